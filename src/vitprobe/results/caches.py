"""Model of a token cache's manifest.json (docs/cache-format.md): what was extracted, how, which shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitprobe.results.common import ManifestModel, Provenance
from vitprobe.results.schema import Model, Versioned, opt

model = dataclass(frozen=True, kw_only=True)


@model
class KeyInfo(Model):
    shape: list[str | int]  # ["n", ...]
    dtype: str  # safetensors dtype name


@model
class ShardEntry(Model):
    file: str
    start: int
    stop: int
    sha256: str


@model
class FinalNormInfo(Model):
    file: str | None
    type: str | None
    eps: float | None


@model
class ManifestDataset(Model):
    spec: str
    split: str
    fingerprint: str
    class_names: list[str]
    num_classes: int
    num_images: int
    limit: int | None
    selection: str | None = None  # "stratified" when --limit kept a class-stratified subset


@model
class CacheManifest(Versioned):
    """CACHE/manifest.json (`vitprobe extract`)."""

    FORMAT = "vitprobe-token-cache"
    KIND = "cache"
    FILE = "manifest.json"
    VERSIONS = (1, 2)
    CURRENT = 2  # 2: the common header (1 spelt it `format` + `format_version`)
    LEGACY = {1: "format_version"}

    created: str
    updated: str | None = opt()  # set by every manifest write
    versions: dict[str, str]
    model: ManifestModel
    layers: list[int]  # 0-based block indices, in the order requested
    depth: int
    grid: list[int]
    patch_size: int
    dim: int
    num_prefix_tokens: int
    has_cls: bool
    num_reg_tokens: int
    tokens: str
    store_dtype: str
    compute_dtype: str
    device: str
    transform: dict[str, Any]
    views: int
    seed: int
    dataset: ManifestDataset
    num_samples: int
    shard_size: int
    keys: dict[str, KeyInfo]
    bytes_per_sample: int
    shards: list[ShardEntry]
    final_norm: FinalNormInfo
    config: dict[str, Any]
    complete: bool
    provenance: Provenance | None = opt()
