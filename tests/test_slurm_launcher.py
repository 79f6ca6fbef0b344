"""The launchers' decisions, on any box with bash: no SLURM daemons needed.

`slurm/pretrain_1600ep.sh` runs as a plain bash script with SLURM's environment variables set
and stand-ins for `srun` (starts SLURM_NTASKS copies of the command, forwards USR1 to them) and
`scontrol` (prints host names, records requeue requests) first on PATH; the trainer is
tests/support/fake_star.py. The expected behaviour is the exit-code contract of slurm/_common.sh:
0 ends the job, 75 requeues it (below the cap, not after SIGTERM), anything else fails it.
tests/test_slurm.py proves the same on a real SLURM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.fake_star import weight_update

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
PRETRAIN = REPO / "slurm" / "pretrain_1600ep.sh"
FINETUNE = REPO / "slurm" / "finetune.sh"
PROFILE = REPO / "slurm" / "profile.sh"
JOB_ID = 4242
# model.kernels the launchers pass by default: fused where nvidia-smi is found (GPU nodes)
DEFAULT_KERNELS = "fused" if shutil.which("nvidia-smi") else "auto"

FAKE_SRUN = r"""#!/bin/bash
echo "srun $*" >> "$SHIM_LOG"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap ':' TERM
rc=0
for p in "${pids[@]}"; do
    while :; do wait "$p"; r=$?; ((r > 128)) && kill -0 "$p" 2>/dev/null || break; done
    ((r > rc)) && rc=$r
done
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$SHIM_LOG"
case "$1 $2" in
    "show hostnames") printf 'node-a\nnode-b\n' ;;
    requeue*) exit "${SHIM_REQUEUE_RC:-0}" ;;
