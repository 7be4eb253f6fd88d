"""The report model: what one report says, typed, built by `collect` from result models and read by every
renderer (HTML, Markdown, GitHub summary, CSV, LaTeX) and `--format json`. Accuracies are in percent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vitprobe.choices import POOLS

REPORT_FORMAT = "vitprobe-report"
REPORT_VERSION = 2  # 2: runs named by label, pivot, intervals, health, 0-based blocks (+ depth, low-shot)
READOUT_ORDER = POOLS  # pivot columns in vitprobe.choices' order, then k-NN@k


@dataclass(frozen=True)
class Finding:
    """A probe-health finding (or a k-NN caveat) on one score."""

    code: str
    severity: str  # "warning" (the number is not clean) or "note"
    message: str
    fix: str


@dataclass(frozen=True)
class SeedChoice:
    """A low-shot seed's test top-1 (percent) and what its selection chose."""

    seed: int
    top1: float
    blr: float | None
    weight_decay: float | None
    C: float | None
    epoch: int | None
    verdict: str


@dataclass(frozen=True)
class Score:
    """One top-1 the report shows: a probe read-out or a k-NN k, with how far to trust it."""

    readout: str  # "cls", "mean", ..., "abmilp@11" (a per-layer sweep's), or "k-NN@20"
    source: str  # "probe" or "knn"
    top1: float  # percent
    ci: tuple[float, float]  # Wilson 95 % interval over the test images, percent
    n: int  # test images
    top5: float | None  # None when the dataset has 5 classes or fewer (always 100 %)
    delta_vs_cls: float | None  # top-1 minus the same run's [cls] probe
    blr: float | None = None
    lr: float | None = None
    epoch: int | None = None  # 1-based
    C: float | None = None
    k_used: int | None = None  # k-NN: the k that voted
    findings: tuple[Finding, ...] = ()
    optimistic: bool = False  # chosen on the test set
    pool: str = ""  # the pivot column: the read-out without its block ("abmilp"), or the k-NN name
    block: int | None = None  # per-layer sweeps: the 0-based block read (None: one block, or several)
    weight_decay: float | None = None  # the chosen decay
    wd_grid: bool = False  # several weight decays were trained: the chosen one is worth showing
    std: float | None = None  # low-shot: std of the top-1 over seeds (percent)
    seeds: tuple[SeedChoice, ...] = ()  # low-shot: each seed's top-1 and choices

    @property
    def flagged(self) -> bool:
        """A warning or an optimistic choice: never shown as a clean number."""
        return self.optimistic or any(f.severity == "warning" for f in self.findings)

    @property
    def verdict(self) -> str:
        if any(f.severity == "warning" for f in self.findings):
            return "warning"
        return "optimistic" if self.optimistic else "ok"


@dataclass(frozen=True)
class DepthCurve:
    """A read-out's test top-1 per block of a per-layer sweep (percent), with 95 % Wilson intervals."""

    pool: str
    blocks: list[int]  # 0-based, increasing
    top1: list[float]
    ci: list[tuple[float, float]]
    flagged: list[bool]  # the block's read-out carries a probe-health warning


@dataclass(frozen=True)
class Curves:
    """Per-block (or per-layer) series of one run's analyses, with their uniform-attention references."""

    blocks: list[int | None]  # 0-based block; None: the patch embedding (frequency)
    labels: list[str]  # tick labels ("0", "1", ... or "embed")
    series: dict[str, list[float]]
    references: dict[str, float] = field(default_factory=dict)  # statistic -> uniform-attention value
    definitions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Spectrum:
    frequencies: list[float]  # in units of pi
    layers: list[str]  # one label per curve
    delta_log_amplitude: list[list[float]]  # layers x frequencies


@dataclass(frozen=True)
class MapScore:
    max_box_acc_v2: float
    max_box_acc: dict[str, float]  # δ -> percent
    num_images: int


@dataclass(frozen=True)
class LearningCurve:
    readout: str
    blr: float | None
    epoch: list[int]
    selection: list[float | None]  # selection split top-1 (%), at the chosen blr
    test: list[float | None]  # test top-1 (%)
    selection_split: str  # holdout or test


