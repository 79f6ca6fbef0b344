"""The sbatch launchers on a real one-node SLURM (Debian's slurm-wlm, installed when missing).

Each test submits the real `slurm/pretrain_1600ep.sh` with its production headers, overriding
only `--nodes=1 --ntasks-per-node=2` (and where logs go), preempts it the way SLURM announces
a time limit (`scancel --signal=USR1 --batch`), and checks that the job checkpoints, requeues
itself under the same id (SLURM_RESTART_COUNT=1), resumes, and trains every step exactly once.
The fake trainer (tests/support/fake_star.py) covers the launcher's decisions in seconds; the last test
does the same with the real `star pretrain` on the smoke preset and compares the exported
weights with those of an uninterrupted run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fake_star import weight_update
from tests.support.slurm_harness import SlurmCluster, install_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "slurm" / "pretrain_1600ep.sh"
ONE_NODE_TWO_TASKS = ("--nodes=1", "--ntasks-per-node=2")
FAKE_STAR = f"{sys.executable} {REPO / 'tests' / 'support' / 'fake_star.py'}"
REAL_STAR = f"{sys.executable} -m star"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why_not = install_slurm()
    if why_not:
        print(f"\n*** SKIPPING the real-SLURM tests: {why_not} ***\n", file=sys.stderr, flush=True)
        pytest.skip(why_not)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


class Job:
    """One submission of the pretraining launcher, with its run directory and log."""

    def __init__(self, cluster: SlurmCluster, work: Path, overrides: str, star_cmd: str = FAKE_STAR,
                 **env: str):
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.cluster, self.run_dir = cluster, work / "run"
        self.id = cluster.submit(PRETRAIN, *ONE_NODE_TWO_TASKS, cwd=work, env={
            "STAR_ROOT": str(REPO), "STAR_CMD": star_cmd, "RUN_DIR": str(self.run_dir),
            "EXTRA": overrides, **env})
        self.log = work / "logs" / f"star-b-1600ep-{self.id}.out"

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def wait(self, predicate, what: str, timeout: float = 60) -> dict[str, str]:
        return self.cluster.wait_for(self.id, predicate, timeout, what, self.log)

    def steps(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for_steps(self, n: int, timeout: float = 60) -> None:
        self.wait(lambda info: len(self.steps()) >= n or info["JobState"] in ENDED,
                  f"{n} trained steps", timeout)
        assert len(self.steps()) >= n, f"job ended before {n} steps:\n{self.log.read_text()}"

    def preempt_and_restart(self, timeout: float = 60) -> None:
        """USR1 to the batch shell, as `--signal=B:USR1@secs` does; then release the requeued job."""
        self.cluster.run("scancel", "--signal=USR1", "--batch", str(self.id))
        info = self.wait(lambda info: info["Restarts"] == "1" or info["JobState"] in ENDED,
                         "requeue (Restarts=1)", timeout)
        assert info["Restarts"] == "1", f"not requeued ({info['JobState']}):\n{self.log.read_text()[-4000:]}"
        self.cluster.release(self.id)

    def wait_done(self, timeout: float = 120) -> dict[str, str]:
        return self.wait(lambda info: info["JobState"] in ENDED, "the end of the job", timeout)


def test_fake_trainer_survives_preemption(cluster, tmp_path):
    steps = 60
    job = Job(cluster, tmp_path, f"steps={steps} step_time=0.1")
    job.wait_for_steps(5)
    job.preempt_and_restart()
    info = job.wait_done()
    log = job.log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log

    records = job.steps()
    assert [r["step"] for r in records] == list(range(steps)), "every step trained exactly once"
    assert {r["restart"] for r in records} == {0, 1}, "trained partly before, partly after the requeue"
    w = 0.0
    for step in range(steps):
        w = weight_update(w, step)
    assert json.loads((job.run_dir / "state.json").read_text()) == {"step": steps, "w": w}

    launches = [json.loads(x) for x in (job.run_dir / "launches.jsonl").read_text().splitlines()]
    assert sorted((x["restart"], x["rank"]) for x in launches) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {x["master_port"] for x in launches} == {str(20000 + job.id % 20000)}
    assert "restart 0 " in log and "restart 1 " in log and "requeueing job" in log, log
    assert log.count("SIGUSR1: saved at step") == 2, "both ranks checkpointed"


def test_failed_training_is_not_requeued(cluster, tmp_path):
    job = Job(cluster, tmp_path, "steps=20 step_time=0.05 fail_at=3")
    info = job.wait_done()
    log = job.log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", log
    assert "FAILED with exit code 3" in log


def test_scancel_is_not_undone_by_a_requeue(cluster, tmp_path):
    job = Job(cluster, tmp_path, "steps=400 step_time=0.05")
    job.wait_for_steps(3)
    cluster.run("scancel", str(job.id))
    info = job.wait_done()
    log = job.log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert "not requeueing" in log, log


def run_star(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "star", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"star {args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


@pytest.fixture(scope="module")
def smoke_shards(tmp_path_factory):
    """A small synthetic ImageNet in the shard format, made by `star synth` + `star shard`."""
    root = tmp_path_factory.mktemp("smoke_data")
    for args in (["synth", "--out", root / "synth", "--classes", "4", "--per-class", "32"],
                 ["shard", "--src", root / "synth" / "train", "--out", root / "shards", "--split", "train",
                  "--shard-bytes", "400000", "--workers", "1"]):
        run_star(*args)
    return root / "shards"


def test_real_pretrain_survives_preemption(cluster, tmp_path, smoke_shards):
    """The real trainer under the real launcher: preempted, requeued, resumed, and ending with
    exactly the weights of an uninterrupted run of the same job."""
    import torch

    env = {"CONFIG": "smoke", "DATA_DIR": str(smoke_shards), "MICRO_IMAGES": "", "OMP_NUM_THREADS": "1"}
    # One sequence of 2 images per rank and step, 8 steps: the launcher, not the model, is on trial.
    total = 8
    overrides = f"batch.global_images=4 batch.micro_images=2 schedule.max_steps={total} log.every_steps=1"
    overrides += " monitor.knn_every_epochs=0"  # the shards hold no val split
    reference = Job(cluster, tmp_path / "reference", overrides, star_cmd=REAL_STAR, **env)
    preempted = Job(cluster, tmp_path / "preempted", overrides, star_cmd=REAL_STAR, **env)
    preempted.wait_for_steps(2, timeout=240)
    preempted.preempt_and_restart(timeout=120)
    for job in (reference, preempted):
        info = job.wait_done(timeout=300)
        assert info["JobState"] == "COMPLETED", job.log.read_text()[-4000:]
    assert reference.info()["Restarts"] == "0"
    log = preempted.log.read_text()
    assert preempted.info()["Restarts"] == "1" and "restart 1 " in log and "requeueing job" in log, log[-4000:]

    steps = [r["step"] for r in preempted.steps()]
    first = 1 if steps[:1] == [1] else 0  # numbered by steps done (1..total) or from 0
    assert steps == [r["step"] for r in reference.steps()] == list(range(first, first + total)), \
        f"every step trained exactly once, in order: {steps}"
    resumed = re.search(r"resumed at step (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < total, "the restart resumed mid-run from a checkpoint"

    weights = []
    for job in (reference, preempted):
        out = job.run_dir / "model.pth"
        run_star("export", job.run_dir, "--out", out)
        weights.append(torch.load(out, weights_only=True))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    different = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
