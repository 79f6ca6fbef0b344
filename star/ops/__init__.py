"""Mamba kernels: fused CUDA (mamba-ssm, causal-conv1d) when available, pure PyTorch otherwise.

Call these, never the backends directly, so that one switch (``STAR_KERNELS`` /
``set_kernel_backend``) decides for the whole program; see ``dispatch.py``.
"""

from .causal_conv1d import causal_conv1d_torch
from .dispatch import (
    KERNEL_SETTINGS,
    KernelsUnavailable,
    causal_conv1d,
    describe_kernel_plan,
    describe_kernels,
    get_kernel_backend,
    kernel_backend_for,
    kernel_paths,
    kernel_status,
    mamba_inner,
    require_kernels,
    selective_scan,
    set_kernel_backend,
)
from .selective_scan import selective_scan_torch

__all__ = [
    "KERNEL_SETTINGS",
    "KernelsUnavailable",
    "causal_conv1d",
    "causal_conv1d_torch",
    "describe_kernel_plan",
    "describe_kernels",
    "get_kernel_backend",
    "kernel_backend_for",
    "kernel_paths",
    "kernel_status",
    "mamba_inner",
    "require_kernels",
    "selective_scan",
    "selective_scan_torch",
    "set_kernel_backend",
]
