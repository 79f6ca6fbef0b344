"""Fine-tuning's ``init`` weights, read and checked before DeepSpeed starts.

A file that is not a checkpoint, a planted pickle, or a checkpoint that leaves encoder
parameters of the target model at random initialisation (another depth or width, another
model) stops the command in seconds with one clear message, instead of after start-up or,
worse, fine-tuning from partly random weights with exit code 0.
"""

from __future__ import annotations

import re

import torch

from star.config import Config, ConfigError
from star.train.weights import read_weights

# Parameters a pretraining checkpoint does not hold: the class token, the final norm (ARM's
# pretraining encoder feeds its decoder without one) and the classification head.
TRAINED_FROM_SCRATCH = re.compile(r"^(cls_token$|norm_f\.|head\.)")


def read_init_state(cfg: Config) -> dict[str, torch.Tensor]:
    """``cfg.init`` as a state dict; every failure is a ConfigError naming the path."""
    try:
        return read_weights(cfg.init)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        raise ConfigError(f"init={cfg.init}: cannot read pretrained weights: {exc}") from None


def check_init_covers_encoder(cfg: Config, state: dict, model: torch.nn.Module) -> str:
    """Load ``state`` into ``model`` (a throwaway of the target shape) and refuse, unless
    ``init_allow_partial``, when any encoder parameter keeps its random initialisation.
    Returns the load report."""
    try:
        report = model.load_pretrained(dict(state), verbose=False)
    except ValueError as exc:
        raise ConfigError(f"init={cfg.init} does not fit model {cfg.model.name}: {exc}") from None
    params = dict(model.named_parameters())
    missing = [k for k in report.missing_keys if k in params and not TRAINED_FROM_SCRATCH.match(k)]
    if missing and not cfg.init_allow_partial:
        total = sum(1 for k in params if not TRAINED_FROM_SCRATCH.match(k))
        raise ConfigError(f"init={cfg.init} leaves {len(missing)} of {total} encoder parameters of "
                          f"{cfg.model.name} at random initialisation:\n{_missing_table(missing, params)}\n"
                          f"Give a checkpoint of the same width and depth, or set init_allow_partial=true "
                          f"to fine-tune anyway")
    return str(report)


def _missing_table(missing: list[str], params: dict) -> str:
    """One row per block whose tensors are all missing, else one row per tensor."""
    def block(name: str) -> str:
        match = re.match(r"(layers\.\d+)\.", name)
        return match.group(1) if match else name

    rows, seen = [], set()
    for name in missing:
        group = block(name)
        if group in seen:
            continue
        members = [k for k in params if block(k) == group]
        lost = [k for k in members if k in missing]
        if len(members) > 1 and len(lost) == len(members):
            rows.append(f"  {group + '.*':<48} all {len(members)} tensors")
            seen.add(group)
        else:
            rows.append(f"  {name:<48} {tuple(params[name].shape)}")
    return "\n".join(rows)
