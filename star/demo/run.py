"""`star demo`: the whole pipeline end to end on CPU, with plots, and what pretraining buys.

    star demo                      # the full demo (how long: README's "what to expect")
    star demo --quick --out /tmp/d # tiny budgets, numbers meaningless (what the tests run)

Every stage is a real command, run as a subprocess and printed before it runs, so any of
them can be repeated alone (they are also written to OUT/commands.sh):

 1. star synth     a synthetic ImageNet-like dataset (10 classes: shapes, colours, stripes)
 2. star synth     its labeled subset: the first images of every class (same seed, same files)
 3. star shard     globally shuffled WebDataset tars + DALI indexes: all training images
                   (pretraining reads them without labels), the labeled subset, validation
 4. star verify    re-hash the shards against their manifests
 5. star probe     k-NN and linear probes of the randomly initialised encoder (the baseline)
 6. star pretrain  the tiny STAR model on every training image, DeepSpeed ZeRO on CPU, DALI
 7. star export    one plain state dict from the pretraining's ZeRO checkpoint
 8. star probe     k-NN and linear probes of the pretrained encoder
 9. star finetune  the 4-scan classifier on the labeled subset from those weights ...
10. star finetune  ... and from random initialisation, with exactly the same recipe
11. star eval      top-1 / top-5 of both fine-tuned classifiers on the validation split

Pretraining sees every training image without its label; the fine-tunes see only the
labeled subset (the low-label regime that self-supervised pretraining is for); the probes
measure the frozen features with every training label (more labels, less noise). While a stage
runs the terminal shows its live progress (training: step, loss, images/s, time left; other
stages: the last line of their log; piped output gets a plain status line every few seconds);
the full output of each stage goes to OUT/logs/, and a failing stage stops the demo and names
its command and log.

Then it prints a summary table and the comparison of random init and STAR pretraining (k-NN
probe, linear probe, fine-tuned; gain and one standard error each) and writes, in OUT:
summary.json, training_curves.png (loss and learning rate), finetune_accuracy.png (validation
top-1 of both fine-tunes per epoch), probe_comparison.png (the comparison as bars),
knn_monitor.png (k-NN top-1 over pretraining when the pretraining config's `monitor` section
logged it, "monitor off" otherwise) and predictions.png (inputs next to the clusters the
pretrained model predicts). One run is one seed: README's "what to expect" gives the figures
over several seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from star.config import ConfigError, load_config
from star.demo import plots

MARKER = ".star-demo"  # marks a directory written by `star demo` (so --force may replace it)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds star/, data_prep/, pipelines/


@dataclass(frozen=True)
class Budget:
    """Dataset sizes and the training overrides (on top of the demo_* presets) of one demo size.

    Pretraining reads every training image without its label (``unlabeled_per_class`` per
    class); both fine-tunes see only the first ``labeled_per_class`` of them with their labels
    (the low-label regime self-supervised pretraining is meant for). The probes measure the
    frozen features with every training image's label: more labels, less noise.
    """

    classes: int
    unlabeled_per_class: int
    labeled_per_class: int
    val_per_class: int
    shard_bytes: int
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    linear_probe: tuple[str, ...] = ("--epochs", "90", "--warmup-epochs", "10")


# The full demo uses the presets as they are (how long it takes: README's "what to expect");
# --quick shrinks the data and the schedules so that every stage and figure still runs.
FULL = Budget(classes=10, unlabeled_per_class=100, labeled_per_class=10, val_per_class=20, shard_bytes=4_000_000)
QUICK = Budget(classes=4, unlabeled_per_class=16, labeled_per_class=8, val_per_class=4, shard_bytes=1_000_000,
               pretrain_overrides=("batch.global_images=16", "batch.micro_images=16",
                                   "schedule.epochs=2", "schedule.warmup_epochs=1", "log.every_steps=1"),
               finetune_overrides=("batch.global_images=8", "batch.micro_images=8", "eval_every_epochs=1",
                                   "schedule.epochs=2", "schedule.warmup_epochs=1", "log.every_steps=1"),
               linear_probe=("--epochs", "5", "--warmup-epochs", "1"))


class DemoError(RuntimeError):
    """A stage failed or the output directory cannot be used; the message says what to do."""


@dataclass
class StageResult:
    key: str
    title: str
    command: str
    log: str
    wall_s: float
    cpu_s: float                 # user + system CPU seconds of the command and its children
    images: int | None = None    # images the stage processed (for images/s)
    images_per_s: float | None = None


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    key: str
    title: str
    argv: list[str]                   # after `star`
    images: int | None = None         # known up front (synth, shard, verify)
    metrics: Path | None = None       # a training run's metrics.jsonl, followed for progress
    total_steps: int | None = None


def star_command(argv: list[str]) -> list[str]:
    """The subprocess command of `star ARGV` with this interpreter."""
    return [sys.executable, "-m", "star", *argv]


def child_env() -> dict[str, str]:
    """The demo's own environment, with the package importable even when not pip-installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # logs stream as they are written
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_line(log: Path, limit: int = 70) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _log_tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _last_record(path: Path | None) -> dict | None:
    """The last complete JSON line of a metrics.jsonl being written, or None."""
    if path is None or not path.is_file():
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 8192))
        lines = fh.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line still being written, or cut by the seek
            continue
    return None


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class TrainingStatus:
    """Live status of a training stage from its metrics.jsonl: step, loss, images/s, time left."""

    def __init__(self, metrics: Path, total_steps: int | None) -> None:
        self.metrics, self.total_steps = metrics, total_steps
        self.first: tuple[int, float] | None = None  # (step, monotonic time) when steps were first seen

    def __call__(self) -> tuple[int, str] | None:
        record = _last_record(self.metrics)
        if record is None or "step" not in record:
            return None
        step, now = int(record["step"]), time.monotonic()
        if self.first is None:
            self.first = (step, now)
        text = f"step {step}/{self.total_steps or '?'}"
        if isinstance(record.get("loss"), (int, float)):
            text += f"  loss {record['loss']:.4f}"
        if isinstance(record.get("images_per_s"), (int, float)):
            text += f"  {record['images_per_s']:.0f} img/s"
        done = step - self.first[0]
        if self.total_steps and done > 0:  # time per step measured since the first step seen
            text += f"  ~{_duration((now - self.first[1]) / done * (self.total_steps - step))} left"
        return step, text


