"""The background shard writer: shards are written on a thread while the next one is computed.

The extraction fills one set of shard buffers while the writer thread writes (hashes, fsyncs, renames) the
previous set, so the model waits for the disk only when the disk is slower than the model on average.
Two buffer sets are enough: a set is handed back once its shard is written, which `collect(keep=1)` waits for
before the next shard is filled.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from vitprobe.cache import KeySpec, ShardInfo

Write = Callable[[int, int, dict[str, torch.Tensor]], ShardInfo]  # (shard number, first row, tensors)


class ShardBuffers:
    """Two reusable sets of one shard's tensors on the CPU (pinned on CUDA for asynchronous copies), each
    allocated when first taken (a rank with one shard allocates one)."""

    def __init__(self, layout: dict[str, KeySpec], rows: int, *, pin: bool) -> None:
        self._layout, self._rows, self._pin = layout, rows, pin
        self._sets: list[dict[str, torch.Tensor]] = []
        self._next = 0

    def take(self, n: int) -> dict[str, torch.Tensor]:
        """The next set, cut to `n` rows (a view: contiguous, since rows are the first axis)."""
        if self._next == len(self._sets):
            self._sets.append({key: torch.empty((self._rows, *s.shape), dtype=s.dtype, pin_memory=self._pin)
                               for key, s in self._layout.items()})
        chosen = self._sets[self._next]
        self._next = (self._next + 1) % 2
        return {key: buf[:n] for key, buf in chosen.items()}


class ShardWriter:
    """Writes shards on one thread, in order; an error stops it and is raised by the next call."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._jobs: queue.Queue[tuple[int, int, dict[str, torch.Tensor]] | None] = queue.Queue()
        self._lock = threading.Condition()
        self._pending = 0
        self._finished: list[ShardInfo] = []
        self._error: BaseException | None = None
        self.waited = 0.0  # seconds the caller spent in `collect` waiting for the disk
        self._thread = threading.Thread(target=self._loop, name="vitprobe-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, index: int, start: int, tensors: dict[str, torch.Tensor]) -> None:
        """Queue shard `index` (its tensors must stay untouched until `collect` has returned it)."""
        with self._lock:
            self._raise_error()
            self._pending += 1
        self._jobs.put((index, start, tensors))

    def collect(self, *, keep: int = 0) -> list[ShardInfo]:
        """Wait until at most `keep` shards are still being written; the shards finished since the last call.

        Raises:
            BaseException: whatever a write raised (a CacheError for a full disk, a KeyboardInterrupt, ...).
        """
        started = time.perf_counter()
        with self._lock:
            self._lock.wait_for(lambda: self._pending <= keep or self._error is not None)
            self.waited += time.perf_counter() - started
            self._raise_error()
            done, self._finished = self._finished, []
        return done

    def close(self) -> None:
        """Finish the queued writes (an interrupted run keeps the shard being written) and stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self) -> None:
        failed = False
        while (job := self._jobs.get()) is not None:
            if failed:  # after an error nothing more is written: the run is stopping
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()
                continue
            try:
                info = self._write(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, raised there
                failed = True
                with self._lock:
                    self._error = exc
                    self._pending -= 1
                    self._lock.notify_all()
                continue
            with self._lock:
                self._finished.append(info)
                self._pending -= 1
                self._lock.notify_all()

