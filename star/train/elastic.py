"""Resuming a ZeRO-1/2 checkpoint on a different number of ranks (elastic resume).

DeepSpeed refuses to load a ZeRO optimizer state written by W ranks into W' != W ranks
(``ZeRORuntimeException: ... DP world size``). What a checkpoint of ours holds is enough to
redo the partitioning ourselves, so that is what :func:`restore_repartitioned` does:

1. the module (full fp32 weights and buffers, identical on every rank) through DeepSpeed's
   ``load_module_only``, which also refreshes the fp32 master partitions from it;
2. from the W files ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` (each read with the
   weights-only unpickler, star/train/safe_load.py): per parameter group, the W fp32 master
   partitions and AdamW moment partitions with their alignment padding stripped, concatenated
   in rank order, then cut into parameters with the shapes of ``param_shapes`` (the layout of
   DeepSpeed's ``zero_to_fp32`` for stage 1/2, including the per-parameter alignment padding);
3. each parameter's slice of the new partitioning, written through the parameter's ZeRO
   mapping (``_hp_mapping``: where this rank's fragment of the parameter lies in its flat
   partition), so the new padding and alignment are DeepSpeed's own.

Why this and not DeepSpeed's universal checkpoint (``ds_to_universal``): the conversion writes a
second copy of the whole checkpoint (one file per parameter and state, 12 bytes a parameter),
runs worker pools, unpickles without restriction and needs ``load_universal`` set before
the engine exists; a consolidated copy written at save time would cost 12 bytes a parameter on
*every* checkpoint for an event that happens a few times per run. Reading the shards at resume
time costs nothing at save time; the price is that every rank reads the whole optimizer state
once (12 bytes a parameter: 1.2 GB at STAR-B's ~100 M parameters) and holds it in host memory
while it re-partitions (docs/design.md, "Elastic resume").

What cannot carry over are the per-rank random streams (drop path, mixup): W files of RNG
state do not map onto W' ranks. :func:`reseed` derives them from (seed, step, rank) instead, so
an elastic resume is reproducible but does not replay the drop-path masks an uninterrupted run
would have drawn. The data order and every augmentation decision are functions of (seed, epoch,
sample position) only (pipelines/sampling.py) and an optimizer step covers the same positions
[k*G, (k+1)*G) for any world size and micro-batch size, so they carry over exactly.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from star.config import ConfigError
from star.train.safe_load import safe_load

OPTIM_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def checkpoint_world_size(step_dir: str | Path) -> int:
    """The number of data-parallel ranks that wrote ``step_dir`` (its ZeRO optimizer shards)."""
    ranks = sorted(int(m.group(1)) for p in Path(step_dir).iterdir() if (m := OPTIM_RE.match(p.name)))
    if not ranks or ranks != list(range(len(ranks))):
        raise FileNotFoundError(f"{step_dir}: ZeRO optimizer shards zero_pp_rank_*_mp_rank_00_optim_states.pt "
                                f"missing or incomplete (found ranks {ranks}); the checkpoint is damaged")
    return len(ranks)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_world_size(global_images: int, micro_images: int, images_per_seq: int, world_size: int) -> None:
    """Refuse, naming the choices that work, a world size that cannot keep the global batch
    as whole micro-batches (global = micro x accumulation x world size)."""
    if global_images % (micro_images * world_size) == 0:
        return
    sizes = _divisors(global_images // micro_images) if global_images % micro_images == 0 else []
    micros = [m for m in _divisors(global_images // world_size) if m % images_per_seq == 0] \
        if global_images % world_size == 0 else []
    with_sizes = (f"run on {', '.join(map(str, sizes))} ranks with batch.micro_images={micro_images}"
                  if sizes else f"no world size works with batch.micro_images={micro_images}")
    with_micro = (f"or keep {world_size} ranks and set batch.micro_images to one of {', '.join(map(str, micros))} "
                  f"(gradient accumulation makes up the rest)"
                  if micros else f"no batch.micro_images works on {world_size} ranks "
                                 f"({global_images} images do not split into whole sequences per rank)")
    raise ConfigError(f"batch.global_images={global_images} is not a multiple of batch.micro_images="
                      f"{micro_images} x {world_size} ranks = {micro_images * world_size}: {with_sizes}; {with_micro}")


def reseed(seed: int, step: int, rank: int, extra: dict[str, torch.Generator] | None = None) -> None:
    """Per-rank random streams after an elastic resume: a pure function of (seed, step, rank)."""
    state = np.random.SeedSequence([seed, step, rank, 0xE1A5]).generate_state(4, dtype=np.uint64)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]) % 2**32)
    torch.manual_seed(int(state[2]) % 2**63)
    for name, gen in (extra or {}).items():
        sub = np.random.SeedSequence([seed, step, rank, zlib.crc32(name.encode())]).generate_state(1, dtype=np.uint64)
        gen.manual_seed(int(sub[0]) % 2**63)


def _lean(value: torch.Tensor, padding: int) -> torch.Tensor:
    return value[:value.numel() - padding] if padding else value


def merged_states(step_dir: str | Path,
                  world_size: int) -> tuple[list[dict[str, torch.Tensor]], list[dict], list | None]:
    """Per parameter group: the unpartitioned flat fp32 master (key ``fp32``) and every
    partitioned optimizer state (``exp_avg``, ``exp_avg_sq``), the group's scalar states
    (AdamW's ``step``), from the ``world_size`` shards of ``step_dir``; and the per-parameter
    alignment paddings (None when the checkpoint predates them)."""
    shards = [safe_load(Path(step_dir) / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
              for r in range(world_size)]
    groups = len(shards[0]["single_partition_of_fp32_groups"])
    flats, scalars = [], []
    for i in range(groups):
        pieces: dict[str, list[torch.Tensor]] = {"fp32": []}
        scalar: dict = {}
        for sd in shards:
            fp32 = sd["single_partition_of_fp32_groups"][i]  # saved without its padding
            pieces["fp32"].append(fp32)
            base = sd["base_optimizer_state"]
            state = base["state"][i] if isinstance(base, dict) else base[i]
            padding = sd["group_paddings"][i]
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    lean = _lean(value.view(-1), padding)  # the partition as trained, padding dropped
                    if lean.numel() != fp32.numel():
                        raise ValueError(f"{step_dir}: optimizer state {key!r} of group {i} has {value.numel()} "
                                         f"values where the fp32 partition has {fp32.numel()} (+{padding} padding)")
                    pieces.setdefault(key, []).append(lean)
                else:
                    scalar.setdefault(key, value)
        flats.append({key: torch.cat(parts) for key, parts in pieces.items()})
        scalars.append(scalar)
    return flats, scalars, shards[0].get("param_alignment_paddings")


def per_parameter(flats: list[dict[str, torch.Tensor]], param_shapes: list[dict],
                  alignment_paddings: list[list[int]] | None, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Cut each group's flat tensors into parameters: name -> {state key -> full tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    if len(flats) != len(param_shapes):
        raise ValueError(f"{len(flats)} optimizer groups but {len(param_shapes)} groups of parameter shapes")
    for i, (flat, shapes) in enumerate(zip(flats, param_shapes)):
        offset = 0
        available = flat["fp32"].numel()
        for j, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > available:
                raise ValueError(f"group {i} holds {available} values, too few for parameter {name} at {offset}")
            out[name] = {key: value.narrow(0, offset, numel).view(tuple(shape)) for key, value in flat.items()}
            offset += numel + (alignment_paddings[i][j] if alignment_paddings else 0)
        # ZeRO-1/2 pad a group to a multiple of 2 x world size; the saved partitions drop it
        # again, so anything beyond that rounding means the shapes do not describe these shards
        align = 2 * world_size
        if math.ceil(offset / align) != math.ceil(available / align):
            raise ValueError(f"group {i}: its parameters take {offset} values but the shards hold {available}")
    return out


def restore_repartitioned(engine, step_dir: str | Path, saved_world_size: int, model_states: dict) -> None:
    """Load fp32 master weights and AdamW moments written by ``saved_world_size`` ranks into
    ``engine``'s partitions (any world size). ``model_states``: the checkpoint's
    mp_rank_00_model_states.pt without its module (the client state of DeepSpeed's
    ``load_module_only``), for ``param_shapes`` and the engine's counters. Every rank calls
    this; no collectives."""
    step_dir = Path(step_dir)
    optimizer = engine.optimizer
    if not hasattr(optimizer, "single_partition_of_fp32_groups"):
        raise RuntimeError("elastic resume needs a ZeRO stage 1/2 optimizer (ds_config zero_optimization.stage)")
    flats, scalars, paddings = merged_states(step_dir, saved_world_size)
    full = per_parameter(flats, model_states["param_shapes"], paddings, saved_world_size)
    named = dict(engine.module.named_parameters())
    missing = sorted(set(named) - set(full))
    if missing:
        raise ValueError(f"{step_dir} has no optimizer state for parameters {missing[:5]}; it was written by a "
                         f"different model")
    base = optimizer.optimizer  # the torch AdamW over this rank's flat partitions
    for i, flat_partition in enumerate(optimizer.single_partition_of_fp32_groups):
        state = base.state[flat_partition]
        for key in flats[i]:
            if key != "fp32":
                state[key] = torch.zeros_like(flat_partition)
        for key, value in scalars[i].items():
            state[key] = value.clone() if torch.is_tensor(value) else value
    group_of = {id(p): i for i, group in enumerate(optimizer.bit16_groups) for p in group}
    for name, param in named.items():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue  # no fragment of this parameter lives on this rank
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat_partition = optimizer.single_partition_of_fp32_groups[group_of[id(param)]]
        for key, value in full[name].items():
            source = value.reshape(-1).narrow(0, lp.start, lp.numel).to(flat_partition.device)
            target = flat_partition if key == "fp32" else base.state[flat_partition][key]
            target.data.narrow(0, hp.start, hp.numel).copy_(source)
    optimizer._link_all_hp_params()  # refresh the fragments' views of the optimizer states
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in model_states:
            setattr(engine, key, model_states[key])

