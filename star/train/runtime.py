"""What `star pretrain` and `star finetune` share: run-dir config resolution, seeding, model
and loader construction, and the DeepSpeed bring-up around the Trainer."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from star.config import Config, ConfigError, diff_configs, load_config, read_yaml_file
from star.train.monitor import check_monitor_data

# Keys that may change when a run is resumed: they do not change the trajectory.
RESUMABLE_CHANGES = ("name", "data.dir", "data.num_threads", "data.backend", "data.on_corrupt", "log.", "checkpoint.",
                     "schedule.max_steps", "max_nonfinite_in_row", "init_allow_partial", "device", "ds_config",
                     "eval_every_epochs", "monitor.")
# Keys that may change with a warning: deliberate decisions about the rest of a run (train
# longer; another node count needs another micro batch: same global batch, other rounding).
RESUMABLE_WITH_WARNING = ("schedule.epochs", "batch.micro_images")


def resolve_run_config(config_arg: str | None, overrides: list[str], run_dir_arg: str | None,
                       kind: str, complete: Callable[[Config], None] | None = None) -> tuple[Config, Path]:
    """The config of a run: from --config and overrides, checked against RUN_DIR/config.yaml
    when the run dir holds a committed checkpoint (a resume), or reloaded from it when --config
    is omitted. Only a committed checkpoint binds a run to its recipe: a run that failed before
    its first checkpoint (a typo, a missing shard) may be started again with corrected settings.
    ``complete(cfg)`` fills values derived from elsewhere (the class count from the shards)
    before the comparison."""
    run_dir = Path(run_dir_arg) if run_dir_arg else None
    saved_path = run_dir / "config.yaml" if run_dir else None
    saved = None
    if saved_path is not None and saved_path.is_file():
        saved = load_config(base=read_yaml_file(saved_path))
    committed = run_dir is not None and (run_dir / "checkpoints" / "latest").is_file()
    if config_arg is None and saved is None:
        raise ConfigError("give --config NAME|PATH (a preset such as star_b_1600ep or a YAML file), or "
                          "--run-dir of an existing run to resume it")
    if config_arg is None:
        cfg = load_config(base=saved.to_dict(), overrides=overrides)
    else:
        cfg = load_config(config_arg, overrides)
    if cfg.kind != kind:
        raise ConfigError(f"config {cfg.name or config_arg!r} is a {cfg.kind} config; use `star {cfg.kind}` "
                          f"(or a {kind} preset)")
    if complete is not None:
        complete(cfg)
    if saved is not None and committed:
        diff = diff_configs(saved, cfg)
        changed = {k: v for k, v in diff.items() if not k.startswith(RESUMABLE_CHANGES + RESUMABLE_WITH_WARNING)}
        warned = {k: v for k, v in diff.items() if k.startswith(RESUMABLE_WITH_WARNING)}
        if warned and os.environ.get("RANK", "0") == "0":
            for key, (old, new) in warned.items():
                print(f"warning: {key} changes from {old!r} to {new!r} in the resumed run {run_dir}",
                      file=sys.stderr)
        if changed:
            lines = "\n".join(f"  {k}: run has {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"{run_dir} holds a run with a different config; resuming would mix two "
                              f"recipes:\n{lines}\nUse a new --run-dir, or repeat the run's settings.")
    if run_dir is None:
        run_dir = Path("runs") / (cfg.name or kind)
    return cfg, run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_kwargs(cfg: Config) -> dict:
    """Overrides for ``create_model``: the fields the config sets (None = model default)."""
    m = cfg.model
    if cfg.kind == "pretrain":
        fields = {"img_size": m.img_size, "images_per_seq": m.images_per_seq, "sep_type": m.sep_type,
                  "sep_value": m.sep_value, "sep_position": m.sep_position, "drop_path": m.drop_path}
    else:
        fields = {"img_size": m.img_size, "cls_position": m.cls_position, "drop_path": m.drop_path,
                  "num_classes": m.num_classes}
    fields.update(embed_dim=m.embed_dim, depth=m.depth)
    return {k: v for k, v in fields.items() if v is not None}


def build_model(cfg: Config) -> torch.nn.Module:
    from star.models import create_model

    return create_model(cfg.model.name, **model_kwargs(cfg))


def build_data_loader(cfg: Config, mode: str, split: str, batch_size: int, *, rank: int, world_size: int,
                      device: str, data_dir: str | None = None):
    from pipelines import build_loader

    return build_loader(mode, data_dir or cfg.data.dir, split=split, batch_size=batch_size,
                        image_size=cfg.model.img_size, rank=rank, world_size=world_size, seed=cfg.seed,
                        backend=cfg.data.backend, num_threads=cfg.data.num_threads, device=device,
                        dtype=torch.float32, on_corrupt=cfg.data.on_corrupt, **cfg.data.loader_kwargs)


def check_data(cfg: Config, splits: list[str]) -> None:
    """Fail before any process group starts when the shards are not there or cannot feed one
    optimizer step (the first split is the training split)."""
    from pipelines.shards import ShardSet

    for i, split in enumerate(splits):
        manifest = Path(cfg.data.dir) / f"{split}.json"
        if not manifest.is_file():
            raise ConfigError(f"no {manifest}: set data.dir=DIR to a shard directory written by "
                              f"`star shard --src SRC --out DIR --split {split}`")
        try:
            count = len(ShardSet(cfg.data.dir, split))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"data.dir={cfg.data.dir}: split {split!r} is not readable: {exc}") from None
        if i == 0 and count < cfg.batch.global_images:
            raise ConfigError(f"the {split} split of {cfg.data.dir} has {count} images, fewer than one optimizer "
                              f"step of batch.global_images={cfg.batch.global_images}; lower "
                              f"batch.global_images (and batch.micro_images) or use more data")


def run_training(cfg: Config, run_dir: Path, make_task: Callable, *,
                 model_factory: Callable[[Config], torch.nn.Module] = build_model,
                 prepare_model: Callable | None = None) -> int:
    """Bring up distributed + DeepSpeed, build everything, train; return the exit code.

    ``make_task(cfg, model, dist_env, device, plan, amp_dtype)`` returns the Task; ``prepare_model(model)``
    runs after construction (fine-tuning loads the pretrained weights there).
    """
    from star.train.distributed import destroy, init_distributed, resolve_device
    from star.train.engine import (autocast_dtype, build_ds_config, build_engine, plan_batches,
                                   resolve_ds_config_path)
    from star.train.loop import Trainer
    from star.train.param_groups import layer_decay_groups, strip_names, weight_decay_groups
    from star.train.stopping import StopFlag

    check_data(cfg, [cfg.data.train_split] + ([cfg.data.val_split] if cfg.kind == "finetune" else []))
    check_monitor_data(cfg)  # the k-NN monitor also reads the val split
    from star.train.checkpoint import Checkpointer

    Checkpointer(run_dir, rank=0, keep_last=1).check_latest()  # a planted pickle stops us here
    device = resolve_device(cfg.device)
    ds_path = resolve_ds_config_path(cfg.ds_config, device)  # fail on a bad name before any process group
    stop = StopFlag().install()  # from the start: a SIGUSR1 during start-up must not kill the job
    try:
        dist_env = init_distributed(device)
        if device == "cuda":
            device = f"cuda:{dist_env.local_rank}"  # loaders and collectives on this rank's GPU
        plan = plan_batches(cfg, dist_env.world_size)
        ds = build_ds_config(ds_path, plan, cfg.optim.grad_clip)
        if dist_env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = model_factory(cfg)
        if prepare_model is not None:
            prepare_model(model)
        model.to(device)
        if cfg.optim.layer_decay is not None:
            groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        else:
            groups = weight_decay_groups(model, cfg.optim.weight_decay)
        engine = build_engine(model, strip_names(groups), cfg, ds)
        seed_everything(cfg.seed + 1000 * dist_env.rank + 1)  # per-rank streams (drop path, mixup)
        task = make_task(cfg, engine.module, dist_env, device, plan, autocast_dtype(ds))
        trainer = Trainer(cfg, run_dir, engine=engine, loader=task.train_loader, task=task, plan=plan,
                          dist_env=dist_env, device=device)
        return trainer.fit(stop)
    finally:
        stop.uninstall()
        destroy()


def cli_error(prog: str, exc: Exception) -> int:
    from star.train import EXIT_USAGE

    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE
