"""What a run started on, recorded once per start: ``RUN_DIR/run_info.json``, the first
``metrics.jsonl`` record of the start (key ``run_info``) and one log line on rank 0.

The record holds the versions that decide speed and numerics (torch, its CUDA, mamba-ssm,
causal-conv1d, DALI with its CUDA flavour, DeepSpeed, NCCL), the kernel path each Mamba op
takes and why (``star.ops.require_kernels``'s plan), each rank's device and the world size.
A run that fell back to the slow PyTorch scan on a GPU says so here instead of silently
running several times slower (docs/design.md, "One kernel switch").
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import socket
from pathlib import Path

import torch

from star.ops import describe_kernel_plan
from star.train.distributed import DistEnv, all_gather_objects

# distribution name -> key in the record (DALI is found by prefix: its name carries CUDA's major)
DISTRIBUTIONS = {"torch": "torch", "mamba-ssm": "mamba_ssm", "causal-conv1d": "causal_conv1d",
                 "deepspeed": "deepspeed"}


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (pip name), None when absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def dali_version() -> str | None:
    """``"2.4.0 (nvidia-dali-cuda120)"``: the version and the distribution, whose name says
    which CUDA major the wheel was built for; None when DALI is not installed."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return None


def nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def collect_versions() -> dict:
    """Installed versions (None: not installed). ``cuda`` is the CUDA torch was built with."""
    versions = {key: installed_version(dist) for dist, key in DISTRIBUTIONS.items()}
    versions["torch"] = torch.__version__  # the running one (a source build has no metadata)
    versions.update(cuda=torch.version.cuda, dali=dali_version(), nccl=nccl_version())
    return versions


def local_device(device: str) -> dict:
    """This process's device: host, device string and its name (GPU model, or "cpu")."""
    info = {"host": socket.gethostname(), "device": str(device)}
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["name"] = "cpu"
    return info


def collect_run_info(kernel_plan: dict, dist_env: DistEnv, device: str) -> dict:
    """The start's record. Collective: every rank must call it (it gathers the devices)."""
    devices = all_gather_objects(local_device(device))
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "world_size": dist_env.world_size,
        "launcher": dist_env.source,
        "versions": collect_versions(),
        "kernels": kernel_plan,
        "devices": [dict(d, rank=r) for r, d in enumerate(devices)],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }


def write_run_info(run_dir: Path, info: dict) -> Path:
    """RUN_DIR/run_info.json (this start's; a resumed run rewrites it), written atomically."""
    path = Path(run_dir) / "run_info.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def run_info_log_lines(info: dict) -> list[str]:
    """What rank 0 prints at start: the kernel paths and the software/hardware in two lines."""
    v = {k: value or "not installed" for k, value in info["versions"].items()}
    names = sorted({d["name"] for d in info["devices"]})
    cuda = f"CUDA {v['cuda']}, NCCL {v['nccl']}" if info["versions"]["cuda"] else "CPU build"
    return [describe_kernel_plan(info["kernels"]),
            f"torch {v['torch']} ({cuda}), mamba-ssm {v['mamba_ssm']}, causal-conv1d {v['causal_conv1d']}, "
            f"DALI {v['dali']}, DeepSpeed {v['deepspeed']}; {info['world_size']} rank(s) on {', '.join(names)}"]