class StageRunner:
    """Runs stages one after the other: prints the command, logs its output, shows live progress.

    On a terminal a rich progress bar per stage; otherwise (output piped to a file or a CI log)
    a plain status line at most every ``plain_every`` seconds, so a long stage is never silent.
    """

    def __init__(self, out: Path, console: Console, plain_every: float = 15.0) -> None:
        self.out, self.console, self.plain_every = out, console, plain_every
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: list[StageResult] = []
        self.commands = out / "commands.sh"
        self.commands.write_text("#!/usr/bin/env bash\n# The commands `star demo` ran, in order; each one runs alone.\n"
                                 "set -euo pipefail\n")

    def progress(self) -> Progress:
        """The live display (rich disables it itself when the console is not a terminal)."""
        return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("[dim]{task.fields[status]}"), console=self.console)

    def run(self, stage: Stage, progress: Progress) -> StageResult:
        number = len(self.results) + 1
        command = star_command(stage.argv)
        shown = shlex.join(command)
        log = self.logs / f"{number:02d}_{stage.key}.log"
        # soft_wrap: the command stays on one line, copy-pastable, whatever the terminal width
        self.console.print(f"\n[bold cyan]{number}. {stage.title}[/bold cyan]\n[dim]$[/dim] {escape(shown)}",
                           highlight=False, soft_wrap=True)
        with open(self.commands, "a") as fh:
            fh.write(f"\n# {number}. {stage.title}\n{shown}\n")
        task = progress.add_task(stage.title, total=stage.total_steps, status="starting")
        training = TrainingStatus(stage.metrics, stage.total_steps) if stage.metrics is not None else None
        plain = not self.console.is_terminal
        last_plain, shown_plain = time.monotonic() - self.plain_every + 5.0, ""  # first line after 5 s
        cpu0, t0 = _children_cpu(), time.perf_counter()
        with open(log, "wb") as fh:
            proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                    cwd=self.out, stdin=subprocess.DEVNULL)
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    live = training() if training is not None else None
                    if live is not None:
                        progress.update(task, completed=live[0])
                    status = live[1] if live is not None else _last_line(log)
                    progress.update(task, status=escape(status))  # log text is not markup
                    now = time.monotonic()
                    if plain and status and status != shown_plain and now - last_plain >= self.plain_every:
                        self.console.print(f"  [{_duration(time.perf_counter() - t0)}] {escape(status)}",
                                           highlight=False, soft_wrap=True)
                        last_plain, shown_plain = now, status
            except BaseException:  # Ctrl-C: do not leave a training process behind
                proc.terminate()
                proc.wait()
                raise
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        progress.update(task, completed=stage.total_steps or 1, total=stage.total_steps or 1,
                        status=f"done, {wall:.0f} s")
        progress.stop_task(task)
        if proc.returncode != 0:
            raise DemoError(f"stage {number} ({stage.title}) failed with exit code {proc.returncode}.\n"
                            f"command: {shown}\nlog:     {log}\nlast lines of the log:\n{_log_tail(log)}")
        self.console.print(f"[green]done[/green] in {wall:.1f} s ({cpu:.0f} CPU-s); log: {escape(str(log))}",
                           highlight=False, soft_wrap=True)
        result = StageResult(stage.key, stage.title, shown, str(log), round(wall, 2), round(cpu, 2))
        if stage.images is not None:
            result.images = stage.images
            result.images_per_s = round(stage.images / max(wall, 1e-9), 2)
        self.results.append(result)
        return result


