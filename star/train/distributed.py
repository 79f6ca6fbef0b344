"""Process-group setup from torchrun's variables, SLURM's, or none (a single process).

Order of precedence: RANK / WORLD_SIZE (torchrun, the deepspeed launcher) when present;
otherwise SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with MASTER_ADDR from the first host
of SLURM_JOB_NODELIST and MASTER_PORT = 20000 + job_id % 20000 (explicit MASTER_* win);
otherwise one process on localhost with a free port. The resolved values are written back
into os.environ so that DeepSpeed and torch.distributed read the same ones.

Stale variables. sbatch exports the submitting shell's environment, so a RANK / WORLD_SIZE
left over from an interactive torchrun session reaches every SLURM task. Inside an srun step
(SLURM_STEP_ID set) without a launcher of its own (torchrun and the deepspeed launcher leave
their own marker variables), such a RANK / WORLD_SIZE must agree with SLURM_PROCID /
SLURM_NTASKS, or the run stops with :class:`InconsistentDistEnv` instead of hanging in a
rendezvous that half the ranks never join. The slurm/ launchers unset them before srun.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

from star.config import ConfigError

# Variables a process launcher sets next to RANK / WORLD_SIZE: their presence means RANK came
# from a launcher running inside the job (torchrun: LOCAL_WORLD_SIZE, GROUP_RANK, TORCHELASTIC_*;
# deepspeed's launcher: CROSS_RANK, LOCAL_SIZE), not from the submitting shell.
LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK", "LOCAL_SIZE")
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class InconsistentDistEnv(ConfigError):
    """RANK / WORLD_SIZE that contradict SLURM's task layout (left over from another shell)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``.

    Handles the compressed form SLURM writes (prefix with a bracketed list of numbers or
    zero-padded ranges); anything more exotic falls back to ``scontrol show hostnames``.
    """
    nodelist = nodelist.strip()
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match:
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            return prefix
        first = ranges.split(",")[0].split("-")[0]
        if first.isdigit():
            return prefix + first
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_dist_env(environ: dict | None = None) -> DistEnv:
    """Work out rank, world size, local rank and the rendezvous address (no side effects)."""
    env = os.environ if environ is None else environ
    _check_not_stale(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 29500))
        return DistEnv(rank, world, local, addr, port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        job_id = int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", 0)))
        port = int(env.get("MASTER_PORT") or 20000 + job_id % 20000)
        return DistEnv(rank, world, local, addr, port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def _check_not_stale(env) -> None:
    in_srun_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    if not in_srun_step or any(marker in env for marker in LAUNCHER_MARKERS):
        return
    given = {name: env[name] for name in RANK_VARIABLES if name in env}
    if not given:
        return
    slurm = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
             "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    wrong = [f"{name}={value} (SLURM says {slurm[name]})" for name, value in given.items()
             if str(value) != str(slurm[name])]
    if wrong:
        raise InconsistentDistEnv(
            f"{', '.join(wrong)}: these variables were inherited from the shell that submitted the job "
            f"and contradict this srun task; run `unset RANK WORLD_SIZE LOCAL_RANK` before sbatch "
            f"(the slurm/ launchers do) or launch with torchrun")


def export_dist_env(dist_env: DistEnv) -> None:
    os.environ.update(RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size),
                      LOCAL_RANK=str(dist_env.local_rank), MASTER_ADDR=dist_env.master_addr,
                      MASTER_PORT=str(dist_env.master_port))


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu`` (and tell DeepSpeed so)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no GPU; use device=cpu or device=auto")
    if name == "cpu":
        # DeepSpeed picks its accelerator at import time; without this it warns and guesses.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return name


def init_distributed(device: str, *, use_deepspeed: bool = True) -> DistEnv:
    """Initialise the default process group (gloo on CPU, nccl on GPU) and return who we are."""
    import torch
    import torch.distributed as dist

    dist_env = resolve_dist_env()
    export_dist_env(dist_env)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(dist_env.local_rank)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=dist_env.rank, world_size=dist_env.world_size)
    return dist_env


def init_inference(device: str) -> tuple[DistEnv, str]:
    """Process group for the commands that only run forward passes (`star eval`, `star probe`):
    gloo / NCCL without DeepSpeed when there are several ranks. Returns who we are and this
    rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    dist_env = resolve_dist_env()
    if dist_env.world_size > 1:
        dist_env = init_distributed(device, use_deepspeed=False)
    if device == "cuda":
        import torch

        device = f"cuda:{dist_env.local_rank}"
        torch.cuda.set_device(dist_env.local_rank)
    return dist_env, device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: str = "cpu") -> list[float]:
    """Sum a few floats over all ranks (identity in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
