"""Frozen-encoder features of a split, every image exactly once over any number of ranks.

The pretraining encoder is used as it is (1 causal scan, the weights of pretraining) on ONE
image per sequence: for STAR that is the first image of a packed sequence, i.e. the image's
patch tokens in cluster-priority order with its separator(s) where the model's
``sep_position`` puts them (``SC``: one separator first); for ARM (N = 1, no separator)
exactly the pretraining input. The feature of an image is the mean of the last layer's
outputs over the image's own tokens (separators excluded), or with ``pool="last"`` the output
at its last image token, the one that has read the whole image through the causal scan.
All model-specific code is :func:`encoder_features`.

Coverage is that of `star eval` (``pipelines.sampling.EpochPlan`` with ``train=False``):
every rank reads its slots of each global batch, the last global batch is padded and padding
is marked ``valid=False``. Each rank keeps (manifest position, label, feature) of its valid
slots; :func:`gather_features` collects them on rank 0 and checks that the positions are
exactly 0..n-1, each once.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from star.models.pretrain import IMAGE, Layout, PackingConfig, build_layout
from star.probe.knn import K_DEFAULT, TEMPERATURE_DEFAULT, knn_classify

POOLS = ("mean", "last")
_LAYOUTS: dict[tuple[PackingConfig, str], tuple[Layout, torch.Tensor, int]] = {}


def _single_image_layout(packing: PackingConfig, device: torch.device) -> tuple[Layout, torch.Tensor, int]:
    """(layout of a 1-image sequence, positions of its image tokens, position of the last one)."""
    key = (packing, str(device))
    if key not in _LAYOUTS:
        layout = build_layout(dataclasses.replace(packing, images_per_seq=1)).to(device)
        image_pos = torch.nonzero(layout.tokens.kind == IMAGE).flatten()
        _LAYOUTS[key] = (layout, image_pos, int(image_pos[-1]))
    return _LAYOUTS[key]


def encoder_features(model: torch.nn.Module, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, D) float32 features of a ``StarPretrainModel``.

    The one place that knows the model's internals: patch embedding + fixed position table,
    the packer's separator tokens gathered into a 1-image sequence, the encoder layers.
    """
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: use one of {', '.join(POOLS)}")
    layout, image_pos, last_pos = _single_image_layout(model.packing, images.device)
    tokens = model.patch_embed(images) + model.pos_embed  # (B, g*g, D)
    if model.packing.sep_type != "none":
        sep = model.packer.separator_tokens().to(tokens.dtype)
        tokens = torch.cat([tokens, sep[None].expand(tokens.shape[0], -1, -1)], dim=1)
    hidden = tokens.index_select(1, layout.tokens.source)  # source table: g*g patches, then separator slots
    for layer in model.layers:
        hidden = layer(hidden)
    if pool == "last":
        return hidden[:, last_pos].float()
    return hidden.index_select(1, image_pos).float().mean(dim=1)


@dataclass
class FeatureSet:
    """Features of one split, in manifest order of the (sub)set; on rank 0 after gathering."""

    features: torch.Tensor  # (n, D) float32
    labels: torch.Tensor  # (n,) int64
    positions: torch.Tensor  # (n,) int64: position in the loader's sample list (0..n-1 once gathered)
    num_classes: int

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.labels.numel())


def subset_indices(num_samples: int, count: int | None, seed: int, split: str) -> np.ndarray | None:
    """Sorted manifest indices of a ``count``-image subset fixed by (seed, split); None = all."""
    if count is None or count >= num_samples:
        return None
    if count < 1:
        raise ValueError(f"a subset needs at least 1 image, got {count}")
    tag = sum(split.encode())  # train and val draw independent subsets from the same seed
    rng = np.random.default_rng([seed, 0x9B0BE, tag])
    return np.sort(rng.choice(num_samples, size=count, replace=False))


class _SubsetShards:
    """A read-only view of a ``pipelines.shards.ShardSet`` holding only ``indices``."""

    def __init__(self, base, indices: np.ndarray):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.data_dir, self.split, self.num_classes = base.data_dir, base.split, base.num_classes
        self.manifest = base.manifest

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> tuple[str, str]:
        return self.base.name(int(self.indices[i]))

    def read(self, i: int) -> tuple[bytes, int]:
        return self.base.read(int(self.indices[i]))


def restrict_loader(loader, indices: np.ndarray | None):
    """Make an eval ``Loader`` (not yet iterated) read only the samples ``indices`` (sorted
    manifest indices) with the same exactly-once plan; ``Batch.indices`` are then positions
    in ``indices``. None leaves the loader as it is."""
    if indices is None:
        return loader
    loader.shards = _SubsetShards(loader.shards, indices)
    loader.num_samples = len(indices)
    loader.steps_per_epoch = loader._plan(0).steps
    return loader


