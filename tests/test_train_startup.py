"""Checks that run before DeepSpeed starts: bad input costs seconds, not a cluster allocation."""

from pathlib import Path


def _star(*args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "star", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_global_batch_larger_than_the_data_is_refused_before_start(tmp_path):
    data = tmp_path / "data"
    assert _star("synth", "--out", str(data / "img"), "--classes", "2", "--per-class", "3", "--val-per-class", "1",
                 cwd=tmp_path).returncode == 0
    assert _star("shard", "--src", str(data / "img" / "train"), "--out", str(data / "shards"), "--split", "train",
                 cwd=tmp_path).returncode == 0
    done = _star("pretrain", "--config", "smoke", "--run-dir", str(tmp_path / "run"), f"data.dir={data / 'shards'}",
                 cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "has 6 images, fewer than one optimizer step of batch.global_images=16" in done.stderr
    assert "Traceback" not in done.stderr and "DeepSpeed" not in done.stdout + done.stderr
