"""Models of what the analyses write: attention.json, frequency.json, localization.json.

Block numbering is 0-based in every model (block 0 is the first transformer block), as in caches, probe
results and heads. Version 1 of attention.json and frequency.json numbered blocks from 1; their models
convert on reading and writing, so a reader never sees the difference. Version 2 (`schema_version` 2) is
the 0-based form and adds the run's resolved `inputs` and the token `cache` it read (docs/results-format.md).
Versions 1 and 2 carry the analyses' own header (`kind`, `schema_version`); version 3 is version 2 under
the common header (`format`, `version`, `kind`), as every other result file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitprobe.results.common import (
    BackboneInfo,
    CacheModelRecord,
    CacheProvenance,
    DataInfo,
    InputsRecord,
    LoadRecord,
    ManifestModel,
    Provenance,
)
from vitprobe.results.schema import Model, Versioned, opt

model = dataclass(frozen=True, kw_only=True)


@model
class Stat(Model):
    per_head: list[list[float]] | None  # blocks x heads; None for per-block statistics (magnitudes)
    mean: list[float]  # per block, heads averaged


@model
class MapsInfo(Model):
    file: str
    keys: list[str]
    grid: list[int]
    n_images: int
    sha256: str | None = None  # version 2: the maps file's sha256
    block: int | None = None  # version 2: the block of the [cls] maps (the last)


@model
class AttentionResults(Versioned):
    """attention.json (`vitprobe analyze attention`)."""

    FORMAT = "vitprobe-attention"
    KIND = "attention"
    FILE = "attention.json"
    VERSIONS = (1, 2, 3)
    CURRENT = 3
    LEGACY = {1: "schema_version", 2: "schema_version"}

    label: str
    model: LoadRecord | CacheModelRecord
    random_init: bool
    backbone: BackboneInfo
    data: DataInfo
    inputs: InputsRecord | None = None  # version 2
    cache: CacheProvenance | None = None  # version 2: the token cache the run's inputs came from
    config: dict[str, Any]
    device: str
    dtype: str
    versions: dict[str, str]
    definitions: dict[str, Any]  # eps, log, and one formula per statistic
    n_images: int
    blocks: list[int]  # 0-based block indices (version 1 files hold 1..L; converted)
    stats: dict[str, Stat]
    maps: MapsInfo | None
    notes: list[str]
    figures: list[str]
    provenance: Provenance | None = opt()

    @classmethod
    def _read_body(cls, body: dict[str, Any], version: int, where: str) -> dict[str, Any]:
        if version == 1 and isinstance(body.get("blocks"), list):
            body = {**body, "blocks": [b - 1 if isinstance(b, int) else b for b in body["blocks"]]}
        return body

    def _write_body(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.version == 1:
            body["blocks"] = [b + 1 for b in self.blocks]
        return body


@model
class FrequencyResults(Versioned):
    """frequency.json (`vitprobe analyze frequency`): one entry per layer, the patch embedding first.

    `blocks[i]` says what layer i is: None for the patch-embedding output, else the 0-based block whose
    output it is (version 1 files store `depth` [0..L], layer i = output of block i counted from 1).
    """

    FORMAT = "vitprobe-frequency"
    KIND = "frequency"
    FILE = "frequency.json"
    VERSIONS = (1, 2, 3)
    CURRENT = 3
    LEGACY = {1: "schema_version", 2: "schema_version"}

    label: str
    model: LoadRecord | CacheModelRecord  # the backbone's load record, or the cache's model (tokens read)
    random_init: bool
    backbone: BackboneInfo
    data: DataInfo
    inputs: InputsRecord | None = None  # version 2
    cache: CacheProvenance | None = None  # version 2
    config: dict[str, Any]
    device: str
    dtype: str
    versions: dict[str, str]
    definitions: dict[str, Any]
    source: str | None = None  # version 2: "cache" (the cache's tokens) or "backbone" (an image pass)
    layers: list[str]  # labels: "patch_embed", then one per block
    blocks: list[int | None]
    n_images: int
    frequency: list[float]  # diagonal frequencies, in units of pi
    log_amplitude: list[list[float]]  # layers x frequencies
    delta_log_amplitude: list[list[float]]
    headline: list[float]  # per layer: delta at the highest frequency
    high_freq_energy_ratio: list[float]  # per layer
    log_amplitude_2d: list[list[list[float]]]
    notes: list[str] = field(default_factory=list)  # version 2
    figures: list[str]
    provenance: Provenance | None = opt()

    @classmethod
    def _read_body(cls, body: dict[str, Any], version: int, where: str) -> dict[str, Any]:
        if version == 1 and "depth" in body:
            body = dict(body)
            depth = body.pop("depth")
            body["blocks"] = [None if d == 0 else (d - 1 if isinstance(d, int) else d) for d in depth]
        return body

    def _write_body(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.version == 1:
            blocks = body.pop("blocks")
            out = {}
            for k, v in body.items():  # `depth` where version 1 had it: right after `layers`
                out[k] = v
                if k == "layers":
                    out["depth"] = [0 if b is None else b + 1 for b in blocks]
            return out
        return body


@model
class MapScore(Model):
    """MaxBoxAccV2 of one map source, all in percent (vitprobe.analysis.maxboxacc.MaxBoxAccResult)."""

    max_box_acc_v2: float
    max_box_acc: dict[str, float]  # IoU threshold δ ("30", "50", "70") -> MaxBoxAcc
    best_threshold: dict[str, float]
    box_acc: list[list[float]]  # δ x τ
    thresholds: list[float]
    num_images: int
    block: int | None = None  # version 2: the block of the tokens the map comes from (None: not known)


@model
class Metric(Model):
    name: str
    thresholds: str
    binarise: str | None = None  # version 2
    quantize: bool | None = None  # version 2: 8-bit maps, as clovaai/wsolevaluation
    constant_maps: str | None = None  # version 2
    iou_thresholds: list[int]
    boxes: str
    blocks: str | None = None  # version 2


@model
class HeadRef(Model):
    """A saved head whose maps a localisation run scored (version 2)."""

    file: str
    sha256: str
    block: int
    final_norm: bool


@model
class LocalizationResults(Versioned):
    """localization.json (`vitprobe analyze localization`)."""

    FORMAT = "vitprobe-localization"
    KIND = "localization"
    FILE = "localization.json"
    VERSIONS = (1, 2, 3)
    CURRENT = 3
    LEGACY = {1: "schema_version", 2: "schema_version"}

    label: str
    model: LoadRecord | CacheModelRecord | ManifestModel | None  # load record, or the cache's model
    random_init: bool
    data: DataInfo
    inputs: InputsRecord | None = None  # version 2
    cache: CacheProvenance | None = None  # version 2
    config: dict[str, Any]
    versions: dict[str, str]
    metric: Metric
    map_sources: dict[str, str]
    maps: dict[str, MapScore]  # "cls_attention", "abmilp", "attentive"
    heads: dict[str, HeadRef] | None = None  # version 2: by pool
    figures: list[str]
    notes: list[str]
    provenance: Provenance | None = opt()
