"""Top-1 / top-5 of a classifier over a whole split, on any number of ranks (`star eval` and
fine-tuning's end-of-epoch evaluation).

Every validation image is counted exactly once whatever the world size: each rank sums its
correct predictions over ``batch.valid`` (the loader pads the last batch) and the sums are
all-reduced, so the reported image count equals the manifest's sample count, less the corrupt
samples skipped under ``data.on_corrupt=skip`` (named in ``skipped_samples``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from star.train.distributed import all_gather_objects, all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, device: str, amp_dtype: torch.dtype | None = None,
             epoch: int = 0) -> dict:
    """{"top1", "top5" (percent), "images"} over the whole split, summed over ranks."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = 0.0
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type=device_type, dtype=amp_dtype) if amp_dtype else nullcontext()
    try:
        for batch in loader.epoch(epoch):
            with autocast:
                logits = model(batch.images)
            valid = batch.valid.bool()
            labels = batch.labels[valid]
            top5 = logits[valid].float().topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = top5 == labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=-1).sum().item()
            count += valid.sum().item()
    finally:
        model.train(was_training)
    correct1, correct5, count = all_reduce_sum([correct1, correct5, count], device)
    # Corrupt samples skipped under data.on_corrupt=skip (valid=False like the padding), counted
    # once each across ranks: the accuracy is over the remaining images.
    names = loader.stats().get("corrupt_samples", []) if hasattr(loader, "stats") else []
    skipped = sorted(set().union(*map(set, all_gather_objects(list(names)))))
    return {"top1": 100.0 * correct1 / max(count, 1), "top5": 100.0 * correct5 / max(count, 1),
            "images": int(count), "skipped_corrupt": len(skipped), "skipped_samples": skipped}
