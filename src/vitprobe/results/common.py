"""Parts several result files share: provenance, the cache reference, the backbone's load record, data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitprobe.results.schema import Model, key, opt

model = dataclass(frozen=True, kw_only=True)


@model
class GitState(Model):
    commit: str
    dirty: bool | None


@model
class DeviceInfo(Model):
    type: str  # cpu, cuda, mps
    name: str  # the GPU's or CPU's model name
    index: int | None = opt()  # CUDA device index


@model
class CheckpointInfo(Model):
    file: str | None  # the weights file's name; None for random weights
    source: str | None  # path, URL, hf-hub:REPO or "random-init"
    sha256: str | None
    random_init: bool


@model
class DatasetRef(Model):
    spec: str | None
    split: str | None
    fingerprint: str | None


@model
class Provenance(Model):
    """`vitprobe.provenance.provenance()`: how a result was made, in full."""

    created: str
    versions: dict[str, str]
    command: str
    git: GitState | None  # the vitprobe checkout's commit; None when installed as a package
    host: str
    platform: str
    device: DeviceInfo | None
    checkpoint: CheckpointInfo | None
    dataset: DatasetRef | None


@model
class CacheProvenance(Model):
    """`TokenCache.provenance()`: the cache a result was computed from."""

    cache: str
    format_version: int
    model: str  # the --model spec
    timm_name: str
    checkpoint: str  # sha256 of the weights, or "random-init"
    random_init: bool
    dataset: str
    split: str
    fingerprint: str
    layers: list[int]  # 0-based block indices
    tokens: str
    store_dtype: str
    views: int
    seed: int | None
    num_samples: int
    versions: dict[str, str]


@model
class CacheRef(Model):
    path: str
    provenance: CacheProvenance


@model
class LoadRecord(Model):
    """`vitprobe.models.LoadReport.to_dict()`: what backbone was loaded, from where, and how."""

    model: str
    timm_name: str
    source: str
    sha256: str | None
    random_init: bool
    remapped: int
    dropped: list[str]
    num_params: int
    notes: list[str]
    layout: str | None
    branch: str | None
    arch_overrides: dict[str, Any]
    data_overrides: dict[str, Any] = field(default_factory=dict)  # image size, mean, std, crop, interpolation
    checkpoint_id: str


@model
class ManifestModel(Model):
    """A cache manifest's `model` block."""

    spec: str
    timm_name: str
    checkpoint: str  # sha256 or "random-init"
    random_init: bool
    source: str


@model
class BackboneInfo(Model):
    """Token layout and size of the backbone an analysis ran (`analysis.backbone_info`)."""

    class_: str | None = key("class")  # None when read from a cache's manifest (no model built)
    depth: int
    dim: int
    num_heads: int | None
    patch_size: int
    grid: list[int]
    img_size: list[int]
    has_cls: bool
    num_prefix_tokens: int
    num_reg_tokens: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


@model
class DataInfo(Model):
    """The images an analysis ran on."""

    spec: str
    split: str
    fingerprint: str | None
    size: int | None  # images in the split (None: read from a cache, the split was not opened)
    n_images: int | None = opt()  # images analysed (attention, frequency)
    selection: str | None = opt()  # "all" or "N evenly spaced indices"


@model
class CacheModelRecord(Model):
    """An analysis's backbone as a cache's manifest names it (`analysis.runs.manifest_model`)."""

    model: str
    timm_name: str | None
    source: str | None
    checkpoint_id: str | None
    random_init: bool
    from_cache: str


@model
class InputsRecord(Model):
    """What an analysis ran on, resolved from its flags and its token cache (`PassInputs.record()`)."""

    model: str
    checkpoint: str | None
    random_init: bool
    seed: int
    data: str
    split: str
    cache: str | None
