"""Mixup / CutMix with label smoothing, on the training device, in torch (timm semantics).

Per batch: with probability ``prob`` mix; CutMix with probability ``switch_prob`` when both
alphas are positive (else whichever is enabled); lam ~ Beta(alpha, alpha). Image i is mixed
with image B-1-i (the batch flipped). CutMix pastes a box of area about (1 - lam) and then
sets lam to the exact uncovered fraction. Targets are smoothed one-hots mixed by lam:
lam * smooth(y) + (1 - lam) * smooth(flip(y)), smooth = 1 - eps + eps/K on, eps/K off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's rand_bbox: a box of side ratio sqrt(1 - lam) centred uniformly, clipped: (y0, y1, x0, x1)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


@dataclass
class MixDecision:
    """What one call did (for logging and tests)."""

    mixed: bool
    cutmix: bool
    lam: float
    box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) for CutMix


class Mixup:
    """``(images, labels) -> (mixed images, soft targets)``; deterministic given ``generator``."""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha {mixup_alpha} / cutmix_alpha {cutmix_alpha}: must be >= 0 (0 disables)")
        if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(f"prob {prob} / switch_prob {switch_prob}: must lie in [0, 1]")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing {label_smoothing}: must lie in [0, 1)")
        if num_classes < 1:
            raise ValueError(f"num_classes {num_classes}: must be at least 1")
        self.mixup_alpha, self.cutmix_alpha, self.prob = mixup_alpha, cutmix_alpha, prob
        self.switch_prob, self.label_smoothing, self.num_classes = switch_prob, label_smoothing, num_classes
        self.last: MixDecision | None = None

    def decide(self, height: int, width: int, generator: torch.Generator | None = None) -> MixDecision:
        """Draw one batch's decision; all randomness comes from ``generator``."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        enabled = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if not enabled or rng.random() >= self.prob:
            return MixDecision(mixed=False, cutmix=False, lam=1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixDecision(mixed=True, cutmix=False, lam=lam)
        box = cutmix_box(height, width, lam, rng)
        y0, y1, x0, x1 = box
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually kept
        return MixDecision(mixed=True, cutmix=True, lam=lam, box=box)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images batch {images.shape[0]} != labels batch {labels.shape[0]}")
        decision = self.decide(images.shape[-2], images.shape[-1], generator)
        self.last = decision
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if not decision.mixed:
            return images, targets
        lam = decision.lam
        if decision.cutmix:
            y0, y1, x0, x1 = decision.box
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        else:
            images = images * lam + images.flip(0) * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)
