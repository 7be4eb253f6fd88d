"""Stopping on signals: SIGINT (Ctrl-C) and SIGTERM (timeout, Slurm, Kubernetes) as one clean stop.

Inside `StopOnSignals()`, SIGTERM raises `Terminated` (a KeyboardInterrupt, so every clean-up path that
handles Ctrl-C handles it too) and SIGXFSZ is ignored, so that exceeding `ulimit -f` makes the write fail
with EFBIG (reported as a full disk) instead of killing the process. The CLI reports an interruption with
exit code 130 (SIGINT) or 143 (SIGTERM), as a shell does for a process killed by those signals.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as for Ctrl-C; the command exits 143."""


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 143 if isinstance(exc, Terminated) else 130


def signal_name(exc: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"


class StopOnSignals:
    """While a long job runs, SIGINT / SIGTERM raise KeyboardInterrupt / `Terminated`, also via dead workers.

    Ctrl-C sends SIGINT to the whole process group, and Slurm sends SIGTERM to every process of a step, so
    DataLoader workers die of them too. Usually the main process raises first, but it may instead see the
    dead workers first (or have its exception swallowed while the loader cleans up), and then raises
    `RuntimeError: DataLoader worker (pid(s) N) exited unexpectedly`. After a signal that error becomes the
    interruption; without one (a worker that crashed) it stays an error. Handlers chain to those they
    replace (restored on exit); they are installed only in the main thread, over Python-level handlers (a
    SIGINT that a shell set to be ignored stays ignored).
    """

    def __init__(self) -> None:
        self.seen: KeyboardInterrupt | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if signum == signal.SIGINT and not callable(previous):
                continue  # ignored (a background job) or default: leave it
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        if hasattr(signal, "SIGXFSZ"):
            self._previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM:
            self.seen = Terminated()
            raise self.seen
        self.seen = KeyboardInterrupt()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
        raise self.seen

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self.seen is not None and isinstance(exc, RuntimeError) and "DataLoader worker (pid" in str(exc):
            raise type(self.seen)() from exc
        if self.seen is not None and isinstance(exc, KeyboardInterrupt) and type(exc) is not type(self.seen):
            raise type(self.seen)() from exc  # e.g. a worker's KeyboardInterrupt re-raised after our SIGTERM

