"""Models of what probing writes: results.json, predictions.json, a saved head's JSON (knn.json: knn.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitprobe.results.common import CacheRef, Provenance
from vitprobe.results.schema import Model, ResultsError, Versioned, opt

model = dataclass(frozen=True, kw_only=True)


@model
class Check(Model):
    """One probe-health finding (vitprobe.probe.selection.Check)."""

    code: str
    severity: str  # "warning": the number is not trustworthy as is; "note": worth knowing
    message: str
    fix: str


@model
class Curve(Model):
    """One grid value's curves: `epoch` (evaluated epochs, 1-based) and one series per metric.

    The series keys are `train_loss`, `train_top1` and `<split>_top1` / `<split>_loss` for each evaluated
    split (holdout, test); each is a list as long as `epoch` (null where a value was not finite).
    """

    blr: float
    lr: float
    diverged: bool
    epoch: list[int]
    series: dict[str, list[float | None]]
    weight_decay: float | None = None

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "") -> Curve:
        if not isinstance(data, dict):
            raise ResultsError(f"{where}: expected a JSON object", "re-run `vitprobe probe`")
        head = {k: data[k] for k in ("blr", "lr", "weight_decay", "diverged", "epoch") if k in data}
        rest = {k: v for k, v in data.items() if k not in head}
        values = cls._parse_fields({**head, "series": rest}, where)
        for name, series in values["series"].items():
            if len(series) != len(values["epoch"]):
                raise ResultsError(
                    f"{where}.{name}: {len(series)} values for {len(values['epoch'])} evaluated epochs",
                    "re-run `vitprobe probe`",
                )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        wd = (
            {"weight_decay": self.weight_decay}
            if self.present is None or "weight_decay" in self.present
            else {}
        )
        return {
            "blr": self.blr,
            "lr": self.lr,
            **wd,
            "diverged": self.diverged,
            "epoch": list(self.epoch),
            **{k: list(v) for k, v in self.series.items()},
            **self.extra,
        }


def split_readout(name: str) -> tuple[str, int | None]:
    """`"abmilp@11"` -> ("abmilp", 11), the pool and block of a per-layer sweep's read-out; `"cls"` ->
    ("cls", None): a one-block run's read-out, or a multi-block one (cls-cat, fusion) of a sweep."""
    pool, at, block = name.rpartition("@")
    if at and block.isdigit():
        return pool, int(block)
    return name, None


@model
class SeedResult(Model):
    """One low-shot seed's test accuracy and choices (vitprobe.probe.lowshot.combine)."""

    seed: int
    top1: float
    top5: float
    blr: float | None
    weight_decay: float | None
    C: float | None
    epoch: int | None
    selection_top1: float | None
    verdict: str


@model
class LowShot(Model):
    """`selection.lowshot`: the subsets a low-shot run trained on, one per seed."""

    shots: int | None  # K images per class (--shots), or
    train_fraction: float | None  # this fraction of each class (--train-fraction)
    seeds: list[int]
    train_rows: list[int]  # per seed
    holdout_rows: list[int]  # per seed


@model
class PerLayer(Model):
    """`per_layer.<pool>` of a per-layer sweep: test top-1 per backbone block, in block order."""

    layers: list[int]  # 0-based blocks
    top1: list[float]
    top1_std: list[float | None] | None = opt()  # low-shot: the std over seeds per block (else nulls)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "") -> PerLayer:
        made = super().from_dict(data, where=where)
        lengths = {len(made.layers), len(made.top1), len(made.top1_std or made.top1)}
        if len(lengths) != 1 or made.layers != sorted(set(made.layers)):
            raise ResultsError(
                f"{where}: {len(made.top1)} top-1 values for the blocks {made.layers} (one per block, "
                "blocks in increasing order)",
                "re-run `vitprobe probe`",
            )
        return made


