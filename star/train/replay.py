"""`star replay RUN_DIR --step S`: run one optimizer step of a finished or stopped run again, exactly.

    star replay runs/star_b --step 51234                  # where did step 51234's NaN come from?
    star replay runs/star_b --step 51234 --fp32           # is it bf16? (autocast off)
    star replay runs/star_b --step 51234 --kernels torch  # is it the fused kernel?
    star replay runs/star_b --step 51234 --json replay.json

What it does, in one process (world size 1) and without touching RUN_DIR:

1. picks the newest complete, committed checkpoint at or before step S-1 (a replay of step S
   starts from the state after step S-1) and restores model, optimizer, EMA, RNG states and the
   training position from it exactly as a resumed run does (star/train/loop.py, Trainer.resume);
2. trains the steps between that checkpoint and S-1 (progress bar) with the training loop's own
   step: the same samples (the data position is a pure function of the step), the same
   augmentation decisions and the same drop-path / mixup draws;
3. runs step S's micro-batches with the non-finite diagnosis of star/train/nonfinite.py armed:
   loss, grad norm, sample keys and, when the step is non-finite, the first module / Mamba stage
   whose forward output and whose gradient went non-finite, as in the run's own
   RUN_DIR/nonfinite/step_S/report.json; and compares them with the run's metrics.jsonl.

Nothing is written to RUN_DIR: no checkpoint, no metrics. The replayed steps' metrics.jsonl, the
report (when non-finite) and replay.json go to OUT/replay/step_S (--out, default a new temporary
directory), and --json FILE gets replay.json too.

Exactness. On CPU, for a run trained on one process, the replayed loss and grad norm equal the
logged ones bit for bit (tests/test_replay.py). A run trained on W > 1 ranks is replayed on one:
the checkpoint is re-partitioned (star/train/elastic.py) and gradient accumulation covers the same
global batch, but sums are reduced in another order and the per-rank random streams (drop path,
mixup) are re-seeded from (seed, step, rank) because W ranks' streams cannot be mapped onto one
(README, "Resume"): without drop path and mixup the loss agrees within float tolerance, not bit
for bit; with them the masks differ. On a GPU, bit-exactness also needs deterministic kernels.
Fine-tuning's evaluation at epoch ends is not run (it changes no weights and draws no random
numbers). `ds_config=auto` resolves for the device the run was trained on (run_info.json), so a
bf16 GPU run replayed on CPU keeps autocast bf16.

--fp32 and --kernels change step S only: the steps on the way are trained with the run's own
precision and kernels, so step S starts from the run's weights and only the question asked
differs (is it bf16? is it the fused kernel?). The result says whether the step stayed
non-finite and where it went non-finite now.

Exit codes: 0 replayed (finite or not), 2 bad input (no such run, step or checkpoint; --kernels
fused without usable kernels; an --out that cannot be created).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from star.config import ConfigError, load_config, read_yaml_file
from star.ops import KernelsUnavailable, describe_kernels, kernel_backend_for, require_kernels
from star.train import EXIT_OK
from star.train.checkpoint import Checkpointer, tag_for
from star.train.cli_common import cli_error, command_parser
from star.train.distributed import destroy, init_distributed, resolve_device, resolve_dist_env
from star.train.engine import plan_batches, resolve_ds_config_path
from star.train.loop import Trainer
from star.train.metrics import RunLogger
from star.train.nonfinite import StepWatch, engine_amp_dtype, inject_nonfinite, summary
from star.train.runtime import build_model, build_training, check_data
from star.train.safe_load import check_checkpoint_dir
from star.train.stopping import StopFlag

PROG = "star replay"
KERNEL_CHOICES = ("auto", "fused", "torch")
# FOR TESTS ONLY: JSON list of {"module", "step", "micro_batch", "phase"?, "value"?}: the replay
# builds its model with star.train.nonfinite.inject_nonfinite at those (step, micro-batch)
# positions, so a test can replay a run whose fault was injected the same way.
TEST_FAULTS_ENV = "STAR_TEST_REPLAY_FAULTS"


class ReplayError(ConfigError):
    """A user's mistake found before start-up (one line, exit code 2)."""


class _ReadOnlyCheckpointer(Checkpointer):
    """The source run's checkpoints, for loading only: a replay writes no checkpoint."""

    def save(self, engine, step, client_state, rng_extra=None):  # noqa: ARG002
        raise RuntimeError("star replay must not write checkpoints")


