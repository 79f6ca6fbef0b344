"""Resuming is exact: a run killed with SIGKILL at a random step, or stopped with SIGUSR1
(exit 75), and started again in the same run dir ends with bit-identical weights, EMA and
per-step losses to an uninterrupted run (single rank, CPU, fp32)."""

from __future__ import annotations

import random
import signal

import pytest

from star.train import EXIT_STOPPED
from tests.test_train_support import (
    TINY_PRETRAIN,
    assert_bit_identical,
    interrupt,
    metrics,
    read_log,
    run_star,
    shard_dir,
    steps_logged,
    weights,
)

STEPS = 12  # 96 images / 16 per step = 6 steps per epoch, 2 epochs


def _args(run_dir):
    # drop path and EMA on, so RNG state and EMA state must be restored too; 2 micro-batches per step
    return ["pretrain", "--config", "smoke", "--run-dir", str(run_dir), f"data.dir={shard_dir()}",
            *TINY_PRETRAIN, "batch.global_images=16", "batch.micro_images=8", "schedule.epochs=2",
            "schedule.warmup_epochs=1", "model.drop_path=0.2", "ema.enabled=true", "ema.decay=0.9",
            "checkpoint.every_steps=2", "checkpoint.keep_last=2", "ds_config=cpu_zero2_fp32"]


def _interrupt(tmp_path, name: str, at_step: int, sig: int) -> list[int]:
    return interrupt(_args(tmp_path / name), tmp_path / name, cwd=tmp_path, log_name=name, at_step=at_step, sig=sig)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    assert run_star(_args(tmp / "run"), cwd=tmp) == [0], read_log(tmp)[-3000:]
    return tmp / "run"


def _assert_same_run(resumed, reference):
    assert_bit_identical(weights(resumed), weights(reference))
    assert_bit_identical(weights(resumed, ema=True), weights(reference, ema=True))
    ours, theirs = metrics(resumed), metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # replayed steps appear once
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in ours] == \
        [(r["loss"], r["lr"], r["grad_norm"]) for r in theirs]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference):
    # a fresh random step on every test run; from step 3 on, the step-2 checkpoint is committed
    at_step = random.Random().randint(3, STEPS - 2)
    print(f"SIGKILL after step {at_step} is logged")
    codes = _interrupt(tmp_path, "killed", at_step, signal.SIGKILL)
    assert codes == [-signal.SIGKILL]
    run_dir = tmp_path / "killed"
    assert steps_logged(run_dir) < STEPS
    assert run_star(_args(run_dir), cwd=tmp_path, log_name="resumed") == [0], read_log(tmp_path, "resumed")[-3000:]
    assert "resumed at step" in read_log(tmp_path, "resumed")
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sigusr1_saves_exits_75_and_resumes_bit_identical(tmp_path, reference):
    codes = _interrupt(tmp_path, "stopped", 3, signal.SIGUSR1)
    assert codes == [EXIT_STOPPED], read_log(tmp_path, "stopped")[-3000:]
    run_dir = tmp_path / "stopped"
    log = read_log(tmp_path, "stopped")
    assert "stop requested (SIGUSR1)" in log
    stopped_at = steps_logged(run_dir)
    # the checkpoint is taken at the step the stop was agreed on, not at the last periodic save
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:09d}"
    assert run_star(_args(run_dir), cwd=tmp_path, log_name="resumed") == [0]
    assert f"resumed at step {stopped_at}" in read_log(tmp_path, "resumed")
    _assert_same_run(run_dir, reference)
    # a finished run started again does nothing and exits 0
    assert run_star(_args(run_dir), cwd=tmp_path, log_name="again") == [0]
    assert "finished at step 12" in read_log(tmp_path, "again")