# ----------------------------------------------------------------------------- run facts


def training_facts(run_dir: Path) -> dict:
    """Steps, losses and throughput of a training run, from its metrics.jsonl."""
    records = plots.read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise DemoError(f"{run_dir / 'metrics.jsonl'} is empty: the run took no step")
    step_time = sum(r["step_time"] for r in records)
    images = sum(r["images_per_s"] * r["step_time"] for r in records)  # global images per step
    losses = [float(r["loss"]) for r in records]  # a non-finite loss is logged as a string
    tenth = max(1, len(losses) // 10)
    return {
        "steps": len(records),
        "images": round(images),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_start": sum(losses[:tenth]) / tenth,  # mean of the first 10% of steps
        "loss_end": sum(losses[-tenth:]) / tenth,   # mean of the last 10%
        "train_images_per_s": round(images / max(step_time, 1e-9), 2),  # optimizer steps only
        "skipped_steps": sum(1 for r in records if r.get("skipped")),
    }


def finetune_facts(run_dir: Path, final_eval: Path) -> dict:
    evals = plots.read_jsonl(run_dir / "eval.jsonl")
    final = json.loads(final_eval.read_text())
    facts = training_facts(run_dir)
    facts.update(top1=final["top1"], top5=final["top5"], eval_images=final["images"],
                 ema_top1=evals[-1].get("ema_top1") if evals else None,
                 best_top1=max((max(r["top1"], r.get("ema_top1", r["top1"])) for r in evals), default=None),
                 top1_per_epoch=[r["top1"] for r in evals],
                 ema_top1_per_epoch=[r.get("ema_top1") for r in evals])
    return facts


def gain_stderr(top1_a: float, top1_b: float, images: int) -> float:
    """Standard error (points) of the difference of two top-1 values measured on ``images``
    images each, treating every prediction as an independent coin (binomial)."""
    a, b = top1_a / 100, top1_b / 100
    return 100 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(images, 1))


# ----------------------------------------------------------------------------- the demo


