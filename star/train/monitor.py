"""The k-NN monitor: how good the pretraining encoder's features are, while it trains.

Every ``monitor.knn_every_epochs`` epochs, and at the last epoch, the Trainer calls
:meth:`KnnMonitor.end_of_epoch` on every rank: each rank extracts its part of a fixed train
subset and a fixed val subset with the frozen encoder (star/probe/extract.py: eval transform,
one image per sequence, every image exactly once over the ranks), rank 0 classifies val by
DINO's weighted k-NN against train (k = 20, T = 0.07, star/probe/knn.py) and logs
``knn_top1`` / ``knn_top5`` (percent), the image counts and ``knn_seconds`` as an evaluation
record (``RUN_DIR/eval.jsonl``, TensorBoard ``eval/*``, one console line). ``metrics.jsonl``
keeps exactly one record per optimizer step, which its readers (the demo, the tests) rely on.

Training is not disturbed, so a run with the monitor on has the weights of the same run
with it off, and resumes bit-identically:

* the subsets are drawn by their own generator from (seed, split)
  (``star.probe.subset_indices``): the same images at every probe, across resumes too;
* the probe loaders are not the training loader, whose batches are a pure function of
  (seed, epoch, step) (pipelines/sampling.py);
* the host and device RNG states (Python, NumPy, torch, CUDA) are captured before a probe and
  restored after it: the baseline backend's torch DataLoader draws its worker seed from
  torch's global generator when it starts, which would shift drop path's masks for the
  rest of the run;
* the encoder runs under no_grad in eval mode and is put back in train mode.

The loaders are built once, at the first probe, and reused: building DALI pipelines is the
fixed cost of a probe (10-15 s). The cost at 1600 epochs is estimated in
star/configs/star_b_1600ep.yaml.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipelines.shards import ShardSet
from star.config import Config, ConfigError
from star.probe.extract import extract_features, gather_features, probe_loader
from star.probe.knn import knn_classify
from star.train.checkpoint import capture_rng, restore_rng
from star.train.distributed import all_reduce_sum


def monitor_enabled(cfg: Config) -> bool:
    return cfg.kind == "pretrain" and cfg.monitor.knn_every_epochs > 0


def knn_due(epoch_done: int, every: int, epochs: int) -> bool:
    """Whether the monitor runs after (0-based) epoch ``epoch_done``: every ``every``-th epoch
    and the last one; never with ``every`` = 0."""
    if every <= 0:
        return False
    return (epoch_done + 1) % every == 0 or epoch_done + 1 == epochs


def check_monitor_data(cfg: Config) -> None:
    """Before any process group starts: the monitor also needs the val split (a pretraining
    run otherwise reads only the train split, which ``runtime.check_data`` checks)."""
    if not monitor_enabled(cfg):
        return
    setting, split = f"monitor.knn_every_epochs={cfg.monitor.knn_every_epochs}", cfg.data.val_split
    manifest = Path(cfg.data.dir) / f"{split}.json"
    if not manifest.is_file():
        raise ConfigError(f"{setting} needs the {split} split: no {manifest}; write it with `star shard --src "
                          f"SRC --out {cfg.data.dir} --split {split}`, or set monitor.knn_every_epochs=0")
    try:
        ShardSet(cfg.data.dir, split)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{setting}: split {split!r} of data.dir={cfg.data.dir} is not readable: {exc}; "
                          f"or set monitor.knn_every_epochs=0") from None


def _amp_dtype(engine) -> torch.dtype | None:
    """The training forward's autocast dtype (DeepSpeed ``torch_autocast``), None without."""
    enabled = getattr(engine, "torch_autocast_enabled", None)
    return engine.torch_autocast_dtype() if enabled is not None and enabled() else None


class KnnMonitor:
    """The k-NN figure of ``engine.module`` at the epochs :func:`knn_due` names (collective)."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, device: str) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.enabled = monitor_enabled(cfg)
        self.loaders = None  # (train, val), built at the first probe

    def due(self, epoch_done: int) -> bool:
        return self.enabled and knn_due(epoch_done, self.cfg.monitor.knn_every_epochs, self.cfg.schedule.epochs)

    def build_loaders(self) -> tuple:
        m, d = self.cfg.monitor, self.cfg.data
        common = dict(image_size=self.cfg.model.img_size, batch_size=self.cfg.batch.micro_images, rank=self.rank,
                      world_size=self.world_size, device=self.device, backend=d.backend,
                      num_threads=d.num_threads, seed=self.cfg.seed, on_corrupt=d.on_corrupt)
        return (probe_loader(d.dir, d.train_split, max_images=m.knn_train_images, **common),
                probe_loader(d.dir, d.val_split, max_images=m.knn_val_images, **common))

    def end_of_epoch(self, epoch_done: int, step: int, engine, logger) -> dict | None:
        """Probe after ``epoch_done`` when due; the logged record on rank 0, None elsewhere
        (and when not due or when the figure had to be skipped)."""
        if not self.due(epoch_done):
            return None
        start = time.perf_counter()
        rng = capture_rng()
        try:
            result = self._probe(engine)
        finally:
            restore_rng(rng)
        seconds = time.perf_counter() - start
        if result is None:
            return None
        if "missing" in result:
            logger.info(f"[yellow]k-NN monitor, epoch {epoch_done}: skipped, {result['missing']} image(s) of its "
                        f"subsets were corrupt and skipped (data.on_corrupt=skip) ({seconds:.1f} s)[/yellow]")
            return None
        record = {"epoch": epoch_done, "step": step, "knn_top1": result["top1"], "knn_top5": result["top5"],
                  "images": result["images"], "train_images": result["train_images"], "knn_seconds": seconds}
        logger.evaluation(record)
        return record

    def _probe(self, engine) -> dict | None:
        if self.loaders is None:
            self.loaders = self.build_loaders()
        train_loader, val_loader = self.loaders
        model, pool, amp = engine.module, self.cfg.monitor.knn_pool, _amp_dtype(engine)
        train = extract_features(model, train_loader, pool=pool, amp_dtype=amp, description="k-NN train")
        val = extract_features(model, val_loader, pool=pool, amp_dtype=amp, description="k-NN val")
        # A corrupt image skipped by a probe loader leaves a hole that gather_features' exactly-once
        # check refuses on rank 0 alone, between collectives; every rank agrees first instead.
        got_train, got_val = all_reduce_sum([float(len(train)), float(len(val))], self.device)
        missing = train_loader.num_samples + val_loader.num_samples - int(got_train) - int(got_val)
        if missing:
            return {"missing": missing} if self.rank == 0 else None
        train = gather_features(train, train_loader.num_samples)
        val = gather_features(val, val_loader.num_samples)
        if train is None:
            return None
        result = knn_classify(train.features, train.labels, val.features, val.labels,
                              num_classes=train.num_classes)
        result["train_images"] = len(train)
        return result
