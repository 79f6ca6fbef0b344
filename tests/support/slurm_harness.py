"""A real one-node SLURM cluster in a temporary directory, for testing the sbatch launchers.

Debian's `slurm-wlm` runs slurmctld and slurmd on one box with no munge and no cgroups
(`AuthType=auth/none`, `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`). The node
declares 16 fake GPUs (empty files named in gres.conf) and, through
`SlurmdParameters=config_overrides`, more CPUs and memory than the box has, so the launchers'
production headers (8 GPUs, 12 CPUs per task, 8G per CPU) schedule unchanged, two such jobs
run side by side, and a test only overrides the node and task counts.

    cluster = SlurmCluster(tmp_path)
    cluster.start()
    try:
        job = cluster.submit("slurm/pretrain_1600ep.sh", "--nodes=1", env={...})
        cluster.wait_for(job, lambda info: info["JobState"] == "COMPLETED", timeout=120)
    finally:
        cluster.stop()
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")
# Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def _missing() -> list[str]:
    return [tool for tool in DAEMONS + CLIENTS if not shutil.which(tool, path=PATH)]


def install_slurm() -> str | None:
    """Install Debian's slurm-wlm when missing. Returns None when SLURM is usable, else why not."""
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs slurmd as root (and installs slurm-wlm with apt-get): run as root"
    if not _missing():
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and apt-get is missing (not a Debian/Ubuntu box)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm"]):
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
    missing = _missing()
    return f"slurm-wlm installed but {missing} not found on {PATH}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_job_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints one line of Key=Value pairs; values have no spaces
    except the trailing Command/WorkDir-like fields, which these tests do not need."""
    info: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            info[key] = value
    return info


class SlurmCluster:
    def __init__(self, root: Path, gpus: int = 16, cpus: int = 64, memory_mb: int = 2_000_000):
        self.root = Path(root)
        self.gpus, self.cpus, self.memory_mb = gpus, cpus, memory_mb
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        # Nothing from an enclosing job or launcher leaks in (pytest may itself run under SLURM).
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
                     and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        self.env = dict(inherited, SLURM_CONF=str(self.conf), PATH=PATH)
        self.procs: dict[str, subprocess.Popen] = {}
        self._daemon_logs: list = []

    # ---- configuration ------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "gpus"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            (self.root / "gpus" / f"nvidia{i}").touch()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=startest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=5
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text(
            f"AutoDetect=off\nName=gpu File={r}/gpus/nvidia[0-{self.gpus - 1}]\n")

    # ---- daemons --------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        for name, args in (("slurmctld", ["-D", "-c"]), ("slurmd", ["-D"])):
            out = open(self.root / "log" / f"{name}.out", "w")
            self._daemon_logs.append(out)
            self.procs[name] = subprocess.Popen([name, *args], env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.daemon_logs()}")
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            state = done.stdout.strip()
            if done.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout:.0f}s (state {state!r}):\n{self.daemon_logs()}")

    def stop(self) -> None:
        """Cancel what still runs (a failed test must not leave trainers behind), then stop the
        daemons this cluster started, by their process ids (slurmd first)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", f"--user={getpass.getuser()}"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if done.returncode != 0 or not done.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for out in self._daemon_logs:
            out.close()
        self._daemon_logs.clear()

    def daemon_logs(self, tail: int = 40) -> str:
        text = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            text.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(text)

    # ---- clients --------------------------------------------------------------------------
    def run(self, *args: str) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def submit(self, script: str | Path, *sbatch_args: str, env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None, script_args: tuple[str, ...] = ()) -> int:
        """sbatch SCRIPT with command-line options (which override its #SBATCH headers)."""
        done = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *script_args],
                              env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return parse_job_record(self.run("scontrol", "show", "job", "-o", str(job_id)))

    def wait_for(self, job_id: int, predicate: Callable[[dict[str, str]], bool], timeout: float,
                 what: str = "condition", log: Path | None = None) -> dict[str, str]:
        """Poll the job until predicate(info) holds; on timeout raise with the job and its log."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            time.sleep(0.3)
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else "(no log)"
        raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f}s; "
                           f"state {info.get('JobState')} restarts {info.get('Restarts')}\n"
                           f"--- job log\n{tail}\n{self.daemon_logs(15)}")

    def release(self, job_id: int, timeout: float = 60.0) -> None:
        """Start a requeued job now instead of after its begin time (about 2 minutes).

        Not too early: slurmd rejects a job whose credential is from the same second as the
        revocation of its previous instance ("Job credential revoked") and the job FAILS. So
        wait until the old instance is gone (PENDING, not COMPLETING), plus two seconds."""
        self.wait_for(job_id, lambda info: info["JobState"] == "PENDING", timeout, "requeued job pending")
        time.sleep(2.0)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
