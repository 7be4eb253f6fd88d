"""The token feed: cached tokens as `Tokens` batches, from a cache (shard by shard) or from memory.

A `TokenSource` is rows of tokens for one block; a `Split` is the rows used for one purpose (train, holdout,
test); `iter_batches` yields batches of a split, shuffled by a seeded generator. Nothing here trains a head
or runs a backbone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vitprobe.errors import ProbeError

if TYPE_CHECKING:
    from vitprobe.cache import TokenCache


@dataclass
class Tokens:
    """One batch of cached tokens from one block; absent parts are None.

    Attributes:
        cls: the [cls] token (B, D), None for models without one or caches that did not keep it.
        patches: patch tokens (B, N, D) in row-major grid order, None for pooled or cls-only caches.
        reg: register tokens (B, R, D), None when the model has none.
        mean: the mean of the patch tokens (B, D), stored only by pooled caches.
    """

    cls: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    reg: torch.Tensor | None = None
    mean: torch.Tensor | None = None

    def parts(self) -> list[torch.Tensor]:
        """The tensors present (cls, patches, reg, mean)."""
        return [t for t in (self.cls, self.patches, self.reg, self.mean) if t is not None]

    @property
    def prefix(self) -> torch.Tensor | None:
        """[cls] then register tokens (B, P, D), the order a ViT keeps them in; None if there are none."""
        parts = []
        if self.cls is not None:
            parts.append(self.cls[:, None])  # (B, 1, D)
        if self.reg is not None:
            parts.append(self.reg)
        return torch.cat(parts, dim=1) if parts else None

    _patch_mean: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def patch_mean(self) -> torch.Tensor:
        """Mean of the patch tokens (B, D), from the patches when present, else the stored mean.

        Computed once per batch: every mean-pooled head of a run reads the same vector."""
        if self._patch_mean is None:
            if self.patches is not None:
                self._patch_mean = self.patches.mean(dim=-2)  # (B, [L,] N, D) -> (B, [L,] D)
            else:
                assert self.mean is not None, "mean read-out on a batch without patches or mean"
                self._patch_mean = self.mean
        return self._patch_mean

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tokens:
        """Move every part to `device` as `dtype` (caches may store bf16; heads train in fp32)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype, non_blocking=True)

        return Tokens(
            cls=move(self.cls), patches=move(self.patches), reg=move(self.reg), mean=move(self.mean)
        )


