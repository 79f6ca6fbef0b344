"""The loader interface shared by both backends, and the host-side half of every batch.

A backend turns a ``HostBatch`` (JPEG bytes plus the decisions of ``pipelines.sampling``)
into a uint8 NCHW tensor; this module does everything else the same way for both: which
samples, labels, the ``valid`` mask, corrupt-sample policy, normalisation and random
erasing on the training device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.sampling import AugmentConfig, EpochPlan, SampleParams, sample_params
from pipelines.shards import CorruptSampleError, ShardSet, jpeg_size


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S), normalised, on the training device
    labels: torch.Tensor  # (B,) int64
    valid: torch.Tensor  # (B,) bool: False for evaluation padding and skipped corrupt samples
    indices: torch.Tensor  # (B,) int64 on the CPU: position of each sample in the manifest order


@dataclass
class HostBatch:
    step: int
    indices: np.ndarray  # sample index per slot
    jpegs: list[bytes]
    params: list[SampleParams]
    labels: np.ndarray  # int64
    valid: np.ndarray  # bool
    skipped: list[str]  # "shard:key (reason)" of corrupt samples replaced in this batch
    replaced: list[int]  # their slots (hold a copy of another sample, valid=False)


class Loader(ABC):
    """Base class: ``epoch(e, start_step)`` yields ``Batch``es; backends implement ``_decode``."""

    backend = "base"

    def __init__(self, mode: str, data_dir, *, split: str, batch_size: int, image_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 on_corrupt: str = "error", augment: AugmentConfig):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt {on_corrupt!r}: use 'error' (stop and name the sample) "
                             f"or 'skip' (replace it, mark it invalid and count it)")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype}: use torch.float32, torch.bfloat16 or torch.float16")
        if num_threads < 1:
            raise ValueError(f"num_threads {num_threads}: must be at least 1")
        self.mode, self.split, self.batch_size, self.image_size = mode, split, batch_size, image_size
        self.rank, self.world_size, self.seed, self.num_threads = rank, world_size, seed, num_threads
        self.device, self.dtype, self.on_corrupt, self.augment = torch.device(device), dtype, on_corrupt, augment
        self.shards = ShardSet(data_dir, split)
        self.num_samples = len(self.shards)
        self.num_classes = self.shards.num_classes
        self.steps_per_epoch = self._plan(0).steps
        self._skipped_events = 0
        self._bad: dict[int, str] = {}  # sample index -> reason, found corrupt in this process
        self._corrupt_names: set[str] = set()  # "shard:key (reason)", from any process
        mean = torch.tensor(augment.mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(augment.std, device=self.device).view(1, 3, 1, 1) * 255
        self._scale, self._shift = 1 / std, -mean / std

    # ----- interface -----
    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from ``start_step`` on; a pure function of (seed, epoch, rank)."""
        plan = self._plan(epoch)
        if not 0 <= start_step <= plan.steps:
            raise ValueError(f"start_step {start_step} outside [0, {plan.steps}] for epoch {epoch}")
        for images, host in self._decode(plan, start_step):
            yield self._finish(images, host)

    def stats(self) -> dict:
        return {"skipped_corrupt": self._skipped_events,
                "corrupt_samples": sorted(self._corrupt_names),
                "num_samples": self.num_samples, "steps_per_epoch": self.steps_per_epoch,
                "backend": self.backend}

    def __len__(self) -> int:
        return self.steps_per_epoch

    # ----- shared machinery -----
    def _plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.num_samples, self.batch_size, self.rank, self.world_size,
                         self.seed, epoch, train=self.augment.train)

    @abstractmethod
    def _decode(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[torch.Tensor, HostBatch]]:
        """Yield (images, host batch) for steps start_step.. of ``plan``; images are uint8
        (B, 3, S, S), or float32 already normalised (the DALI backend's CPU fast path)."""

    def mark_corrupt(self, index: int, reason: str) -> None:
        """Record a sample that failed (read, header or decode); raise unless skipping."""
        shard, key = self.shards.name(index)
        if self.on_corrupt == "error":
            raise CorruptSampleError(shard, key, reason)
        self._bad[index] = reason

    def host_batch(self, plan: EpochPlan, step: int) -> HostBatch:
        """Read one batch's bytes and labels and draw its augmentation decisions."""
        return prepare_host_batch(self.shards, self.augment, plan, step, self._bad, self.on_corrupt)

    def _finish(self, images: torch.Tensor, host: HostBatch) -> Batch:
        self._skipped_events += len(host.skipped)
        self._corrupt_names.update(host.skipped)
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # else the backend normalised already (CPU fast path)
            x = x.float() * self._scale + self._shift  # (x/255 - mean) / std
        if self.augment.random_erasing:
            pixel = self.augment.erase_mode == "pixel"
            for i, p in enumerate(host.params):
                ex, ey, ew, eh = p.erase
                if not ew:
                    continue
                if pixel:  # timm's mode "pixel": per-pixel standard normal noise, normalised space
                    x[i, :, ey : ey + eh, ex : ex + ew] = erase_noise(p.erase_seed, eh, ew, x.device)
                else:  # timm's mode "const": zero in normalised space (the mean colour)
                    x[i, :, ey : ey + eh, ex : ex + ew] = 0
        return Batch(images=x.to(self.dtype),
                     labels=torch.from_numpy(host.labels).to(self.device),
                     valid=torch.from_numpy(host.valid).to(self.device),
                     indices=torch.from_numpy(np.asarray(host.indices, dtype=np.int64)))