def prepare_out(out: Path, force: bool) -> None:
    """Create OUT, or replace a previous demo there with --force; never touch other folders."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"{out} exists, is not empty and was not written by `star demo`; "
                            f"choose another --out")
        if not force:
            raise DemoError(f"{out} holds a previous demo; pass --force to replace it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `star demo`; `star demo --force` may delete this folder\n")


PROBES = ("knn", "linear")
INITS = ("random_init", "pretrained")


def build_stages(out: Path, budget: Budget, seed: int) -> dict[str, Stage]:
    data, runs, probes = out / "data", out / "runs", out / "probes"
    images, labeled_images = data / "images", data / "images_labeled"
    shards, labeled = data / "shards", data / "labeled_shards"
    n_unlabeled, n_labeled = budget.classes * budget.unlabeled_per_class, budget.classes * budget.labeled_per_class
    n_val = budget.classes * budget.val_per_class
    if not 0 < budget.labeled_per_class <= budget.unlabeled_per_class:
        raise DemoError(f"labeled_per_class {budget.labeled_per_class} must be in [1, {budget.unlabeled_per_class}]")
    pre_over = [f"data.dir={shards}", f"seed={seed}", *budget.pretrain_overrides]
    ft_over = [f"data.dir={labeled}", f"seed={seed}", *budget.finetune_overrides]

    def steps(preset: str, overrides: list[str], n_train: int) -> int:
        """Optimizer steps the run will take (for its progress bar; the trainer decides)."""
        cfg = load_config(preset, overrides)  # validates the overrides before anything runs
        per_epoch = n_train // cfg.batch.global_images
        if per_epoch < 1:
            raise DemoError(f"{n_train} training images are fewer than one batch of {cfg.batch.global_images}")
        total = per_epoch * cfg.schedule.epochs
        return min(total, cfg.schedule.max_steps or total)

    def synth(src: Path, per_class: int, val_per_class: int) -> list[str]:
        # images depend only on (seed, split, class, index): the labeled set is the first
        # labeled_per_class training images of every class of the unlabeled one
        return ["synth", "--out", str(src), "--classes", str(budget.classes), "--per-class", str(per_class),
                "--val-per-class", str(val_per_class), "--seed", str(seed)]

    def shard(src: Path, dst: Path, split: str) -> list[str]:
        return ["shard", "--src", str(src), "--out", str(dst), "--split", split,
                "--shard-bytes", str(budget.shard_bytes), "--seed", str(seed)]

    def probe(mode: str, init: str) -> list[str]:
        model = ["--ckpt", str(runs / "pretrain")] if init == "pretrained" else \
            ["--random-init", "--config", "demo_pretrain"]
        extra = list(budget.linear_probe) if mode == "linear" else []
        return ["probe", mode, *model, "--data", str(shards), "--device", "cpu", "--seed", str(seed), *extra,
                "--json", str(probes / f"{mode}_{init}.json")]

    def finetune(run: str, init: list[str]) -> list[str]:
        return ["finetune", "--config", "demo_finetune", *init, "--run-dir", str(runs / run), *ft_over]

    def evaluate(run: str) -> list[str]:
        return ["eval", "--ckpt", str(runs / run), "--data", str(labeled),
                "--json", str(runs / run / "final_eval.json")]

    ft_steps = steps("demo_finetune", ft_over, n_labeled)
    probe_images = n_unlabeled + n_val
    stages = [
        Stage("synth", "make a synthetic dataset", synth(images, budget.unlabeled_per_class, budget.val_per_class),
              images=n_unlabeled + n_val),
        Stage("synth_labeled", "its labeled subset (the first images of every class)",
              synth(labeled_images, budget.labeled_per_class, 0), images=n_labeled),
        Stage("shard_train", "shard the training split (pretraining: images only)",
              shard(images / "train", shards, "train"), images=n_unlabeled),
        Stage("shard_val", "shard the validation split", shard(images / "val", shards, "val"), images=n_val),
        Stage("shard_labeled", "shard the labeled subset (fine-tuning)",
              shard(labeled_images / "train", labeled, "train"), images=n_labeled),
        Stage("shard_labeled_val", "the validation split next to it", shard(images / "val", labeled, "val"),
              images=n_val),
        Stage("verify", "verify the shards", ["verify", str(shards)], images=n_unlabeled + n_val),
        Stage("verify_labeled", "verify the labeled shards", ["verify", str(labeled)], images=n_labeled + n_val),
        *(Stage(f"probe_{mode}_random_init", f"{mode} probe of the randomly initialised encoder",
                probe(mode, "random_init"), images=probe_images) for mode in PROBES),
        Stage("pretrain", "STAR pretraining (DeepSpeed, DALI CPU pipeline)", [
            "pretrain", "--config", "demo_pretrain", "--run-dir", str(runs / "pretrain"), *pre_over],
            metrics=runs / "pretrain" / "metrics.jsonl", total_steps=steps("demo_pretrain", pre_over, n_unlabeled)),
        Stage("export", "export the pretrained weights", [
            "export", str(runs / "pretrain"), "--out", str(runs / "pretrain.pth")]),
        *(Stage(f"probe_{mode}_pretrained", f"{mode} probe of the pretrained encoder",
                probe(mode, "pretrained"), images=probe_images) for mode in PROBES),
        Stage("finetune_pretrained", "fine-tune from the pretrained weights",
              finetune("finetune_pretrained", ["--init", str(runs / "pretrain.pth")]),
              metrics=runs / "finetune_pretrained" / "metrics.jsonl", total_steps=ft_steps),
        Stage("finetune_scratch", "fine-tune from random initialisation (same budget)",
              finetune("finetune_scratch", []),
              metrics=runs / "finetune_scratch" / "metrics.jsonl", total_steps=ft_steps),
        Stage("eval_pretrained", "evaluate the fine-tune from pretraining", evaluate("finetune_pretrained"),
              images=n_val),
        Stage("eval_scratch", "evaluate the fine-tune from scratch", evaluate("finetune_scratch"), images=n_val),
    ]
    return {stage.key: stage for stage in stages}


def probe_facts(probes_dir: Path) -> dict:
    """The four probes' figures, from the JSON `star probe` wrote, with the gain of pretraining
    and one binomial standard error of that gain (see :func:`gain_stderr`)."""
    facts = {}
    for mode in PROBES:
        by_init = {}
        for init in INITS:
            path = probes_dir / f"{mode}_{init}.json"
            if not path.is_file():
                raise DemoError(f"{path} is missing: the probe stage that should have written it did not")
            result = json.loads(path.read_text())
            by_init[init] = {k: result[k] for k in ("top1", "top5", "train_images", "val_images", "feature_dim")}
        gain = by_init["pretrained"]["top1"] - by_init["random_init"]["top1"]
        facts[mode] = {**by_init, "top1_gain": gain,
                       "top1_gain_stderr": round(gain_stderr(by_init["pretrained"]["top1"],
                                                             by_init["random_init"]["top1"],
                                                             by_init["pretrained"]["val_images"]), 2)}
    return facts


def make_figures(out: Path, num_classes: int, probes: dict, ft_pre: dict, ft_scr: dict) -> tuple[dict[str, str], dict]:
    """Every figure into OUT; returns ({name: path}, what the k-NN monitor logged)."""
    runs = out / "runs"
    finetunes = {"pretrained": runs / "finetune_pretrained", "scratch": runs / "finetune_scratch"}
    figures = {
        "training_curves": plots.plot_training_curves(
            plots.read_jsonl(runs / "pretrain" / "metrics.jsonl"),
            {k: plots.read_jsonl(v / "metrics.jsonl") for k, v in finetunes.items()},
            out / "training_curves.png"),
        "finetune_accuracy": plots.plot_accuracy(
            {k: plots.read_jsonl(v / "eval.jsonl") for k, v in finetunes.items()}, num_classes,
            out / "finetune_accuracy.png"),
    }
    results = {f"{mode} probe": {init: probes[mode][init]["top1"] for init in INITS} for mode in PROBES}
    results["fine-tuned"] = {"random_init": ft_scr["top1"], "pretrained": ft_pre["top1"]}
    stderr = {f"{mode} probe": math.sqrt(
        sum(v * (100 - v) for v in results[f"{mode} probe"].values()) / 2 / probes[mode]["pretrained"]["val_images"])
        for mode in PROBES}
    stderr["fine-tuned"] = math.sqrt(sum(v * (100 - v) for v in results["fine-tuned"].values()) / 2
                                     / max(ft_pre["eval_images"], 1))
    figures["probe_comparison"] = plots.plot_probe_comparison(results, stderr, num_classes,
                                                              out / "probe_comparison.png")
    records, source = plots.monitor_records(runs / "pretrain")
    figures["knn_monitor"] = plots.plot_knn_monitor(
        records, out / "knn_monitor.png", source=str(source or ""), num_classes=num_classes,
        probes={init: probes["knn"][init]["top1"] for init in INITS})
    monitor = {"enabled": bool(records), "source": str(source) if source else None,
               "step": [r.get("step") for r in records], "epoch": [r.get("epoch") for r in records],
               "knn_top1": [r["knn_top1"] for r in records], "knn_top5": [r.get("knn_top5") for r in records],
               "knn_seconds": [r.get("knn_seconds") for r in records]}
    shown = plots.predict_clusters(runs / "pretrain" / "config.yaml", runs / "pretrain.pth", out / "data" / "shards")
    figures["predictions"] = plots.plot_predictions(
        shown["inputs"], shown["predicted"], images_per_seq=shown["images_per_seq"],
        cluster_px=shown["cluster_px"], patch_px=shown["patch_px"], out=out / "predictions.png")
    return {k: str(v) for k, v in figures.items()}, monitor


def summary_table(summary: dict) -> Table:
    table = Table(title=f"star demo{' --quick' if summary['quick'] else ''}: summary", show_lines=False)
    table.add_column("stage")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("result")
    pre, ftp, fts = summary["pretrain"], summary["finetune_pretrained"], summary["finetune_scratch"]
    results = {
        "pretrain": f"loss {pre['loss_first']:.3f} at step 1 -> {pre['loss_end']:.3f} "
                    f"(mean of the last 10% of {pre['steps']} steps)",
        "finetune_pretrained": f"{ftp['steps']} steps; EMA top-1 {ftp['ema_top1']:.1f}%"
        if ftp.get("ema_top1") is not None else f"{ftp['steps']} steps",
        "finetune_scratch": f"{fts['steps']} steps; EMA top-1 {fts['ema_top1']:.1f}%"
        if fts.get("ema_top1") is not None else f"{fts['steps']} steps",
        "eval_pretrained": f"top-1 {ftp['top1']:.1f}%  top-5 {ftp['top5']:.1f}%",
        "eval_scratch": f"top-1 {fts['top1']:.1f}%  top-5 {fts['top5']:.1f}%",
    }
    for mode, facts in summary["probes"].items():
        for init in INITS:
            results[f"probe_{mode}_{init}"] = f"top-1 {facts[init]['top1']:.1f}%  top-5 {facts[init]['top5']:.1f}%"
    for stage in summary["stages"]:
        rate = stage["images_per_s"]
        table.add_row(stage["title"], f"{stage['wall_s']:.1f}", f"{stage['cpu_s']:.0f}",
                      f"{rate:,.1f}" if rate is not None else "-", results.get(stage["key"], ""))
    table.add_row("[bold]total[/bold]", f"[bold]{summary['wall_s']:.1f}[/bold]", f"{summary['cpu_s']:.0f}", "", "")
    return table


def comparison_table(summary: dict) -> Table:
    """Random init vs STAR pretrained: frozen-feature probes and fine-tunes."""
    data = summary["dataset"]
    table = Table(title=f"what pretraining buys: validation top-1 on {data['val_images']} images")
    for column in ("measure", "random init", "STAR pretrained", "gain", "1 s.e."):
        table.add_column(column, justify="left" if column == "measure" else "right")
    rows = [(f"{mode} probe (frozen, {facts['pretrained']['train_images']} labels)", facts["random_init"]["top1"],
             facts["pretrained"]["top1"], facts["top1_gain"], facts["top1_gain_stderr"])
            for mode, facts in summary["probes"].items()]
    rows.append((f"fine-tuned ({data['labeled_images']} labels, same recipe)", summary["finetune_scratch"]["top1"],
                 summary["finetune_pretrained"]["top1"], summary["top1_gain_from_pretraining"],
                 summary["top1_gain_stderr"]))
    for name, scratch, pretrained, gain, se in rows:
        table.add_row(name, f"{scratch:.1f}%", f"{pretrained:.1f}%", f"{gain:+.1f}", f"{se:.1f}")
    return table


def run_demo(out: Path, *, quick: bool, seed: int, force: bool, console: Console) -> dict:
    budget = QUICK if quick else FULL
    t0, cpu0 = time.perf_counter(), _children_cpu()
    stages = build_stages(out, budget, seed)  # checks presets and overrides before touching OUT
    prepare_out(out, force)
    runner = StageRunner(out, console)
    console.print(f"[bold]star demo[/bold]{' --quick' if quick else ''}: {len(stages)} stages into {out} "
                  f"(logs in {runner.logs}, commands in {runner.commands})", highlight=False)
    with runner.progress() as progress:
        for stage in stages.values():
            result = runner.run(stage, progress)
            if stage.metrics is not None:  # training: images/s of the optimizer steps
                facts = training_facts(stage.metrics.parent)
                result.images, result.images_per_s = facts["images"], facts["train_images_per_s"]
        runs = out / "runs"
        ft_pre = finetune_facts(runs / "finetune_pretrained", runs / "finetune_pretrained" / "final_eval.json")
        ft_scr = finetune_facts(runs / "finetune_scratch", runs / "finetune_scratch" / "final_eval.json")
        probes = probe_facts(out / "probes")
        figures_task = progress.add_task("figures", total=None, status="")
        figures, monitor = make_figures(out, budget.classes, probes, ft_pre, ft_scr)
        progress.update(figures_task, total=1, completed=1, status="done")
    gain = ft_pre["top1"] - ft_scr["top1"]
    noise = gain_stderr(ft_pre["top1"], ft_scr["top1"], ft_pre["eval_images"])
    summary = {
        "quick": quick, "seed": seed, "out": str(out),
        "dataset": {"classes": budget.classes, "train_images": budget.classes * budget.unlabeled_per_class,
                    "labeled_images": budget.classes * budget.labeled_per_class,
                    "val_images": budget.classes * budget.val_per_class},
        "pretrain": training_facts(runs / "pretrain"),
        "knn_monitor": monitor,
        "probes": probes,
        "finetune_pretrained": ft_pre,
        "finetune_scratch": ft_scr,
        "top1_gain_from_pretraining": gain,
        "top1_gain_stderr": round(noise, 2),  # binomial standard error of the difference, in points
        "winner": "pretrained" if gain > 0 else "scratch" if gain < 0 else "tie",
        "stages": [asdict(r) for r in runner.results],
        "figures": figures,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(_children_cpu() - cpu0, 2),
        "cpus": os.cpu_count(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="folder for the data, runs, logs, figures and summary.json (default ./demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny dataset and schedules: every stage and figure, numbers meaningless "
                             "(for tests and a first check)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data, the shard shuffle, the probes, pretraining and both "
                             "fine-tunes (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="replace a previous demo in --out (only a folder `star demo` wrote is deleted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    console = Console(highlight=False)
    try:
        import matplotlib  # noqa: F401  (checked first: fail before any training)
    except ImportError:
        console.print("star demo: error: the figures need matplotlib; pip install matplotlib "
                      "(or pip install 'star-pretrain[dev]')", style="red")
        return 2
    out = Path(args.out).resolve()
    try:
        summary = run_demo(out, quick=args.quick, seed=args.seed, force=args.force, console=console)
    except (DemoError, ConfigError) as exc:
        console.print(f"\n[red bold]star demo: error:[/red bold] {escape(str(exc))}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print(f"\nstar demo: interrupted; the running stage was stopped. Partial output in "
                      f"{escape(str(out))} (rerun with --force to start over)")
        return 130
    console.print()
    console.print(summary_table(summary))
    console.print()
    console.print(comparison_table(summary))
    pre = summary["finetune_pretrained"]
    for name, gain, se in [(f"{mode} probe", f["top1_gain"], f["top1_gain_stderr"])
                           for mode, f in summary["probes"].items()] + \
            [("fine-tuned", summary["top1_gain_from_pretraining"], summary["top1_gain_stderr"])]:
        if gain > 2 * se:
            verdict = "pretraining helps, by more than 2 standard errors"
        elif gain < -2 * se:
            verdict = "random init is better, by more than 2 standard errors"
        else:
            verdict = "within noise (less than 2 standard errors)"
        console.print(f"{name}: {gain:+.1f} points from pretraining, one standard error {se:.1f}: {verdict}")
    console.print(f"(one seed; standard errors are binomial over {pre['eval_images']} validation images. "
                  f"README's \"what to expect\" gives the figures over several seeds.)")
    monitor = summary["knn_monitor"]
    console.print("k-NN monitor during pretraining: " + (
        f"top-1 {' -> '.join(f'{v:.1f}' for v in monitor['knn_top1'])}%" if monitor["enabled"] else "monitor off"))
    if summary["quick"]:
        console.print("[yellow]--quick: budgets too small for the numbers to mean anything[/yellow]")
    console.print(f"figures: {', '.join(summary['figures'].values())}\nsummary: {out / 'summary.json'}"
                  f"\ntotal {summary['wall_s']:.0f} s wall, {summary['cpu_s']:.0f} CPU-s over the stages")
    return 0
