"""SLURM pre-emption: SIGTERM/SIGUSR1 only set a flag; the loop acts on it at a step boundary.

Saving inside a signal handler would interleave with collectives mid-step; instead every rank reports its flag in
the loop's per-step all-reduce, so all ranks agree on the same step to checkpoint and exit with EX_TEMPFAIL (75),
which the sbatch scripts turn into a requeue.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EX_TEMPFAIL = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager installing the handlers (main thread only) and restoring the previous ones on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS):
        self.signals, self.requested, self.signum = signals, False, None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