def erase_noise(seed: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The (3, height, width) float32 noise of one erased box: a pure function of the seed
    (drawn in ``pipelines.sampling``) and the device type, identical for both backends."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((3, height, width), generator=generator, device=device, dtype=torch.float32)


def prepare_host_batch(shards: ShardSet, cfg: AugmentConfig, plan: EpochPlan, step: int,
                       known_bad: dict[int, str], on_corrupt: str) -> HostBatch:
    """Bytes, labels and decisions for one batch. Corrupt samples raise (``on_corrupt='error'``)
    or are replaced by the batch's first good sample with ``valid=False`` and reported."""
    positions, indices, valid = plan.samples(step)
    valid = valid.copy()
    jpegs: list[bytes | None] = []
    labels = np.zeros(len(indices), dtype=np.int64)
    params: list[SampleParams | None] = []
    skipped: list[str] = []
    for slot, (pos, index) in enumerate(zip(positions, indices)):
        index = int(index)
        try:
            if index in known_bad:
                raise CorruptSampleError(*shards.name(index), known_bad[index])
            data, labels[slot] = shards.read(index)
            try:
                width, height = jpeg_size(data)
            except ValueError as e:
                raise CorruptSampleError(*shards.name(index), str(e)) from None
        except CorruptSampleError as e:
            if on_corrupt == "error":
                raise
            known_bad[index] = e.reason
            skipped.append(f"{e.shard}:{e.key} ({e.reason})")
            jpegs.append(None)
            params.append(None)
            valid[slot] = False
            continue
        jpegs.append(data)
        params.append(sample_params(cfg, plan.seed, plan.epoch, int(pos), width, height))
    good = [i for i, j in enumerate(jpegs) if j is not None]
    if not good:
        raise CorruptSampleError(*shards.name(int(indices[0])),
                                 f"every sample of step {step} is corrupt; check the shards with `star verify`")
    replaced = [slot for slot in range(len(jpegs)) if jpegs[slot] is None]
    for slot in replaced:
        jpegs[slot], params[slot], labels[slot] = jpegs[good[0]], params[good[0]], labels[good[0]]
    return HostBatch(step, indices, jpegs, params, labels, valid, skipped, replaced)  # type: ignore[arg-type]
