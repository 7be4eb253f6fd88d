"""Cache rows: the fixed plan (row r = view r % K of image r // K), seeded views, batches inside shards, and
a forward pass's tokens split into the tensors a shard stores.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.quant import SCALE_SUFFIX, is_quantised, quantise

if TYPE_CHECKING:
    from vitprobe.data import ImageDataset
    from vitprobe.models import Backbone

VIEW_AUGMENT = {  # --views: the crop and flip of timm's training transform, without colour jitter
    "kind": "random-resized-crop+hflip", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5,
}


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) of every shard: consecutive blocks of `shard_size` rows, the last one shorter."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def view_seed(seed: int, index: int, view: int) -> int:
    """RNG seed of view `view` of dataset image `index`: a hash, independent of workers and ranks."""
    digest = hashlib.blake2b(f"{seed}:{index}:{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def view_transform(backbone: Backbone) -> Callable[[Any], torch.Tensor]:
    """The model's timm training transform cut down to random-resized-crop + flip (no colour jitter)."""
    from timm.data import create_transform

    dc = backbone.data_config()
    return create_transform(
        input_size=dc["input_size"], is_training=True, interpolation=dc["interpolation"], mean=dc["mean"],
        std=dc["std"], scale=tuple(VIEW_AUGMENT["scale"]), ratio=tuple(VIEW_AUGMENT["ratio"]),
        hflip=VIEW_AUGMENT["hflip"], color_jitter=None, auto_augment=None, re_prob=0.0,
    )


class CacheRows(torch.utils.data.Dataset):
    """Cache row r -> (image tensor, label, dataset index, view); a view is seeded by (seed, index, view)."""

    def __init__(self, dataset: ImageDataset, transform: Callable[[Any], torch.Tensor], *, views: int,
                 seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset) * max(self.views, 1)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int, int]:
        position, view = divmod(row, max(self.views, 1))
        index = self.dataset.rows[position]  # the dataset index (a --limit subset maps its rows back)
        image = self.dataset.load_image(position)
        if not self.views:
            return self.transform(image), int(self.dataset.labels[position]), index, 0
        state = random.getstate()
        try:
            seed = view_seed(self.seed, index, view)
            random.seed(seed)  # timm's RandomResizedCrop draws from `random`
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # torchvision's flip draws from torch
                pixels = self.transform(image)
        finally:
            random.setstate(state)
        return pixels, int(self.dataset.labels[position]), index, view


class ShardBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of row ids over the given shard ranges, in order; a batch never crosses a shard boundary."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.ranges = list(ranges)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(math.ceil((stop - start) / self.batch_size) for start, stop in self.ranges)


def split_tokens(
    outs: Sequence[torch.Tensor], *, num_prefix_tokens: int, has_cls: bool, tokens: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Per-layer token sequences -> the tensors a shard stores, in the store dtype.

    Args:
        outs: one (B, T, D) tensor per layer, prefix tokens first (`Backbone.intermediates`).
        num_prefix_tokens: [cls] + register tokens at the start of each sequence.
        has_cls: whether prefix token 0 is [cls].
        tokens: `all`, `cls` or `pooled` (see `shard_layout`).
        dtype: the store dtype.
    """
    x = outs[0].unsqueeze(1) if len(outs) == 1 else torch.stack(list(outs), dim=1)  # (B, L, T, D)
    prefix = x[:, :, :num_prefix_tokens]  # (B, L, prefix, D)
    patches = x[:, :, num_prefix_tokens:]  # (B, L, P, D)
    parts: dict[str, torch.Tensor] = {}
    if tokens == "all":
        parts["patches"] = patches
    if has_cls:
        parts["cls"] = prefix[:, :, 0]  # (B, L, D)
    if tokens == "all" and num_prefix_tokens > int(has_cls):
        parts["reg"] = prefix[:, :, int(has_cls):]  # (B, L, R, D)
    if tokens == "pooled":
        parts["mean"] = patches.float().mean(dim=2)  # (B, L, D), averaged in fp32
    squeeze = x.shape[1] == 1
    return {k: (v.squeeze(1) if squeeze else v).to(dtype) for k, v in parts.items()}  # drop L when one layer


def to_store(parts: dict[str, torch.Tensor], store: str) -> dict[str, torch.Tensor]:
    """Float token tensors -> what a shard stores: cast to the store dtype, or (fp8, int8) codes plus
    `k_scale` per-token scales (vitprobe.quant)."""
    if not is_quantised(store):
        return parts
    out: dict[str, torch.Tensor] = {}
    for key, value in parts.items():
        out[key], out[key + SCALE_SUFFIX] = quantise(value, store)
    return out


class Limit:
    """`n` images of a dataset for --limit, class-stratified and seeded (`vitprobe.data.stratified_subset`),
    in dataset order; `rows[i]` is the dataset index of row i (all rows when `n` covers the dataset). The
    same interface CacheRows and the GPU decoder read."""

    def __init__(self, dataset: ImageDataset, n: int, *, seed: int) -> None:
        from vitprobe.data import stratified_subset

        self.dataset = dataset
        self.rows = stratified_subset(dataset.labels, n, seed=seed)
        self.labels = [dataset.labels[i] for i in self.rows]
        paths = getattr(dataset, "paths", None)
        self.paths = None if paths is None else [paths[i] for i in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, i: int) -> Any:
        return self.dataset.load_image(self.rows[i])