def probe_loader(data_dir, split: str, *, image_size: int, batch_size: int, rank: int, world_size: int,
                 device: str, backend: str = "dali", num_threads: int = 2, seed: int = 0,
                 max_images: int | None = None, on_corrupt: str = "error"):
    """An eval-transform loader (resize + centre crop, no augmentation) over ``split``, or over
    its ``max_images``-image subset fixed by ``seed``; every rank reads its share."""
    from pipelines import build_loader

    loader = build_loader("eval", data_dir, split=split, batch_size=batch_size, image_size=image_size,
                          rank=rank, world_size=world_size, seed=seed, backend=backend,
                          num_threads=num_threads, device=device, on_corrupt=on_corrupt)
    return restrict_loader(loader, subset_indices(loader.num_samples, max_images, seed, split))


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not enabled,
                    console=Console(stderr=True), transient=False)


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, *, pool: str = "mean", amp_dtype: torch.dtype | None = None,
                     show_progress: bool = False, description: str = "features") -> FeatureSet:
    """This rank's features of ``loader``'s valid slots (padding dropped), on the loader's device."""
    was_training = model.training
    model.eval()
    device_type = loader.device.type
    autocast = torch.autocast(device_type=device_type, dtype=amp_dtype) if amp_dtype else nullcontext()
    feats, labels, positions = [], [], []
    start, seen = time.perf_counter(), 0
    try:
        with _progress(show_progress) as bar:
            task = bar.add_task(description, total=loader.steps_per_epoch, rate="")
            for batch in loader.epoch(0):
                with autocast:
                    out = encoder_features(model, batch.images, pool)
                valid = batch.valid.bool()
                feats.append(out[valid])
                labels.append(batch.labels[valid])
                positions.append(batch.indices[valid.cpu()].to(out.device))
                seen += int(valid.sum())
                rate = seen * loader.world_size / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=1, rate=f"{rate:,.0f} img/s")
    finally:
        model.train(was_training)
    dim = feats[0].shape[1] if feats else 0
    device = loader.device
    return FeatureSet(features=torch.cat(feats) if feats else torch.zeros(0, dim, device=device),
                      labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device),
                      positions=torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long, device=device),
                      num_classes=loader.num_classes)


def _gather_rows(tensor: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor | None:
    """Rank 0 gets every rank's rows in rank order (padded to the largest count for the collective)."""
    pad = max(counts)
    padded = torch.zeros((pad, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in counts] if rank == 0 else None
    dist.gather(padded, chunks, dst=0)
    if rank != 0:
        return None
    return torch.cat([c[:n] for c, n in zip(chunks, counts)])


def gather_features(local: FeatureSet, num_samples: int) -> FeatureSet | None:
    """Every rank's part on rank 0, sorted by position, checked to hold each of the
    ``num_samples`` positions exactly once (RuntimeError otherwise); None on other ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        count = torch.tensor([len(local)], dtype=torch.long, device=local.features.device)
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        dim = torch.tensor([local.features.shape[1]], device=local.features.device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)  # a rank without samples has D = 0
        feats = local.features if local.features.shape[1] else local.features.new_zeros(0, int(dim))
        feats = _gather_rows(feats.float(), counts, rank)
        labels = _gather_rows(local.labels, counts, rank)
        positions = _gather_rows(local.positions, counts, rank)
        if rank != 0:
            return None
    else:
        feats, labels, positions = local.features.float(), local.labels, local.positions
    order = torch.argsort(positions)
    positions = positions[order]
    if positions.numel() != num_samples or not torch.equal(positions.cpu(), torch.arange(num_samples)):
        seen = positions.cpu()
        dupes = int(seen.numel() - torch.unique(seen).numel())
        raise RuntimeError(f"feature extraction covered {seen.numel()} slots ({dupes} duplicates) of "
                           f"{num_samples} images: the split was not read exactly once")
    return FeatureSet(features=feats[order], labels=labels[order], positions=positions,
                      num_classes=local.num_classes)


def features_of_split(model: torch.nn.Module, loader, *, pool: str = "mean", amp_dtype: torch.dtype | None = None,
                      show_progress: bool = False, description: str = "features") -> FeatureSet | None:
    """extract_features on every rank + gather_features: the whole split on rank 0, None elsewhere."""
    local = extract_features(model, loader, pool=pool, amp_dtype=amp_dtype, show_progress=show_progress,
                             description=description)
    return gather_features(local, loader.num_samples)


def knn_accuracy(model: torch.nn.Module, train_loader, val_loader, *, pool: str = "mean",
                 amp_dtype: torch.dtype | None = None, k: int = K_DEFAULT,
                 temperature: float = TEMPERATURE_DEFAULT, show_progress: bool = False) -> dict | None:
    """The whole k-NN evaluation over ranks: every rank extracts its part of both loaders
    (collective: call it on every rank), rank 0 classifies. Returns {"top1", "top5", "images",
    "train_images", "seconds"} on rank 0, None elsewhere. Uses no random number stream and
    restores ``model.training``, so a training run around it continues unchanged."""
    start = time.perf_counter()
    train = features_of_split(model, train_loader, pool=pool, amp_dtype=amp_dtype,
                              show_progress=show_progress, description="train features")
    val = features_of_split(model, val_loader, pool=pool, amp_dtype=amp_dtype,
                            show_progress=show_progress, description="val features")
    if train is None:
        return None
    result = knn_classify(train.features, train.labels, val.features, val.labels,
                          num_classes=train.num_classes, k=k, temperature=temperature)
    result.update(train_images=len(train), seconds=time.perf_counter() - start)
    return result
