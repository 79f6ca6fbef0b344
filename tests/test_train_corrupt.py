"""Corrupt samples met during training and evaluation: one clear line naming shard and key
with exit code 2 (data.on_corrupt=error), or each one named once, counted per epoch, and left
out of the accuracy (data.on_corrupt=skip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.shards import ShardSet
from star.config import load_config
from star.train.runtime import build_model
from tests.test_train_support import TINY_FINETUNE, TINY_PRETRAIN, read_log, run_star, shard_dir


def corrupt_copy(dst: Path, split: str, position: int) -> str:
    """A copy of the test shards whose sample at manifest ``position`` of ``split`` has its JPEG
    bytes zeroed in place (the tar and index stay consistent); returns "shard:key"."""
    shutil.copytree(shard_dir(), dst)
    shards = ShardSet(dst, split)
    ref = shards.refs[position]
    shard_name, key = shards.name(position)
    tar = shards.shard_paths[ref.shard]
    with open(tar, "r+b") as fh:
        fh.seek(ref.jpg_offset)
        fh.write(b"\0" * ref.jpg_size)
    return f"{shard_name}:{key}"


@pytest.fixture()
def eval_weights(tmp_path) -> Path:
    cfg = load_config("smoke_finetune", [*TINY_FINETUNE, "model.num_classes=4"])
    path = tmp_path / "w.pth"
    torch.save(build_model(cfg).state_dict(), path)
    return path


def test_eval_with_skip_reports_and_excludes_the_corrupt_image(tmp_path, eval_weights):
    name = corrupt_copy(tmp_path / "shards", "val", 3)
    args = ["eval", "--ckpt", str(eval_weights), "--config", "smoke_finetune", "--data", str(tmp_path / "shards"),
            "--json", str(tmp_path / "r.json"), *TINY_FINETUNE, "model.num_classes=4", "data.on_corrupt=skip"]
    assert run_star(args, cwd=tmp_path) == [0], read_log(tmp_path)
    log = read_log(tmp_path)
    assert log.count(f"skipped corrupt sample {name}") == 1, log
    assert "1 corrupt image(s) skipped" in log and "accuracy over the other 19" in log
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 19 and result["skipped_corrupt"] == 1


def test_eval_with_error_is_one_line_exit_2(tmp_path, eval_weights):
    name = corrupt_copy(tmp_path / "shards", "val", 3)
    args = ["eval", "--ckpt", str(eval_weights), "--config", "smoke_finetune", "--data", str(tmp_path / "shards"),
            *TINY_FINETUNE, "model.num_classes=4"]
    assert run_star(args, cwd=tmp_path) == [2], read_log(tmp_path)
    log = read_log(tmp_path)
    shard, key = name.split(":")
    assert f"corrupt sample {key!r} in shard {shard}" in log and "data.on_corrupt=skip" in log
    assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_pretraining_meets_a_corrupt_sample(tmp_path, mode):
    name = corrupt_copy(tmp_path / "shards", "train", 7)
    args = ["pretrain", "--config", "smoke", "--run-dir", str(tmp_path / "run"), *TINY_PRETRAIN,
            f"data.dir={tmp_path / 'shards'}", f"data.on_corrupt={mode}", "schedule.max_steps=6"]
    codes = run_star(args, cwd=tmp_path)
    log = read_log(tmp_path)
    if mode == "error":
        assert codes == [2], log
        shard, key = name.split(":")
        assert f"corrupt sample {key!r} in shard {shard}" in log and "Traceback" not in log
    else:
        assert codes == [0], log
        assert log.count(f"skipped corrupt sample {name}") == 1, log
        assert "epoch 0: 1 corrupt sample(s) skipped" in log, log
