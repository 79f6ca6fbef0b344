"""Which parameters take no weight decay, by name, for optimiser groups (the MAE / ARM recipe:
`docs/design.md`, "Training")."""

from __future__ import annotations

from torch import nn

# substrings of parameter names that never decay: position embeddings and learned tokens
_NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token", "ar_token", "sep_embed")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Biases and other 1-D parameters (norms, D), position embeddings, tokens, and every
    parameter flagged ``_no_weight_decay`` by mamba-ssm's convention (A_log, D)."""
    names = set()
    for name, param in model.named_parameters():
        if (param.ndim <= 1 or getattr(param, "_no_weight_decay", False)
                or any(part in name for part in _NO_DECAY_NAME_PARTS)):
            names.add(name)
    return names
