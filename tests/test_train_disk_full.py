"""A full disk during a checkpoint save: one clear message, exit 74, and a clean resume.

On a small tmpfs (when the test runs as root) a real run fills the disk; elsewhere, and for
the write-failure path, a fault-injecting engine stands in for DeepSpeed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from star.train import checkpoint as ckpt_mod
from star.train.checkpoint import Checkpointer, CheckpointWriteError, tag_for

REPO = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


class FullDiskEngine:
    """DeepSpeed's save as it fails on a full disk: torch's stream writer error, a partial file."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(100, 100)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                           "basic_ios::clear: iostream error")


def test_write_failure_on_a_full_disk_names_the_device_and_the_size(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "run", rank=0, keep_last=2)
    free = iter([10**9, 100])  # enough before the write, nothing after it
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**9, 0, next(free, 100)))
    with pytest.raises(CheckpointWriteError) as err:
        ckpt.save(FullDiskEngine(), 5, {"ema": None})
    message = str(err.value)
    assert message.startswith("no space left on ") and str(tmp_path / "run" / "checkpoints" / tag_for(5)) in message
    # (100*100 + 100) parameters x 16 bytes (fp32 module + master + two moments) x 1.10 headroom
    assert f"needs about {ckpt_mod._human(int(10100 * 16 * 1.10))} " in message, message
    assert "173.6 KB" in message
    assert "iostream" not in message and not ckpt.pointer.exists()


def test_precheck_refuses_before_writing_anything(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "run", rank=0, keep_last=1)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: Usage(10**9, 0, 1000))

    class Engine(FullDiskEngine):
        def save_checkpoint(self, *a, **k):
            raise AssertionError("nothing may be written when the space is known to be short")

    with pytest.raises(CheckpointWriteError, match="no space left"):
        ckpt.save(Engine(), 1, {"ema": None})


def test_other_write_errors_are_named_not_called_disk_full(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", rank=0, keep_last=1)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*iostream error"):
        ckpt.save(FullDiskEngine(), 1, {"ema": None})


def test_uncommitted_step_folders_are_removed(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", rank=0, keep_last=1)
    for step in (1, 2, 3):
        (ckpt.dir / tag_for(step)).mkdir(parents=True)
    ckpt._commit(tag_for(1))
    removed = ckpt.remove_uncommitted(ckpt.latest_tag())
    assert sorted(p.name for p in removed) == [tag_for(2), tag_for(3)]
    assert sorted(p.name for p in ckpt.dir.iterdir() if p.is_dir()) == [tag_for(1)]


def _star(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "star", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_real_run_on_a_small_tmpfs_stops_with_74_and_resumes(tmp_path):
    data = tmp_path / "data"
    for args in (["synth", "--out", str(data / "img"), "--classes", "2", "--per-class", "16", "--val-per-class", "2"],
                 ["shard", "--src", str(data / "img" / "train"), "--out", str(data / "shards"), "--split", "train"]):
        assert _star(*args, cwd=tmp_path).returncode == 0
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)], check=True)
    try:
        run = small / "run"
        common = ["pretrain", "--config", "smoke", "--run-dir", str(run), f"data.dir={data / 'shards'}",
                  "checkpoint.every_steps=1", "checkpoint.keep_last=1", "schedule.max_steps=3", "log.tensorboard=false",
                  "monitor.knn_every_epochs=0"]  # no val split here: monitor off
        first = _star(*common, cwd=tmp_path)
        assert first.returncode == 74, first.stdout + first.stderr
        out = first.stdout + first.stderr
        assert "no space left on tmpfs" in out and "Traceback" not in out
        assert (run / "checkpoints" / "latest").read_text().strip() == tag_for(1)
        (run / "checkpoints" / tag_for(2)).mkdir(exist_ok=True)  # as a save killed half-way leaves it
        (run / "checkpoints" / tag_for(2) / "junk").write_bytes(b"x" * 1000)
        subprocess.run(["mount", "-o", "remount,size=120m", str(small)], check=True)
        second = _star(*common, cwd=tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "resumed at step 1" in second.stdout + second.stderr
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        assert steps == [1, 2, 3], steps
        assert (run / "checkpoints" / "latest").read_text().strip() == tag_for(3)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
