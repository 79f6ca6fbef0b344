"""The package works installed from a wheel (not editable): presets and DeepSpeed configs ship
inside it, and one training step runs from a directory outside the repository."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from star.train.engine import DS_CONFIG_DIR, resolve_ds_config_path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "star", "data_prep", "pipelines")  # what the build reads
TINY = ["model.embed_dim=32", "model.depth=2", "model.img_size=64", "data.num_threads=1", "log.tensorboard=false"]


def test_ds_configs_are_package_data():
    star_dir = REPO / "star"
    assert DS_CONFIG_DIR.parent == star_dir, "the DeepSpeed configs must live inside the package"
    for device in ("cpu", "cuda"):
        assert resolve_ds_config_path("auto", device).parent == DS_CONFIG_DIR
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["star"]
    shipped = {p for pattern in package_data for p in star_dir.glob(pattern)}
    assert set(DS_CONFIG_DIR.glob("*.json")) <= shipped and set((star_dir / "configs").glob("*.yaml")) <= shipped
    # the top-level folder documents them and holds no second copy that could drift
    assert not list((REPO / "ds_configs").glob("*.json"))


def _run(cmd: list, *, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
@pytest.mark.distributed
def test_wheel_installs_and_trains_one_step_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")

    # 1. a wheel from a copy of the sources (an in-tree build would write build/ into the checkout)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", tmp_path / "dist", src], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("star_pretrain-*.whl")

    # 2. a fresh venv holding only the wheel; its dependencies (torch, DeepSpeed, DALI, ...) come from
    # this interpreter's site-packages through a .pth line. A directory named in a .pth file is only
    # appended to sys.path (its own .pth files are not run), so the editable install there stays off.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env)
    python, star = venv / "bin" / "python", venv / "bin" / "star"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=env).stdout.strip())
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
         cwd=tmp_path, env=env)
    work = tmp_path / "work"  # outside the repository: nothing there to import from
    work.mkdir()
    where = json.loads(_run([python, "-c", "import json, star, star.train.engine as e; "
                             "print(json.dumps([star.__file__, str(e.resolve_ds_config_path('auto', 'cpu'))]))"],
                            cwd=work, env=env).stdout)
    for path in where:
        assert Path(path).is_relative_to(site), f"{path} is not from the installed wheel in {site}"

    # 3. tiny synthetic shards and one pretraining step with ds_config=auto, all through the wheel's `star`
    _run([star, "synth", "--out", "images", "--classes", "2", "--per-class", "8", "--val-per-class", "2"],
         cwd=work, env=env)
    _run([star, "shard", "--src", "images/train", "--out", "shards", "--split", "train", "--workers", "1"],
         cwd=work, env=env)
    _run([star, "pretrain", "--config", "smoke", "--run-dir", "run", "data.dir=shards", "schedule.max_steps=1",
          "monitor.knn_every_epochs=0", *TINY], cwd=work, env=env)  # no val split here: monitor off
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and steps[-1]["step"] == 1
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert (work / "run" / "checkpoints" / "latest").is_file()