class _ReplayLogger(RunLogger):
    """RunLogger into the replay's folder that also keeps the records for the comparison."""

    def __init__(self, out_dir: Path) -> None:
        # every_steps: no console line per step (the progress bar shows them); skipped ones still print
        super().__init__(out_dir, enabled=True, every_steps=2**31 - 1, tensorboard=False)
        self.records: list[dict] = []

    def step(self, record: dict) -> None:
        self.records.append(record)
        super().step(record)


class _ReplayWatch(StepWatch):
    """The training loop's watch; also keeps each micro-batch's sample keys of the armed step."""

    keys: list | None = None

    def micro_batch(self, batch) -> None:
        super().micro_batch(batch)
        if self.keys is not None:
            self.keys.append(self._micros[-1].keys)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of `star pretrain` or `star finetune`")
    parser.add_argument("--step", type=int, required=True, metavar="S",
                        help="the optimizer step to replay, as numbered in metrics.jsonl and "
                             "nonfinite/step_S/ (1 = the first step)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where to replay (default auto: cuda when a GPU is visible)")
    parser.add_argument("--fp32", action="store_true",
                        help="step S with autocast off (float32 forward, backward and gradient reduction; "
                             "the steps before it as the run trained them): is it bf16?")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES,
                        help="the Mamba kernel path (star.ops): torch = the pure-PyTorch scan, fused = "
                             "mamba-ssm's CUDA kernels (exit 2 where they cannot run), auto = fused when "
                             "usable; default: the run's model.kernels. Applies to step S (the steps before it "
                             "take the run's path). Is it the fused kernel?")
    parser.add_argument("--out", metavar="DIR",
                        help="write OUT/replay/step_S/ (replay.json, the replayed steps' metrics.jsonl, "
                             "the report of a non-finite step); default: a new temporary directory")
    parser.add_argument("--json", metavar="FILE", help="also write the result (replay.json) to FILE")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="the run's shards are elsewhere now (default: data.dir of RUN_DIR/config.yaml); "
                             "the same shards, or the samples differ")
    return parser


def _last_logged_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line).get("step", last)
        except json.JSONDecodeError:
            break
    return last


def _logged(run_dir: Path, step: int) -> dict | None:
    """The run's metrics.jsonl record of ``step`` (the last one written: a resumed run rewrites)."""
    path = run_dir / "metrics.jsonl"
    found = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record.get("step") == step:
                found = record
    return found


def choose_checkpoint(run_dir: Path, step: int) -> int:
    """The newest kept, complete checkpoint at or before ``step - 1`` (ReplayError if none)."""
    ckpt = Checkpointer(run_dir, rank=0, keep_last=1)
    try:
        kept = ckpt.kept_steps()
    except FileNotFoundError as exc:  # `latest` names a missing folder
        raise ReplayError(str(exc)) from None
    usable = [s for s in kept if s <= step - 1]
    if not usable:
        have = ", ".join(str(s) for s in kept) if kept else "none"
        raise ReplayError(f"no checkpoint at or before step {step - 1} in {ckpt.dir} (a replay of step {step} "
                          f"starts from the state after step {step - 1}); complete checkpoints kept: steps {have}. "
                          f"Replay a later step, or keep more with checkpoint.keep_last / checkpoint.every_steps")
    return usable[-1]


def _run_device(run_dir: Path) -> str | None:
    """The device type the run was trained on, from run_info.json (None when unknown)."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
        return info["kernels"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _autocast_off(engine) -> None:
    """--fp32 for step S only: DeepSpeed's forward reads ``torch_autocast_enabled`` from its config
    at every call, and ZeRO reduces a gradient in its parameter's ``comm_dtype`` tag (bf16 for
    Linear / Conv weights under autocast, star/train/engine.py); both back to float32."""
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME

    engine._config.torch_autocast_enabled = False
    for param in engine.module.parameters():
        if hasattr(param, PARAM_COMM_DTYPE_ATTR_NAME):
            delattr(param, PARAM_COMM_DTYPE_ATTR_NAME)


def _fault_factory(faults: list[dict], first_step: int, accum: int):
    """FOR TESTS (TEST_FAULTS_ENV): build_model with faults at (step, micro-batch) positions of
    this replay; inject_nonfinite counts the model's distinct inputs from 0."""

    def factory(cfg):
        model = build_model(cfg)
        for fault in faults:
            call = (int(fault["step"]) - first_step) * accum + int(fault.get("micro_batch", 0))
            inject_nonfinite(model, fault["module"], {call}, phase=fault.get("phase", "forward"),
                             value=float(fault.get("value", "inf")))
        return model
    return factory


