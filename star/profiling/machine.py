"""What a measurement ran on (hardware, software versions, host, date) and the GPU's peak.

Peak dense bf16 tensor-core TFLOP/s (no sparsity), from NVIDIA's data sheets. Matched
against ``torch.cuda.get_device_name()``, first matching pattern wins, so the more specific
variants come first (``H100 NVL`` and ``H100 PCIe`` before the SXM ``H100``, ``H200 NVL``
before ``H200``: the NVL cards peak at 835, the SXM modules at 989). A GPU not in the
table has no MFU unless ``--peak-tflops`` gives its peak; neither has a CPU.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import socket
import subprocess

import torch

from star.ops import describe_kernels
from star.train.run_info import dali_version, installed_version

# (regular expression on the device name, peak dense bf16 TFLOP/s, variant)
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"GH200", 989.0, "GH200 (H100 SXM class)"),
    (r"H200.*NVL", 835.0, "H200 NVL"),   # "NVIDIA H200 NVL": PCIe card, lower clocks and power
    (r"H200", 989.0, "H200 SXM"),       # "NVIDIA H200"
    (r"H100.*NVL", 835.0, "H100 NVL"),
    (r"H100.*PCI[Ee]", 756.0, "H100 PCIe"),
    (r"H100", 989.0, "H100 SXM"),       # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"
    (r"H800.*PCI[Ee]", 756.0, "H800 PCIe"),
    (r"H800", 989.0, "H800 SXM"),
    (r"A100", 312.0, "A100 (SXM4 / PCIe, 40 / 80 GB)"),
    (r"A800", 312.0, "A800"),
)

# distributions whose versions a result records (DALI's name carries its CUDA major version)
PACKAGES = ("torch", "deepspeed", "mamba-ssm", "causal-conv1d", "webdataset", "numpy", "pillow")


def lookup_peak_tflops(device_name: str) -> tuple[float | None, str | None]:
    """(peak dense bf16 TFLOP/s, matched variant) for a CUDA device name, or (None, None)."""
    for pattern, tflops, variant in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, variant
    return None, None


def resolve_peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """The peak to compute MFU against, and where it came from (for the report)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return override, "--peak-tflops"
    if device != "cuda":
        return None, "n/a on CPU (give --peak-tflops to compute MFU)"
    name = torch.cuda.get_device_name()
    peak, variant = lookup_peak_tflops(name)
    if peak is None:
        return None, f"{name!r} is not in the peak table (give --peak-tflops)"
    return peak, f"table: {variant}, dense bf16"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = sorted(set(out.stdout.split()))
    return ", ".join(versions) or None


def describe_machine(device: str = "cpu") -> dict:
    """Host, date, CPU / GPU models and counts, driver, CUDA and package versions."""
    info: dict = {
        "hostname": socket.gethostname(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": {name: installed_version(name) for name in PACKAGES} | {"nvidia-dali": dali_version()},
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_model=names[torch.cuda.current_device()], gpu_count=len(names), gpu_names=names,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", nvidia_driver=_nvidia_driver())
    else:
        info.update(gpu_model=None, gpu_count=0)
    info["kernels"] = describe_kernels()
    return info


def machine_slug(info: dict) -> str:
    """A short folder-safe name: ``<gpu or cpu model>-<date>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-23``."""
    model = info.get("gpu_model") or info.get("cpu_model") or "machine"
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]
    return f"{slug}-{info['date_utc'][:10]}"