@model
class Readout(Model):
    """One read-out's entry of results.json: the reported head, how it was chosen, its health."""

    options: dict[str, Any]
    blr: float | None
    lr: float | None
    weight_decay: float | None = None  # the chosen weight decay (gradient protocols)
    epoch: int | None  # chosen epoch, 1-based
    C: float | None  # logreg: chosen L2 strength
    selection_top1: float | None
    top1: float  # fraction in [0, 1]
    top5: float
    test_loss: float | None
    num_test_samples: int
    per_class: dict[str, float | None]
    verdict: str  # "ok" or "warning"
    health: list[Check]
    movement: float | None
    test_top1_before_refit: float | None
    baseline_top1: float | None = None  # the ridge reference's test top-1 (pooled read-outs; docs/probing.md)
    refit: bool
    head: str
    curves: dict[str, Curve]  # per grid head: key the blr as %g, plus ",wd=%g" when several decays train
    sweep: list[dict[str, Any]] | None
    top1_std: float | None = None  # low-shot: std of the test top-1 over seeds
    seeds: list[SeedResult] | None = None  # low-shot: each seed's test top-1 and choices
    layer: int | None = opt()  # the block read; null for multi-block read-outs (`blocks`)
    blocks: list[int] | None = opt()  # the blocks a multi-block read-out reads (cls-cat, fusion)

    def curve(self) -> Curve | None:
        """The curves of the chosen head (None for logreg, which has no epochs)."""
        if self.blr is None:
            return None
        if f"{self.blr:g}" in self.curves:
            return self.curves[f"{self.blr:g}"]
        return self.curves.get(f"{self.blr:g},wd={self.weight_decay or 0.0:g}")

    @property
    def flagged(self) -> bool:
        """A health warning: this number must never be shown as a clean one."""
        return self.verdict != "ok"

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.health if c.severity == "warning"]


@model
class Selection(Model):
    split: str  # holdout or test
    rule: str
    optimistic: bool
    train_rows: int
    holdout_rows: int
    holdout_fraction: float | None = None  # the fraction held out: --holdout, or raised by --min-holdout
    test_rows: int
    batch_size: int | None
    refit: bool
    lowshot: LowShot | None = None  # low-shot runs: the seeds' subsets


@model
class Schedule(Model):
    batch_size: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_epochs: float
    eval_every: int
    scaled: bool


@model
class ProtocolRecord(Model):
    name: str
    overrides: list[str]
    description: str
    source: str


@model
class HealthSummary(Model):
    ok: bool
    flagged: list[str]


@model
class ProbeConfigRecord(Model):
    """`ProbeConfig.to_dict()`: the resolved protocol a run used."""

    protocol: str
    overrides: list[str]
    pools: list[str]
    layer: int | list[int] | str | None  # a block (< 0: from the end), blocks of a sweep, "all"; None: last
    n_last_blocks: int = 4  # cls-cat read-outs: [cls] of the last n stored blocks
    final_norm: bool
    abmilp_depth: int
    abmilp_act: str
    abmilp_content: str
    queries: int
    optimizer: str
    momentum: float
    weight_decay: list[float]  # trained side by side with the lr grid
    decay_vectors: bool
    lr_grid: list[float]
    batch_size: int
    epochs: int
    min_steps: int
    warmup_epochs: float
    select_on: str
    select_epoch: str = "best"  # best (early stopping) or last (heads compared at the end of the schedule)
    holdout: float
    min_holdout: int = 0  # older runs held out exactly --holdout
    refit: bool
    eval_every: int
    shots: int | None = None
    train_fraction: float | None = None
    seeds: int = 1
    c_grid: list[float]
    max_iter: int
    seed: int
    device: str
    amp: str
    load: str
    preload_gb: float
    shuffle_shards: int


