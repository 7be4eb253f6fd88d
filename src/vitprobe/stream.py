"""The token stream: a split's rows read window by window, shuffled by index, gathered into reused buffers.

A window is up to WINDOW_BYTES of consecutive split rows inside one block (shard). Each epoch shuffles the
order of all windows; consecutive windows form a group of about half the buffer, whose rows are permuted
(by index: nothing is copied to shuffle) and gathered straight from the memory-mapped shards into reused
batch buffers, one copy per byte. A reader thread opens and pages in the next group (and verifies its
shards) while the current one is consumed, so reading overlaps compute and memory stays at about the
buffer plus a few batches, whatever the shard or cache size. Every permutation is drawn in the caller's
thread from its generator, so the batches depend on the seed and epoch only, never on timing. The buffers and
the batches they hold are `vitprobe.buffers`.

Shards are verified (`TokenSource.verify_block`: sha256 the first time) on background threads while they
are consumed; the stream waits for every verification before its last batch, so a corrupt shard stops the
pass with a CacheError before any result is computed from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vitprobe.buffers import Batch, Fp32Buffers, Ring, one_thread
from vitprobe.tokens import WINDOW_BYTES

if TYPE_CHECKING:
    from vitprobe.sources import TokenSource

STREAM_BUFFER_BYTES = 512 << 20  # default feed memory: the group being consumed plus the one read ahead
VERIFIERS = max(1, min(4, (os.cpu_count() or 2) - 1))  # shards hashed at once (hashlib frees the GIL)


@dataclass
class Window:
    """Split rows inside one block: block-local rows `local` (sorted), all within [start, stop)."""

    block: int
    start: int
    stop: int
    local: torch.Tensor  # (m,) block-local row numbers
    rows: torch.Tensor  # (m,) source row numbers


@dataclass
class Piece:
    """An opened window: its tensors (views of rows [start, stop)), the rows wanted in it, their labels."""

    tensors: dict[str, torch.Tensor]
    local: torch.Tensor  # (m,) positions in `tensors`
    rows: torch.Tensor  # (m,) source row numbers
    reused: bool = False  # `tensors` are a carry buffer the stream writes again: no batch may view them
    wide: dict[str, torch.Tensor] = field(init=False, repr=False)  # `_wide` views of `tensors`, made once

    def __post_init__(self) -> None:
        self.wide = {k: _wide(t) for k, t in self.tensors.items()}


@dataclass
class Pool:
    """The pieces a group's batches are drawn from, with every piece's positions and source rows laid end
    to end, so a batch looks its rows up in one index operation whatever the number of pieces."""

    pieces: list[Piece]
    offsets: torch.Tensor  # (P + 1,) first pool position of each piece
    local: torch.Tensor  # (n,) position of each pool row inside its piece
    rows: torch.Tensor  # (n,) source row of each pool row

    @classmethod
    def of(cls, pieces: list[Piece]) -> Pool:
        sizes = torch.tensor([0] + [len(p.local) for p in pieces])
        return cls(
            pieces, sizes.cumsum(0), torch.cat([p.local for p in pieces]), torch.cat([p.rows for p in pieces])
        )

    def __len__(self) -> int:
        return len(self.local)

    def by_piece(self, positions: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """`positions` (pool positions) regrouped piece by piece (stable), the count of each piece's rows
        among them, and the pieces with any."""
        piece = torch.searchsorted(self.offsets, positions, right=True) - 1  # which piece each row is in
        positions = positions[torch.argsort(piece, stable=True)]
        counts = torch.bincount(piece, minlength=len(self.pieces)).tolist()
        return positions, counts, [j for j, c in enumerate(counts) if c]


def memory_batches(
    memory: dict[str, torch.Tensor],
    keys: Sequence[str],
    order: torch.Tensor,
    batch_size: int,
    count: int,
    *,
    pin: bool = True,
) -> Iterator[Batch]:
    """Batches of rows `order` of tensors in pinned host memory, gathered into pinned reused buffers so each
    copies to the GPU asynchronously (an index into pinned memory would give pageable memory)."""
    ring = Ring({k: memory[k] for k in keys}, batch_size, pin=pin)
    for b in range(count):
        take = order[b * batch_size : (b + 1) * batch_size]
        out, slot = ring.take(len(take))
        with one_thread():
            for k in keys:
                gather(memory[k], take, out[k])
        batch = Batch(out)
        batch.slot = slot
        batch["labels"] = memory["labels"][take]
        yield batch


def plan_windows(source: TokenSource, rows: torch.Tensor, per_window: int) -> list[Window]:
    """The split's rows (sorted) cut into windows of at most `per_window` rows, none across blocks."""
    out = []
    bounds = torch.tensor([b for block in source.blocks for b in block], dtype=rows.dtype)
    cuts = torch.searchsorted(rows, bounds).view(-1, 2).tolist()  # (blocks, 2) positions in `rows`
    for i, ((start, _), (lo, hi)) in enumerate(zip(source.blocks, cuts, strict=True)):
        for a in range(lo, hi, per_window):
            local = rows[a : min(a + per_window, hi)] - start
            out.append(Window(i, int(local[0]), int(local[-1]) + 1, local, local + start))
    return out


