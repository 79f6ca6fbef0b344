"""Which parameters take no weight decay, by name, for optimiser groups (docs/fidelity.md,
"weight-decay rule").

Two rules, chosen by ``optim.ssm_weight_decay``:

* ``true`` (default), ARM's: timm's ``add_weight_decay`` in ARM's ``main_pretrain.py`` and
  ``param_groups_lrd`` in its ``Finetuning/util/lr_decay.py`` exempt 1-D parameters (biases,
  norms, ``D``) and the names of ``no_weight_decay()`` (position tables, class tokens); every
  other parameter decays, ``A_log`` (d_inner x d_state) and the decoder's ``ar_token`` included.
  This rule produced the papers' numbers.
* ``false``, our first recipe: additionally ``A_log`` and ``D`` (mamba-ssm's ``_no_weight_decay``
  flag) and the learned input vectors ``ar_token`` and ``sep_embed`` are exempt.
"""

from __future__ import annotations

from torch import nn

# substrings of parameter names that never decay: position embeddings (ARM keeps its tables
# fixed, so only our learned separator slot, or a fine-tuning table, matches) and class tokens
ARM_NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token")
# what ``ssm_weight_decay: false`` exempts on top: the learned tokens of the pretraining model
TOKEN_NAME_PARTS = ("ar_token", "sep_embed")


def no_weight_decay_names(model: nn.Module, ssm_weight_decay: bool = True) -> set[str]:
    """Names of the parameters that must not decay under the chosen rule (module docstring)."""
    parts = ARM_NO_DECAY_NAME_PARTS if ssm_weight_decay else ARM_NO_DECAY_NAME_PARTS + TOKEN_NAME_PARTS
    names = set()
    for name, param in model.named_parameters():
        flagged = not ssm_weight_decay and getattr(param, "_no_weight_decay", False)
        if param.ndim <= 1 or flagged or any(part in name for part in parts):
            names.add(name)
    return names
