"""Token sources: the rows of a cache (memory-mapped shards) or of tensors in memory, block by block.

A `TokenSource` is rows of tokens for one block (or several: the layers picked), grouped in blocks (cache
shards) that are opened lazily (`open_block`), verified against their recorded hash (`verify_block`) and
read a window at a time by `vitprobe.tokens` and `vitprobe.stream`. Nothing here shuffles or batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from vitprobe.errors import CacheError

if TYPE_CHECKING:
    from vitprobe.cache import TokenCache


class BlockView:
    """One block's tensors for some keys, read lazily: `rows(a, b)` gives views of block rows [a, b).

    Args:
        get: (a, b) -> {key: (b - a, ...) tensor}, views of the block where the storage allows.
        num_rows: rows in the block.
        page_in: block-local rows (sorted) -> None; reads them ahead of use (memory maps), or None.
        read: block-local rows (sorted) -> {key: (m, ...) tensor} read into fresh memory without mapping
            (for sparse rows), or None where `get` costs nothing (tensors in memory).
    """

    def __init__(
        self,
        get: Callable[[int, int], dict[str, torch.Tensor]],
        num_rows: int,
        page_in: Callable[[torch.Tensor], None] | None = None,
        read: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.get, self.num_rows, self.page_in, self.read = get, num_rows, page_in, read

    def rows(self, a: int, b: int) -> dict[str, torch.Tensor]:
        return self.get(a, b)


class TokenSource:
    """Rows of tokens for one block (or several), grouped in blocks (cache shards) read a window at a time.

    Attributes:
        labels: (N,) int64 class of each row, in source order.
        indices: (N,) int64 dataset index of each row (views of one image share it).
        views: (N,) int64 view number of each row, or None when every image has one row.
        blocks: (start, stop) row range of each block.
    """

    num_rows: int
    dim: int
    grid: tuple[int, int]
    num_classes: int
    class_names: list[str]
    labels: torch.Tensor
    indices: torch.Tensor
    views: torch.Tensor | None
    blocks: list[tuple[int, int]]
    keys: frozenset[str]  # token keys present: cls, patches, reg, mean

    def open_block(self, i: int, keys: Sequence[str]) -> BlockView:
        """Block i's tensors for `keys`, the layer(s) already picked, as a lazy view (nothing read yet).
        Call `verify_block(i)` before trusting what it reads."""
        raise NotImplementedError

    def verify_block(self, i: int) -> None:
        """Check block i's bytes against their recorded hash (a no-op where nothing is recorded).

        Raises:
            CacheError: the block was corrupted since it was written.
        """

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Block i's tensors for `keys` (plus "labels"), each (n, ...) with the layer already picked."""
        start, stop = self.blocks[i]
        self.verify_block(i)
        out = dict(self.open_block(i, keys).rows(0, stop - start))
        out["labels"] = self.labels[start:stop].clone()
        return out

    def row_bytes(self, keys: Sequence[str]) -> int:
        """Bytes one row of `keys` and its label take in memory."""
        start, stop = self.blocks[0]
        first = self.open_block(0, keys).rows(0, min(1, stop - start))
        return 8 + sum(t.element_size() * t[0].numel() for t in first.values() if len(t))


