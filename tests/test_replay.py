"""`star replay` (star/train/replay.py): a replayed step reproduces the run's logged loss and grad
norm bit for bit on CPU (the reference is the uninterrupted training run's own metrics.jsonl),
also across an epoch boundary; a replayed faulty step finds the origin module, micro-batch and
sample keys of the run's report; the run directory is left untouched; mistakes exit 2 in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from star.config import ConfigError, load_config, read_yaml_file
from star.train.checkpoint import Checkpointer, tag_for
from star.train.replay import TEST_FAULTS_ENV, choose_checkpoint
from star.train.replay import main as replay_main
from star.train.runtime import build_data_loader, build_model
from star.train.weights import consolidate_run
from tests.test_safe_load import plant
from tests.test_train_elastic import REL_TOL
from tests.test_train_nonfinite import SCRIPT
from tests.test_train_support import (
    REPO,
    TINY_FINETUNE,
    TINY_PRETRAIN,
    metrics,
    read_log,
    run_star,
    shard_dir,
    star_env,
)

# 96 images, 16 per step in 2 micro-batches of 8: 6 steps per epoch. Checkpoints every 2 steps,
# at the epoch end (6) and at the end (9), all kept. drop_path > 0: the replay must redraw the masks.
OVERRIDES = ["batch.global_images=16", "batch.micro_images=8", "ds_config=cpu_zero2_fp32", "model.drop_path=0.2",
             "schedule.max_steps=9", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
# A fault in step 4's second micro-batch (forward call 7 of the run: step c // 2 + 1, micro c % 2).
FAULT_STEP, FAULT_MICRO, FAULT_MODULE = 4, 1, "layers.1.mlp.w2"


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _replay(args: list[str], cwd, env_extra: dict | None = None, timeout: float = 400):
    return subprocess.run([sys.executable, "-m", "star", "replay", *args], cwd=cwd, env=star_env(env_extra),
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """A 9-step single-process run with an inf out of layers.1.mlp.w2 at step 4 (skipped)."""
    tmp = tmp_path_factory.mktemp("replay")
    script = tmp / "faults.py"
    script.write_text(SCRIPT)
    faults = [{"module": FAULT_MODULE, "calls": [(FAULT_STEP - 1) * 2 + FAULT_MICRO]}]
    proc = subprocess.run([sys.executable, str(script), str(tmp / "run"), json.dumps(faults),
                           f"data.dir={shard_dir()}", *TINY_PRETRAIN, *OVERRIDES],
                          cwd=tmp, env=star_env(), capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return tmp / "run"


@pytest.mark.slow
def test_replay_reproduces_logged_steps_and_the_nonfinite_origin(faulty_run, tmp_path):
    run = faulty_run
    records = {r["step"]: r for r in metrics(run)}
    assert [records[s]["skipped"] for s in range(1, 10)] == [s == FAULT_STEP for s in range(1, 10)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == \
        [tag_for(s) for s in (2, 4, 6, 8, 9)]
    before = _tree_digest(run)

    # step 8: from checkpoint 6, trains step 7, then step 8; loss and grad norm bit for bit
    proc = _replay([str(run), "--step", "8", "--device", "cpu", "--out", str(tmp_path / "a"),
                    "--json", str(tmp_path / "a.json")], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["checkpoint"] == tag_for(6) and result["nonfinite"] is False
    assert result["loss"] == records[8]["loss"] and result["grad_norm"] == records[8]["grad_norm"]
    assert result["loss_equal"] is True and result["grad_norm_equal"] is True and result["lr_equal"] is True
    assert (result["epoch"], result["step_in_epoch"]) == (records[8]["epoch"], records[8]["step_in_epoch"])
    replayed = {r["step"]: r for r in metrics(tmp_path / "a" / "replay" / "step_8")}
    assert sorted(replayed) == [7, 8] and replayed[7]["loss"] == records[7]["loss"]
    assert json.loads((tmp_path / "a" / "replay" / "step_8" / "replay.json").read_text()) == result
    assert "replayed step 8" in proc.stderr and "bit for bit" in proc.stderr

    # the faulty step 4 with the fault put back at the same (step, micro-batch): from checkpoint
    # 2, step 3 trained, step 4 diagnosed: the run's report's module, micro-batch and keys
    fault = [{"module": FAULT_MODULE, "step": FAULT_STEP, "micro_batch": FAULT_MICRO}]
    proc = _replay([str(run), "--step", str(FAULT_STEP), "--device", "cpu", "--out", str(tmp_path / "b"),
                    "--json", str(tmp_path / "b.json")], tmp_path, {TEST_FAULTS_ENV: json.dumps(fault)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "b.json").read_text())
    report = json.loads((run / "nonfinite" / f"step_{FAULT_STEP}" / "report.json").read_text())
    assert result["checkpoint"] == tag_for(2) and result["nonfinite"] is True and result["loss"] == "nan"
    assert result["loss_equal"] is True  # nan as logged
    assert result["first_nonfinite_forward"] == report["first_nonfinite_forward"]
    assert result["first_nonfinite_forward"]["module"] == FAULT_MODULE
    assert result["micro_batch"] == report["micro_batch"] == FAULT_MICRO
    assert result["keys"][FAULT_MICRO] == report["keys"]["0"]
    assert result["steps_on_the_way"] == [{"step": 3, "loss": records[3]["loss"], "logged_loss": records[3]["loss"],
                                           "same": True}]
    assert "first non-finite forward : layers.1.mlp.w2" in proc.stderr

    # across an epoch boundary, from an older checkpoint (a copy without step 6): steps 5, 6,
    # (epoch 1) 7 trained, step 8 replayed: the same numbers again
    older = tmp_path / "older"
    shutil.copytree(run, older)
    shutil.rmtree(older / "checkpoints" / tag_for(6))
    proc = _replay([str(older), "--step", "8", "--device", "cpu", "--fp32", "--kernels", "torch",
                    "--out", str(tmp_path / "c"), "--json", str(tmp_path / "c.json")], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["checkpoint"] == tag_for(4)
    assert result["loss"] == records[8]["loss"] and result["grad_norm"] == records[8]["grad_norm"]
    assert [s["step"] for s in result["steps_on_the_way"]] == [5, 6, 7]
    assert all(s["logged_loss"] == records[s["step"]]["loss"] == s["loss"] for s in result["steps_on_the_way"])
    assert result["dtype_path"]["autocast"] is None and result["dtype_path"]["kernel_path"] == "torch"

    assert _tree_digest(run) == before  # nothing written into the run directory


def _fake_run(root, steps=(2, 4, 6), last=9):
    """A run directory with the files `star replay` checks before start-up (empty pickles):
    config.yaml, metrics.jsonl up to ``last``, complete 1-rank checkpoints at ``steps``."""
    root.mkdir(parents=True, exist_ok=True)
    load_config("smoke", [*TINY_PRETRAIN, f"data.dir={shard_dir()}"]).save(root / "config.yaml")
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                for s in range(1, last + 1)))
    for s in steps:
        d = root / "checkpoints" / tag_for(s)
        d.mkdir(parents=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank00000.pt"):
            torch.save({}, d / name)
    (root / "checkpoints" / "latest").write_text(tag_for(max(steps)) + "\n")
    return root


def test_kept_steps_are_the_complete_committed_ones(tmp_path):
    run = _fake_run(tmp_path, steps=(2, 4, 6))
    (run / "checkpoints" / "latest").write_text(tag_for(4) + "\n")      # step 6: an uncommitted save
    (run / "checkpoints" / tag_for(2) / "rng_rank00000.pt").unlink()    # step 2: incomplete
    assert Checkpointer(run, rank=0, keep_last=1).kept_steps() == [4]
    assert choose_checkpoint(run, 6) == 4 and choose_checkpoint(run, 5) == 4
    with pytest.raises(ConfigError, match="kept: steps 4"):
        choose_checkpoint(run, 4)


def test_replay_refuses_in_one_line_before_start_up(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    before = _tree_digest(run)
    cases = {
        ("--step", "2"): "no checkpoint at or before step 1 ",
        ("--step", "10"): "never ran it (",
        ("--step", "0"): "numbered from 1",
        ("--step", "5", "--device", "cpu", "--kernels", "fused"): "fused kernels need CUDA tensors",
        ("--step", "5", "--data-dir", str(tmp_path / "nowhere")): "train.json",
    }
    for args, expected in cases.items():
        assert replay_main([str(run), *args, "--out", str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("star replay: error:") and expected in lines[0], lines
    assert replay_main([str(run), "--step", "2"]) == 2
    assert "complete checkpoints kept: steps 2, 4, 6" in capsys.readouterr().err
    assert replay_main([str(tmp_path / "nowhere"), "--step", "3"]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
    assert replay_main([str(run), "--step", "5", "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _tree_digest(run) == before
    assert not (tmp_path / "out").exists()  # refused before anything was created

    # a planted pickle in the checkpoint to load: refused by name, never executed
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / tag_for(4) / "rng_rank00000.pt", marker)
    assert replay_main([str(run), "--step", "5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "rng_rank00000.pt" in err and len(err.strip().splitlines()) == 1 and not marker.exists()


def test_replay_is_a_star_command():
    proc = subprocess.run([sys.executable, "-m", "star", "replay", "--help"], env=star_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--fp32" in proc.stdout and "--kernels" in proc.stdout
    assert "replay" in subprocess.run([sys.executable, "-m", "star", "--help"], env=star_env(), cwd=REPO,
                                      capture_output=True, text=True, timeout=120, check=False).stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_rank_run_replays_on_one_process_within_tolerance(tmp_path):
    """2 ranks x 4 images x 2 micro-batches, replayed as 1 x 4 x 4 from the re-partitioned
    checkpoint: the same samples, sums in another order. Drop path off (its per-rank streams are
    re-seeded on another world size, star/train/elastic.py). Tolerance as tests/test_train_elastic.py:
    the two orders differ by about 4e-8 relative on a loss; REL_TOL = 1e-5."""
    run = tmp_path / "run"
    args = ["pretrain", "--config", "smoke", "--run-dir", str(run), f"data.dir={shard_dir()}", *TINY_PRETRAIN,
            "batch.global_images=16", "batch.micro_images=4", "model.drop_path=0.0", "ds_config=cpu_zero2_fp32",
            "schedule.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    assert run_star(args, cwd=tmp_path, world_size=2, log_name="two") == [0, 0], read_log(tmp_path, "two")[-3000:]
    records = {r["step"]: r for r in metrics(run)}
    proc = _replay([str(run), "--step", "4", "--device", "cpu", "--out", str(tmp_path / "out"),
                    "--json", str(tmp_path / "r.json")], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["checkpoint"] == tag_for(2) and result["trained_world_size"] == 2
    assert result["exact_expected"] is False and "from a 2-rank checkpoint on 1 ranks" in proc.stderr
    for step, loss in [(3, result["steps_on_the_way"][0]["loss"]), (4, result["loss"])]:
        assert abs(loss - records[step]["loss"]) <= REL_TOL * abs(records[step]["loss"]), (step, loss)
    assert abs(result["grad_norm"] - records[4]["grad_norm"]) <= 1e-4 * records[4]["grad_norm"]
    assert result["lr"] == records[4]["lr"]


@pytest.mark.slow
def test_fp32_runs_step_s_without_autocast_from_the_runs_own_weights(tmp_path):
    """A bf16-autocast run on CPU (ds_config=zero2_bf16), no drop path: the replay of step 3
    reproduces it bit for bit, and with --fp32 step 3's loss is that of a float32 forward of the
    run's weights after step 2 (checkpoint step 2, consolidated), computed here directly on step
    3's micro-batches from the loader; the bf16 forward of the same weights is the other answer."""
    run = tmp_path / "run"
    args = ["pretrain", "--config", "smoke", "--run-dir", str(run), f"data.dir={shard_dir()}", *TINY_PRETRAIN,
            "batch.global_images=16", "batch.micro_images=8", "model.drop_path=0.0", "ds_config=zero2_bf16",
            "schedule.max_steps=3", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    assert run_star(args, cwd=tmp_path, log_name="bf16") == [0], read_log(tmp_path, "bf16")[-3000:]
    logged = {r["step"]: r for r in metrics(run)}[3]
    results = {}
    for name, extra in [("bf16", []), ("fp32", ["--fp32"])]:
        proc = _replay([str(run), "--step", "3", "--device", "cpu", *extra, "--json", str(tmp_path / f"{name}.json")],
                       tmp_path)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["bf16"]["loss"] == logged["loss"] and results["bf16"]["dtype_path"]["autocast"] == "bfloat16"
    assert results["fp32"]["dtype_path"]["autocast"] is None and results["fp32"]["changed_for_step"]

    cfg = load_config(base=read_yaml_file(run / "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(consolidate_run(run, tag=tag_for(2)))
    model.train()
    loader = build_data_loader(cfg, "pretrain", cfg.data.train_split, 8, rank=0, world_size=1, device="cpu")
    batches = iter(loader.epoch(0, start_step=2 * 2))  # step 3 = loader steps 4 and 5 of epoch 0
    fp32, bf16 = [], []
    with torch.no_grad():
        for _ in range(2):
            images = next(batches).images
            fp32.append(float(model(images)["loss"]))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16.append(float(model(images)["loss"].float()))
    ref32, ref16 = sum(fp32) / 2, sum(bf16) / 2
    assert abs(ref32 - ref16) > 1e-5  # bf16 makes a visible difference here
    assert results["fp32"]["loss"] == pytest.approx(ref32, rel=1e-6, abs=0)
    assert results["bf16"]["loss"] == pytest.approx(ref16, rel=1e-6, abs=0)


@pytest.mark.slow
def test_a_finetuning_run_replays_exactly_across_an_evaluated_epoch_end(tmp_path):
    """Fine-tuning (mixup generator, EMA, evaluation at the epoch end of step 6): the checkpoint at
    step 6 removed, step 8 is replayed from step 3; the skipped evaluation must not shift any
    random stream, so steps 4-7 and 8 equal the run's metrics.jsonl bit for bit."""
    run = tmp_path / "ft"
    args = ["finetune", "--config", "smoke_finetune", "--run-dir", str(run), f"data.dir={shard_dir()}",
            *TINY_FINETUNE, "schedule.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep_last=10",
            "ds_config=cpu_zero2_fp32", "ema.enabled=true"]
    assert run_star(args, cwd=tmp_path, log_name="ft") == [0], read_log(tmp_path, "ft")[-3000:]
    assert (run / "eval.jsonl").is_file()  # the run did evaluate at the end of epoch 0
    shutil.rmtree(run / "checkpoints" / tag_for(6))
    records = {r["step"]: r for r in metrics(run)}
    proc = _replay([str(run), "--step", "8", "--device", "cpu", "--json", str(tmp_path / "r.json")], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["checkpoint"] == tag_for(3) and records[7]["epoch"] == 1
    on_the_way = [(s["step"], s["loss"]) for s in result["steps_on_the_way"]]
    assert on_the_way == [(s, records[s]["loss"]) for s in (4, 5, 6, 7)]
    assert result["loss"] == records[8]["loss"] and result["grad_norm"] == records[8]["grad_norm"]