@model
class ProbeResults(Versioned):
    """RUN_DIR/results.json (`vitprobe probe`); docs/results-format.md."""

    FORMAT = "vitprobe-probe-results"
    KIND = "probe"
    FILE = "results.json"
    VERSIONS = (2,)
    CURRENT = 2

    created: str
    versions: dict[str, str]
    random_init: bool
    protocol: ProtocolRecord
    health: HealthSummary
    warnings: list[str]
    notes: list[str]
    layer: int | None  # 0-based block of a one-block run; null for a per-layer sweep (`layers`)
    final_norm: bool
    num_classes: int
    class_names: list[str]
    selection: Selection
    schedule: Schedule | None
    readouts: dict[str, Readout]
    config: ProbeConfigRecord
    train_cache: CacheRef
    test_cache: CacheRef
    timing: dict[str, Any]
    provenance: Provenance | None = opt()
    heads_sha256: str | None = None  # digest of heads/ (vitprobe.probe.rundir)
    layers: list[int] | None = opt()  # per-layer sweeps: the blocks probed (0-based, as the cache's)
    per_layer: dict[str, PerLayer] | None = opt()  # per-layer sweeps: pool -> test top-1 per block

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "") -> ProbeResults:
        made = super().from_dict(data, where=where)
        made.check_layers(where or cls.FILE or "results.json")
        return made

    def check_layers(self, where: str) -> None:
        """A sweep's read-out names, `layer` fields, `layers` and `per_layer` agree with one another."""
        blocks = set(self.layers or ([] if self.layer is None else [self.layer]))
        problems = []
        for name, r in self.readouts.items():
            _, block = split_readout(name)
            if block is not None and (block not in blocks or r.layer not in (None, block)):
                problems.append(f"readouts.{name}: block {block} is not one of the blocks {sorted(blocks)}")
            elif block is not None and r.layer is None and "layer" in (r.present or ()):
                problems.append(f"readouts.{name}: layer is null for a one-block read-out")
        for pool, curve in (self.per_layer or {}).items():
            if not set(curve.layers) <= blocks:
                problems.append(f"per_layer.{pool}: blocks {curve.layers} are not all in {sorted(blocks)}")
        if problems:
            raise ResultsError(f"{where}: " + "; ".join(problems), "re-run `vitprobe probe`")

    def blocks_of(self, pool: str) -> dict[int, str]:
        """Block -> read-out name of `pool` in a per-layer sweep ({} for a one-block run), in block order."""
        found = {}
        for name in self.readouts:
            p, block = split_readout(name)
            if p == pool and block is not None:
                found[block] = name
        return dict(sorted(found.items()))


@model
class Prediction(Model):
    index: int  # dataset index
    label: int
    pred: int
    top5: list[int]


@model
class Predictions(Versioned):
    """predictions.json (`vitprobe predict HEAD --cache CACHE --out DIR`)."""

    FORMAT = "vitprobe-predictions"
    KIND = "predictions"
    FILE = "predictions.json"
    VERSIONS = (1, 2)
    CURRENT = 2  # 2: the common header (1 had no `kind`)
    LEGACY = {1: "no-kind"}

    head: str
    cache: str
    pool: str
    layer: int | None  # 0-based block; null for a multi-block head (`blocks`)
    num_samples: int
    top1: float
    top5: float
    per_class: dict[str, float | None]
    predictions: list[Prediction]
    maps: str | None = opt()
    provenance: Provenance | None = opt()
    blocks: list[int] | None = opt()  # the blocks a multi-block head read


@model
class HeadBackbone(Model):
    spec: str | None
    timm_name: str
    checkpoint: str
    random_init: bool
    seed: int | None


@model
class HeadMeta(Versioned):
    """heads/<pool>.json beside heads/<pool>.safetensors (`vitprobe probe`)."""

    FORMAT = "vitprobe-head"
    KIND = "head"
    VERSIONS = (1, 2)
    CURRENT = 2  # 2: the common header (1 had no `kind`)
    LEGACY = {1: "no-kind"}

    weights: str
    pool: str
    options: dict[str, Any]
    spec: dict[str, Any]  # the HeadSpec fields
    backbone: HeadBackbone
    layer: int | None  # 0-based block index; null for a multi-block read-out (`blocks`)
    blocks: list[int] | None = opt()  # the blocks a multi-block read-out reads (cls-cat, fusion)
    final_norm: bool
    final_norm_eps: float | None
    num_classes: int
    class_names: list[str]
    dim: int
    grid: list[int]
    num_prefix_tokens: int
    blr: float | None
    lr: float | None
    epoch: int | None
    protocol: str | None
    C: float | None


__all__ = [
    "Check",
    "Curve",
    "HeadBackbone",
    "HeadMeta",
    "LowShot",
    "PerLayer",
    "Prediction",
    "Predictions",
    "ProbeConfigRecord",
    "ProbeResults",
    "ProtocolRecord",
    "Readout",
    "Schedule",
    "SeedResult",
    "Selection",
    "split_readout",
]
