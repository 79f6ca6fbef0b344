"""The learning rate as a pure function of the optimizer step (no scheduler state to save).

Linear warmup from 0 to the peak, then half a cosine from the peak down to ``min_lr``, as in
MAE's per-iteration schedule (which ARM keeps). The peak scales with the batch, ``min_lr`` does
not; each parameter group then multiplies both by its layer-decay ``lr_scale``. Because the
rate is recomputed from the step on every step, a resumed run follows the same curve as an
uninterrupted one by construction.
"""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MAE / ARM / STAR: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def lr_bounds(base_lr: float, min_lr: float, global_batch: int) -> tuple[float, float]:
    """(peak, floor) of the schedule: the peak follows the scaling rule, the floor ``min_lr`` is
    absolute, as ARM's ``lr_sched.adjust_learning_rate`` uses ``args.min_lr`` (docs/fidelity.md)."""
    return scaled_lr(base_lr, global_batch), min_lr


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
