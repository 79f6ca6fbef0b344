"""The training loop shared by pretraining and fine-tuning.

One optimizer step = ``accum_steps`` micro-batches from the loader, each through DeepSpeed's
``forward`` / ``backward`` / ``step`` (the engine applies the update at the accumulation
boundary). Per step, and in this order:

1. lr = schedule(step) x group lr_scale, a pure function of the step;
2. the micro-batches (their sample keys and RNG states noted for a diagnosis); a non-finite
   loss is not special-cased on the way: its NaN/inf gradients make ZeRO-1/2's global grad
   norm non-finite, and DeepSpeed then skips the update on *every* rank (the norm is global),
   leaving weights and AdamW states untouched;
3. one all-reduce of [stop requested, non-finite seen, loss, data wait] so all ranks agree
   on stopping and on counting the step as skipped;
4. a non-finite step is diagnosed (first of a streak: re-run with hooks, report; see
   star/train/nonfinite.py), a finite one checked for a loss spike; EMA update (taken steps
   only), a metrics.jsonl record;
5. stop (save, exit 75) / too many non-finite steps in a row (save, exit 76) / periodic
   checkpoint; at the end of an epoch the task's hook (fine-tuning evaluates), the k-NN monitor
   when due (pretraining, star/train/monitor.py), then a checkpoint.

The data position is (epoch, step within epoch): a resumed run asks the loader for
``epoch(e, start_step=k * accum_steps)`` and sees the batches an uninterrupted run would. An
optimizer step covers the same samples for any world size and micro-batch size (positions
[k*G, (k+1)*G) of the epoch's order, pipelines/sampling.py), so a checkpoint also resumes on
another number of ranks (star/train/elastic.py); ``log.sample_indices=true`` writes each step's
sample indices to metrics.jsonl to check it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.markup import escape

from star.config import Config
from star.train import EXIT_IO, EXIT_NONFINITE, EXIT_OK, EXIT_STOPPED
from star.train.checkpoint import Checkpointer, CheckpointWriteError
from star.train.distributed import DistEnv, all_gather_objects, all_reduce_sum
from star.train.ema import ModelEma
from star.train.engine import BatchPlan, grad_norm, set_lr
from star.train.metrics import RunLogger
from star.train.monitor import KnnMonitor
from star.train.nonfinite import StepWatch
from star.train.run_info import run_info_log_lines
from star.train.schedule import lr_at, lr_bounds
from star.train.stopping import StopFlag


class Task(Protocol):
    """What differs between pretraining and fine-tuning."""

    rng_generators: dict[str, torch.Generator]

    def loss(self, engine, batch) -> torch.Tensor: ...

    def end_of_epoch(self, epoch: int, step: int, engine, ema: ModelEma | None) -> dict | None: ...

    # optional: ``last_metrics() -> dict[str, float]``, extra scalars of the step just taken
    # (pretraining's loss_image / loss_sep), added to its metrics record

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Everything beyond model and optimizer that a checkpoint restores."""

    step: int = 0             # optimizer steps done (taken or skipped)
    epoch: int = 0            # epoch in progress
    step_in_epoch: int = 0    # optimizer steps of that epoch done
    skipped_steps: int = 0    # non-finite steps, total
    nonfinite_in_row: int = 0
    loss_spikes: int = 0      # finite steps flagged as loss spikes (star/train/nonfinite.py)


