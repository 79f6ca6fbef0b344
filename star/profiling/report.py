"""Turning profiler results into one rich table, a projection, and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

IMAGENET_TRAIN_IMAGES = 1_281_167


def _fmt(value, spec: str = ",.1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _mib(num_bytes) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:,.0f} MiB"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def _mfu(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _shares(by_kind: dict[str, int]) -> str:
    total = sum(by_kind.values())
    return ", ".join(f"{kind} {100 * n / total:.1f} %" for kind, n in sorted(by_kind.items(), key=lambda kv: -kv[1]))


def aggregate_model(per_rank: list[dict]) -> dict:
    """Sum of the ranks' images/s and tokens/s (each rank timed its own GPU); MFU over all."""
    images = sum(r["images_per_s"] for r in per_rank)
    tokens = sum(r["tokens_per_s"] for r in per_rank)
    achieved = sum(r["achieved_tflops"] for r in per_rank)
    peaks = [r["peak_tflops"] for r in per_rank]
    peak = sum(peaks) if all(p for p in peaks) else None
    return {"ranks": len(per_rank), "images_per_s": images, "tokens_per_s": tokens,
            "achieved_tflops": achieved, "mfu": achieved / peak if peak else None}


def projection(images_per_s: float, epochs: int, source: str, dataset_images: int = IMAGENET_TRAIN_IMAGES) -> dict:
    """Wall time of ``epochs`` passes over ImageNet-1k train at ``images_per_s``."""
    seconds = dataset_images * epochs / images_per_s
    return {"dataset_images": dataset_images, "epochs": epochs, "images_per_s": images_per_s,
            "based_on": source, "seconds": seconds, "hours": seconds / 3600, "days": seconds / 86400}


def _rows(result: dict) -> list[tuple[list[str], str]]:
    """(table cells, one-line details) per measured thing: data, model per rank and summed, step."""
    rows = []
    data = result.get("data")
    if data:
        rows.append((["data", _fmt(data.get("images_per_s")), "-", _ms(data.get("batch_s")), "-", "-", "-"],
                     data.get("details", "")))
    per_rank = result.get("model_per_rank") or []
    for rank, model in enumerate(per_rank):
        label = "model" if len(per_rank) == 1 else f"model, rank {rank}"
        details = (f"batch {model['batch_images']} images, {model['precision']}, Mamba path {model['mamba_path']}, "
                   f"forward {_ms(model['forward_s'])} + backward {_ms(model['backward_s'])}, "
                   f"{model['flops']['training_per_image'] / 1e9:,.2f} GFLOP/image trained (3 x forward: "
                   f"{_shares(model['flops']['by_kind'])})")
        rows.append(([label, _fmt(model["images_per_s"]), _fmt(model["tokens_per_s"], ",.0f"), _ms(model["step_s"]),
                      _fmt(model["achieved_tflops"], ".3g"), _mfu(model["mfu"]), _mib(model["peak_memory_bytes"])],
                     details))
    if len(per_rank) > 1:
        agg = result["model"]
        rows.append(([f"model, {agg['ranks']} ranks", _fmt(agg["images_per_s"]), _fmt(agg["tokens_per_s"], ",.0f"),
                      "-", _fmt(agg["achieved_tflops"], ".3g"), _mfu(agg["mfu"]), "-"], "sum over ranks"))
    step = result.get("step")
    if step:
        details = (f"{step['world_size']} rank(s) x {step['micro_images']} images x {step['accum_steps']} accumulation "
                   f"({step['rank_images_per_s']:,.1f} images/s per rank), "
                   f"{step['precision']}, ZeRO-{step['zero_stage']}, {step['data_backend']} loader; "
                   f"waiting for data {100 * step['data_wait_share']:.1f} %, "
                   f"optimizer {100 * step['optimizer_share']:.1f} %")
        waits = step.get("data_wait_share_per_rank") or []
        if len(waits) > 1:
            details += f" (data wait on the slowest-fed rank {100 * max(waits):.1f} %)"
        rows.append((["train step", _fmt(step["images_per_s"]), _fmt(step["tokens_per_s"], ",.0f"), _ms(step["step_s"]),
                      _fmt(step.get("achieved_tflops"), ".3g"), _mfu(step.get("mfu")), _mib(step["peak_memory_bytes"])],
                     details))
    return rows


def build_table(result: dict) -> Table:
    """One table, a row per measured thing; the details of each row are printed under it."""
    table = Table(title=f"star profile {result['what']}: {result['config']} on {result['device_label']}")
    for column in ("stage", "images/s", "tokens/s", "time / iter", "TFLOP/s", "MFU", "peak memory"):
        table.add_column(column, justify="left" if column == "stage" else "right", no_wrap=True)
    for cells, _ in _rows(result):
        table.add_row(*cells)
    return table


def print_report(result: dict, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 160)
    machine = result["machine"]
    console.print(f"[bold]{machine['hostname']}[/bold] {machine['date_utc']}: {result['device_label']}; "
                  f"torch {machine['versions'].get('torch')}, CUDA {machine.get('torch_cuda')}, "
                  f"driver {machine.get('nvidia_driver', '-')}, DALI {machine['versions'].get('nvidia-dali')}, "
                  f"mamba-ssm {machine['versions'].get('mamba-ssm')}")
    console.print(build_table(result))
    for cells, details in _rows(result):
        if details:
            console.print(f"  {cells[0]}: {details}")
    for model in result.get("model_per_rank") or []:
        if model.get("trace"):
            console.print(f"  trace: {model['trace']['chrome_trace']} (open in ui.perfetto.dev), "
                          f"top operators: {model['trace']['top_operators']}")
    peak = result.get("peak_tflops_source")
    if peak:
        console.print(f"  MFU = achieved training FLOP/s (analytic count, star/flops.py) / peak; peak: {peak}")
    proj = result.get("projection")
    if proj:
        console.print(f"  projected wall time of {proj['epochs']} epochs x {proj['dataset_images']:,} images at "
                      f"{proj['images_per_s']:,.1f} images/s ({proj['based_on']}): [bold]{proj['hours']:,.1f} h"
                      f"[/bold] ({proj['days']:,.1f} days)")


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
