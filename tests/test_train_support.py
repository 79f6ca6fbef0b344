"""Helpers shared by the training tests (this module holds no tests): synthetic shards from
`star synth` + `star shard`, tiny-model overrides, and launching `star` commands as 1..N ranks
with torchrun's environment variables (DeepSpeed on the CPU accelerator, gloo)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# A model small enough for CPU tests: the tiny preset at 64 px (8 x 8 patches of 8 px, 4 clusters),
# 32 wide and 2 deep (the pretraining model keeps 4 decoder blocks).
TINY_PRETRAIN = ["model.embed_dim=32", "model.depth=2", "model.img_size=64", "log.tensorboard=false",
                 "data.num_threads=1"]
TINY_FINETUNE = ["model.embed_dim=32", "model.depth=2", "model.img_size=64", "log.tensorboard=false",
                 "data.num_threads=1"]
TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 24, 5, 4  # 96 train images, 20 val (not a multiple of 8)


@functools.cache
def shard_dir() -> Path:
    """Shards of a 4-class `star synth` tree, built once per test process."""
    root = Path(tempfile.mkdtemp(prefix="star_train_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    from data_prep import shard, synth

    assert synth.main(["--out", str(root / "src"), "--classes", str(CLASSES), "--per-class",
                       str(TRAIN_PER_CLASS), "--val-per-class", str(VAL_PER_CLASS)]) == 0
    for split in ("train", "val"):
        assert shard.main(["--src", str(root / "src" / split), "--out", str(root / "shards"),
                           "--split", split, "--workers", "1", "--check", "markers"]) == 0
    return root / "shards"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def star_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or key.startswith("SLURM_"):
            env.pop(key, None)
    env.update(extra or {})
    return env


def free_slurm_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id % 20000) is free right now."""
    for _ in range(200):
        port = random.randrange(20000, 40000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port + 20000  # then 20000 + id % 20000 == port
    raise RuntimeError("no free port in 20000-39999")


def spawn(args: list[str], *, world_size: int = 1, cwd: Path, log_name: str = "log",
          launcher: str = "torchrun") -> list[subprocess.Popen]:
    """Start `python -m star ARGS` as ``world_size`` ranks (each with its own log file in cwd),
    described by torchrun's variables or (``launcher="slurm"``) only by SLURM's."""
    port = str(free_port())
    job_id = str(free_slurm_job_id())
    procs = []
    for rank in range(world_size):
        if world_size == 1:
            dist = {}
        elif launcher == "slurm":
            dist = dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank),
                        SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id)
        else:
            dist = dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(Path(cwd) / f"{log_name}.rank{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "star", *args], cwd=cwd, env=star_env(dist),
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], cwd: Path, log_name: str = "log", timeout: float = 240) -> list[int]:
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return codes


def run_star(args: list[str], *, cwd: Path, world_size: int = 1, log_name: str = "log",
             timeout: float = 240, launcher: str = "torchrun") -> list[int]:
    procs = spawn(args, world_size=world_size, cwd=cwd, log_name=log_name, launcher=launcher)
    return wait_all(procs, cwd, log_name, timeout)


def steps_logged(run_dir: Path) -> int:
    """The last step in RUN_DIR/metrics.jsonl (0 before the first)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def interrupt(args: list[str], run_dir: Path, *, cwd: Path, log_name: str, at_step: int, sig: int) -> list[int]:
    """Start a single-rank run, send ``sig`` once ``at_step`` is logged, return the exit codes."""
    procs = spawn(args, cwd=cwd, log_name=log_name)
    deadline = time.time() + 240
    while steps_logged(run_dir) < at_step:
        assert procs[0].poll() is None, read_log(cwd, log_name)[-3000:]
        assert time.time() < deadline, "run did not reach the step in time"
        time.sleep(0.05)
    os.kill(procs[0].pid, sig)
    return wait_all(procs, cwd, log_name)


def read_log(cwd: Path, log_name: str = "log", rank: int = 0) -> str:
    return (Path(cwd) / f"{log_name}.rank{rank}.txt").read_text()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    from star.train.weights import consolidate_run

    return consolidate_run(run_dir, ema=ema)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"

