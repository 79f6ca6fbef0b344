"""Progress bars, atomic file writes and CPU counting shared by the data_prep commands."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. '1,234 img/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


class LoggedProgress(Progress):
    """A rich progress bar that, without a terminal (a SLURM log), prints a plain line every
    `log_every` seconds instead: rich alone would show nothing until the very end."""

    def __init__(self, *columns, unit: str, log_every: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.unit, self.log_every, self._last_log = unit, log_every, time.monotonic()

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if now - self._last_log >= self.log_every or task.finished:
            self._last_log = now
            speed = task.finished_speed or task.speed or 0.0
            eta = f"{task.time_remaining:.0f} s" if task.time_remaining is not None else "-"
            self.console.print(f"{task.description}: {task.completed:,.0f}/{task.total:,.0f} "
                               f"({speed:,.0f} {self.unit}/s, ETA {eta})", highlight=False)


def make_progress(unit: str = "img", console: Console | None = None) -> Progress:
    return LoggedProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        unit=unit, console=console or Console(stderr=True))


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write via a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def usable_cpus() -> int:
    """CPUs this process may run on (respects SLURM / cgroup CPU binding, unlike cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS
        return max(1, os.cpu_count() or 1)