def _same(a, b) -> bool:
    """Equal floats, counting NaN == NaN and a JSON "nan"/"inf" string as the float."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return a == b or (math.isnan(a) and math.isnan(b))


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


def _json_float(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


# ----------------------------------------------------------------------------- the replay
def replay(run_dir: Path, step: int, *, device: str, fp32: bool, kernels: str | None,
           out_root: Path | None = None, data_dir: str | None = None) -> dict:
    """Replay ``step`` of the run in ``run_dir``; return the result (also in OUT/replay/step_S/replay.json;
    ``out_root`` None: a new temporary directory)."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ReplayError(f"{config_path} does not exist: RUN_DIR must be a run directory of `star pretrain` "
                          f"or `star finetune`")
    if step < 1:
        raise ReplayError(f"--step {step}: steps are numbered from 1 (metrics.jsonl)")
    last = _last_logged_step(run_dir)
    if last is not None and step > last:
        raise ReplayError(f"--step {step}: the run never ran it ({run_dir / 'metrics.jsonl'} ends at step {last})")
    start = choose_checkpoint(run_dir, step)
    check_checkpoint_dir(run_dir / "checkpoints" / tag_for(start))  # a planted pickle stops us here
    cfg = load_config(base=read_yaml_file(config_path))
    if data_dir is not None:
        cfg.data.dir = data_dir
    check_data(cfg, [cfg.data.train_split])  # shards missing here (another machine): --data-dir
    device = resolve_device(device)  # cuda without a GPU: RuntimeError, reported in one line
    # the run's kernels on the way to step S, --kernels for step S; both checked here (exit 2)
    try:
        run_kernels = require_kernels(cfg.model.kernels, device)
    except KernelsUnavailable as exc:
        raise ReplayError(f"the run's model.kernels={cfg.model.kernels} cannot run here: {exc}; "
                          f"replay on the run's device") from None
    try:
        kernel_plan = require_kernels(kernels or cfg.model.kernels, device)
    except KernelsUnavailable as exc:
        raise ReplayError(f"--kernels {kernels}: {exc}") from None
    require_kernels(cfg.model.kernels, device)  # back to the run's path for the steps on the way
    dist = resolve_dist_env()
    if dist.world_size != 1:
        raise ReplayError(f"star replay runs as one process, not as {dist.world_size} ranks ({dist.source}); "
                          f"start it without torchrun / srun (a W-rank run replays on one: see --help)")
    out_root = out_root if out_root is not None else Path(tempfile.mkdtemp(prefix="star_replay_"))
    out_dir = out_root / "replay" / f"step_{step}"
    if out_dir.resolve().is_relative_to((run_dir / "checkpoints").resolve()):
        raise ReplayError(f"--out {out_root}: not inside {run_dir / 'checkpoints'}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReplayError(f"--out {out_root}: cannot create {out_dir}: {exc}") from None
    cfg.device = device
    # the run's DeepSpeed JSON, `auto` resolved for the device it ran on (precision included)
    cfg.ds_config = str(resolve_ds_config_path(cfg.ds_config, _run_device(run_dir) or device))
    cfg.log.tensorboard = False
    cfg.max_nonfinite_in_row = 2**31 - 1  # a streak on the way must not stop (and save)
    faults = json.loads(os.environ[TEST_FAULTS_ENV]) if os.environ.get(TEST_FAULTS_ENV) else None

    stop = StopFlag()  # not installed: Ctrl-C ends a replay at once, nothing to save
    try:
        dist_env = init_distributed(device)
        factory = build_model
        if faults:
            factory = _fault_factory(faults, start + 1, plan_batches(cfg, 1).accum_steps)
        parts = build_training(cfg, dist_env, device, None, model_factory=factory)
        trainer = Trainer(cfg, out_dir, engine=parts.engine, loader=parts.train_loader, task=parts.task,
                          plan=parts.plan, dist_env=dist_env, device=parts.device)
        trainer.ckpt = _ReadOnlyCheckpointer(run_dir, rank=0, keep_last=1)
        if not trainer.resume(tag=tag_for(start)):
            raise RuntimeError(f"checkpoint {tag_for(start)} of {run_dir} did not load")
        return _advance_and_replay(trainer, run_dir, start, step, out_dir, fp32=fp32, kernel_plan=kernel_plan,
                                   run_kernels=run_kernels, stop=stop)
    finally:
        destroy()


def _advance_and_replay(trainer: Trainer, run_dir: Path, start: int, step: int, out_dir: Path, *, fp32: bool,
                        kernel_plan: dict, run_kernels: dict, stop: StopFlag) -> dict:
    cfg, state, plan = trainer.cfg, trainer.state, trainer.plan
    if state.step != start:
        raise RuntimeError(f"{tag_for(start)} holds step {state.step}")
    logger = _ReplayLogger(out_dir)
    trainer.logger = logger
    run_amp = engine_amp_dtype(trainer.engine)
    # the loop's watch with the diagnosis off on the way (the training run's trajectory does not
    # depend on it, tests/test_train_nonfinite.py) and loss spikes off: min_samples above the window
    watch = _ReplayWatch(out_dir, trainer.dist_env, trainer.loader, False, cfg.log.spike_k, cfg.log.spike_window,
                         cfg.log.spike_window + 1, generators=trainer.task.rng_generators, info=logger.info)
    trainer.watch = watch
    logger.info(f"[bold]replay[/bold] of step {step} of {run_dir}: from checkpoint {tag_for(start)} (epoch "
                f"{state.epoch}, step {state.step_in_epoch} of it), {step - 1 - start} step(s) to train first, "
                f"then step {step}; {plan.accum_steps} micro-batch(es) of {plan.micro_images} images per step on "
                f"1 process; the run's autocast ({_dtype(engine_amp_dtype(trainer.engine))}) and kernels "
                f"({run_kernels['setting']}) on the way, step {step} with autocast "
                f"{'off (--fp32)' if fp32 else 'as the run'} and kernels {kernel_plan['setting']}")
    if trainer.resize_note:
        logger.info(trainer.resize_note + "; the replayed loss agrees within tolerance, not bit for bit")
    try:
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=logger.console, transient=True) as bar:
            task = bar.add_task(f"steps {start + 1}..{step}", total=step - start)
            while state.step < step:
                batches = iter(trainer.loader.epoch(state.epoch,
                                                    start_step=state.step_in_epoch * plan.accum_steps))
                try:
                    while state.step_in_epoch < trainer.steps_per_epoch and state.step < step:
                        if state.step == step - 1:  # arm the diagnosis for step S, as the first of a streak
                            watch.diagnose, watch.keys, state.nonfinite_in_row = True, [], 0
                            require_kernels(kernel_plan["setting"], str(trainer.device))  # --kernels
                            if fp32:
                                _autocast_off(trainer.engine)
                        code = trainer._one_step(batches, logger, stop)
                        if code is not None:
                            raise RuntimeError(f"the training step returned exit code {code}")
                        bar.advance(task)
                finally:
                    if hasattr(batches, "close"):
                        batches.close()
                if state.step_in_epoch >= trainer.steps_per_epoch:  # as Trainer._run, without evaluation
                    state.epoch += 1
                    state.step_in_epoch = 0
    finally:
        logger.close()
    changed = []  # what --fp32 / --kernels changed for step S
    if fp32 and run_amp is not None:
        changed.append(f"--fp32 (the run used autocast {_dtype(run_amp)})")
    if {k: v["path"] for k, v in kernel_plan["ops"].items()} != {k: v["path"] for k, v in run_kernels["ops"].items()}:
        changed.append(f"--kernels {kernel_plan['setting']} (the run's path: {run_kernels['setting']})")
    return _result(trainer, run_dir, start, step, out_dir, fp32=fp32, kernel_plan=kernel_plan, changed=changed)


