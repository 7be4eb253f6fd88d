"""The token feed: cached tokens as `Tokens` batches, from a cache (memory-mapped shards) or from memory.

A `TokenSource` (`vitprobe.sources`) is rows of tokens for one block (or several); a `Split` is the rows
used for one purpose (train, holdout, test); `iter_batches` yields batches of a split, shuffled by a
seeded generator, streamed window by window (`vitprobe.stream`) or served from memory. Tokens stay in the
stored dtype until `to_tokens` converts them on the device. Nothing here trains a head or runs a backbone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vitprobe.errors import ProbeError
from vitprobe.sources import MemorySource, TokenSource

if TYPE_CHECKING:
    from vitprobe.cache import TokenCache

WINDOW_BYTES = 32 << 20  # rows read at once by load_whole / pooled_source (and the stream's largest window)
RESIDENT_BYTES = 256 << 20  # an evaluation split read a second time is kept in memory when this small


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


def non_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether `t` holds a NaN or an inf, as a () bool on its device (no sync): from its min and max (one
    reduction; NaN propagates into both; exact, unlike a sum, which finite values can overflow), about 20x
    faster on the CPU than `~isfinite(t).all()` and its bool copy."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def non_finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of an (n, ...) tensor that hold a NaN or an inf. Each row is summed first (one
    pass, no (n, ...) bool copy); only rows whose sum is not finite are checked exactly (finite values can
    overflow a sum), so the answer is exact."""
    flat = t.reshape(len(t), -1)  # (n, ...) -> (n, F)
    suspect = (~torch.isfinite(flat.sum(dim=1))).nonzero().flatten()
    bad = torch.zeros(len(t), dtype=torch.bool, device=t.device)
    bad[suspect] = ~torch.isfinite(flat[suspect]).all(dim=1)
    return bad


