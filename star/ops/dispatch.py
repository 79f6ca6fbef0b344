"""The one switch between mamba-ssm's fused CUDA kernels and the pure-PyTorch ops.

Rule: a fused kernel runs iff (1) the setting allows it, (2) its module imports and (3) the
tensors are on CUDA. Otherwise the torch implementation in this package runs (any device).

The setting is ``set_kernel_backend("auto" | "torch")`` if it was called, else the
environment variable ``STAR_KERNELS`` (default ``auto``). ``kernel_backend_for(tensor)``
says which path a call would take, for logs and profilers; ``describe_kernels()`` says why.

The official modules are imported lazily, once, on first need: importing mamba-ssm without its
compiled extension fails (``No module named 'selective_scan_cuda'``), which simply means
"torch path".
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .causal_conv1d import causal_conv1d_torch
from .selective_scan import selective_scan_torch

ENV_VAR = "STAR_KERNELS"
BACKENDS = ("auto", "torch")
KERNEL_NAMES = ("selective_scan", "causal_conv1d", "mamba_inner")

_backend_override: str | None = None
# name -> fused function or None; None until first needed. Tests replace it with fakes.
_KERNELS: dict[str, Callable | None] | None = None
_IMPORT_ERRORS: dict[str, str] = {}


def _validate_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_kernel_backend(name: str | None) -> None:
    """Force the torch path ("torch"), allow fused kernels ("auto"), or None to go back to
    the STAR_KERNELS environment variable."""
    global _backend_override
    _backend_override = None if name is None else _validate_backend(name, "kernel backend")


def get_kernel_backend() -> str:
    """The setting in force: "auto" or "torch"."""
    if _backend_override is not None:
        return _backend_override
    return _validate_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto",
                             f"environment variable {ENV_VAR}")


def _import_kernels() -> dict[str, Callable | None]:
    table: dict[str, Callable | None] = dict.fromkeys(KERNEL_NAMES)
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    except (ImportError, OSError, RuntimeError) as err:  # missing or broken CUDA extension
        _IMPORT_ERRORS["mamba_ssm"] = f"{type(err).__name__}: {err}"
    else:
        table["selective_scan"] = selective_scan_fn
        table["mamba_inner"] = mamba_inner_fn
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError, RuntimeError) as err:
        _IMPORT_ERRORS["causal_conv1d"] = f"{type(err).__name__}: {err}"
    else:
        table["causal_conv1d"] = causal_conv1d_fn
    if table["causal_conv1d"] is None:
        table["mamba_inner"] = None  # mamba_inner_fn calls causal-conv1d's extension
    return table


def _kernels() -> dict[str, Callable | None]:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _import_kernels()
    return _KERNELS


def _is_cuda(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def kernel_backend_for(tensor: torch.Tensor, op: str = "mamba_inner") -> str:
    """Which path a call of ``op`` on this tensor takes: "cuda" (fused kernel) or "torch"."""
    if op not in KERNEL_NAMES:
        raise ValueError(f"op must be one of {KERNEL_NAMES}, got {op!r}")
    if get_kernel_backend() == "torch" or not _is_cuda(tensor):
        return "torch"
    return "cuda" if _kernels()[op] is not None else "torch"


def describe_kernels(tensor: torch.Tensor | None = None) -> str:
    """One line for logs: the setting, which fused kernels imported, and why others did not."""
    table = _kernels()
    present = [name for name, fn in table.items() if fn is not None]
    parts = [f"{ENV_VAR}/setting={get_kernel_backend()}",
             f"fused kernels available: {', '.join(present) if present else 'none'}"]
    parts += [f"{module} not importable ({err})" for module, err in _IMPORT_ERRORS.items()]
    if tensor is not None:
        parts.append(f"this tensor ({tensor.device}) -> {kernel_backend_for(tensor)}")
    return "; ".join(parts)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """mamba-ssm's ``selective_scan_fn``: fused on CUDA when available, else the torch scan."""
    if kernel_backend_for(u, "selective_scan") == "cuda":
        return _kernels()["selective_scan"](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                            delta_softplus=delta_softplus,
                                            return_last_state=return_last_state)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)


