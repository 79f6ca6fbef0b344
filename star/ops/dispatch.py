"""The one switch between mamba-ssm's fused CUDA kernels and the pure-PyTorch ops.

Rule: a fused kernel runs iff (1) the setting allows it, (2) it passed the import probe and
(3) the tensors are on CUDA. Otherwise the torch implementation in this package runs (any device).

The setting is ``set_kernel_backend("auto" | "torch")`` if it was called, else the
environment variable ``STAR_KERNELS`` (default ``auto``). ``kernel_backend_for(tensor)``
says which path a call would take, for logs and profilers; ``describe_kernels()`` (one line)
and ``kernel_status()`` (a dict) say why.

The official modules are imported lazily, once, on first need, and *probed*: a kernel is
registered only if what mamba-ssm itself will call is there, because a successful
``import causal_conv1d`` proves nothing about mamba-ssm's own binding to it:

* causal-conv1d 1.5.1 changed its C++ entry point (it takes an ``out`` tensor) and mamba-ssm
  2.2.5 switched to it. mamba-ssm >= 2.2.5 with an older (or missing) causal-conv1d leaves
  ``selective_scan_interface.causal_conv1d_fwd_function`` None and ``mamba_inner_fn``
  asserts; mamba-ssm <= 2.2.4 has no such name and calls the old entry point, a TypeError
  with causal-conv1d >= 1.5.1. Both are probed here (pin: the ``cuda`` extra in pyproject).
* ``selective_scan_interface.selective_scan_cuda`` (the compiled scan) must not be None.
* Any exception during the import counts as "not available", with its text recorded:
  recent mamba-ssm imports Triton/TileLang-based modules at package import, and
  causal-conv1d >= 1.5.1 uses ``torch.library.custom_op`` (an AttributeError before torch 2.4).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from star.errors import ConfigError

from .causal_conv1d import causal_conv1d_torch
from .selective_scan import selective_scan_torch

ENV_VAR = "STAR_KERNELS"
BACKENDS = ("auto", "torch")
KERNEL_NAMES = ("selective_scan", "causal_conv1d", "mamba_inner")
# What the fused path is known to work with (the ``cuda`` extra in pyproject.toml).
MIN_VERSIONS = {"mamba_ssm": "2.2.5", "causal_conv1d": "1.5.1"}
_FIX = "install mamba-ssm>=2.2.5 with causal-conv1d>=1.5.1 (pip install -e '.[cuda]')"

_backend_override: str | None = None
# name -> fused function or None; None until first needed. Tests replace it with fakes.
_KERNELS: dict[str, Callable | None] | None = None
# Why each unavailable kernel is unavailable (kernel name -> text); filled with _KERNELS.
_REASONS: dict[str, str] = {}
# Module name -> version string, or None if it did not import; filled with _KERNELS.
_VERSIONS: dict[str, str | None] = {}


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


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _module_version(name: str) -> str | None:
    module = sys.modules.get(name)
    return getattr(module, "__version__", "unknown") if module is not None else None


_MISSING = object()


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe_mamba_ssm(table: dict, reasons: dict) -> None:
    """Register selective_scan / mamba_inner if mamba-ssm's interface module has what its
    own functions call."""
    try:
        import mamba_ssm.ops.selective_scan_interface as ssi  # optional heavy package
    except Exception as err:  # noqa: BLE001 - any failure means "torch path", with the reason
        text = f"mamba_ssm not importable ({_error_text(err)})"
        reasons["selective_scan"] = reasons["mamba_inner"] = text
        return
    version = _VERSIONS["mamba_ssm"] = _module_version("mamba_ssm")
    if getattr(ssi, "selective_scan_cuda", None) is None:
        text = f"mamba_ssm {version}: its compiled scan (selective_scan_cuda) is missing"
        reasons["selective_scan"] = reasons["mamba_inner"] = text
        return
    table["selective_scan"] = ssi.selective_scan_fn
    conv_fwd = getattr(ssi, "causal_conv1d_fwd_function", _MISSING)
    if conv_fwd is _MISSING:
        reasons["mamba_inner"] = (
            f"mamba_ssm {version} predates 2.2.5: its mamba_inner_fn calls causal-conv1d's "
            f"pre-1.5.1 C++ entry point (TypeError with causal-conv1d>=1.5.1); {_FIX}")
    elif conv_fwd is None:
        reasons["mamba_inner"] = (
            f"mamba_ssm {version} found no usable causal-conv1d (its causal_conv1d_fwd_function "
            f"is None: causal-conv1d missing, broken or older than 1.5.1); {_FIX}")
    else:
        table["mamba_inner"] = ssi.mamba_inner_fn


def _probe_causal_conv1d(table: dict, reasons: dict) -> None:
    try:
        from causal_conv1d import causal_conv1d_fn  # optional heavy package
    except Exception as err:  # noqa: BLE001
        reasons["causal_conv1d"] = f"causal_conv1d not importable ({_error_text(err)})"
        return
    _VERSIONS["causal_conv1d"] = _module_version("causal_conv1d")
    if causal_conv1d_fn is None:
        reasons["causal_conv1d"] = "causal_conv1d imported but its causal_conv1d_fn is None"
        return
    table["causal_conv1d"] = causal_conv1d_fn


def _import_kernels() -> dict[str, Callable | None]:
    table: dict[str, Callable | None] = dict.fromkeys(KERNEL_NAMES)
    _REASONS.clear()
    _VERSIONS.clear()
    _VERSIONS.update(dict.fromkeys(MIN_VERSIONS))
    _probe_mamba_ssm(table, _REASONS)
    _probe_causal_conv1d(table, _REASONS)
    return table


def _kernels() -> dict[str, Callable | None]:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _import_kernels()
    return _KERNELS


def _is_cuda(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


@contextlib.contextmanager
def _kernel_table(table: dict[str, Callable | None]) -> Iterator[None]:
    """Test seam: route calls through ``table`` (name -> function or None) whatever the
    tensors' device, e.g. mamba-ssm's pure-PyTorch references on CPU. Not for production."""
    global _KERNELS, _is_cuda
    saved = _KERNELS, _is_cuda
    _KERNELS = {name: table.get(name) for name in KERNEL_NAMES}
    _is_cuda = lambda tensor: True  # noqa: E731
    try:
        yield
    finally:
        _KERNELS, _is_cuda = saved


def kernel_backend_for(tensor: torch.Tensor, op: str = "mamba_inner") -> str:
    """Which path a call of ``op`` on this tensor takes: "cuda" (fused kernel) or "torch"."""
    if op not in KERNEL_NAMES:
        raise ValueError(f"op must be one of {KERNEL_NAMES}, got {op!r}")
    if get_kernel_backend() == "torch" or not _is_cuda(tensor):
        return "torch"
    return "cuda" if _kernels()[op] is not None else "torch"


def kernel_status() -> dict:
    """For logs and self-checks: the setting, and per kernel whether its fused version is
    available and, if not, why (import error text or failed probe); plus module versions.

    {"setting": "auto", "versions": {"mamba_ssm": "2.3.2" | None, ...},
     "kernels": {"mamba_inner": {"available": False, "reason": "..."}, ...}}
    """
    table = _kernels()
    return {
        "setting": get_kernel_backend(),
        "versions": dict(_VERSIONS),
        "kernels": {name: {"available": table[name] is not None,
                           "reason": None if table[name] is not None
                           else _REASONS.get(name, "not registered")}
                    for name in KERNEL_NAMES},
    }


def describe_kernels(tensor: torch.Tensor | None = None) -> str:
    """One line for logs: the setting, which fused kernels imported, and why others did not."""
    status = kernel_status()
    present = [name for name, k in status["kernels"].items() if k["available"]]
    parts = [f"{ENV_VAR}/setting={status['setting']}",
             f"fused kernels available: {', '.join(present) if present else 'none'}"]
    reasons: dict[str, list[str]] = {}  # one entry per distinct reason, naming its kernels
    for name, k in status["kernels"].items():
        if not k["available"]:
            reasons.setdefault(k["reason"], []).append(name)
    parts += [f"{'/'.join(names)}: {reason}" for reason, names in reasons.items()]
    if tensor is not None:
        parts.append(f"this tensor ({tensor.device}) -> {kernel_backend_for(tensor)}")
    return "; ".join(parts)


# ``model.kernels``: the run's choice. auto: fused where available (STAR_KERNELS still applies),
# fused: refuse to start unless every op runs fused, torch: the pure-PyTorch path everywhere.
KERNEL_SETTINGS = ("auto", "fused", "torch")
_MODULE_OF = {"selective_scan": "mamba_ssm", "mamba_inner": "mamba_ssm", "causal_conv1d": "causal_conv1d"}


class KernelsUnavailable(ConfigError):
    """``model.kernels=fused`` on a machine or device where the fused kernels cannot run."""


def kernel_paths(device_type: str, forced_by: str | None = None) -> dict[str, dict[str, str]]:
    """Per op, the path a call on a ``device_type`` tensor takes under the setting in force,
    and why: ``{"mamba_inner": {"path": "cuda" | "torch", "reason": "..."}, ...}``.
    ``forced_by`` names the setting that forced the torch path, for the reason text."""
    backend = get_kernel_backend()
    status = kernel_status() if backend != "torch" and device_type == "cuda" else None
    paths = {}
    for name in KERNEL_NAMES:
        if backend == "torch":
            forced_by = forced_by or ("set_kernel_backend('torch')" if _backend_override == "torch"
                                      else f"{ENV_VAR}=torch")
            paths[name] = {"path": "torch", "reason": f"forced by {forced_by}"}
        elif device_type != "cuda":
            paths[name] = {"path": "torch", "reason": f"device is {device_type}: fused kernels need CUDA tensors"}
        elif status["kernels"][name]["available"]:
            module = _MODULE_OF[name]
            paths[name] = {"path": "cuda",
                           "reason": f"fused kernel from {module} {status['versions'].get(module)}"}
        else:
            reason = status["kernels"][name]["reason"]
            if name == "mamba_inner":
                reason += "; its conv and scan each take their own path"
            paths[name] = {"path": "torch", "reason": reason}
    return paths


def require_kernels(setting: str, device: str) -> dict:
    """Apply ``model.kernels`` (through :func:`set_kernel_backend`, the one switch) for a run on
    ``device`` and return the plan for logs: setting, device, module versions and per-op paths.

    Raises :class:`KernelsUnavailable` (exit 2, before any process group starts) when the
    setting is ``fused`` and some op would not run fused: on a CPU device, or when an import
    or probe failed (its reason is in the message)."""
    if setting not in KERNEL_SETTINGS:
        raise ConfigError(f"model.kernels={setting!r} is not one of {', '.join(KERNEL_SETTINGS)}")
    device_type = torch.device(device).type
    # auto leaves STAR_KERNELS in charge; fused overrides a stale STAR_KERNELS=torch.
    set_kernel_backend({"auto": None, "fused": "auto", "torch": "torch"}[setting])
    if setting == "fused" and device_type != "cuda":
        raise KernelsUnavailable(
            f"model.kernels=fused: fused kernels need CUDA tensors, and this run's device is {device_type}; "
            f"use model.kernels=auto or model.kernels=torch (KERNELS=auto with the slurm/ launchers)")
    paths = kernel_paths(device_type, forced_by="model.kernels=torch" if setting == "torch" else None)
    if setting == "fused":
        missing = [f"{name}: {p['reason']}" for name, p in paths.items() if p["path"] != "cuda"]
        if missing:
            raise KernelsUnavailable(
                f"model.kernels=fused but {'; '.join(missing)}. Fix the install ({_FIX}) or run the slow "
                f"PyTorch path with model.kernels=auto (KERNELS=auto with the slurm/ launchers)")
    if setting != "torch" and device_type == "cuda":
        versions = kernel_status()["versions"]  # what the probe imported
    else:  # no fused call can happen: read the installed versions without importing the packages
        versions = {name: _installed_version(name.replace("_", "-")) for name in MIN_VERSIONS}
    return {"setting": setting, "backend": get_kernel_backend(), "device": device_type,
            "versions": versions, "ops": paths}


def describe_kernel_plan(plan: dict) -> str:
    """One log line from :func:`require_kernels`'s plan: each op's path and why."""
    groups: dict[tuple[str, str], list[str]] = {}  # ops sharing a path and a reason, in one entry
    for name, p in plan["ops"].items():
        groups.setdefault((p["path"], p["reason"]), []).append(name)
    ops = "; ".join(f"{'/'.join(names)} -> {path} ({reason})" for (path, reason), names in groups.items())
    return f"kernels (model.kernels={plan['setting']}, device {plan['device']}): {ops}"


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
    if out_proj_weight is not None and kernel_backend_for(xz, "mamba_inner") == "cuda":
        weight3 = conv1d_weight if conv1d_weight.dim() == 3 else conv1d_weight.unsqueeze(1)
        return _kernels()["mamba_inner"](xz, weight3, conv1d_bias, x_proj_weight, delta_proj_weight,
                                         out_proj_weight, out_proj_bias, A=A, D=D,
                                         delta_bias=delta_bias, delta_softplus=delta_softplus)
    # Conv and scan each take their own path (fused where available, so a missing or
    # mismatched mamba_inner_fn still leaves the fused scan), the rest is F.linear.
    return _compose_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                          out_proj_weight, out_proj_bias, A, D, delta_bias, dt_rank, d_state,
                          delta_softplus, causal_conv1d, selective_scan)