def apply_final_norm(tokens: Tokens, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Tokens:
    """Apply the backbone's final LayerNorm to every token (what timm's `forward_features` returns).

    A stored mean cannot be normalised after the fact (the mean of normalised tokens is not the normalised
    mean), so a pooled batch keeps `mean=None` here and the mean read-out then needs patches.
    """

    def norm(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else F.layer_norm(t, (t.shape[-1],), weight.to(t), bias.to(t), eps)

    return Tokens(cls=norm(tokens.cls), patches=norm(tokens.patches), reg=norm(tokens.reg), mean=None)


# ------------------------------------------------------------------------------------------ token sources


class TokenSource:
    """Rows of tokens for one block, grouped in blocks (cache shards) that are read one at a time.

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

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Block i's tensors for `keys` (plus "labels"), each (n, ...) with the layer already picked."""
        raise NotImplementedError

    def row_bytes(self, keys: Sequence[str]) -> int:
        """Bytes one row of `keys` takes in memory."""
        first = self.read_block(0, keys)
        n = self.blocks[0][1] - self.blocks[0][0]
        return sum(t.element_size() * t.numel() for t in first.values()) // max(n, 1)


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

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        start, stop = self.blocks[i]
        return {k: self.tensors[k][start:stop] for k in (*keys, "labels")}


class CacheSource(TokenSource):
    """A token cache (vitprobe.cache) read shard by shard at one layer.

    With `verify` (the default), each shard's sha256 is checked against the manifest the first time it is
    read, so a corrupted shard stops the run with a CacheError instead of feeding garbage to the heads; this
    reads each shard once more in full.
    """

    def __init__(self, cache: TokenCache, layer: int, *, verify: bool = True) -> None:
        self.cache = cache
        self.verify = verify
        self.layer = layer
        self.layer_pos = list(cache.layers).index(layer)
        self.multi_layer = len(cache.layers) > 1
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

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.verify:
            self.cache.verify_shard(i)
        out = dict(self.cache.read_shard(i, keys=[*keys, "labels"]))
        if self.multi_layer:
            for k in keys:
                out[k] = out[k][:, self.layer_pos]  # (n, L, ...) -> (n, ...)
        return out


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


@dataclass
class Split:
    """The rows of a source used for one purpose (train, holdout, test)."""

    name: str
    source: TokenSource
    rows: torch.Tensor  # (n,) sorted row positions in the source
    memory: dict[str, torch.Tensor] | None = None  # the whole source in memory, when it was loaded

    def epoch_rows(self, epoch: int | None) -> torch.Tensor:
        """Rows seen in a training epoch (one view per image: view epoch mod V) or in evaluation (view 0)."""
        views = self.source.views
        if views is None:
            return self.rows
        num_views = int(views.max()) + 1
        want = 0 if epoch is None else epoch % num_views
        return self.rows[views[self.rows] == want]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches an epoch of n rows gives: full batches only when dropping, but never zero."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return max(1, math.ceil(n / batch_size))


def iter_batches(
    split: Split,
    keys: Sequence[str],
    batch_size: int,
    *,
    epoch: int | None = None,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    shuffle_shards: int = 4,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `keys` + "labels" over a split's rows; shuffled when a generator is given.

    In memory: one permutation of all rows. Streaming: shards in shuffled order, `shuffle_shards` at a time
    in a buffer that is shuffled again, so memory stays at a few shards whatever the cache size. With
    `drop_last`, a trailing partial batch is dropped (as MAE's loader does) unless it would be the only one.
    """
    rows = split.epoch_rows(epoch)
    if split.memory is not None:
        order = rows[torch.randperm(len(rows), generator=generator)] if generator is not None else rows
        count = num_batches(len(order), batch_size, drop_last)
        store = next(iter(split.memory.values())).device
        for b in range(count):
            take = order[b * batch_size : (b + 1) * batch_size].to(store)
            yield {k: split.memory[k][take] for k in (*keys, "labels")}
        return

    member = torch.zeros(split.source.num_rows, dtype=torch.bool)
    member[rows] = True
    blocks = list(range(len(split.source.blocks)))
    if generator is not None:
        blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
    groups = [blocks[g : g + shuffle_shards] for g in range(0, len(blocks), shuffle_shards)]

    def read_group(group: list[int]) -> list[dict[str, torch.Tensor]]:
        parts = []
        for i in group:
            start, stop = split.source.blocks[i]
            keep = member[start:stop]
            if keep.any():
                parts.append({k: v[keep] for k, v in split.source.read_block(i, keys).items()})
        return parts

    carry: dict[str, torch.Tensor] | None = None
    yielded = 0
    # One reader thread loads the next group of shards while the current one is trained on; the order and
    # the permutations are drawn here, in the caller's thread, so the batches do not depend on timing.
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_group, groups[0]) if groups else None
        for g in range(len(groups)):
            parts = pending.result()
            pending = reader.submit(read_group, groups[g + 1]) if g + 1 < len(groups) else None
            if carry is not None:
                parts.insert(0, carry)
            if not parts:
                continue
            buffer = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            n = len(buffer["labels"])
            if generator is not None:
                perm = torch.randperm(n, generator=generator)
                buffer = {k: v[perm] for k, v in buffer.items()}
            full = n // batch_size
            for b in range(full):
                yield {k: v[b * batch_size : (b + 1) * batch_size] for k, v in buffer.items()}
                yielded += 1
            carry = {k: v[full * batch_size :] for k, v in buffer.items()} if n > full * batch_size else None
    if carry is not None and (not drop_last or yielded == 0):
        yield carry


def to_tokens(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    norm: dict[str, Any] | None,
    *,
    layer: int | None = None,
) -> Tokens:
    """A batch dict as fp32 `Tokens` on `device`, with the final norm applied when asked.

    `layer` picks a position on the batch's block axis (batches of several blocks are (B, L, ...)); None
    when the batch holds one block.
    """

    def part(key: str) -> torch.Tensor | None:
        t = batch.get(key)
        return t if t is None or layer is None else t[:, layer]

    tokens = Tokens(cls=part("cls"), patches=part("patches"), reg=part("reg"), mean=part("mean")).to(device)
    if norm is not None:
        tokens = apply_final_norm(tokens, norm["weight"], norm["bias"], norm["eps"])
    return tokens


def load_whole(
    source: TokenSource,
    keys: Sequence[str],
    device: torch.device,
    *,
    pin: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every row of `keys` + labels, concatenated in source order, on `device` (pinned host memory when
    `pin`, so batches copy to a GPU asynchronously); token tensors converted to `dtype` when given (once,
    instead of once per batch and epoch)."""
    parts = [source.read_block(i, keys) for i in range(len(source.blocks))]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if dtype is not None:
        whole = {k: v.to(dtype) if v.is_floating_point() else v for k, v in whole.items()}
    if pin:
        return {k: v.pin_memory() for k, v in whole.items()}
    return {k: v.to(device) for k, v in whole.items()}


def final_norm_state(cache: TokenCache, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The backbone's final LayerNorm as {"weight", "bias" (fp32, on `device`), "eps"} from the cache."""
    state = cache.final_norm_state()
    info = cache.manifest.get("final_norm", {})
    if "weight" not in state or "bias" not in state:
        raise ProbeError(
            f"--final-norm: the cache {cache.path} stores no final LayerNorm (type {info.get('type')!r})",
            "drop --final-norm for this backbone",
        )
    eps = info.get("eps")
    return {
        "weight": state["weight"].float().to(device),
        "bias": state["bias"].float().to(device),
        "eps": float(1e-6 if eps is None else eps),
    }


@torch.no_grad()
def pooled_source(
    source: TokenSource, keys: Sequence[str], norm: dict[str, Any] | None, device: torch.device
) -> MemorySource:
    """The [cls] token and patch mean of every row (after the final norm when `norm`), as an fp32
    MemorySource on the CPU: pooled read-outs then read 2D numbers per row instead of the patch tokens.

    The features are fixed functions of the cached tokens, so computing them once gives the same batches
    as computing them in every step."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(len(source.blocks)):
        block = source.read_block(i, keys)
        tokens = to_tokens(block, device, norm)
        if tokens.cls is not None:
            parts.setdefault("cls", []).append(tokens.cls.cpu())
        if tokens.patches is not None or tokens.mean is not None:
            parts.setdefault("mean", []).append(tokens.patch_mean().cpu())
        parts.setdefault("labels", []).append(block["labels"])
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["indices"] = source.indices
    if source.views is not None:
        tensors["views"] = source.views
    return MemorySource(tensors, class_names=source.class_names, grid=source.grid, block_size=None)