def causal_conv1d(x, weight, bias=None, activation=None):
    """causal-conv1d's ``causal_conv1d_fn`` (weight (dim, width)): fused on CUDA when
    available, else F.conv1d."""
    if kernel_backend_for(x, "causal_conv1d") == "cuda":
        if weight.dim() == 3:
            weight = weight[:, 0]
        return _kernels()["causal_conv1d"](x, weight, bias, activation=activation)
    return causal_conv1d_torch(x, weight, bias, activation)


def _compose_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                   out_proj_weight, out_proj_bias, A, D, delta_bias, dt_rank, d_state,
                   delta_softplus, conv_fn, scan_fn):
    """The Mamba inner path from its parts (mamba-ssm's ``mamba_inner_ref`` recipe)."""
    x, z = xz.chunk(2, dim=1)
    x = conv_fn(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (batch, L, dt_rank + 2 * d_state)
    dt, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=-1)
    # (d_inner, dt_rank) @ (batch, dt_rank, L): delta comes out contiguous in (batch, d_inner, L),
    # the layout the scans read fastest.
    delta = torch.matmul(delta_proj_weight, dt.transpose(1, 2))
    B = B.transpose(1, 2).contiguous()  # (batch, d_state, L)
    C = C.transpose(1, 2).contiguous()
    y = scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if out_proj_weight is None:
        return y
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                out_proj_weight, out_proj_bias, A, D, delta_bias, dt_rank, d_state,
                delta_softplus=True):
    """The whole Mamba inner path, as mamba-ssm's ``mamba_inner_fn``.

    xz: in_proj output (batch, 2 * d_inner, L), split into x and the gate z. x goes through
    the causal conv (conv1d_weight (d_inner, 1, width) or (d_inner, width)) and SiLU; x_proj
    gives (dt, B, C) of sizes (dt_rank, d_state, d_state); delta = delta_proj_weight @ dt
    (its bias is added in the scan as delta_bias); the scan is gated by SiLU(z). Returns
    out_proj's output (batch, L, d_model), or (batch, d_inner, L) if out_proj_weight is None.
    """
    d_inner = xz.shape[1] // 2
    if xz.dim() != 3 or xz.shape[1] != 2 * d_inner:
        raise ValueError(f"xz must be (batch, 2 * d_inner, L), got {tuple(xz.shape)}")
    if x_proj_weight.shape != (dt_rank + 2 * d_state, d_inner):
        raise ValueError(
            f"x_proj_weight {tuple(x_proj_weight.shape)} does not match dt_rank={dt_rank}, "
            f"d_state={d_state}, d_inner={d_inner}: expected {(dt_rank + 2 * d_state, d_inner)}"
        )
    if delta_proj_weight.shape != (d_inner, dt_rank):
        raise ValueError(f"delta_proj_weight must be {(d_inner, dt_rank)}, "
                         f"got {tuple(delta_proj_weight.shape)}")
    if kernel_backend_for(xz, "mamba_inner") == "cuda":
        kernels = _kernels()
        if out_proj_weight is not None:
            weight3 = conv1d_weight if conv1d_weight.dim() == 3 else conv1d_weight.unsqueeze(1)
            return kernels["mamba_inner"](xz, weight3, conv1d_bias, x_proj_weight, delta_proj_weight,
                                          out_proj_weight, out_proj_bias, A=A, D=D,
                                          delta_bias=delta_bias, delta_softplus=delta_softplus)
        conv_fn, scan_fn = causal_conv1d, selective_scan  # each dispatches to its kernel
    else:
        conv_fn, scan_fn = causal_conv1d_torch, selective_scan_torch
    return _compose_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                          out_proj_weight, out_proj_bias, A, D, delta_bias, dt_rank, d_state,
                          delta_softplus, conv_fn, scan_fn)
