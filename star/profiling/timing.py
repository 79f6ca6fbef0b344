"""Timing stages of an iteration and peak memory, on CUDA or CPU.

CUDA work is asynchronous, so a host clock read after a launch measures the launch, not the
work. :class:`StageTimer` therefore either records CUDA events at every stage boundary and
reads them once the iteration is done (``mode="events"``: no extra synchronisation, for the
model profiler) or synchronises the device before reading the host clock (``mode="sync"``:
host-side stages such as waiting for data can be attributed too, for the step profiler).
On CPU both read ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Durations of consecutive stages of one iteration: ``start()``, ``mark(name)`` at the end
    of each stage, then ``durations()`` -> {name: seconds} (adds up to the iteration)."""

    def __init__(self, device: str, mode: str = "events") -> None:
        if mode not in ("events", "sync"):
            raise ValueError(f"mode must be 'events' or 'sync', got {mode!r}")
        self.device, self.use_events = device, device == "cuda" and mode == "events"
        self._marks: list[tuple[str, object]] = []

    def _now(self):
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        if not self._marks:
            raise RuntimeError("StageTimer.mark() before start()")
        self._marks.append((name, self._now()))

    def durations(self) -> dict[str, float]:
        if self.use_events:
            self._marks[-1][1].synchronize()
            return {name: prev.elapsed_time(cur) / 1e3
                    for (_, prev), (name, cur) in zip(self._marks, self._marks[1:])}
        return {name: cur - prev for (_, prev), (name, cur) in zip(self._marks, self._marks[1:])}


def median_stages(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per-stage median over iterations, plus ``total``: the median of the iteration sums
    (not the sum of the medians)."""
    if not samples:
        raise ValueError("no timed iterations: --batches must be at least 1")
    out = {name: statistics.median(s[name] for s in samples) for name in samples[0]}
    out["total"] = statistics.median(sum(s.values()) for s in samples)
    return out


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a region: CUDA ``max_memory_allocated`` (weights, gradients and
    activations: everything the caching allocator handed out), or on CPU the rise of the
    process's resident set above its size at ``reset()``. Linux lets a process reset its RSS
    high-water mark (write 5 to /proc/self/clear_refs); where it cannot, the rise of the
    lifetime high-water mark is reported, which is lower if an earlier phase peaked higher.
    On CPU the figure counts only pages that become resident: memory an earlier phase freed to
    the allocator is reused without raising RSS, so profile in a fresh process."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device == "cuda" else "cpu peak RSS increase"
        self._baseline_kib = 0

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._baseline_kib = _proc_status_kib("VmRSS") or 0
        except OSError:
            self._baseline_kib = _proc_status_kib("VmHWM") or 0

    def peak_bytes(self) -> int | None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        high = _proc_status_kib("VmHWM")
        return None if high is None else max(high - self._baseline_kib, 0) * 1024
