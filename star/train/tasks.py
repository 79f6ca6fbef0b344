"""The two training tasks: what differs between pretraining and fine-tuning (the loop's ``Task``).

``PretrainTask``: images in, the model's own reconstruction loss out, nothing at epoch ends.
``FinetuneTask``: Mixup / CutMix with label smoothing, cross-entropy on soft targets, and after
every ``eval_every_epochs`` epochs top-1 / top-5 of the model and its EMA on the validation
split, keeping the best weights in RUN_DIR/best.pth. Both are built by
:func:`star.train.runtime.build_training`; the command modules only parse options.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.manifest import read_manifest
from star.config import Config, ConfigError
from star.train.init_weights import read_init_state
from star.train.mixup import Mixup
from star.train.validation import evaluate


class PretrainTask:
    """Pretraining: images in, the model's own reconstruction loss out."""

    def __init__(self, train_loader) -> None:
        self.train_loader = train_loader
        self.rng_generators: dict[str, torch.Generator] = {}
        self._split: tuple[dict[str, torch.Tensor], int] = ({}, 0)  # this step's loss split: sums, count

    def loss(self, engine, batch) -> torch.Tensor:
        out = engine(batch.images)
        sums, count = self._split
        self._split = ({k: sums.get(k, 0) + out[k] for k in ("loss_image", "loss_sep") if k in out}, count + 1)
        return out["loss"]

    def last_metrics(self) -> dict[str, float]:
        """This rank's loss split (image clusters / separators), mean over the step's micro-batches."""
        (sums, count), self._split = self._split, ({}, 0)
        return {k: float(v) / count for k, v in sums.items()}

    def end_of_epoch(self, epoch, step, engine, ema):
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class FinetuneTask:
    """Fine-tuning. ``val_loader`` None: no evaluation (the step profiler times the step only)."""

    def __init__(self, cfg: Config, run_dir: Path | None, model, train_loader, val_loader, *, device: str,
                 amp_dtype, is_main: bool, seed: int) -> None:
        self.cfg, self.run_dir, self.model = cfg, Path(run_dir) if run_dir is not None else None, model
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device, self.amp_dtype, self.is_main = device, amp_dtype, is_main
        self.generator = torch.Generator()  # CPU: mixup draws its decisions on the host
        self.generator.manual_seed(seed)
        self.rng_generators = {"mixup": self.generator}
        self.best: dict = {"metric": None, "epoch": None}
        m = cfg.mixup
        self.mixup = None
        if m.mixup_alpha > 0 or m.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                               switch_prob=m.switch_prob, label_smoothing=m.label_smoothing,
                               num_classes=cfg.model.num_classes)

    def loss(self, engine, batch) -> torch.Tensor:
        if self.mixup is None:
            return F.cross_entropy(engine(batch.images).float(), batch.labels,
                                   label_smoothing=self.cfg.mixup.label_smoothing)
        images, targets = self.mixup(batch.images, batch.labels, generator=self.generator)
        return soft_target_cross_entropy(engine(images), targets)

    def end_of_epoch(self, epoch: int, step: int, engine, ema) -> dict | None:
        last = epoch + 1 == self.cfg.schedule.epochs
        if self.val_loader is None or ((epoch + 1) % self.cfg.eval_every_epochs and not last):
            return None
        result = evaluate(engine.module, self.val_loader, device=self.device, amp_dtype=self.amp_dtype, epoch=0)
        record = {"top1": result["top1"], "top5": result["top5"], "images": result["images"]}
        if ema is not None:
            ema_result = evaluate(ema.module, self.val_loader, device=self.device, amp_dtype=self.amp_dtype)
            record.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
        metric = max(record["top1"], record.get("ema_top1", float("-inf")))
        if self.best["metric"] is None or metric > self.best["metric"]:
            self.best = {"metric": metric, "epoch": epoch}
            if self.is_main and self.run_dir is not None:
                self._save_best(engine.module, ema, epoch, step, record)
        record["best"] = self.best["metric"]
        return record

    def _save_best(self, model, ema, epoch: int, step: int, record: dict) -> None:
        state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "ema": ema.state_dict() if ema is not None else None,
                 "epoch": epoch, "step": step, **record}
        tmp = self.run_dir / "best.pth.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / "best.pth")

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best") or {"metric": None, "epoch": None})


def fill_num_classes(cfg: Config) -> None:
    """``model.num_classes: null`` means the class count of the training shards (their manifest)."""
    if cfg.model.num_classes is not None:
        return
    manifest = Path(cfg.data.dir) / f"{cfg.data.train_split}.json"
    if not manifest.is_file():
        raise ConfigError(f"model.num_classes is null and {manifest} does not exist; set model.num_classes "
                          f"or point data.dir at shards written by `star shard`")
    cfg.model.num_classes = int(read_manifest(manifest)["num_classes"])  # damaged: one line naming it


def needs_init(cfg: Config, run_dir: Path | None) -> bool:
    """Fine-tuning from ``cfg.init``: a new run with an init (a resumed run restores its own)."""
    return (cfg.kind == "finetune" and bool(cfg.init) and run_dir is not None
            and not (Path(run_dir) / "checkpoints" / "latest").is_file())


def load_init_weights(model: torch.nn.Module, cfg: Config, run_dir: Path, *, verbose: bool,
                      state: dict | None = None) -> None:
    """Fine-tuning's starting weights from ``cfg.init`` (``state``: already read and checked)."""
    if not needs_init(cfg, run_dir):
        return
    report = model.load_pretrained(state if state is not None else read_init_state(cfg), verbose=False)
    if verbose:
        print(f"init from {cfg.init}:\n{report}", flush=True)
