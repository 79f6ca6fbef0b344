"""AdamW parameter groups: which parameters decay, and (fine-tuning) layer-wise lr scales.

No weight decay for biases and other 1-D parameters (norms, D) and for the names the model
lists in ``model.no_weight_decay()`` (position embeddings, class tokens): ARM's rule, the
default. ``ssm_weight_decay=False`` (``optim.ssm_weight_decay: false``) also exempts the
parameters flagged ``_no_weight_decay`` (mamba-ssm's convention for A_log and D) and the
learned tokens (``star.models.weight_decay``; docs/fidelity.md, "weight-decay rule").

Each group carries ``lr_scale``; the training loop sets ``lr = schedule(step) * lr_scale``
on every step, so groups need no scheduler of their own.
"""

from __future__ import annotations

from torch import nn

from star.models.weight_decay import no_weight_decay_names


def _no_decay_names(model: nn.Module, ssm_weight_decay: bool) -> set[str]:
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, param in model.named_parameters():
        if param.ndim <= 1 or name in listed or name.split(".")[-1] in listed:
            names.add(name)
    if not ssm_weight_decay:
        names |= no_weight_decay_names(model, ssm_weight_decay=False)
    return names


def weight_decay_groups(model: nn.Module, weight_decay: float, ssm_weight_decay: bool = True) -> list[dict]:
    """Two groups: decayed weights and everything that must not decay."""
    skip = _no_decay_names(model, ssm_weight_decay)
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in skip:
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "names": no_decay_names},
    ]
    return [g for g in groups if g["params"]]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       ssm_weight_decay: bool = True) -> list[dict]:
    """Groups per (layer, decay?) with lr_scale = layer_decay ** (top_layer - layer).

    ``model.layer_id(name)`` numbers parameters from 0 (embeddings) through i + 1 (block i)
    to the head; the head gets scale 1 and each layer below it one more factor of decay.
    """
    if not hasattr(model, "layer_id"):
        raise TypeError(f"{type(model).__name__} has no layer_id(name); layer-wise lr decay needs the "
                        f"fine-tuning model (a *_ft name) or set optim.layer_decay=null")
    skip = _no_decay_names(model, ssm_weight_decay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = {n: int(model.layer_id(n)) for n, _ in named}
    top = max(ids.values())
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        no_decay = name in skip
        key = (ids[name], no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (top - ids[name]), "layer_id": ids[name]}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def strip_names(groups: list[dict]) -> list[dict]:
    """Groups without the bookkeeping ``names`` lists (kept out of optimizer state dicts)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]
