"""`star finetune`: the 4-scan classifier from a pretrained checkpoint, with EMA and evaluation.

    star finetune --config finetune_b --init runs/star_b_1600ep --run-dir runs/ft_b
    star finetune --config finetune_b --init checkpoint-1599.pth     # ARM's official weights

``--init`` takes a pretraining run dir (its newest checkpoint is consolidated), a file from
`star export`, or ARM's checkpoint (a state dict under "model", read with weights_only=True);
the position embedding is interpolated and missing / unexpected keys are reported. Training
uses layer-wise lr decay, drop path, mixup / cutmix / label smoothing and random erasing; after
every epoch the model and its EMA are evaluated on the whole validation split (top-1 / top-5
in RUN_DIR/eval.jsonl) and the best weights are kept in RUN_DIR/best.pth. Resume, graceful
stop and exit codes are those of `star pretrain`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.manifest import read_manifest
from star.config import Config, ConfigError
from star.train.evaluate import evaluate
from star.train.pretrain import build_parser
from star.train.runtime import build_data_loader, build_model, cli_error, resolve_run_config, run_training


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class FinetuneTask:
    def __init__(self, cfg: Config, run_dir: Path, model, train_loader, val_loader, *, device: str,
                 amp_dtype, is_main: bool, seed: int) -> None:
        self.cfg, self.run_dir, self.model = cfg, Path(run_dir), model
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device, self.amp_dtype, self.is_main = device, amp_dtype, is_main
        self.generator = torch.Generator()  # CPU: mixup draws its decisions on the host
        self.generator.manual_seed(seed)
        self.rng_generators = {"mixup": self.generator}
        self.best: dict = {"metric": None, "epoch": None}
        m = cfg.mixup
        self.mixup = None
        if m.mixup_alpha > 0 or m.cutmix_alpha > 0:
            from star.augment import Mixup

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
        if (epoch + 1) % self.cfg.eval_every_epochs and not last:
            return None
        result = evaluate(engine.module, self.val_loader, device=self.device, amp_dtype=self.amp_dtype, epoch=0)
        record = {"top1": result["top1"], "top5": result["top5"], "images": result["images"]}
        if ema is not None:
            ema_result = evaluate(ema.module, self.val_loader, device=self.device, amp_dtype=self.amp_dtype)
            record.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
        metric = max(record["top1"], record.get("ema_top1", float("-inf")))
        if self.best["metric"] is None or metric > self.best["metric"]:
            self.best = {"metric": metric, "epoch": epoch}
            if self.is_main:
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


def _num_classes(cfg: Config) -> int:
    """The class count of the training shards (their manifest)."""
    manifest = Path(cfg.data.dir) / f"{cfg.data.train_split}.json"
    if not manifest.is_file():
        raise ConfigError(f"model.num_classes is null and {manifest} does not exist; set model.num_classes "
                          f"or point data.dir at shards written by `star shard`")
    return read_manifest(manifest)["num_classes"]  # a damaged manifest: one line naming it, exit 2


def fill_num_classes(cfg: Config) -> None:
    """``model.num_classes: null`` means the class count of the training shards."""
    if cfg.model.num_classes is None:
        cfg.model.num_classes = _num_classes(cfg)


# Parameters a pretraining checkpoint does not hold: the class token, the final norm (ARM's
# pretraining encoder feeds its decoder without one) and the classification head.
TRAINED_FROM_SCRATCH = re.compile(r"^(cls_token$|norm_f\.|head\.)")


def check_init_covers_encoder(cfg: Config, state: dict) -> str:
    """Load ``state`` into a throwaway model of the target shape, before DeepSpeed starts, and
    refuse (unless ``init_allow_partial``) when any encoder parameter would keep its random
    initialisation: a checkpoint of another depth or width, or of another model, would
    otherwise fine-tune from partly random weights with exit code 0. Returns the load report."""
    model = build_model(cfg)
    try:
        report = model.load_pretrained(dict(state), verbose=False)
    except ValueError as exc:
        raise ConfigError(f"init={cfg.init} does not fit model {cfg.model.name}: {exc}") from None
    params = dict(model.named_parameters())
    missing = [k for k in report.missing_keys if k in params and not TRAINED_FROM_SCRATCH.match(k)]
    if missing and not cfg.init_allow_partial:
        total = sum(1 for k in params if not TRAINED_FROM_SCRATCH.match(k))
        raise ConfigError(f"init={cfg.init} leaves {len(missing)} of {total} encoder parameters of "
                          f"{cfg.model.name} at random initialisation:\n{_missing_table(missing, params)}\n"
                          f"Give a checkpoint of "
                          f"the same width and depth, or set init_allow_partial=true to fine-tune anyway")
    return str(report)


def _missing_table(missing: list[str], params: dict) -> str:
    """One row per block whose tensors are all missing, else one row per tensor."""
    def block(name: str) -> str:
        match = re.match(r"(layers\.\d+)\.", name)
        return match.group(1) if match else name

    rows, seen = [], set()
    for name in missing:
        group = block(name)
        if group in seen:
            continue
        members = [k for k in params if block(k) == group]
        lost = [k for k in members if k in missing]
        if len(members) > 1 and len(lost) == len(members):
            rows.append(f"  {group + '.*':<48} all {len(members)} tensors")
            seen.add(group)
        else:
            rows.append(f"  {name:<48} {tuple(params[name].shape)}")
    return "\n".join(rows)


def read_init(cfg: Config, run_dir: Path) -> dict | None:
    """The ``init`` weights, read before DeepSpeed starts so that a bad file fails in seconds;
    None when training from scratch or when resuming (the run restores its own weights)."""
    from star.train.weights import read_weights

    if not cfg.init or (run_dir / "checkpoints" / "latest").is_file():
        return None
    try:
        state = read_weights(cfg.init)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        raise ConfigError(f"init={cfg.init}: cannot read pretrained weights: {exc}") from None
    check_init_covers_encoder(cfg, state)
    return state


def run_finetune(cfg: Config, run_dir: Path, **kwargs) -> int:
    fill_num_classes(cfg)
    init_state = read_init(cfg, run_dir)

    def load_init(model) -> None:
        if init_state is None:
            return
        report = model.load_pretrained(init_state, verbose=False)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"init from {cfg.init}:\n{report}", flush=True)

    def make_task(cfg, model, dist_env, device, plan, amp_dtype) -> FinetuneTask:
        common = dict(rank=dist_env.rank, world_size=dist_env.world_size, device=device)
        train = build_data_loader(cfg, "finetune", cfg.data.train_split, plan.micro_images, **common)
        val = build_data_loader(cfg, "eval", cfg.data.val_split, plan.micro_images, **common)
        return FinetuneTask(cfg, run_dir, model, train, val, device=device, amp_dtype=amp_dtype,
                            is_main=dist_env.is_main, seed=cfg.seed + 7919 * dist_env.rank)

    return run_training(cfg, run_dir, make_task, prepare_model=load_init, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("star finetune", __doc__)
    parser.add_argument("--init", metavar="PATH",
                        help="pretrained weights: run dir, exported .pth, or ARM's checkpoint-1599.pth "
                             "(same as init=PATH; omit to train from scratch)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"init={args.init}"] if args.init else [])
    try:
        cfg, run_dir = resolve_run_config(args.config, overrides, args.run_dir, kind="finetune",
                                          complete=fill_num_classes)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        return run_finetune(cfg, run_dir)
    except ConfigError as exc:
        return cli_error("star finetune", exc)