def _record_finished(logger: RunLogger, state: TrainState) -> None:
    logger.info(f"[green]finished[/green] at step {state.step} "
                f"({state.skipped_steps} non-finite steps skipped in total)")


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, engine, loader, task: Task, plan: BatchPlan,
                 dist_env: DistEnv, device: str, run_info: dict | None = None) -> None:
        self.cfg, self.run_dir, self.engine, self.loader, self.task = cfg, Path(run_dir), engine, loader, task
        self.plan, self.dist_env, self.device = plan, dist_env, device
        self.steps_per_epoch = loader.steps_per_epoch // plan.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training split has {loader.num_samples} images: fewer than one optimizer step of "
                f"{plan.global_images} images (batch.global_images); lower batch.global_images")
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.end_step = min(self.total_steps, cfg.schedule.max_steps or self.total_steps)
        self.peak_lr, self.min_lr = lr_bounds(cfg.optim.base_lr, cfg.optim.min_lr, plan.global_images)
        self.ema = ModelEma(engine.module, cfg.ema.decay) if cfg.ema.enabled else None
        self.ckpt = Checkpointer(self.run_dir, rank=dist_env.rank, keep_last=cfg.checkpoint.keep_last)
        self.monitor = KnnMonitor(cfg, rank=dist_env.rank, world_size=dist_env.world_size, device=device)
        self.state = TrainState()
        self._corrupt_named: set[str] = set()  # corrupt samples already reported by this rank
        self._corrupt_at_epoch_start = 0
        # [h10] What this start runs on: logged at start, and the first metrics record of the start
        # carries it (key "run_info"), so metrics.jsonl alone says which kernel path ran.
        self.run_info = run_info
        self._record_extra = {"run_info": run_info} if run_info is not None else {}
        self.resize_note: str | None = None  # the elastic-resume line, logged once the logger exists

    # ---------------------------------------------------------------- checkpoint glue
    def _client_state(self) -> dict:
        return {"train_state": asdict(self.state), "ema": self.ema.state_dict() if self.ema else None,
                "task": self.task.state_dict(), "config": self.cfg.to_dict()}

    def save(self) -> str:
        return self.ckpt.save(self.engine, self.state.step, self._client_state(), self.task.rng_generators)

    def resume(self, tag: str | None = None) -> bool:
        """Restore the newest checkpoint (or ``tag``, see Checkpointer.load); False for a new run."""
        client = self.ckpt.load(self.engine, self.task.rng_generators, tag=tag)
        if client is None:
            return False
        self.state = TrainState(**client["train_state"])
        saved_world = self.ckpt.loaded_world_size
        if saved_world is not None and saved_world != self.plan.world_size:
            batch = (client.get("config") or {}).get("batch", {})
            old_micro = batch.get("micro_images", self.plan.micro_images)
            old_accum = self.plan.global_images // (old_micro * saved_world)
            self.resize_note = (f"resumed step {self.state.step} from a {saved_world}-rank checkpoint on "
                                f"{self.plan.world_size} ranks (accumulation {old_accum} -> {self.plan.accum_steps}); "
                                f"per-rank random streams (drop path) re-seeded from (seed, step, rank)")
        if self.ema is not None:
            if client.get("ema") is None:
                raise RuntimeError("ema.enabled=true but the checkpoint has no EMA; it was started with "
                                   "ema.enabled=false (keep the setting of the run you resume)")
            self.ema.load_state_dict(client["ema"])
        self.task.load_state_dict(client.get("task") or {})
        return True

    # ---------------------------------------------------------------- the loop
    def fit(self, stop: StopFlag) -> int:
        """Train to the end (0), or until a stop request (75) or a run of non-finite steps (76)."""
        cfg, plan = self.cfg, self.plan
        resumed = self.resume()
        logger = RunLogger(self.run_dir, enabled=self.dist_env.is_main, every_steps=cfg.log.every_steps,
                           tensorboard=cfg.log.tensorboard, resume_step=self.state.step if resumed else None)
        self.logger = logger
        self.watch = StepWatch.from_config(cfg, self.run_dir, self.dist_env, self.loader, self.task.rng_generators,
                                           logger.info, resume_step=self.state.step if resumed else None)
        where = f"resumed at step {self.state.step} (epoch {self.state.epoch}, step {self.state.step_in_epoch} " \
                f"of it)" if resumed else "new run"
        logger.info(f"[bold]{cfg.kind}[/bold] {cfg.name or ''} in {self.run_dir}: {where}; "
                    f"{self.steps_per_epoch} steps/epoch x {cfg.schedule.epochs} epochs = {self.total_steps} steps "
                    f"(running to {self.end_step}); global batch {plan.global_images} images = "
                    f"{plan.global_sequences} sequences of {plan.images_per_seq}, {plan.world_size} rank(s) x "
                    f"{plan.micro_images} images x {plan.accum_steps} accumulation; peak lr {self.peak_lr:.3e}, "
                    f"floor {self.min_lr:.1e}, gradient clipping {cfg.optim.grad_clip or 'off'}")
        for line in run_info_log_lines(self.run_info) if self.run_info else []:  # [h10]
            logger.info(escape(line))  # reasons may hold brackets ('.[cuda]')
        if self.resize_note:
            logger.info(self.resize_note)
        try:
            return self._run(logger, stop)
        except CheckpointWriteError as exc:
            logger.info(f"[red]error: {exc}. Exit code {EXIT_IO}.[/red]")
            return EXIT_IO
        finally:
            logger.close()

    def _run(self, logger: RunLogger, stop: StopFlag) -> int:
        cfg, state, engine = self.cfg, self.state, self.engine
        if state.step >= self.end_step:
            _record_finished(logger, state)
            return EXIT_OK
        saved_at = state.step
        while state.step < self.end_step:
            batches = iter(self.loader.epoch(state.epoch, start_step=state.step_in_epoch * self.plan.accum_steps))
            try:
                while state.step_in_epoch < self.steps_per_epoch and state.step < self.end_step:
                    code = self._one_step(batches, logger, stop)
                    if code is not None:
                        return code
                    if state.step % cfg.checkpoint.every_steps == 0 and state.step_in_epoch < self.steps_per_epoch:
                        self.save()
                        saved_at = state.step
            finally:
                if hasattr(batches, "close"):
                    batches.close()  # release the loader's workers of a partly read epoch
            if state.step_in_epoch >= self.steps_per_epoch:
                self._report_corrupt_epoch(logger, state.epoch)
                epoch_done = state.epoch
                state.epoch += 1
                state.step_in_epoch = 0
                record = self.task.end_of_epoch(epoch_done, state.step, engine, self.ema)
                if record is not None:
                    logger.evaluation({"epoch": epoch_done, "step": state.step, **record})
                self.monitor.end_of_epoch(epoch_done, state.step, engine, logger)  # k-NN figure when due
                self.save()
                saved_at = state.step
        if saved_at != state.step:
            self.save()
        _record_finished(logger, state)
        return EXIT_OK

    # ---------------------------------------------------------------- corrupt samples (on_corrupt=skip)
    def _name_corrupt_samples(self) -> None:
        """Name every corrupt sample once, on the rank that met it (shard, key, reason)."""
        for name in self.loader.stats().get("corrupt_samples", []) if hasattr(self.loader, "stats") else []:
            if name not in self._corrupt_named:
                self._corrupt_named.add(name)
                print(f"warning: rank {self.dist_env.rank} skipped corrupt sample {name} (data.on_corrupt=skip)",
                      file=sys.stderr, flush=True)

    def _report_corrupt_epoch(self, logger: RunLogger, epoch: int) -> None:
        """Console line with the corrupt samples skipped in the epoch just finished (all ranks)."""
        local = self.loader.stats().get("skipped_corrupt", 0) if hasattr(self.loader, "stats") else 0
        total = int(all_reduce_sum([float(local)], self.device)[0])
        if total > self._corrupt_at_epoch_start:
            logger.info(f"[yellow]epoch {epoch}: {total - self._corrupt_at_epoch_start} corrupt sample(s) skipped "
                        f"(data.on_corrupt=skip; {total} in this run so far, named above)[/yellow]")
        self._corrupt_at_epoch_start = total

    def _one_step(self, batches, logger: RunLogger, stop: StopFlag) -> int | None:
        cfg, state, engine, plan = self.cfg, self.state, self.engine, self.plan
        t_start = time.perf_counter()
        lr = lr_at(state.step, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                   total_steps=self.total_steps, min_lr=self.min_lr)
        set_lr(engine.optimizer, lr)
        wait, losses, indices = 0.0, [], []
        self.watch.start_step()
        for _ in range(plan.accum_steps):
            t_wait = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t_wait
            self.watch.micro_batch(batch)
            if cfg.log.sample_indices:
                indices += batch.indices.tolist()
            loss = self.task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach().float().item()))
        norm = grad_norm(engine)
        local_nonfinite = not all(math.isfinite(v) for v in losses) or not math.isfinite(norm)
        step_time = time.perf_counter() - t_start
        corrupt = float(self.loader.stats().get("skipped_corrupt", 0)) if hasattr(self.loader, "stats") else 0.0
        stop_votes, nonfinite_votes, loss_sum, wait_sum, corrupt_sum = all_reduce_sum(
            [float(stop.requested), float(local_nonfinite), sum(losses) / len(losses), wait, corrupt],
            self.device)
        skipped = nonfinite_votes > 0
        state.step += 1
        state.step_in_epoch += 1
        if skipped:
            state.skipped_steps += 1
            state.nonfinite_in_row += 1
        else:
            state.nonfinite_in_row = 0
            if self.ema is not None:
                self.ema.update(engine.module)
        world = plan.world_size
        watched = self.watch.after_step(
            step=state.step, epoch=state.epoch, step_in_epoch=state.step_in_epoch, skipped=skipped,
            nonfinite_in_row=state.nonfinite_in_row, losses=losses, loss=loss_sum / world, lr=lr, norm=norm,
            engine=engine, task=self.task)
        state.loss_spikes += int(watched["loss_spike"])
        # every rank's samples of this step, as a sorted list: the set a step averages over
        samples = sorted(i for part in all_gather_objects(indices) for i in part) if cfg.log.sample_indices else None
        logger.step({
            "step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
            "total_steps": self.total_steps, "loss": loss_sum / world, "lr": lr, "grad_norm": norm,
            "skipped": bool(skipped), "skipped_total": state.skipped_steps,
            "images_per_s": plan.global_images / max(step_time, 1e-9),
            "data_wait": wait_sum / world / max(step_time, 1e-9), "step_time": step_time,
            "corrupt_skipped": int(corrupt_sum),
            "loss_spike": watched["loss_spike"], "loss_spikes": state.loss_spikes,
            "time": time.time(),
            **self._record_extra,  # [h10] run_info, in this start's first record only
            **({"samples": samples} if samples is not None else {}),
            **getattr(self.task, "last_metrics", dict)(),  # pretraining: loss_image, loss_sep
        })
        self._name_corrupt_samples()
        self._record_extra = {}
        if state.nonfinite_in_row >= cfg.max_nonfinite_in_row:
            self.save()
            logger.info(f"[red]stopping: {state.nonfinite_in_row} non-finite steps in a row[/red] (step "
                        f"{state.step}, max_nonfinite_in_row={cfg.max_nonfinite_in_row}). The last good weights "
                        f"are saved; lower optim.base_lr or check the data before resuming. "
                        f"Exit code {EXIT_NONFINITE}.")
            return EXIT_NONFINITE
        if stop_votes > 0:
            tag = self.save()
            logger.info(f"[yellow]stop requested ({stop.signal_name or 'by another rank'}): saved {tag}; "
                        f"run the same command again to resume. Exit code {EXIT_STOPPED}.[/yellow]")
            return EXIT_STOPPED
        return None
