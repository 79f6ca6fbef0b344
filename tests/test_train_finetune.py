"""`star finetune` from an ARM-format checkpoint on synthetic data, and `star eval` counting
every validation image exactly once on 1 and 2 ranks."""

from __future__ import annotations

import argparse
import json
import signal

import pytest
import torch

from tests.test_train_support import (
    CLASSES,
    TINY_FINETUNE,
    VAL_PER_CLASS,
    interrupt,
    metrics,
    read_log,
    run_star,
    shard_dir,
)

ARM_KW = dict(embed_dim=32, depth=2, img_size=64)


def _arm_checkpoint(path):
    """A file shaped like ARM's official checkpoint-1599.pth: {"model": state_dict, ...}."""
    from star.models import create_model, to_arm_state_dict

    torch.manual_seed(0)
    model = create_model("arm_tiny_pz8", **ARM_KW)
    state = to_arm_state_dict(model.state_dict())  # ARM's top-level decoder names
    args = argparse.Namespace(model="arm_base_pz16", batch_size=128, blr=1.5e-4)  # as MAE's save_model does
    torch.save({"model": state, "epoch": 1599, "args": args}, path)
    return state


def test_arm_format_state_dict_loads_into_the_classifier(tmp_path):
    from star.config import load_config
    from star.train.runtime import build_model
    from star.train.weights import read_weights

    source = _arm_checkpoint(tmp_path / "checkpoint-1599.pth")
    state = read_weights(tmp_path / "checkpoint-1599.pth")  # weights_only=True under the hood
    assert state.keys() == source.keys()
    cfg = load_config("smoke_finetune", TINY_FINETUNE + ["model.num_classes=4", "model.cls_position=middle"])
    model = build_model(cfg)
    report = model.load_pretrained(state, verbose=False)
    loaded = model.state_dict()
    for name in ("layers.0.mixer.in_proj.weight", "layers.1.mlp.fc1.weight", "patch_embed.proj.weight",
                 "layers.1.mixer.A_log"):
        if name in source:
            assert torch.equal(loaded[name], source[name]), name
    assert torch.equal(loaded["layers.0.mixer.in_proj.weight"], source["layers.0.mixer.in_proj.weight"])
    assert any(k.startswith("dec_block") or k.startswith("ar_") for k in report.dropped_keys + report.unexpected_keys)
    assert all(k.startswith(("head", "norm", "cls_token", "pos_embed")) for k in report.missing_keys), report


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_from_arm_checkpoint_beats_chance_and_eval_counts_exactly(tmp_path):
    _arm_checkpoint(tmp_path / "checkpoint-1599.pth")
    run_dir = tmp_path / "ft"
    args = ["finetune", "--config", "smoke_finetune", "--run-dir", str(run_dir),
            "--init", str(tmp_path / "checkpoint-1599.pth"), f"data.dir={shard_dir()}", *TINY_FINETUNE,
            "model.cls_position=middle", "schedule.epochs=4", "schedule.warmup_epochs=1",
            "optim.base_lr=2e-2", "eval_every_epochs=2", "ds_config=cpu_zero2_fp32"]
    # stopped with SIGUSR1 in epoch 1 and resumed: the resume machinery with EMA, best-so-far,
    # and the mixup generator's state in the checkpoint
    assert interrupt(args, run_dir, cwd=tmp_path, log_name="first", at_step=8, sig=signal.SIGUSR1) == [75], \
        read_log(tmp_path, "first")[-4000:]
    log = read_log(tmp_path, "first")
    assert "init from" in log and "checkpoint-1599.pth" in log
    assert run_star(args, cwd=tmp_path) == [0], read_log(tmp_path)[-4000:]
    assert "resumed at step" in read_log(tmp_path) and "init from" not in read_log(tmp_path)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 25))
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [1, 3]
    final = evals[-1]
    assert final["images"] == CLASSES * VAL_PER_CLASS
    chance = 100.0 / CLASSES
    assert max(final["top1"], final["ema_top1"]) >= 2 * chance, evals
    assert (run_dir / "best.pth").is_file()
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert max(best["top1"], best["ema_top1"]) == max(max(e["top1"], e["ema_top1"]) for e in evals)

    # `star eval` on 2 ranks (started from SLURM's variables) and on 1 rank (EMA weights): 20 images
    # (not a multiple of the batch) counted once each, and the same predictions as the trainer's
    # own evaluation of the final weights.
    out = tmp_path / "eval2.json"
    codes = run_star(["eval", "--ckpt", str(run_dir), "--data", str(shard_dir()), "--batch-size", "8",
                      "--json", str(out)], cwd=tmp_path, world_size=2, log_name="eval2", launcher="slurm")
    assert codes == [0, 0], read_log(tmp_path, "eval2")[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["images"] == CLASSES * VAL_PER_CLASS == two["num_samples"]
    assert two["top1"] == pytest.approx(final["top1"]) and two["top5"] == 100.0  # 4 classes: top-5 is all
    out = tmp_path / "eval1.json"
    assert run_star(["eval", "--ckpt", str(run_dir), "--data", str(shard_dir()), "--ema", "--batch-size", "8",
                     "--json", str(out)], cwd=tmp_path, log_name="eval1") == [0], read_log(tmp_path, "eval1")
    one = json.loads(out.read_text())
    assert one["images"] == CLASSES * VAL_PER_CLASS and one["top1"] == pytest.approx(final["ema_top1"])
