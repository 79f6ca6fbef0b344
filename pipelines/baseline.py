"""Baseline backend: PIL decoding in torch DataLoader worker processes.

The fallback where DALI is missing and the yardstick for it. Each worker renders whole
batches (one DataLoader item = one step), so the batch composition and every augmentation
decision are exactly those of the DALI backend (``pipelines.sampling``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines import pil_ops
from pipelines.loader import HostBatch, Loader, prepare_host_batch
from pipelines.sampling import EpochPlan
from pipelines.shards import CorruptSampleError


class _Steps(Sampler):
    """Yields (epoch, step) keys for the epoch being read; retargeted by each ``epoch()`` call."""

    def __init__(self):
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        return iter([(self.epoch, step) for step in range(self.start, self.stop)])

    def __len__(self) -> int:
        return self.stop - self.start


class _StepDataset(Dataset):
    """Item (epoch, step) = that step rendered; lives in the worker processes."""

    def __init__(self, loader: BaselineLoader):
        self.shards, self.cfg, self.on_corrupt = loader.shards, loader.augment, loader.on_corrupt
        self.plan_args = dict(num_samples=loader.num_samples, batch_size=loader.batch_size,
                              rank=loader.rank, world_size=loader.world_size, seed=loader.seed,
                              train=loader.augment.train)
        self.plan: EpochPlan | None = None
        self.known_bad: dict[int, str] = {}

    def __getitem__(self, key: tuple[int, int]):
        """(uint8 images, host batch), or (None, (shard, key, reason)) to raise in the main
        process: a worker's exception would reach it re-typed, without the shard and key."""
        try:
            return self._render(*key)
        except CorruptSampleError as e:
            return None, (e.shard, e.key, e.reason)

    def _render(self, epoch: int, step: int) -> tuple[torch.Tensor, HostBatch]:
        if self.plan is None or self.plan.epoch != epoch:
            self.plan = EpochPlan(epoch=epoch, **self.plan_args)
        host = prepare_host_batch(self.shards, self.cfg, self.plan, step, self.known_bad, self.on_corrupt)
        size = self.cfg.image_size
        out = np.empty((len(host.jpegs), 3, size, size), dtype=np.uint8)
        replaced = set(host.replaced)  # copies of another slot: rendered from that slot below
        for slot, (data, params) in enumerate(zip(host.jpegs, host.params)):
            if slot in replaced:
                continue
            try:
                out[slot] = pil_ops.render(data, params, size, self.cfg.interpolation, self.cfg.mean)
            except Exception as e:  # PIL raises several types on broken data
                index = int(host.indices[slot])
                shard, key = self.shards.name(index)
                reason = f"PIL cannot decode it ({type(e).__name__}: {e})"
                if self.on_corrupt == "error":
                    raise CorruptSampleError(shard, key, reason) from None
                self.known_bad[index] = reason
                host.skipped.append(f"{shard}:{key} ({reason})")
                host.valid[slot] = False
                replaced.add(slot)
        if replaced:
            good = [s for s in range(len(out)) if s not in replaced]
            if not good:
                raise CorruptSampleError(*self.shards.name(int(host.indices[0])),
                                         f"every sample of step {host.step} is corrupt: {host.skipped}")
            for slot in replaced:
                out[slot], host.labels[slot] = out[good[0]], host.labels[good[0]]
        host.jpegs = []  # do not ship the bytes back to the main process
        return torch.from_numpy(out), host


class BaselineLoader(Loader):
    """Worker processes persist across epochs and start by forkserver: forking a process that
    runs DALI or torch threads can deadlock the child. As with "spawn", a script that uses this
    backend needs the ``if __name__ == "__main__":`` guard (the ``star`` commands have it)."""

    backend = "baseline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._steps = _Steps()
        self._loader: DataLoader | None = None

    def _decode(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[torch.Tensor, HostBatch]]:
        if start_step >= plan.steps:
            return
        if self._loader is None:
            # The loader's own generator: without it the DataLoader draws its workers' base seed from
            # torch's global generator when the first iterator starts, which shifts the training
            # process's random stream (drop path) by one draw, and a resumed run starts its iterator
            # at another point of that stream than an uninterrupted one. The workers draw nothing
            # (every decision comes from pipelines.sampling), so the seed's value does not matter.
            self._loader = DataLoader(
                _StepDataset(self), batch_size=None, sampler=self._steps, num_workers=self.num_threads,
                prefetch_factor=2, persistent_workers=True, multiprocessing_context="forkserver",
                pin_memory=self.device.type == "cuda", collate_fn=_identity,
                generator=torch.Generator().manual_seed(self.seed))
        self._steps.epoch, self._steps.start, self._steps.stop = plan.epoch, start_step, plan.steps
        for images, host in self._loader:
            if images is None:
                raise CorruptSampleError(*host)
            yield images, host


def _identity(item):
    return item