def plan_groups(windows: Sequence[Window], row_bytes: int, group_bytes: int) -> list[list[Window]]:
    """Consecutive windows gathered into groups of about `group_bytes` of wanted rows."""
    groups: list[list[Window]] = []
    size = group_bytes + 1
    for w in windows:
        if size >= group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(w)
        size += len(w.local) * row_bytes
    return groups


def open_group(source: TokenSource, keys: Sequence[str], group: Sequence[Window]) -> list[Piece]:
    """Map a group's windows and page their wanted rows in, or read the rows of sparse windows (fewer
    than half the rows they span) into memory (run on the reader thread)."""
    views = {}
    pieces = []
    for w in group:
        if w.block not in views:
            views[w.block] = source.open_block(w.block, keys)
        view = views[w.block]
        if view.read is not None and 2 * len(w.local) < w.stop - w.start:
            pieces.append(Piece(view.read(w.local), torch.arange(len(w.local)), w.rows))
            continue
        if view.page_in is not None:
            view.page_in(w.local)
        pieces.append(Piece(view.rows(w.start, w.stop), w.local - w.start, w.rows))
    return pieces


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Rows of `t` as (n, X) of the widest integer type their bytes allow (a view), for fast row copies;
    `t` itself when its rows are not contiguous."""
    try:
        flat = t.view(len(t), -1).view(torch.uint8)  # (n, bytes)
    except RuntimeError:
        return t
    for dtype in (torch.int64, torch.int32, torch.int16):
        try:
            return flat.view(dtype)
        except RuntimeError:
            continue
    return flat


def gather(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[j] = src[index[j]] for every j: one copy of each row, straight from `src` (a mapped file)."""
    wide_src = _wide(src)
    torch.index_select(wide_src, 0, index, out=_as_wide(out, wide_src))


def _as_wide(out: torch.Tensor, wide_src: torch.Tensor) -> torch.Tensor:
    """`out` viewed as `wide_src` is (the `_wide` view of its source), so the two copy row for row."""
    if wide_src.dtype == out.dtype and wide_src.dim() == out.dim():
        return out
    return out.view(len(out), -1).view(torch.uint8).view(wide_src.dtype)


def _assemble(
    pool: Pool,
    take: torch.Tensor,
    keys: Sequence[str],
    labels: torch.Tensor,
    sink: Ring | None,
    views: bool,
) -> Batch:
    """The batch of pool positions `take`, grouped by piece; zero-copy views when it is one row run."""
    with one_thread():
        take, counts, used = pool.by_piece(take)
        local = pool.local[take]  # (B,) positions inside their pieces, grouped by piece
        if views and len(used) == 1 and not pool.pieces[used[0]].reused:
            first = int(local[0])
            if torch.equal(local, torch.arange(first, first + len(local))):
                tensors = pool.pieces[used[0]].tensors
                batch = Batch({k: tensors[k][first : first + len(local)] for k in keys})
                batch["labels"] = labels[pool.rows[take]]
                return batch
        if sink is None:  # the whole split into fresh memory (a resident copy)
            like = pool.pieces[used[0]].tensors
            out = {k: torch.empty((len(take), *like[k].shape[1:]), dtype=like[k].dtype) for k in keys}
            slot = None
        else:
            out, slot = sink.take(len(take))
        _copy_rows(pool, used, counts, local, out, keys)
        batch = Batch(out)
        batch.slot = slot
        batch["labels"] = labels[pool.rows[take]]
    return batch


def _copy_rows(
    pool: Pool,
    used: Sequence[int],
    counts: Sequence[int],
    local: torch.Tensor,
    out: dict[str, torch.Tensor],
    keys: Sequence[str],
) -> None:
    """out[k][i] = the i-th row of `local` (grouped by piece: counts[j] rows of piece j, for j in `used`).
    Pieces of one pool may differ in layout (a contiguous carry buffer next to strided views of one block
    of a multi-block shard), so `out` is viewed once per layout met."""
    wide_out: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}
    pos = 0
    for j in used:
        c = counts[j]
        index = local[pos : pos + c]
        wide = pool.pieces[j].wide
        for k in keys:
            src = wide[k]
            layout = (k, src.dtype, src.dim())
            if layout not in wide_out:
                wide_out[layout] = _as_wide(out[k], src)  # (B, X) or out[k] itself
            torch.index_select(src, 0, index, out=wide_out[layout][pos : pos + c])
        pos += c