def apply_final_norm(tokens: Tokens, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Tokens:
    """Apply the backbone's final LayerNorm to every token (what timm's `forward_features` returns).

    A stored mean cannot be normalised after the fact (the mean of normalised tokens is not the normalised
    mean), so a pooled batch keeps `mean=None` here and the mean read-out then needs patches.
    """

    def norm(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else F.layer_norm(t, (t.shape[-1],), weight.to(t), bias.to(t), eps)

    return Tokens(cls=norm(tokens.cls), patches=norm(tokens.patches), reg=norm(tokens.reg), mean=None)


@dataclass
class Split:
    """The rows of a source used for one purpose (train, holdout, test).

    An evaluation split read a second time (the holdout and test splits, every evaluation epoch) is kept
    in memory in its stored dtype when it takes at most RESIDENT_BYTES, so later passes read only its rows
    and never the disk.
    """

    name: str
    source: TokenSource
    rows: torch.Tensor  # (n,) sorted row positions in the source
    memory: dict[str, torch.Tensor] | None = None  # the whole source in memory, when it was loaded
    passes: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False, compare=False)
    resident: dict[tuple[str, ...], dict[str, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

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
    buffer_mb: float | None = None,
    pin: bool | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `keys` + "labels" over a split's rows; shuffled when a generator is given.

    In memory: one permutation of all rows. Streaming (`vitprobe.stream`): windows of shards in shuffled
    order, at least `shuffle_shards` of them mixed in a buffer of about `buffer_mb` MiB that is shuffled
    again, so memory stays bounded whatever the shard and cache sizes. With `drop_last`, a trailing partial
    batch is dropped (as MAE's loader does) unless it would be the only one.

    Streamed token tensors may live in reused buffers (pinned when `pin`; default: when CUDA is
    available): pass each batch through `to_tokens` before drawing the next one, or copy what you keep.
    """
    from vitprobe.stream import STREAM_BUFFER_BYTES, memory_batches, stream_batches

    rows = split.epoch_rows(epoch)
    if split.memory is not None:
        order = rows[torch.randperm(len(rows), generator=generator)] if generator is not None else rows
        count = num_batches(len(order), batch_size, drop_last)
        store = next(iter(split.memory.values())).device
        if keys and store.type == "cpu" and split.memory[keys[0]].is_pinned():
            yield from memory_batches(split.memory, keys, order, batch_size, count)
            return
        for b in range(count):
            take = order[b * batch_size : (b + 1) * batch_size].to(store)
            yield {k: split.memory[k][take] for k in (*keys, "labels")}
        return
    stream = {
        "shuffle_shards": shuffle_shards,
        "buffer_bytes": int(buffer_mb * 2**20) if buffer_mb else STREAM_BUFFER_BYTES,
        "pin": torch.cuda.is_available() if pin is None else pin,
    }
    if generator is None:
        resident = _resident(split, tuple(keys), rows, stream)
        if resident is not None:
            count = num_batches(len(rows), batch_size, drop_last)
            for b in range(count):
                yield {k: v[b * batch_size : (b + 1) * batch_size] for k, v in resident.items()}
            return
    yield from stream_batches(
        split.source, rows, keys, batch_size, generator=generator, drop_last=drop_last, **stream
    )


def _resident(
    split: Split, keys: tuple[str, ...], rows: torch.Tensor, stream: dict[str, Any]
) -> dict[str, torch.Tensor] | None:
    """The split's evaluation rows in memory, gathered on its second pass when they fit RESIDENT_BYTES."""
    from vitprobe.stream import stream_batches

    if keys in split.resident:
        return split.resident[keys]
    split.passes[keys] = split.passes.get(keys, 0) + 1
    if split.passes[keys] < 2 or len(rows) * split.source.row_bytes(keys) > RESIDENT_BYTES:
        return None
    batch = next(stream_batches(split.source, rows, keys, max(len(rows), 1), into_memory=True, **stream))
    split.resident[keys] = dict(batch)
    return split.resident[keys]


def to_tokens(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    norm: dict[str, Any] | None,
    *,
    layer: int | None = None,
) -> Tokens:
    """A batch dict as fp32 `Tokens` on `device` (the dtype conversion happens there), with the final norm
    applied when asked. The tokens own their memory: the feed may reuse the batch's buffers afterwards.
    On the CPU a streamed batch is converted into its stream's reused fp32 buffers (`buffers.Fp32Buffers`),
    which are not written again while anything holds these tokens.

    `layer` picks a position on the batch's block axis (batches of several blocks are (B, L, ...)); None
    when the batch holds one block.
    """
    from vitprobe.buffers import fp32_on_cpu, on_device, release, reused

    shared = reused(batch)

    def part(key: str) -> torch.Tensor | None:
        t = batch.get(key)
        if t is None:
            return None
        if layer is not None and device.type == "cuda":
            t = on_device(batch, key, device)  # (B, L, ...) moved once for every block picked
        t = t if layer is None else t[:, layer]
        if device.type == "cpu" and (converted := fp32_on_cpu(batch, t)) is not None:
            return converted
        moved = t.to(device=device, dtype=torch.float32, non_blocking=True)
        return moved.clone() if shared and moved.data_ptr() == t.data_ptr() else moved  # own the memory

    tokens = Tokens(cls=part("cls"), patches=part("patches"), reg=part("reg"), mean=part("mean"))
    release(batch, device)
    if norm is not None:
        tokens = apply_final_norm(tokens, norm["weight"], norm["bias"], norm["eps"])
    return tokens


def _windows(source: TokenSource, keys: Sequence[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row, {key: rows}) for every window of about WINDOW_BYTES of the source, in source order."""
    step = max(1, WINDOW_BYTES // source.row_bytes(keys))
    for i, (start, stop) in enumerate(source.blocks):
        source.verify_block(i)
        view = source.open_block(i, keys)
        for a in range(0, stop - start, step):
            yield start + a, view.rows(a, min(a + step, stop - start))


def load_whole(
    source: TokenSource,
    keys: Sequence[str],
    device: torch.device,
    *,
    pin: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every row of `keys` + labels in source order, on `device` (pinned host memory when `pin`, so
    batches copy to a GPU asynchronously); token tensors converted to `dtype` when given (once, instead of
    once per batch and epoch). Each byte is copied once, window by window, into the final tensors."""
    where = torch.device("cpu") if pin else device
    out: dict[str, torch.Tensor] = {}
    for first, part in _windows(source, keys):
        for k, t in part.items():
            if k not in out:
                want = dtype if dtype is not None and t.is_floating_point() else t.dtype
                shape = (source.num_rows, *t.shape[1:])
                out[k] = torch.empty(shape, dtype=want, device=where, pin_memory=pin)
            out[k][first : first + len(t)].copy_(t)
    labels = source.labels.clone()
    out["labels"] = labels.pin_memory() if pin else labels.to(device)
    return out


def available_memory() -> int | None:
    """Bytes of host memory new allocations can take now: Linux MemAvailable, capped by a cgroup limit (a
    container's); free pages elsewhere; None when unknown."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(0, min(found))


def memory_budget(preload_gb: float) -> tuple[int, str]:
    """Bytes of tokens `--load auto` loads whole, and the limit in words: `preload_gb`, or half the host
    memory available now when that is less (the rest of the run and the system need the other half)."""
    cap = int(preload_gb * 2**30)
    free = available_memory()
    if free is None or cap <= free // 2:
        return cap, f"preload_gb = {preload_gb:g} GiB"
    return free // 2, f"half the {free / 1e9:.1f} GB of memory available"


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
    as computing them in every step. Read window by window, so memory stays at a window of tokens."""
    tensors: dict[str, torch.Tensor] = {}
    for first, part in _windows(source, keys):
        tokens = to_tokens(part, device, norm)
        pooled = {"cls": tokens.cls}
        if tokens.patches is not None or tokens.mean is not None:
            pooled["mean"] = tokens.patch_mean()
        for k, t in pooled.items():
            if t is None:
                continue
            if k not in tensors:
                tensors[k] = torch.empty((source.num_rows, *t.shape[1:]), dtype=torch.float32)  # (n, [L,] D)
            tensors[k][first : first + len(t)].copy_(t)
    tensors["labels"] = source.labels.clone()
    tensors["indices"] = source.indices
    if source.views is not None:
        tensors["views"] = source.views
    return MemorySource(tensors, class_names=source.class_names, grid=source.grid, block_size=None)
