"""Stopping a distillation cleanly on SIGTERM or SIGINT, the signals a cluster (SLURM, torchrun)
or a user sends before a job is killed.

:class:`Watch` is a context manager: while it is entered it replaces the handlers of SIGTERM and
SIGINT (in the main thread only: Python runs handlers there and lets no other thread set them); on
exit it puts back the ones it found, so a library caller's or a test runner's handlers are untouched
outside the loop. A signal the process ignores (``nohup``, a background job's SIGINT) stays ignored.

The first signal is only recorded (:meth:`Watch.requested`): the loop finishes its iteration, every
process agrees to stop after the same one, and rank 0 checkpoints there (``session.py``). A second
signal ends the process at once: the default action is restored and the signal sent again. The same
signal a second time within ``DUPLICATE_S`` of the first is taken as one request delivered twice and
ignored: SLURM can signal every process of a job step, and torchrun forwards its own copy to each
worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional, Sequence

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# two copies of one request arrive milliseconds apart; a person pressing Ctrl-C twice takes longer
DUPLICATE_S = 1.0


def exit_code(signum: int) -> int:
    """The shell's status of a process ended by ``signum`` (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name


class Watch:
    """Records the first of ``signals`` while entered; a second one ends the process (see above)."""

    def __init__(self, signals: Sequence[int] = SIGNALS, duplicate_s: float = DUPLICATE_S):
        self.signals = tuple(signals)
        self.duplicate_s = duplicate_s
        self._signal: Optional[int] = None
        self._at = 0.0
        self._previous: Dict[int, object] = {}

    def requested(self) -> Optional[int]:
        """The first signal received while entered (its number), or None."""
        return self._signal

    @property
    def installed(self) -> bool:
        """Whether the handlers are in place (not outside the main thread)."""
        return bool(self._previous)

    def __enter__(self) -> "Watch":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                if signal.getsignal(s) is not signal.SIG_IGN:  # ignored (nohup, `&`): stays so
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: the handler was not set from Python and cannot be put back; the default is closest
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._signal is None:
            self._signal, self._at = signum, now
            return
        if signum == self._signal and now - self._at < self.duplicate_s:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