def _leftover(pool: Pool, rest: torch.Tensor, buffers: dict[str, torch.Tensor] | None) -> list[Piece]:
    """The rows at pool positions `rest` (fewer than a batch), copied out of their windows so that the
    carry into the next group keeps no mapping of this one alive (memory stays at two groups). Into
    `buffers` (batch-sized, reused every other group: a carry is consumed within the next group) when
    given, else fresh memory."""
    if len(rest) == 0:
        return []
    with one_thread():
        rest, counts, used = pool.by_piece(rest)
        like = pool.pieces[used[0]].tensors
        if buffers is None:
            out = {k: torch.empty((len(rest), *v.shape[1:]), dtype=v.dtype) for k, v in like.items()}
        else:
            out = {k: v[: len(rest)] for k, v in buffers.items()}
        _copy_rows(pool, used, counts, pool.local[rest], out, list(like))
    return [Piece(out, torch.arange(len(rest)), pool.rows[rest], reused=buffers is not None)]


def stream_batches(
    source: TokenSource,
    rows: torch.Tensor,
    keys: Sequence[str],
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    shuffle_shards: int = 4,
    buffer_bytes: int = STREAM_BUFFER_BYTES,
    pin: bool = False,
    into_memory: bool = False,
) -> Iterator[Batch]:
    """Batches of `keys` + "labels" over `rows` (sorted source rows), streamed from `source`.

    Args:
        generator: shuffles window order and rows within each group; None reads in source order.
        drop_last: drop a trailing partial batch unless it is the only one.
        shuffle_shards: at least this many windows are mixed in a group (windows shrink to fit).
        buffer_bytes: about the memory the stream holds: the group consumed and the group read ahead.
        pin: batch buffers in pinned memory (for asynchronous copies to a GPU).
        into_memory: every batch in fresh memory instead of reused buffers (used for resident copies).
    """
    keys = list(keys)
    if len(rows) == 0:
        return
    row_bytes = max(1, source.row_bytes(keys))
    group_bytes = max(buffer_bytes // 2, batch_size * row_bytes)
    per_window = max(1, min(WINDOW_BYTES, group_bytes // max(shuffle_shards, 1)) // row_bytes)
    windows = plan_windows(source, rows, per_window)
    if generator is not None:
        windows = [windows[i] for i in torch.randperm(len(windows), generator=generator).tolist()]
    groups = plan_groups(windows, row_bytes, group_bytes)
    blocks = list(dict.fromkeys(w.block for w in windows))  # in the order the pass first reads them
    labels = source.labels
    views = generator is None and not pin and not into_memory  # in order: batches can be file views
    sink: Ring | None = None
    fp32 = None if into_memory else Fp32Buffers()
    carry: list[Piece] = []
    spare: dict[int, dict[str, torch.Tensor]] = {}  # the two carry buffers (batch_size rows each)
    yielded = 0
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitprobe-reader")
    verifier = ThreadPoolExecutor(max_workers=VERIFIERS, thread_name_prefix="vitprobe-verify")
    try:
        checks = [verifier.submit(source.verify_block, i) for i in blocks]
        pending: Future[list[Piece]] = reader.submit(open_group, source, keys, groups[0])
        for g in range(len(groups)):
            for check in checks if g == len(groups) - 1 else [c for c in checks if c.done()]:
                check.result()  # a corrupt shard's CacheError; before the last group, wait for all
            pieces = pending.result()
            if g + 1 < len(groups):
                pending = reader.submit(open_group, source, keys, groups[g + 1])
            pool = Pool.of(carry + pieces)
            n = len(pool)
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            like = pool.pieces[0].tensors
            if sink is None and not into_memory:
                sink = Ring({k: like[k] for k in keys}, batch_size, pin)
            full = n // batch_size
            for b in range(full):
                take = order[b * batch_size : (b + 1) * batch_size]
                batch = _assemble(pool, take, keys, labels, sink, views)
                batch.fp32 = fp32
                yield batch
                yielded += 1
            if n % batch_size and not into_memory and g % 2 not in spare:  # two carry buffers, in turn
                spare[g % 2] = {
                    k: torch.empty((batch_size, *like[k].shape[1:]), dtype=like[k].dtype) for k in keys
                }
            carry = _leftover(pool, order[full * batch_size :], spare.get(g % 2))
            pool = pieces = like = None  # this group's maps go now, before the next one is read ahead
    finally:  # also when the caller stops early: no shard is hashed for a pass that ended
        reader.shutdown(wait=True, cancel_futures=True)
        verifier.shutdown(wait=True, cancel_futures=True)
    if carry and (not drop_last or yielded == 0):
        last = Pool.of(carry)
        batch = _assemble(last, torch.arange(len(last)), keys, labels, sink, views)
        batch.fp32 = fp32
        yield batch
