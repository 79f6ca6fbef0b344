"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle: unpickled with arbitrary globals it can run any code on the
machine of whoever loads it. Run directories live on shared file systems where other people
can write, so every file of a run directory (and every weights file given on the command
line) is read with PyTorch's weights-only unpickler, which rebuilds tensors, containers and
plain values and nothing else, plus the few types our and DeepSpeed's checkpoints hold:

- NumPy's array reconstruction (the NumPy random state in ``rng_rank*.pt``);
- DeepSpeed's ``LossScaler``, ``ZeroStageEnum`` and ``fragment_address`` (ZeRO optimizer shards);
- ``argparse.Namespace`` (MAE-style checkpoints such as ARM's ``checkpoint-1599.pth`` store
  their command line).

DeepSpeed's own checkpoint engine unpickles without restriction; :func:`use_safe_loading`
replaces that engine's loader with :func:`safe_load`, and :func:`check_checkpoint_dir` scans a
checkpoint's files before anything slow starts (the scan reads only the pickle's opcodes;
nothing is executed). Consolidating a run (export, eval, --init) reads the ZeRO shards itself
through :func:`safe_load` (star/train/weights.py), not through DeepSpeed's ``zero_to_fp32``.
A file that needs anything else is refused with its name and the offending global.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from star.config import ConfigError

# Fully qualified names allowed beyond torch's own weights-only set (see the module docstring).
ALLOWED_GLOBALS = (
    "argparse.Namespace",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that would need code outside the allow-list to load."""


def _allowed_objects() -> list:
    """The allow-listed globals that can be imported here (DeepSpeed's only when installed)."""
    import importlib

    objects = []
    for name in ALLOWED_GLOBALS:
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - numpy 1 vs 2 names, DeepSpeed absent
            continue
        obj = getattr(module, attr, None)
        if obj is not None:
            objects.append((obj, name) if getattr(obj, "__module__", None) != module_name else obj)
    # NumPy's dtype classes (numpy.dtypes.UInt32DType, ...) appear next to numpy.dtype.
    try:
        import numpy as np

        objects += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    except ImportError:
        pass
    return objects


def _refuse(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to load: {what}. STAR loads checkpoint files with the weights-only "
        f"unpickler; this file was not written by STAR, DeepSpeed or PyTorch's save of a state dict, "
        f"or it was modified. Do not use it; re-export or re-train from a directory only you can write")


def safe_load(path: str | Path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` and the allow-list above."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path}: not a PyTorch checkpoint (torch.save's zip format); refused to "
                                    f"load. A legacy-format file can be re-saved with a recent torch by its owner")
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for line in str(exc).splitlines():  # torch names the global in a line of its own
            if "GLOBAL" in line or "Unsupported global" in line:
                first_line = line.strip()
                break
        raise _refuse(path, first_line) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise UnsafeCheckpointError(f"{path}: not a readable PyTorch file ({exc}); it is truncated or "
                                    f"corrupt") from None


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals that the weights-only unpickler would refuse, read from the pickle's opcodes only."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path}: not a PyTorch zip checkpoint (legacy or foreign format); "
                                    f"refused to load")
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return [name for name in found if name not in ALLOWED_GLOBALS and not name.startswith("numpy.dtypes.")]


def check_checkpoint_dir(step_dir: str | Path) -> None:
    """Refuse a checkpoint directory when any of its ``.pt`` files holds a non-allowed global."""
    for path in sorted(Path(step_dir).glob("*.pt")):
        bad = unsafe_globals(path)
        if bad:
            raise _refuse(path, f"it references {', '.join(bad)}")


def use_safe_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with :func:`safe_load`."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        raise RuntimeError("this DeepSpeed engine has no checkpoint_engine; cannot load its checkpoints safely")
    checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location=map_location)
