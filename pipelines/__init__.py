"""Data loaders: DALI pipelines (GPU nvJPEG on clusters, CPU here) and a PyTorch/PIL baseline.

``build_loader`` is the one entry point. Files, in the order a batch goes through them:

* ``shards``       manifest + DALI index -> random access to any sample's bytes and label
* ``sampling``     epoch order, rank split, eval padding, every augmentation decision, all a
                   pure function of (seed, epoch, position): exact resume, no saved state
* ``loader``       the ``Loader`` interface, host side of a batch, corrupt-sample policy,
                   normalisation and random erasing on the device
* ``dali_backend`` the DALI graph (decode the crop window, resize, RandAugment, flip)
* ``torch_resize`` its CPU fast path (torch's vectorised uint8 resize)
* ``baseline``     the same with PIL (``pil_ops``) in torch DataLoader workers
"""

from __future__ import annotations

import torch

from pipelines.loader import Batch, Loader
from pipelines.sampling import AugmentConfig
from pipelines.shards import CorruptSampleError

__all__ = ["AugmentConfig", "Batch", "CorruptSampleError", "Loader", "build_loader"]


def build_loader(mode: str, data_dir, *, split: str, batch_size: int, image_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, backend: str = "dali",
                 num_threads: int = 2, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, on_corrupt: str = "error",
                 scale: tuple[float, float] | None = None, ratio: tuple[float, float] | None = None,
                 hflip: float | None = None, rand_augment_n: int | None = None,
                 rand_augment_m: float | None = None, rand_augment_mstd: float | None = None,
                 erase_prob: float | None = None, eval_crop_pct: float | None = None,
                 interpolation: str | None = None, randaug: str | None = None,
                 erase_mode: str | None = None, eval_resize: str | None = None, prefetch: int = 2,
                 cpu_resize: str = "torch") -> Loader:
    """A loader for ``mode`` ("pretrain" | "finetune" | "eval") over ``data_dir/{split}.json``.

    Augmentation knobs left as None take the defaults for the mode (``AugmentConfig``; ARM's
    fine-tuning recipe, see docs/fidelity.md): ``randaug`` "timm" | "star_v1", ``erase_mode``
    "pixel" | "const", ``eval_resize`` "shorter" | "square".
    There is no shuffle buffer to size: every epoch is a full global permutation of the
    manifest (see ``pipelines.sampling``). ``cpu_resize`` ("torch" | "dali"): who resizes
    in the DALI backend on the CPU (see ``pipelines.dali_backend``); on GPU DALI always does.
    ``prefetch``: DALI's queue depth. A missing DALI is an error naming the fix, never a
    silent switch to the baseline.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}: expected 'train' or 'val'")
    augment = AugmentConfig.for_mode(
        mode, image_size, scale=scale, ratio=ratio, hflip=hflip, rand_augment_n=rand_augment_n,
        rand_augment_m=rand_augment_m, rand_augment_mstd=rand_augment_mstd, erase_prob=erase_prob,
        eval_crop_pct=eval_crop_pct, interpolation=interpolation, randaug=randaug, erase_mode=erase_mode,
        eval_resize=eval_resize)
    kwargs = dict(split=split, batch_size=batch_size, image_size=image_size, rank=rank,
                  world_size=world_size, seed=seed, num_threads=num_threads, device=device,
                  dtype=dtype, on_corrupt=on_corrupt, augment=augment)
    if backend == "dali":
        from pipelines.dali_backend import DaliLoader, dali_available

        if not dali_available():
            raise ImportError("backend='dali' needs nvidia-dali (pip install nvidia-dali-cuda120); "
                              "or pass backend='baseline'")
        return DaliLoader(mode, data_dir, prefetch=prefetch, cpu_resize=cpu_resize, **kwargs)
    if backend == "baseline":
        from pipelines.baseline import BaselineLoader

        return BaselineLoader(mode, data_dir, **kwargs)
    raise ValueError(f"backend {backend!r}: expected 'dali' or 'baseline'")