@dataclass(frozen=True)
class RunProvenance:
    model: str  # the --model spec
    timm_name: str | None
    checkpoint: str | None  # sha256 of the weights, "random-init", or None when no file says
    checkpoint_file: str | None
    random_init: bool
    dataset: str | None  # spec
    split: str | None
    fingerprint: str | None
    layer: int | None  # 0-based block probed (None: a per-layer sweep, see `layers`)
    layers: list[int]  # the blocks of a per-layer sweep ([] for a one-block run)
    versions: dict[str, str]
    commands: list[str]  # every command that wrote a file of the run
    git: list[str]  # commit(s) of vitprobe, "+dirty" when the checkout had changes
    hosts: list[str]
    devices: list[str]
    protocol: str | None  # probe protocol name
    protocol_overrides: list[str]
    protocol_text: str | None  # "sgd, 13 lrs, batch 256, ..."
    schedule: str | None  # "batch 64, 60 epochs x 28 steps = 1680 steps"
    selection: str | None  # the rule
    optimistic: bool
    lowshot: str | None = None  # low-shot runs: the subsets, in words


@dataclass
class RunSummary:
    """One run directory as the report shows it."""

    label: str  # names the run in every table and legend: `group`, plus " · dataset" if groups repeat
    group: str  # the --label (or directory name): a model's row in pivots over datasets
    dataset: str  # names the dataset in pivots over datasets
    path: str
    files: list[str]  # result files read
    provenance: RunProvenance
    scores: list[Score]  # every read-out (each block of a sweep) and k-NN k
    depth: list[DepthCurve]  # per-layer sweeps: one per pool
    learning_curves: list[LearningCurve]
    weakest_classes: dict[str, list[tuple[str, float]]]  # read-out -> (class, top-1 %), lowest first
    attention: Curves | None
    frequency: Curves | None
    spectrum: Spectrum | None
    localization: dict[str, MapScore]  # cls_attention, abmilp, attentive
    figure_files: list[str]  # figures the analyses wrote that the report embeds, relative to path
    notes: list[str]
    num_classes: int | None

    @property
    def random_init(self) -> bool:
        return self.provenance.random_init

    def score(self, readout: str) -> Score | None:
        """The pivot's score of a column: the read-out of that name, or for a per-layer sweep the pool's
        read-out at its last (deepest) block."""
        exact = next((s for s in self.scores if s.readout == readout), None)
        if exact is not None:
            return exact
        swept = [s for s in self.scores if s.pool == readout and s.block is not None]
        return max(swept, key=lambda s: s.block or 0) if swept else None

    def pivot_scores(self) -> list[Score]:
        """The scores the pivot shows (a sweep's last block per pool, every other score)."""
        return [s for s in self.scores if self.score(s.pool or s.readout) is s]


@dataclass(frozen=True)
class WhyRow:
    """One run's row of "why [cls] loses": the accuracy gaps beside the attention and frequency numbers."""

    run: str
    cls: Score | None
    mean: Score | None
    abmilp: Score | None
    abmilp_minus_cls: float | None
    abmilp_minus_mean: float | None
    cls_self_last: float | None
    cls_self_uniform: float | None  # 1/T
    cls_entropy_last: float | None
    patch_entropy_last: float | None
    entropy_uniform: float | None  # ln N
    high_frequency_ratio_last: float | None
    maxboxaccv2: dict[str, float]  # map -> MaxBoxAccV2


@dataclass
class Report:
    title: str
    created: str
    vitprobe: str
    runs: list[RunSummary]
    why_cls_loses: list[WhyRow]
    definitions: dict[str, str]  # statistic -> formula, as the analyses stored them

    @property
    def random_init(self) -> bool:
        return any(r.random_init for r in self.runs)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.runs))

    def readouts(self) -> list[str]:
        """Pivot columns: the probe read-outs in READOUT_ORDER (a sweep's by pool), then k-NN by k."""
        present = {s.pool or s.readout for r in self.runs for s in r.scores}
        probe = [r for r in READOUT_ORDER if r in present]
        probe += sorted(r for r in present if r not in READOUT_ORDER and not r.startswith("k-NN@"))
        knn = sorted((r for r in present if r.startswith("k-NN@")), key=lambda r: int(r.split("@")[1]))
        return probe + knn

    def flagged(self) -> list[tuple[RunSummary, Score]]:
        return [(r, s) for r in self.runs for s in r.scores if s.flagged]

    def to_dict(self) -> dict[str, Any]:
        """The `--format json` report (docs/report-format.md)."""
        runs = []
        for r in self.runs:
            d = asdict(r)
            d["random_init"] = r.random_init
            d["scores"] = [{**asdict(s), "flagged": s.flagged, "verdict": s.verdict} for s in r.scores]
            runs.append(d)
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "title": self.title,
            "created": self.created,
            "vitprobe": self.vitprobe,
            "random_init": self.random_init,
            "readouts": self.readouts(),
            "runs": runs,
            "why_cls_loses": [asdict(w) for w in self.why_cls_loses],
            "definitions": self.definitions,
        }
