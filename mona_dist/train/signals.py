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


def ignore_preemption_signals() -> None:
    """For a process on its way out with EX_TEMPFAIL, its checkpoint saved: further pre-emption signals are ignored.

    A late SIGTERM would otherwise turn the exit 75 into death by signal (128 + 15), which the sbatch scripts do not
    requeue: a Python handler catches it only until the interpreter's exit puts the default action back. Such a
    signal is expected, not rare: `srun --kill-on-bad-exit=1` (slurm/common.sh) terminates the step's other tasks as
    soon as the first one exits, and 75 is a non-zero exit; a time limit's SIGTERM can follow its USR1.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
