"""What `star pretrain` and `star finetune` share: run-dir config resolution, seeding, model
and loader construction, :func:`build_training` (a run's parts, also used by `star profile
step`) and :func:`run_training` (the DeepSpeed bring-up around the Trainer)."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines import build_loader
from star.config import Config, ConfigError, diff_configs, load_config, read_yaml_file
from star.models import create_model
from star.ops import require_kernels
from star.train.checkpoint import Checkpointer
from star.train.distributed import DistEnv, destroy, init_distributed, resolve_device, resolve_dist_env
from star.train.engine import (
    BatchPlan,
    autocast_dtype,
    build_ds_config,
    build_engine,
    plan_batches,
    resolve_ds_config_path,
)
from star.train.init_weights import check_init_covers_encoder, read_init_state
from star.train.loop import Trainer
from star.train.monitor import check_monitor_data
from star.train.param_groups import layer_decay_groups, strip_names, weight_decay_groups
from star.train.run_info import collect_run_info, write_run_info
from star.train.seeds import mixup_seed, rank_stream_seed, weights_seed
from star.train.stopping import StopFlag
from star.train.tasks import FinetuneTask, PretrainTask, fill_num_classes, load_init_weights, needs_init

# Keys that may change when a run is resumed: they do not change the trajectory.
RESUMABLE_CHANGES = ("name", "data.dir", "data.num_threads", "data.backend", "data.on_corrupt", "log.",
                     "checkpoint.", "schedule.max_steps", "max_nonfinite_in_row", "init_allow_partial", "device",
                     "ds_config", "eval_every_epochs", "model.kernels", "monitor.")
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


def build_model(cfg: Config) -> torch.nn.Module:
    """The model the config names, with its ``model.*`` overrides (``model.config`` records both)."""
    return create_model(cfg.model.name, **cfg.model.model_overrides())


def build_data_loader(cfg: Config, mode: str, split: str, batch_size: int, *, rank: int, world_size: int,
                      device: str, data_dir: str | None = None):
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


@dataclass
class TrainingParts:
    """What :func:`build_training` returns: everything a training run (or the step profiler) drives."""

    engine: Any                  # the DeepSpeed engine; engine.module is the model
    task: PretrainTask | FinetuneTask
    plan: BatchPlan
    ds_config: dict              # the filled DeepSpeed JSON
    amp_dtype: torch.dtype | None
    device: str                  # "cpu" or this rank's "cuda:N"
    train_loader: Any
    val_loader: Any | None       # fine-tuning's evaluation split; None otherwise or when profiling


def build_training(cfg: Config, dist_env: DistEnv, device: str, run_dir: Path | None = None, *,
                   model_factory: Callable[[Config], torch.nn.Module] = build_model,
                   init_state: dict | None = None) -> TrainingParts:
    """Build a run's parts in their fixed order (the order fixes the random streams, see
    star/train/seeds.py): batch plan, DeepSpeed JSON, model (fine-tuning: with its ``init``
    weights), engine, loaders, task. The process group must be up (``init_distributed``).

    ``run_dir`` None builds what the step profiler times: no init weights, no validation loader.
    """
    if device.startswith("cuda"):
        device = f"cuda:{dist_env.local_rank}"  # loaders and collectives on this rank's GPU
    if cfg.kind == "finetune":
        fill_num_classes(cfg)
    plan = plan_batches(cfg, dist_env.world_size)
    ds = build_ds_config(resolve_ds_config_path(cfg.ds_config, device.split(":")[0]), plan, cfg.optim.grad_clip)
    seed_everything(weights_seed(cfg.seed))
    model = model_factory(cfg)
    if cfg.kind == "finetune" and run_dir is not None:
        load_init_weights(model, cfg, run_dir, verbose=dist_env.is_main, state=init_state)
    model.to(device)
    if cfg.optim.layer_decay is not None:
        groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay,
                                    cfg.optim.ssm_weight_decay)
    else:
        groups = weight_decay_groups(model, cfg.optim.weight_decay, cfg.optim.ssm_weight_decay)
    engine = build_engine(model, strip_names(groups), cfg, ds)
    seed_everything(rank_stream_seed(cfg.seed, dist_env.rank))
    amp = autocast_dtype(ds)
    common = dict(rank=dist_env.rank, world_size=dist_env.world_size, device=device)
    train = build_data_loader(cfg, cfg.kind, cfg.data.train_split, plan.micro_images, **common)
    val = None
    if cfg.kind == "pretrain":
        task = PretrainTask(train)
    else:
        if run_dir is not None:
            val = build_data_loader(cfg, "eval", cfg.data.val_split, plan.micro_images, **common)
        task = FinetuneTask(cfg, run_dir, engine.module, train, val, device=device, amp_dtype=amp,
                            is_main=dist_env.is_main, seed=mixup_seed(cfg.seed, dist_env.rank))
    return TrainingParts(engine=engine, task=task, plan=plan, ds_config=ds, amp_dtype=amp, device=device,
                         train_loader=train, val_loader=val)


def run_training(cfg: Config, run_dir: Path, *,
                 model_factory: Callable[[Config], torch.nn.Module] = build_model) -> int:
    """Bring up distributed + DeepSpeed, build the run (:func:`build_training`), train; return the
    exit code. ``model_factory(cfg)`` builds the network (tests wrap it)."""
    check_data(cfg, [cfg.data.train_split] + ([cfg.data.val_split] if cfg.kind == "finetune" else []))
    check_monitor_data(cfg)  # the k-NN monitor also reads the val split
    Checkpointer(run_dir, rank=0, keep_last=1).check_latest()  # a planted pickle stops us here
    init_state = None
    if needs_init(cfg, run_dir):  # read and check --init before DeepSpeed starts
        fill_num_classes(cfg)
        init_state = read_init_state(cfg)
        check_init_covers_encoder(cfg, init_state, model_factory(cfg))
    device = resolve_device(cfg.device)
    kernel_plan = require_kernels(cfg.model.kernels, device)  # `fused` without usable kernels: exit 2 here
    resolve_ds_config_path(cfg.ds_config, device)  # fail on a bad name before any process group
    plan_batches(cfg, resolve_dist_env().world_size)  # elastic resume: a world size that cannot keep the batch
    stop = StopFlag().install()  # from the start: a SIGUSR1 during start-up must not kill the job
    try:
        dist_env = init_distributed(device)
        rank_dev = f"cuda:{dist_env.local_rank}" if device == "cuda" else device
        run_info = collect_run_info(kernel_plan, dist_env, rank_dev)  # a collective: every rank calls it
        if dist_env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
            write_run_info(run_dir, run_info)
        parts = build_training(cfg, dist_env, device, run_dir, model_factory=model_factory,
                               init_state=init_state)
        trainer = Trainer(cfg, run_dir, engine=parts.engine, loader=parts.train_loader, task=parts.task,
                          plan=parts.plan, dist_env=dist_env, device=parts.device, run_info=run_info)
        return trainer.fit(stop)
    finally:
        stop.uninstall()
        destroy()