class MemorySource(TokenSource):
    """Tokens already in memory (tests, small experiments), cut into blocks of `block_size` rows."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        class_names: Sequence[str] | None = None,
        grid: tuple[int, int] | None = None,
        block_size: int | None = None,
    ) -> None:
        self.tensors = dict(tensors)
        self.labels = self.tensors["labels"].long()
        self.num_rows = len(self.labels)
        self.indices = self.tensors.get("indices", torch.arange(self.num_rows)).long()
        self.views = self.tensors["views"].long() if "views" in self.tensors else None
        self.keys = frozenset(k for k in ("cls", "patches", "reg", "mean") if k in self.tensors)
        self.dim = int(
            next(self.tensors[k] for k in ("cls", "patches", "mean") if k in self.tensors).shape[-1]
        )
        self.num_classes = len(class_names) if class_names else int(self.labels.max()) + 1
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        if grid is None and "patches" in self.tensors:
            side = int(math.isqrt(self.tensors["patches"].shape[1]))
            grid = (side, side)
        self.grid = grid or (0, 0)
        size = block_size or self.num_rows
        self.blocks = [(s, min(s + size, self.num_rows)) for s in range(0, self.num_rows, size)]

    def open_block(self, i: int, keys: Sequence[str]) -> BlockView:
        start, stop = self.blocks[i]
        return BlockView(lambda a, b: {k: self.tensors[k][start + a : start + b] for k in keys}, stop - start)


class CacheSource(TokenSource):
    """A token cache (vitprobe.cache) read through memory-mapped shards at one block or several.

    `layer` is one block (tensors (n, ...)) or a sequence of blocks (tensors (n, L, ...), in the order
    given), each one the cache stores. With `verify` (the default), `verify_block(i)` runs
    `cache.verify_shard(i)`, so a corrupted shard stops the run with a CacheError: readers call it before
    using a shard, the stream on a background thread while the shard is consumed (vitprobe.stream).
    """

    def __init__(self, cache: TokenCache, layer: int | Sequence[int], *, verify: bool = True) -> None:
        self.cache = cache
        self.verify = verify
        self.layer = layer
        wanted = [layer] if isinstance(layer, int) else [int(b) for b in layer]
        stored = list(cache.layers)
        missing = [b for b in wanted if b not in stored]
        if missing or not wanted:
            raise CacheError(
                f"block(s) {missing or wanted} are not in the cache {cache.path} (it holds blocks {stored})",
                f"pick blocks among {stored}, or extract them with `vitprobe extract --layers`",
            )
        self.layer_pos: int | list[int] = (
            stored.index(layer) if isinstance(layer, int) else [stored.index(b) for b in wanted]
        )
        self._positions = [stored.index(b) for b in wanted]
        self._stored = len(stored)
        self.multi_layer = len(stored) > 1
        self.num_rows = cache.num_samples
        self.dim = cache.dim
        self.grid = tuple(cache.grid)
        self.class_names = list(cache.class_names)
        self.num_classes = cache.num_classes
        self.labels = cache.labels().long()
        self.indices = cache.indices().long()
        self.blocks = [(s.start, s.stop) for s in cache.shards]
        self.keys = frozenset(cache_token_keys(cache))
        self.views = cache.view_ids().long() if cache.views > 1 else None

    def _pick(self, t: torch.Tensor) -> torch.Tensor:
        """The wanted block(s) of stored rows: (n, ...) for one block, (n, L, ...) for several; a view
        unless the blocks asked for are irregularly spaced in the cache."""
        pos = self._positions
        if not self.multi_layer:
            return t if isinstance(self.layer, int) else t[:, None]  # (n, ...) -> (n, 1, ...)
        if isinstance(self.layer, int):
            return t[:, pos[0]]  # (n, L, ...) -> (n, ...)
        steps = {b - a for a, b in zip(pos, pos[1:], strict=False)}
        if len(steps) <= 1 and (not steps or next(iter(steps)) > 0):
            step = next(iter(steps), 1)
            return t[:, pos[0] : pos[-1] + 1 : step]  # (n, L', ...)
        return t[:, pos]  # (n, L', ...), a copy of these rows

    def _part(self, row: int) -> tuple[int, int] | None:
        """(byte offset, length) of the wanted blocks inside one stored row, when they are contiguous."""
        if not self.multi_layer:
            return None
        pos = self._positions
        if pos != list(range(pos[0], pos[0] + len(pos))):
            return None
        per = row // self._stored
        return pos[0] * per, len(pos) * per

    def verify_block(self, i: int) -> None:
        if self.verify:
            self.cache.verify_shard(i)

    def open_block(self, i: int, keys: Sequence[str]) -> BlockView:
        from vitprobe.mapped import MappedFile

        mapped = MappedFile(self.cache.path / self.cache.shards[i].file)
        full = {k: mapped.tensor(k) for k in keys}  # views of the file, (n, [L,] ...)

        def get(a: int, b: int) -> dict[str, torch.Tensor]:
            return {k: self._pick(t[a:b]) for k, t in full.items()}

        def page_in(rows: torch.Tensor) -> None:
            for k, t in full.items():
                mapped.page_in(k, rows, self._part(t[0].numel() * t.element_size()))

        def read(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {}
            for k, t in full.items():
                part = self._part(t[0].numel() * t.element_size())
                raw = mapped.read_rows(k, rows, part).view(t.dtype)  # (m, elements)
                if part is None:
                    out[k] = self._pick(raw.view(len(rows), *t.shape[1:]))
                else:  # the wanted blocks only: (m, L', ...) or (m, ...) for one block
                    blocks = raw.view(len(rows), len(self._positions), *t.shape[2:])
                    out[k] = blocks[:, 0] if isinstance(self.layer, int) else blocks
            return out

        start, stop = self.blocks[i]
        return BlockView(get, stop - start, page_in, read)

    def row_bytes(self, keys: Sequence[str]) -> int:
        layout = self.cache.layout
        share = len(self._positions) / self._stored
        return 8 + sum(int(layout[k].bytes_per_sample * share) for k in keys)


def cache_token_keys(cache: TokenCache) -> set[str]:
    """Token keys a cache's shards hold, from its manifest (tokens = all | cls | pooled)."""
    keys = {"cls"} if cache.has_cls else set()
    if cache.tokens == "all":
        keys.add("patches")
        if cache.num_reg_tokens:
            keys.add("reg")
    elif cache.tokens == "pooled":
        keys.add("mean")
    return keys
