"""Plain state dicts in and out of runs: consolidate a run's ZeRO checkpoint, read weight files.

A run's checkpoint keeps the fp32 weights partitioned over ranks (ZeRO's optimizer shards);
``consolidate_run`` rebuilds one full float32 state dict, parameters and buffers in the
module's order. State dicts that leave a run carry ARM's names (:func:`to_arm_state_dict`:
the pretraining decoder is one submodule in memory, top-level pieces in ARM's files), so a
consolidated run, an exported file and ARM's own ``checkpoint-1599.pth`` read alike, and
``load_state_dict`` of our models takes them all. Every file is read with the weights-only
unpickler and an allow-list (star/train/safe_load.py): a run directory on a shared file system,
or ARM's ``checkpoint-1599.pth`` from elsewhere, can never run code here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from star.models import to_arm_state_dict
from star.train.checkpoint import Checkpointer
from star.train.elastic import checkpoint_world_size, merged_states, per_parameter
from star.train.safe_load import safe_load


def checkpoint_tag(run_dir: Path, tag: str | None = None) -> tuple[Path, str]:
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or Checkpointer(run_dir, rank=0, keep_last=1).latest_tag()
    if tag is None:
        raise FileNotFoundError(f"{run_dir} has no committed checkpoint ({ckpt_dir / 'latest'} is missing); "
                                f"is it a run directory of `star pretrain` / `star finetune`?")
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag!r} in {ckpt_dir}")
    return ckpt_dir, tag


def consolidate_run(run_dir: str | Path, *, tag: str | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a run's newest (or ``tag``) checkpoint, under ARM's names;
    ``ema=True`` gives the EMA."""
    ckpt_dir, tag = checkpoint_tag(Path(run_dir), tag)
    step_dir = ckpt_dir / tag
    states = safe_load(step_dir / "mp_rank_00_model_states.pt")
    if ema:
        if states.get("ema") is None:
            raise ValueError(f"{step_dir} holds no EMA weights (the run had ema.enabled=false)")
        return to_arm_state_dict(dict(states["ema"]))
    # The fp32 master weights from the ZeRO shards, read through safe_load by the same code that
    # re-partitions them for an elastic resume (DeepSpeed's zero_to_fp32 would unpickle them freely).
    world = checkpoint_world_size(step_dir)
    flats, _, paddings = merged_states(step_dir, world)
    params = {name: state["fp32"] for name, state in
              per_parameter(flats, states["param_shapes"], paddings, world).items()}
    module = states["module"]  # full module (params + buffers) in the model's order
    out = {}
    for name, value in module.items():
        value = params.get(name, value)
        out[name] = value.detach().float().clone() if value.is_floating_point() else value.clone()
    return to_arm_state_dict(out)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a run dir (newest checkpoint), an exported file or an ARM checkpoint."""
    path = Path(path)
    if path.is_dir():
        return consolidate_run(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: neither a run directory nor a weights file")
    # MAE-style checkpoints (ARM's checkpoint-1599.pth) also pickle the run's argparse.Namespace,
    # which the allow-list admits; nothing else beyond tensors and containers.
    state = safe_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    for key in ("model", "module", "state_dict"):  # ARM / MAE / DeepSpeed style wrappers
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (keys {list(state)[:5]}...)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
