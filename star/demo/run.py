"""`star demo`: the whole pipeline end to end on CPU in minutes, with plots.

    star demo                      # 7 to 10 minutes on a 2-core CPU machine
    star demo --quick --out /tmp/d # tiny budgets, under a minute or two (what the tests run)

Every stage is a real command, run as a subprocess and printed before it runs, so any of
them can be repeated alone (they are also written to OUT/commands.sh):

 1. star synth     a synthetic ImageNet-like dataset (10 classes: shapes, colours, stripes)
 2. star shard     globally shuffled WebDataset tars + DALI indexes (train, then val)
 3. star verify    re-hash the shards against their manifests
 4. star pretrain  the tiny STAR model, DeepSpeed ZeRO on CPU, DALI CPU pipeline
 5. star export    one plain state dict from the pretraining's ZeRO checkpoint
 6. star finetune  the 4-scan classifier from those weights ...
 7. star finetune  ... and from random initialisation, with exactly the same recipe
 8. star eval      top-1 / top-5 of both fine-tuned classifiers on the validation split

Then it prints a summary table and writes, in OUT: summary.json, training_curves.png (loss and
learning rate), finetune_accuracy.png (validation top-1 of both fine-tunes per epoch) and
predictions.png (inputs next to the clusters the pretrained model predicts). Each stage's
output goes to OUT/logs/; a failing stage stops the demo and names its command and log.
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
    """Dataset size and the training overrides (on top of the demo_* presets) of one demo size."""

    classes: int
    train_per_class: int
    val_per_class: int
    shard_bytes: int
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()


# The full demo uses the presets as they are (measured: 550 s wall, 659 CPU-s on the shared 2-core
# dev machine); --quick shrinks the data and the schedules so the whole pipeline still runs
# (every stage, every figure) in under a minute on an idle machine.
FULL = Budget(classes=10, train_per_class=100, val_per_class=20, shard_bytes=4_000_000)
QUICK = Budget(classes=4, train_per_class=16, val_per_class=4, shard_bytes=1_000_000,
               pretrain_overrides=("batch.global_images=16", "batch.micro_images=16",
                                   "schedule.epochs=2", "schedule.warmup_epochs=1", "log.every_steps=1"),
               finetune_overrides=("batch.global_images=16", "batch.micro_images=16",
                                   "schedule.epochs=2", "schedule.warmup_epochs=1", "log.every_steps=1"))


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


def _count_lines(path: Path | None) -> int:
    if path is None or not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


class StageRunner:
    """Runs stages one after the other: prints the command, logs its output, follows progress."""

    def __init__(self, out: Path, console: Console) -> None:
        self.out, self.console = out, console
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: list[StageResult] = []
        self.commands = out / "commands.sh"
        self.commands.write_text("#!/usr/bin/env bash\n# The commands `star demo` ran, in order; each one runs alone.\n"
                                 "set -euo pipefail\n")

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
        cpu0, t0 = _children_cpu(), time.perf_counter()
        with open(log, "wb") as fh:
            proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                    cwd=self.out, stdin=subprocess.DEVNULL)
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    if stage.metrics is not None:
                        progress.update(task, completed=_count_lines(stage.metrics))
                    progress.update(task, status=escape(_last_line(log)))  # log text is not markup
            except BaseException:  # Ctrl-C: do not leave a training process behind
                proc.terminate()
                proc.wait()
                raise
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        progress.update(task, completed=stage.total_steps or 1, total=stage.total_steps or 1, status=f"done, {wall:.0f} s")
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


def build_stages(out: Path, budget: Budget, seed: int) -> dict[str, Stage]:
    images, shards, runs = out / "data" / "images", out / "data" / "shards", out / "runs"
    n_train, n_val = budget.classes * budget.train_per_class, budget.classes * budget.val_per_class
    common = [f"data.dir={shards}", f"seed={seed}"]
    pre_over = [*common, *budget.pretrain_overrides]
    ft_over = [*common, *budget.finetune_overrides]

    def steps(preset: str, overrides: list[str]) -> int:
        """Optimizer steps the run will take (for its progress bar; the trainer decides)."""
        cfg = load_config(preset, overrides)  # validates the overrides before anything runs
        per_epoch = n_train // cfg.batch.global_images
        if per_epoch < 1:
            raise DemoError(f"{n_train} training images are fewer than one batch of {cfg.batch.global_images}")
        total = per_epoch * cfg.schedule.epochs
        return min(total, cfg.schedule.max_steps or total)

    def finetune(run: str, init: list[str]) -> list[str]:
        return ["finetune", "--config", "demo_finetune", *init, "--run-dir", str(runs / run), *ft_over]

    def evaluate(run: str) -> list[str]:
        return ["eval", "--ckpt", str(runs / run), "--data", str(shards), "--json", str(runs / run / "final_eval.json")]

    ft_steps = steps("demo_finetune", ft_over)
    return {
        "synth": Stage("synth", "make a synthetic dataset", [
            "synth", "--out", str(images), "--classes", str(budget.classes), "--per-class",
            str(budget.train_per_class), "--val-per-class", str(budget.val_per_class), "--seed", str(seed)],
            images=n_train + n_val),
        "shard_train": Stage("shard_train", "shard the training split", [
            "shard", "--src", str(images / "train"), "--out", str(shards), "--split", "train",
            "--shard-bytes", str(budget.shard_bytes), "--seed", str(seed)], images=n_train),
        "shard_val": Stage("shard_val", "shard the validation split", [
            "shard", "--src", str(images / "val"), "--out", str(shards), "--split", "val",
            "--shard-bytes", str(budget.shard_bytes), "--seed", str(seed)], images=n_val),
        "verify": Stage("verify", "verify the shards", ["verify", str(shards)], images=n_train + n_val),
        "pretrain": Stage("pretrain", "STAR pretraining (DeepSpeed, DALI CPU pipeline)", [
            "pretrain", "--config", "demo_pretrain", "--run-dir", str(runs / "pretrain"), *pre_over],
            metrics=runs / "pretrain" / "metrics.jsonl", total_steps=steps("demo_pretrain", pre_over)),
        "export": Stage("export", "export the pretrained weights", [
            "export", str(runs / "pretrain"), "--out", str(runs / "pretrain.pth")]),
        "finetune_pretrained": Stage("finetune_pretrained", "fine-tune from the pretrained weights",
                                     finetune("finetune_pretrained", ["--init", str(runs / "pretrain.pth")]),
                                     metrics=runs / "finetune_pretrained" / "metrics.jsonl", total_steps=ft_steps),
        "finetune_scratch": Stage("finetune_scratch", "fine-tune from random initialisation (same budget)",
                                  finetune("finetune_scratch", []),
                                  metrics=runs / "finetune_scratch" / "metrics.jsonl", total_steps=ft_steps),
        "eval_pretrained": Stage("eval_pretrained", "evaluate the fine-tune from pretraining",
                                 evaluate("finetune_pretrained"), images=n_val),
        "eval_scratch": Stage("eval_scratch", "evaluate the fine-tune from scratch",
                              evaluate("finetune_scratch"), images=n_val),
    }


def make_figures(out: Path, num_classes: int) -> dict[str, str]:
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
    shown = plots.predict_clusters(runs / "pretrain" / "config.yaml", runs / "pretrain.pth", out / "data" / "shards")
    figures["predictions"] = plots.plot_predictions(
        shown["inputs"], shown["predicted"], images_per_seq=shown["images_per_seq"],
        cluster_px=shown["cluster_px"], patch_px=shown["patch_px"], out=out / "predictions.png")
    return {k: str(v) for k, v in figures.items()}


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
    for stage in summary["stages"]:
        rate = stage["images_per_s"]
        table.add_row(stage["title"], f"{stage['wall_s']:.1f}", f"{stage['cpu_s']:.0f}",
                      f"{rate:,.1f}" if rate is not None else "-", results.get(stage["key"], ""))
    table.add_row("[bold]total[/bold]", f"[bold]{summary['wall_s']:.1f}[/bold]", f"{summary['cpu_s']:.0f}", "", "")
    return table


def run_demo(out: Path, *, quick: bool, seed: int, force: bool, console: Console) -> dict:
    budget = QUICK if quick else FULL
    t0, cpu0 = time.perf_counter(), _children_cpu()
    stages = build_stages(out, budget, seed)  # checks presets and overrides before touching OUT
    prepare_out(out, force)
    runner = StageRunner(out, console)
    console.print(f"[bold]star demo[/bold]{' --quick' if quick else ''}: {len(stages)} stages into {out} "
                  f"(logs in {runner.logs}, commands in {runner.commands})", highlight=False)
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("[dim]{task.fields[status]}"), console=console)
    with progress:
        for stage in stages.values():
            result = runner.run(stage, progress)
            if stage.metrics is not None:  # training: images/s of the optimizer steps
                facts = training_facts(stage.metrics.parent)
                result.images, result.images_per_s = facts["images"], facts["train_images_per_s"]
        figures_task = progress.add_task("figures", total=None, status="")
        figures = make_figures(out, budget.classes)
        progress.update(figures_task, total=1, completed=1, status="done")
    runs = out / "runs"
    ft_pre = finetune_facts(runs / "finetune_pretrained", runs / "finetune_pretrained" / "final_eval.json")
    ft_scr = finetune_facts(runs / "finetune_scratch", runs / "finetune_scratch" / "final_eval.json")
    gain = ft_pre["top1"] - ft_scr["top1"]
    noise = gain_stderr(ft_pre["top1"], ft_scr["top1"], ft_pre["eval_images"])
    summary = {
        "quick": quick, "seed": seed, "out": str(out),
        "dataset": {"classes": budget.classes, "train_images": budget.classes * budget.train_per_class,
                    "val_images": budget.classes * budget.val_per_class},
        "pretrain": training_facts(runs / "pretrain"),
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
                        help="tiny dataset and schedules: every stage and figure in a minute or two, "
                             "numbers meaningless (for tests and a first check)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data, the shard shuffle and both trainings (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="replace a previous demo in --out (only a folder `star demo` wrote is deleted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    console = Console(highlight=False)
    try:
        import matplotlib  # noqa: F401  (checked first: fail before ten minutes of training)
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
    pre, scr = summary["finetune_pretrained"], summary["finetune_scratch"]
    verdict = {"pretrained": "the STAR-pretrained classifier wins", "scratch": "the classifier from scratch wins",
               "tie": "a tie"}[summary["winner"]]
    if abs(summary["top1_gain_from_pretraining"]) < 2 * summary["top1_gain_stderr"]:
        verdict += (f", within noise: one standard error of the difference is "
                    f"{summary['top1_gain_stderr']:.1f} points on {pre['eval_images']} images")
    console.print(f"\nfine-tuned top-1 on {pre['eval_images']} validation images: from pretraining "
                  f"[bold]{pre['top1']:.1f}%[/bold], from scratch [bold]{scr['top1']:.1f}%[/bold] "
                  f"({summary['top1_gain_from_pretraining']:+.1f} points: {verdict}; same data, recipe and steps)")
    if summary["quick"]:
        console.print("[yellow]--quick: budgets too small for the numbers to mean anything[/yellow]")
    console.print(f"figures: {', '.join(summary['figures'].values())}\nsummary: {out / 'summary.json'}"
                  f"\ntotal {summary['wall_s']:.0f} s wall, {summary['cpu_s']:.0f} CPU-s over the stages")
    return 0
