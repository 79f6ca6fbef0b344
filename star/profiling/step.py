"""The whole training step: real batches from the configured loader through the DeepSpeed
engine the trainer builds (``star.train.runtime.build_training``: the same batch plan, JSON
config, precision, parameter groups, seeds and task).

One optimizer step is ``accum_steps`` micro-steps, each: wait for the next batch, forward
(the task's loss), backward, ``engine.step()``; the last ``engine.step()`` of the step runs
the optimizer (gradient clipping, AdamW, ZeRO's parameter all-gather). With ``ema.enabled``
the EMA update follows, as in the trainer. The device is
synchronised at every boundary so each phase is timed on its own (a few microseconds of lost
overlap, in exchange for attribution). Warm-up steps are dropped; figures are medians over
the timed steps, and the data-wait and optimizer shares are total time in that phase over
total step time. The learning rate is the recipe's peak rate (the value does not change the
cost). Checkpoints, evaluation and logging are not part of the step and are not run.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

from star.config import Config
from star.flops import model_flops
from star.profiling.timing import PeakMemory, StageTimer
from star.train.distributed import DistEnv
from star.train.ema import ModelEma
from star.train.engine import set_lr
from star.train.runtime import build_training
from star.train.schedule import scaled_lr


@dataclass(frozen=True)
class StepProfileSettings:
    batches: int = 10       # timed optimizer steps
    warmup: int = 2         # untimed optimizer steps first


def _endless(loader):
    """Batches of epoch 0, 1, 2, ... without end (small data sets run out quickly)."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def profile_step(cfg: Config, device: str, dist_env: DistEnv, settings: StepProfileSettings) -> dict:
    """Time ``settings.batches`` optimizer steps after ``settings.warmup`` untimed ones."""
    if settings.batches < 1 or settings.warmup < 0:
        raise ValueError(f"need batches >= 1 and warmup >= 0, got {settings.batches}, {settings.warmup}")
    parts = build_training(cfg, dist_env, device)  # no run dir: no init weights, no validation loader
    engine, task, plan, ds = parts.engine, parts.task, parts.plan, parts.ds_config
    set_lr(engine.optimizer, scaled_lr(cfg.optim.base_lr, plan.global_images))
    ema = ModelEma(engine.module, cfg.ema.decay) if cfg.ema.enabled else None
    batches = _endless(task.train_loader)
    timer, memory = StageTimer(device, mode="sync"), PeakMemory(device)
    steps: list[dict[str, float]] = []
    losses: list[float] = []
    memory.reset()
    try:
        for index in range(settings.warmup + settings.batches):
            phases = dict.fromkeys(("data_wait", "forward", "backward", "optimizer"), 0.0)
            for _ in range(plan.accum_steps):
                timer.start()
                batch = next(batches)
                timer.mark("data_wait")
                loss = task.loss(engine, batch)
                timer.mark("forward")
                engine.backward(loss)
                timer.mark("backward")
                engine.step()
                timer.mark("optimizer")
                for name, seconds in timer.durations().items():
                    phases[name] += seconds
            if ema is not None:  # the trainer's EMA update, part of a fine-tuning step
                timer.start()
                ema.update(engine.module)
                timer.mark("ema")
                phases["ema"] = timer.durations()["ema"]
            losses.append(float(loss.detach().float()))
            if index >= settings.warmup:
                steps.append(phases)
    finally:
        if hasattr(batches, "close"):
            batches.close()
    peak_bytes = memory.peak_bytes()

    totals = [sum(s.values()) for s in steps]
    step_s = statistics.median(totals)
    whole = sum(totals)
    rank_images = plan.micro_images * plan.accum_steps
    count = model_flops(engine.module)
    return {
        "global_images_per_step": plan.global_images,
        "rank_images_per_step": rank_images,
        "micro_images": plan.micro_images,
        "accum_steps": plan.accum_steps,
        "world_size": plan.world_size,
        "timed_steps": settings.batches,
        "warmup_steps": settings.warmup,
        "step_s": step_s,
        "phase_median_s": {name: statistics.median(s[name] for s in steps) for name in steps[0]},
        "data_wait_share": sum(s["data_wait"] for s in steps) / whole,
        "optimizer_share": sum(s["optimizer"] for s in steps) / whole,
        "images_per_s": plan.global_images / step_s,
        "rank_images_per_s": rank_images / step_s,
        "tokens_per_s": plan.global_images / step_s * count.tokens_per_image,
        "training_flops_per_image": count.training_per_image,
        "precision": "bf16 autocast" if ds.get("torch_autocast", {}).get("enabled") else "fp32",
        "ds_config": cfg.ds_config,
        "zero_stage": ds.get("zero_optimization", {}).get("stage"),
        "data_backend": cfg.data.backend,
        "loss_last": losses[-1],
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": memory.kind,
        "loader_stats": task.train_loader.stats() if hasattr(task.train_loader, "stats") else {},
    }