def _result(trainer: Trainer, run_dir: Path, start: int, step: int, out_dir: Path, *, fp32: bool,
            kernel_plan: dict, changed: list[str]) -> dict:
    logger, watch = trainer.logger, trainer.watch
    records = {r["step"]: r for r in logger.records}
    mine = records[step]
    logged = _logged(run_dir, step)
    saved_world = trainer.ckpt.loaded_world_size or 1
    # The steps before S too: a mismatch there says where the replay left the run's trajectory.
    on_the_way = []
    for s in range(start + 1, step):
        theirs = _logged(run_dir, s)
        if theirs is not None:
            on_the_way.append({"step": s, "loss": _json_float(records[s]["loss"]), "logged_loss": theirs["loss"],
                               "same": _same(records[s]["loss"], theirs["loss"])})
    report_path = out_dir / "nonfinite" / f"step_{step}" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    run_report_path = run_dir / "nonfinite" / f"step_{step}" / "report.json"
    sample = next(iter(trainer.engine.module.parameters()))
    amp = engine_amp_dtype(trainer.engine)
    result = {
        "run_dir": str(run_dir), "step": step, "checkpoint": tag_for(start),
        "epoch": mine["epoch"], "step_in_epoch": mine["step_in_epoch"],
        "trained_world_size": saved_world, "world_size": 1,
        "loss": _json_float(mine["loss"]), "grad_norm": _json_float(mine["grad_norm"]), "lr": mine["lr"],
        "nonfinite": bool(mine["skipped"]),
        "logged": None if logged is None else {k: logged.get(k) for k in ("loss", "grad_norm", "lr", "skipped")},
        "loss_equal": None if logged is None else _same(mine["loss"], logged["loss"]),
        "grad_norm_equal": None if logged is None else _same(mine["grad_norm"], logged["grad_norm"]),
        # a schedule changed on resume (schedule.epochs) shows here: the replay uses config.yaml's
        "lr_equal": None if logged is None else _same(mine["lr"], logged["lr"]),
        "exact_expected": saved_world == 1 and str(sample.device) == "cpu" and not changed,
        "changed_for_step": changed,
        "steps_on_the_way": on_the_way,
        "keys": watch.keys,  # [micro-batch][image] = [shard, key]
        "first_nonfinite_forward": report["first_nonfinite_forward"] if report else None,
        "first_nonfinite_backward": report["first_nonfinite_backward"] if report else None,
        "micro_batch": report["micro_batch"] if report else None,
        "report": str(report_path) if report else None,
        "run_report": str(run_report_path) if run_report_path.is_file() else None,
        "dtype_path": {"autocast": str(amp).replace("torch.", "") if amp is not None else None, "fp32": fp32,
                       "kernels": kernel_plan["setting"], "kernel_path": kernel_backend_for(sample),
                       "kernel_detail": describe_kernels()},
        "metrics": str(out_dir / "metrics.jsonl"),
    }
    _write_json(out_dir / "replay.json", result)
    logger.info(_describe(result, report))
    return result


