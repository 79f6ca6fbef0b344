"""Every seed a run derives from ``cfg.seed``, in one place.

A resumed run restores the generators from its checkpoint, so these offsets matter for fresh
runs only; they are part of the recipe all the same (changing one changes a run's trajectory),
which is why they are named here and nowhere else.

* Initial weights: ``cfg.seed`` on every rank (``weights_seed``): identical initial weights.
* Per-rank global streams (torch / numpy / random once the model is built: drop path):
  ``cfg.seed + RANK_STREAM_STRIDE * rank + RANK_STREAM_OFFSET``; the offset keeps rank 0's
  stream apart from the weight-init stream.
* Mixup / CutMix decisions (their own ``torch.Generator``, checkpointed with the run):
  ``cfg.seed + MIXUP_STRIDE * rank`` (a prime stride, unrelated to the one above).
"""

from __future__ import annotations

RANK_STREAM_STRIDE = 1000
RANK_STREAM_OFFSET = 1
MIXUP_STRIDE = 7919


def weights_seed(seed: int) -> int:
    """The seed of model construction: the same on every rank."""
    return seed


def rank_stream_seed(seed: int, rank: int) -> int:
    """The seed of this rank's global generators once the model is built."""
    return seed + RANK_STREAM_STRIDE * rank + RANK_STREAM_OFFSET


def mixup_seed(seed: int, rank: int) -> int:
    """The seed of this rank's Mixup / CutMix generator."""
    return seed + MIXUP_STRIDE * rank