esac
"""


@pytest.fixture()
def shim(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def launch(shim: Path, overrides: str, restart: int = 0, script: Path = PRETRAIN, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    environ.update(
        PATH=f"{shim / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",  # `python` = this one
        SHIM_LOG=str(shim / "calls.log"),
        SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NAME="star-test", SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="3",
        SLURM_RESTART_COUNT=str(restart), SLURM_SUBMIT_DIR=str(REPO),
        STAR_CMD=f"{sys.executable} {REPO / 'tests' / 'support' / 'fake_star.py'}",
        RUN_DIR=str(shim / "run"), EXTRA=overrides,
    )
    environ.update(env)
    return subprocess.Popen(["bash", str(script), "extra_arg=1"], env=environ, cwd=shim,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def calls(shim: Path) -> list[str]:
    log = shim / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def metric_steps(shim: Path) -> list[int]:
    path = shim / "run" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_steps(shim: Path, n: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(metric_steps(shim)) < n:
        assert proc.poll() is None, f"launcher ended early:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"no {n} steps within {timeout}s"
        time.sleep(0.05)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pretrain_headers_ask_for_a_preemptible_multi_node_job():
    headers = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", PRETRAIN.read_text(), re.M))
    assert headers["nodes"] == "4" and headers["ntasks-per-node"] == "8" and headers["gpus-per-node"] == "8"
    assert "requeue" in headers and headers["open-mode"] == "append"
    assert re.fullmatch(r"B:USR1@\d+", headers["signal"]), headers["signal"]
    assert "%x" in headers["output"] and "%j" in headers["output"]
    assert {"cpus-per-task", "mem-per-cpu", "time"} <= headers.keys()


def test_finished_run_ends_without_requeue_and_gets_the_environment(shim):
    rc, out = finish(launch(shim, "steps=3 step_time=0", DATA_DIR="/data/wds"))
    assert rc == 0, out
    assert not [c for c in calls(shim) if c.startswith("scontrol requeue")], calls(shim)
    srun = [c for c in calls(shim) if c.startswith("srun ")]
    assert len(srun) == 2 and " doctor " in srun[0] and " pretrain " in srun[1], srun  # doctor first
    assert all("--kill-on-bad-exit=0" in c and "--cpus-per-task=3" in c for c in srun)
    launches = [json.loads(x) for x in (shim / "run" / "launches.jsonl").read_text().splitlines()]
    assert sorted(x["rank"] for x in launches) == [0, 1]
    for x in launches:
        assert x["master_addr"] == "node-a" and x["master_port"] == str(20000 + JOB_ID % 20000)
        assert x["config"] == "star_b_1600ep"
        assert x["overrides"] == [f"model.kernels={DEFAULT_KERNELS}", "batch.micro_images=64", "data.dir=/data/wds",
                                  "steps=3", "step_time=0", "extra_arg=1"]
    assert metric_steps(shim) == [0, 1, 2]
    assert "restart 0" in out and "finished (exit 0)" in out


def test_stopped_run_requeues_itself(shim):
    rc, out = finish(launch(shim, "steps=10 step_time=0 stop_at=4"))
    assert rc == 0, out
    assert [c for c in calls(shim) if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]
    assert metric_steps(shim) == [0, 1, 2, 3, 4]
    # The requeued instance (SLURM_RESTART_COUNT=1) resumes and finishes: every step exactly once.
    rc, out = finish(launch(shim, "steps=10 step_time=0 stop_at=4", restart=1))
    assert rc == 0 and "restart 1" in out, out
    assert metric_steps(shim) == list(range(10))


def test_usr1_to_the_batch_shell_reaches_every_task_and_requeues(shim):
    proc = launch(shim, "steps=400 step_time=0.02")
    wait_for_steps(shim, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 0, out
    assert "received SIGUSR1" in out and out.count("SIGUSR1: saved at step") == 2, out
    assert [c for c in calls(shim) if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]
    steps = metric_steps(shim)
    assert 3 <= len(steps) < 400 and steps == list(range(len(steps)))
    state = json.loads((shim / "run" / "state.json").read_text())
    w = 0.0
    for step in range(len(steps)):
        w = weight_update(w, step)
    assert state == {"step": len(steps), "w": w}


def test_task_killed_by_the_forwarded_usr1_is_still_requeued(shim):
    # A rank that has not installed its handler yet dies of USR1 (srun exits 128 + 10); the
    # newest complete checkpoint is intact, so the job must come back rather than fail.
    proc = launch(shim, "steps=400 step_time=0.02 handle_signals=0")
    wait_for_steps(shim, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 0 and "died of the forwarded SIGUSR1" in out, out
    assert [c for c in calls(shim) if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]


def test_requeue_cap_stops_requeueing(shim):
    rc, out = finish(launch(shim, "steps=10 step_time=0 stop_at=2", restart=3, MAX_RESTARTS="3"))
    assert rc == 75, out
    assert not [c for c in calls(shim) if c.startswith("scontrol requeue")]
    assert "MAX_RESTARTS=3" in out


def test_failure_is_not_requeued(shim):
    rc, out = finish(launch(shim, "steps=10 step_time=0 fail_at=2"))
    assert rc == 3, out
    assert not [c for c in calls(shim) if c.startswith("scontrol requeue")]
    assert "FAILED with exit code 3" in out


def test_sigterm_from_slurm_is_not_requeued(shim):
    # scancel / preemption / time limit: SLURM sends TERM to the batch shell and to every task.
    proc = launch(shim, "steps=400 step_time=0.02")
    wait_for_steps(shim, 3, proc)
    for pid in (proc.pid, *_descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # a short-lived helper (date) already gone
            pass
    rc, out = finish(proc)
    assert rc == 75, out
    assert out.count("SIGTERM: saved at step") == 2, out
    assert not [c for c in calls(shim) if c.startswith("scontrol requeue")]
    assert "not requeueing" in out


def test_failed_requeue_is_reported(shim):
    rc, out = finish(launch(shim, "steps=10 step_time=0 stop_at=2", SHIM_REQUEUE_RC="1"))
    assert rc == 75 and "scontrol requeue failed" in out, out


def test_finetune_needs_init(shim):
    rc, out = finish(launch(shim, "steps=3 step_time=0", script=FINETUNE))
    assert rc == 2 and "INIT is not set" in out, out
    assert not [c for c in calls(shim) if c.startswith("srun")], "nothing launched"


@pytest.mark.parametrize("ema", [False, True])
def test_finetune_then_eval(shim, ema):
    extra = "steps=3 step_time=0" + (" ema.enabled=true" if ema else "")
    rc, out = finish(launch(shim, extra, script=FINETUNE, INIT="runs/pre", DATA_DIR="/d"))
    assert rc == 0, out
    run = shim / "run"
    launches = [json.loads(x) for x in (run / "launches.jsonl").read_text().splitlines()]
    assert {x["config"] for x in launches} == {"finetune_b"}
    assert launches[0]["overrides"] == [f"model.kernels={DEFAULT_KERNELS}", "data.dir=/d", *extra.split(),
                                        "extra_arg=1"]
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    expected = [(str(run), "/d", False, str(run / "eval.json"))] * 2  # one record per rank
    if ema:
        expected += [(str(run), "/d", True, str(run / "eval_ema.json"))] * 2
    assert [(e["ckpt"], e["data"], e["ema"], e["json"]) for e in evals] == expected
    assert not [c for c in calls(shim) if c.startswith("scontrol requeue")]


def test_finetune_evaluates_on_the_data_the_run_used(shim):
    rc, out = finish(launch(shim, "steps=2 step_time=0 data.dir=/from/extra", script=FINETUNE, INIT="x"))
    assert rc == 0, out
    evals = [json.loads(x) for x in (shim / "run" / "eval.jsonl").read_text().splitlines()]
    assert {e["data"] for e in evals} == {"/from/extra"}


def test_stopped_finetune_requeues_before_eval(shim):
    rc, out = finish(launch(shim, "steps=10 step_time=0 stop_at=2", script=FINETUNE, INIT="runs/pre"))
    assert rc == 0, out
    assert [c for c in calls(shim) if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]
    assert not (shim / "run" / "eval.jsonl").exists()


def test_profile_runs_one_task_per_gpu(shim):
    rc, out = finish(launch(shim, "", script=PROFILE, DATA_DIR="/d", PROFILE_ARGS="--batches 5"))
    assert rc == 0, out
    lines = sorted(line for line in out.splitlines() if line.startswith("[fake rank"))
    assert lines == [f"[fake rank {r}] profile all --config star_b_1600ep --data /d --batches 5 extra_arg=1"
                     for r in (0, 1)], out


# --- star doctor before training, and the kernels setting ------------------------------------

def doctor_runs(shim: Path) -> list[dict]:
    path = shim / "doctor.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("script", [PRETRAIN, FINETUNE], ids=lambda p: p.name)
def test_doctor_runs_on_every_task_before_training(shim, script):
    rc, out = finish(launch(shim, "steps=2 step_time=0", script=script, INIT="runs/pre", DATA_DIR="/d",
                            FAKE_DOCTOR_LOG=str(shim / "doctor.jsonl")))
    assert rc == 0, out
    srun = [c for c in calls(shim) if c.startswith("srun ")]
    assert " doctor " in srun[0] and (" pretrain " in srun[1] or " finetune " in srun[1]), srun
    runs = doctor_runs(shim)
    assert sorted(r["rank"] for r in runs) == [0, 1]  # one srun over all tasks
    config = "star_b_1600ep" if script == PRETRAIN else "finetune_b"
    launches = [json.loads(x) for x in (shim / "run" / "launches.jsonl").read_text().splitlines()]
    device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    for r in runs:  # the doctor checks the very config and overrides the training gets
        assert r["args"] == ["--device", device, "--config", config, "--json", str(shim / "run" / "doctor.json"),
                             "--data", "/d", *launches[0]["overrides"]]
    assert out.index("doctor: all checks passed") < out.index("resuming at step 0")


def test_doctor_runs_again_on_every_start(shim):
    env = dict(FAKE_DOCTOR_LOG=str(shim / "doctor.jsonl"))
    assert finish(launch(shim, "steps=6 step_time=0 stop_at=2", **env))[0] == 0
    assert finish(launch(shim, "steps=6 step_time=0 stop_at=2", restart=1, **env))[0] == 0
    assert sorted(r["rank"] for r in doctor_runs(shim)) == [0, 0, 1, 1]
    assert metric_steps(shim) == list(range(6))


def test_doctor_0_skips_the_doctor(shim):
    rc, out = finish(launch(shim, "steps=2 step_time=0", DOCTOR="0", FAKE_DOCTOR_LOG=str(shim / "doctor.jsonl")))
    assert rc == 0, out
    assert doctor_runs(shim) == [] and "DOCTOR=0: skipping star doctor" in out
    assert [c for c in calls(shim) if c.startswith("srun ")] and \
        all(" doctor " not in c for c in calls(shim) if c.startswith("srun "))
    assert metric_steps(shim) == [0, 1]


@pytest.mark.parametrize("script", [PRETRAIN, FINETUNE], ids=lambda p: p.name)
def test_failing_doctor_ends_the_job_without_training_or_requeue(shim, script):
    rc, out = finish(launch(shim, "steps=2 step_time=0", script=script, INIT="runs/pre", FAKE_DOCTOR_FAIL="1"))
    assert rc == 1, out  # the job's exit code is the doctor's
    assert "star doctor FAILED (exit 1)" in out and "not requeueing" in out, out
    assert not [c for c in calls(shim) if c.startswith("scontrol requeue")]
    assert not (shim / "run" / "launches.jsonl").exists(), "training must not start"
    assert [c for c in calls(shim) if c.startswith("srun ")] == [c for c in calls(shim) if " doctor " in c]


@pytest.fixture()
def gpu_shim(shim):
    """The stand-ins plus an `nvidia-smi`, as on a GPU node."""
    smi = shim / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/bash\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    smi.chmod(0o755)
    return shim


@pytest.mark.parametrize("kernels, expected", [(None, "fused"), ("auto", "auto"), ("torch", "torch")])
def test_gpu_nodes_train_and_check_with_fused_kernels_unless_relaxed(gpu_shim, kernels, expected):
    env = dict(FAKE_DOCTOR_LOG=str(gpu_shim / "doctor.jsonl"), **({"KERNELS": kernels} if kernels else {}))
    rc, out = finish(launch(gpu_shim, "steps=2 step_time=0", **env))
    assert rc == 0, out
    launches = [json.loads(x) for x in (gpu_shim / "run" / "launches.jsonl").read_text().splitlines()]
    assert {x["overrides"][0] for x in launches} == {f"model.kernels={expected}"}
    for r in doctor_runs(gpu_shim):
        assert r["args"][:2] == ["--device", "cuda"] and f"model.kernels={expected}" in r["args"]


def test_kernels_setting_can_be_overridden_by_extra_and_is_validated(shim):
    rc, out = finish(launch(shim, "steps=2 step_time=0 model.kernels=torch"))
    assert rc == 0, out
    overrides = json.loads((shim / "run" / "launches.jsonl").read_text().splitlines()[0])["overrides"]
    assert overrides.index("model.kernels=torch") > overrides.index(f"model.kernels={DEFAULT_KERNELS}")  # later wins
    rc, out = finish(launch(shim, "steps=2 step_time=0", KERNELS="fast"))
    assert rc == 2 and "KERNELS=fast" in out, out
    assert not [c for c in calls(shim) if "fast" in c and c.startswith("srun")]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