def _describe(result: dict, report: dict | None) -> str:
    logged = result["logged"]
    lines = [f"[bold]replayed step {result['step']}[/bold] from {result['checkpoint']}: loss {result['loss']}, "
             f"grad norm {result['grad_norm']}, lr {result['lr']:.3e}"
             f"{' [red](non-finite)[/red]' if result['nonfinite'] else ''}"]
    if logged is not None:
        same = result["loss_equal"] and result["grad_norm_equal"]
        reasons = list(result["changed_for_step"])
        if result["trained_world_size"] != 1:
            reasons.append(f"trained on {result['trained_world_size']} ranks: sums in another order")
        how = ("equal, bit for bit" if same else
               "different" + (f" (expected: {'; '.join(reasons)})" if reasons else ""))
        lines.append(f"  run's metrics.jsonl: loss {logged['loss']}, grad norm {logged['grad_norm']}: {how}")
    off = [s["step"] for s in result["steps_on_the_way"] if not s["same"]]
    if off:
        lines.append(f"  steps on the way whose loss differs from the run's: {off[:10]}")
    if report is not None:
        lines.append(summary(report, result["report"]))
    keys = [k for micro in (result["keys"] or []) for k in micro]
    if keys and report is None:
        shown = ", ".join(f"{s}:{k}" for s, k in keys[:4])
        lines.append(f"  samples: {shown}{' ...' if len(keys) > 4 else ''} ({len(keys)} in all)")
    lines.append(f"  replay.json: {Path(result['metrics']).parent / 'replay.json'}")
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    out_root = Path(args.out) if args.out else None
    if args.json:
        json_path = Path(args.json)
        if not json_path.parent.is_dir():
            return cli_error(PROG, f"--json {args.json}: the folder {json_path.parent} does not exist")
    try:
        result = replay(run_dir, args.step, device=args.device, fp32=args.fp32, kernels=args.kernels,
                        out_root=out_root, data_dir=args.data_dir)
    except (ConfigError, RuntimeError) as exc:
        if isinstance(exc, ConfigError) or "torch sees no GPU" in str(exc):
            return cli_error(PROG, exc)
        raise
    if args.json:
        _write_json(Path(args.json), result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
