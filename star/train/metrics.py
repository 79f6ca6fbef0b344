"""Run logging: ``RUN_DIR/metrics.jsonl`` (every optimizer step), a rich console line every K
steps, and TensorBoard scalars when the tensorboard package is installed. Rank 0 only.

On resume the JSONL file is cut back to the records at or before the resumed step, so the
file always describes exactly one trajectory (steps replayed after a crash appear once).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records with ``step <= last_step`` (and any unparsable tail is dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is suspect too
        if record.get("step", -1) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable instead of invalid JSON
    return value


class RunLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, every_steps: int, tensorboard: bool,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.every = every_steps
        self.console = Console(stderr=True, soft_wrap=True)
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.eval_path = Path(run_dir) / "eval.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_jsonl(self.metrics_path, resume_step)
            truncate_jsonl(self.eval_path, resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self._fh = open(self.metrics_path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def step(self, record: dict) -> None:
        """One optimizer step: always to JSONL, to the console every K steps (and when skipped)."""
        if not self.enabled:
            return
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key in ("loss", "loss_image", "loss_sep", "lr", "grad_norm", "images_per_s", "data_wait"):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
        if record["step"] % self.every == 0 or record.get("skipped"):
            skipped = " [red]skipped (non-finite)[/red]" if record.get("skipped") else ""
            self.console.print(
                f"epoch {record['epoch']} step {record['step']}/{record['total_steps']} "
                f"loss {record['loss']:.4f} "
                + "".join(f"{k.replace('_', '-')} {record[k]:.4f} " for k in ("loss_image", "loss_sep") if k in record)
                + f"lr {record['lr']:.3e} "
                f"{record['images_per_s']:.0f} img/s data-wait {100 * record['data_wait']:.0f}% "
                f"grad-norm {record['grad_norm']:.3f}{skipped}"
                + (f" corrupt-skipped {record['corrupt_skipped']}" if record.get("corrupt_skipped") else ""))

    def evaluation(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.eval_path, "a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"eval/{key}", value, record["step"])
        parts = " ".join(f"{k} {v:.2f}" for k, v in record.items() if k.startswith(("top", "ema_top", "knn_top")))
        knn = (f" against {record['train_images']} train images, {record['knn_seconds']:.1f} s"
               if "knn_seconds" in record else "")  # the k-NN monitor's record (star/train/monitor.py)
        self.console.print(f"[bold]eval epoch {record['epoch']}[/bold] {parts} ({record['images']} images{knn})")

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()
