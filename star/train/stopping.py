"""Graceful stop: SIGUSR1 / SIGTERM set a flag; all ranks agree on it every step.

The handler only records the signal (a handler must not touch collectives). The training
loop folds the flag into the one all-reduce it does per step, so every rank sees the
same decision at the same step, saves the same checkpoint and exits with EXIT_STOPPED.
SLURM's ``--signal=B:USR1@secs`` reaches the batch shell; its trap forwards USR1 to the
tasks (see slurm/), and any one rank receiving it is enough.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
