"""The token stream's reused memory: the batches it yields, the buffers they live in, their fp32 copies.

A streamed batch (`Batch`) is a dict of tensors that may be views of a reused buffer (`Ring`, pinned on
CUDA): `to_tokens` copies them out (to the device, or to fp32 in `Fp32Buffers` on the CPU) and then
`release`s the buffer for the next batch. Row copies run on one thread (`one_thread`). Nothing here reads
a shard or draws a permutation: that is `vitprobe.stream`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch

RING = 3  # batch buffers kept for reuse (CUDA copies from one while the next two are filled)


class Batch(dict):
    """A streamed batch (keys -> tensors) whose token tensors live in a reused buffer, `slot`."""

    slot: Slot | None = None
    moved: dict[tuple[str, str], torch.Tensor] | None = None  # whole (B, L, ...) tensors copied to a GPU
    fp32: Fp32Buffers | None = None  # the stream's reused buffers for fp32 copies on the CPU


def fp32_on_cpu(batch: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor | None:
    """`t` (a tensor of the batch, or a view of one) as fp32 in one of its stream's reused CPU buffers; None
    when the batch has none (not streamed)."""
    if not isinstance(batch, Batch) or batch.fp32 is None or t.device.type != "cpu":
        return None
    return batch.fp32.convert(t)


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # tensors (views included) sharing a storage


def _holders(t: torch.Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata) if _use_count is not None else -1


class Fp32Buffers:
    """fp32 copies of a stream's batches on the CPU, written into a few reused buffers per tensor shape:
    converting into fresh memory runs at a fraction of copy speed (every page is faulted in and zeroed).

    A buffer is written again only when nothing but this pool holds its memory (its storage's use count:
    every view handed out, and every tensor autograd saved from one, counts). So a batch still in use —
    the previous step's tokens, a prefetch queue, features kept in a list — is never overwritten; when all
    kept buffers are in use, the copy goes to fresh memory, as without the pool.
    """

    def __init__(self, keep: int = RING) -> None:
        self.keep = keep
        self.buffers: dict[tuple[int, ...], list[tuple[torch.Tensor, int]]] = {}  # row shape: (buffer, idle)

    def convert(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as fp32 (same shape), in a buffer that nothing else is using."""
        kept = self.buffers.setdefault(tuple(t.shape[1:]), [])
        for buffer, idle in kept:
            if len(buffer) >= len(t) and _holders(buffer) == idle:
                with one_thread():
                    return buffer[: len(t)].copy_(t)  # (B, ...) a view: held, it keeps the buffer busy
        buffer = torch.empty(t.shape, dtype=torch.float32)
        if _use_count is not None and len(kept) < self.keep:
            kept.append((buffer, _holders(buffer)))
            buffer = buffer[:]  # hand out a view, as above
        with one_thread():
            return buffer.copy_(t)


def on_device(batch: dict[str, torch.Tensor], key: str, device: torch.device) -> torch.Tensor:
    """`batch[key]` on `device` in its stored dtype, copied once per batch (several blocks are then picked
    on the device instead of each one copied from a strided host view)."""
    t = batch[key]
    if not isinstance(batch, Batch) or t.device == device:
        return t
    if batch.moved is None:
        batch.moved = {}
    if (key, str(device)) not in batch.moved:
        batch.moved[(key, str(device))] = t.to(device, non_blocking=True)
    return batch.moved[(key, str(device))]


def reused(batch: dict[str, torch.Tensor]) -> bool:
    """Whether the batch's token tensors live in a buffer the feed reuses (copy them to keep them)."""
    return isinstance(batch, Batch) and batch.slot is not None


def release(batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a batch's buffer back to the feed once its tensors were copied out (on `device`'s stream)."""
    if isinstance(batch, Batch) and batch.slot is not None:
        batch.slot.release(device)


class Slot:
    """One batch buffer per key; back in its ring's free list once released."""

    def __init__(self, tensors: dict[str, torch.Tensor], free: deque[Slot]) -> None:
        self.tensors, self.free, self.event, self.available = tensors, free, None, False

    def release(self, device: torch.device) -> None:
        if device.type == "cuda":  # the copy out of this pinned buffer may still run: wait for it on reuse
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))
        if not self.available:
            self.available = True
            self.free.append(self)

    def claim(self) -> dict[str, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        self.available = False
        return self.tensors


class Ring:
    """Batch buffers shaped like `like` (pinned when `pin`), reused once `to_tokens` released them; a batch
    that is never released keeps its buffer, and the ring makes a new one."""

    def __init__(self, like: dict[str, torch.Tensor], batch_size: int, pin: bool) -> None:
        self.specs = {k: (tuple(v.shape[1:]), v.dtype) for k, v in like.items()}
        self.batch_size, self.pin = batch_size, pin
        self.free: deque[Slot] = deque()
        self.made = 0

    def take(self, n: int) -> tuple[dict[str, torch.Tensor], Slot]:
        spare = 2 if self.pin else 1  # on CUDA, keep one buffer in flight while another is filled
        if len(self.free) >= spare or (self.free and self.made >= RING):
            slot = self.free.popleft()
        else:
            tensors = {
                k: torch.empty((self.batch_size, *shape), dtype=dtype, pin_memory=self.pin)
                for k, (shape, dtype) in self.specs.items()
            }
            slot = Slot(tensors, self.free)
            self.made += 1
        return {k: v[:n] for k, v in slot.claim().items()}, slot


@contextmanager
def one_thread() -> Iterator[None]:
    """Row copies on one thread: a copy is memory-bound, one core reaches memory speed, and a parallel copy
    waits for its slowest thread (on a busy machine, for a thread that is not running)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
