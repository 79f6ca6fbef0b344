"""Exponential moving average of the weights (timm's ModelEmaV2 semantics).

``ema = decay * ema + (1 - decay) * weights`` after every optimizer step that was taken, on
a float32 copy of the module that lives beside the engine (ZeRO-1/2 keep the full weights
on every rank, so every rank updates an identical copy and no communication is needed).
Buffers are copied. Its state dict uses the model's own names, so it exports and loads
like the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        averaged, current = [], []
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                averaged.append(target)
                current.append(value.detach().to(target.dtype))
            else:
                target.copy_(value)
        if averaged:  # one fused kernel per dtype/device instead of one per tensor
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
