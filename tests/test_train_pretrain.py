"""`star pretrain` end to end on CPU: 2-rank DeepSpeed ZeRO-2 over `star synth` shards, the
non-finite-step skip, and `star export`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.test_train_support import (
    REPO,
    TINY_PRETRAIN,
    assert_bit_identical,
    metrics,
    read_log,
    run_star,
    shard_dir,
    star_env,
    weights,
)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero2_pretraining_loss_goes_down(tmp_path):
    run_dir = tmp_path / "run"
    # 96 images / 16 per step = 6 steps per epoch; 2 ranks x 4 images x 2 accumulation.
    args = ["pretrain", "--config", "smoke", "--run-dir", str(run_dir), f"data.dir={shard_dir()}",
            *TINY_PRETRAIN, "batch.global_images=16", "batch.micro_images=4", "schedule.epochs=4",
            "schedule.warmup_epochs=1", "optim.base_lr=2e-2", "checkpoint.every_steps=5",
            "ds_config=cpu_zero2_fp32"]
    codes = run_star(args, cwd=tmp_path, world_size=2)
    assert codes == [0, 0], read_log(tmp_path, rank=0)[-3000:] + read_log(tmp_path, rank=1)[-3000:]
    log = read_log(tmp_path)
    assert "2 rank(s) x 4 images x 2 accumulation" in log
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 25))
    assert not any(r["skipped"] for r in records)
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < 0.85 * first, (first, last)
    # the loss split (image clusters / separators) is logged next to the total (docs/fidelity.md)
    assert all(r["loss_image"] > 0 and r["loss_sep"] >= 0 for r in records)
    assert "loss-image" in log and "loss-sep" in log
    # ZeRO-2 wrote one optimizer shard per rank; `latest` names the final step.
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_000000024"
    assert sorted(p.name for p in (ckpt / "step_000000024").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    kept = sorted(p.name for p in ckpt.glob("step_*"))
    assert kept == ["step_000000020", "step_000000024"]  # saves at 5, 6, 10, 12, ...; keep_last=2
    # `star export` consolidates the shards into the model's own names.
    out = tmp_path / "model.pth"
    proc = subprocess.run([sys.executable, "-m", "star", "export", str(run_dir), "--out", str(out)],
                          cwd=tmp_path, env=star_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = torch.load(out, weights_only=True)
    from star.config import load_config
    from star.models import to_arm_state_dict
    from star.train.runtime import build_model

    model = build_model(load_config("smoke", TINY_PRETRAIN))
    assert list(exported) == list(to_arm_state_dict(model.state_dict()))  # ARM's names, same order
    model.load_state_dict(exported)
    assert_bit_identical(exported, weights(run_dir))
    # the consolidated weights are the fp32 master weights of the ZeRO shards, not the init
    initial = build_model(load_config("smoke", TINY_PRETRAIN)).state_dict()
    assert not torch.equal(exported["layers.0.mixer.in_proj.weight"], initial["layers.0.mixer.in_proj.weight"])


NAN_SCRIPT = """
import sys, torch
from pathlib import Path
from star.config import load_config
from star.train.runtime import build_model, run_training

nan_calls = {int(x) for x in sys.argv[2].split(",") if x}

class NanAt(torch.nn.Module):
    '''The real model, with the loss of chosen forward calls replaced by NaN.'''
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0
    def no_weight_decay(self):
        return {"model." + n for n in self.model.no_weight_decay()}
    def forward(self, images):
        out = self.model(images)
        self.calls += 1
        if self.calls - 1 in nan_calls:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

cfg = load_config("smoke", sys.argv[3:])
sys.exit(run_training(cfg, Path(sys.argv[1]), model_factory=lambda c: NanAt(build_model(c))))
"""


def _run_nan(tmp_path, name: str, nan_calls: list[int], overrides: list[str]) -> tuple[int, str]:
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / name), ",".join(map(str, nan_calls)),
                           f"data.dir={shard_dir()}", *TINY_PRETRAIN, "batch.global_images=16",
                           "batch.micro_images=8", "ds_config=cpu_zero2_fp32", *overrides],
                          cwd=tmp_path, env=star_env(), capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_nonfinite_step_is_skipped_exactly_and_repeated_ones_stop_the_run(tmp_path):
    # Micro-batch 7 is the second half of step 4 (2 micro-batches per step): the whole step is
    # skipped, so 4 steps with a NaN in step 4 end with the weights (and AdamW states) of 3 steps.
    code, out = _run_nan(tmp_path, "nan", [7], ["schedule.max_steps=4"])
    assert code == 0, out[-3000:]
    records = metrics(tmp_path / "nan")
    assert [r["skipped"] for r in records] == [False, False, False, True]
    code, out = _run_nan(tmp_path, "ref", [], ["schedule.max_steps=3"])
    assert code == 0, out[-3000:]
    assert_bit_identical(weights(tmp_path / "nan"), weights(tmp_path / "ref"))

    # From step 4 on every step is bad; with max_nonfinite_in_row=3 the run saves after step 6
    # and exits 76, holding the weights of step 3 (the reference run above).
    from star.train import EXIT_NONFINITE

    code, out = _run_nan(tmp_path, "diverged", list(range(6, 40)), ["max_nonfinite_in_row=3"])
    assert code == EXIT_NONFINITE, out[-3000:]
    assert "3 non-finite steps in a row" in out
    records = metrics(tmp_path / "diverged")
    assert [r["skipped"] for r in records] == [False, False, False, True, True, True]
    assert (tmp_path / "diverged" / "checkpoints" / "latest").read_text().strip() == "step_000000006"
    assert_bit_identical(weights(tmp_path / "diverged"), weights(tmp_path / "ref"))


def test_bad_override_exits_2_and_names_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "star", "pretrain", "--config", "smoke",
                           "--run-dir", str(tmp_path / "r"), "optim.base_lrr=1"],
                          cwd=REPO, env=star_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optim.base_lrr" in proc.stderr and "optim.base_lr" in proc.stderr
