"""The report as one document model: headings, tables, figures and lists (built by `sections` from the
report model) that every renderer walks (HTML, Markdown, the GitHub summary), so the page is written once;
and the cells a run and a score become.

Every table names its runs (a `run` column, or the runs as columns), every flagged number carries ⚠ and
the health list says why and what to run instead; a random-weights run says so on every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitprobe.report.figures import Figure
from vitprobe.report.model import RunSummary, Score

RANDOM_INIT_WARNING = (
    "RANDOM WEIGHTS: at least one backbone in this report was built with --random-init. Its numbers say "
    "nothing about any pretrained model; they only show that the pipeline runs."
)
FLAG = "⚠"
WHY_TEXT = (
    "AbMILP and mean pooling against the [cls] probe, beside the last block's [cls] self-attention and "
    "entropies and the last layer's high-frequency energy. References are what uniform attention would "
    "give: A[0,0] = 1/T over T tokens, entropy = ln N over N patches. A [cls] that attends mostly to "
    "itself (cls_self ≫ 1/T) and spreads the rest evenly (entropy near ln N) aggregates the patches "
    "poorly, which is where selective pooling gains."
)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2
    id: str | None = None


@dataclass(frozen=True)
class Text:
    text: str
    note: bool = True  # small grey print


@dataclass(frozen=True)
class Alarm:
    text: str
    id: str | None = None


@dataclass(frozen=True)
class Cell:
    text: str
    sub: str | None = None  # a second, smaller line (selected lr and epoch)
    flag: bool = False  # a number that is not clean (health warning, optimistic, random weights)
    numeric: bool = False


@dataclass(frozen=True)
class Table:
    id: str
    header: list[str]
    rows: list[list[Cell]]
    caption: str


@dataclass(frozen=True)
class FigureBlock:
    figure: Figure


@dataclass(frozen=True)
class Items:
    items: list[str]
    id: str | None = None


@dataclass(frozen=True)
class Glossary:
    items: list[tuple[str, str]]


Block = Heading | Text | Alarm | Table | FigureBlock | Items | Glossary


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def fmt(value: float | None, digits: int = 1, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "x"


def run_cell(run: RunSummary) -> Cell:
    if run.random_init:
        return Cell(f"{run.label} {FLAG} random weights", flag=True)
    return Cell(run.label)


def score_cell(score: Score | None, *, detail: bool = True) -> Cell:
    """`70.8 [57.1, 81.5]` (low-shot: `70.8 ± 2.1 [57.1, 81.5]`, mean ± std over seeds), ⚠ when flagged,
    and below: the selected lr (and weight decay when a grid was searched), epoch, block of a sweep, k used,
    the health verdict."""
    if score is None:
        return Cell("—", numeric=True)
    spread = f" ± {score.std:.1f}" if score.std is not None else ""
    text = f"{score.top1:.1f}{spread} [{score.ci[0]:.1f}, {score.ci[1]:.1f}]" + (
        f" {FLAG}" if score.flagged else ""
    )
    sub = " · ".join([*choices(score), score.verdict]) if detail else None
    return Cell(text, sub=sub, flag=score.flagged, numeric=True)


def choices(score: Score) -> list[str]:
    """What the selection chose for a score, in words: `lr 0.4`, `wd 0.05`, `ep 7`, `block 11`, ...; for a
    low-shot score each seed's choices (`blr 0.1/1`, `ep 7/4`, `3 seeds`)."""
    parts = []
    if score.seeds:
        def per_seed(values: list, spec: str) -> str:
            return "/".join(format(v, spec) for v in dict.fromkeys(values))

        if any(s.blr is not None for s in score.seeds):
            parts.append(f"blr {per_seed([s.blr for s in score.seeds], 'g')}")
        if score.wd_grid:
            parts.append(f"wd {per_seed([s.weight_decay or 0.0 for s in score.seeds], 'g')}")
        if any(s.C is not None for s in score.seeds):
            parts.append(f"C {per_seed([s.C for s in score.seeds], '.3g')}")
        if any(s.epoch is not None for s in score.seeds):
            parts.append(f"ep {per_seed([s.epoch for s in score.seeds], 'd')}")
        parts.append(f"{len(score.seeds)} seeds")
    else:
        if score.lr is not None:
            parts.append(f"lr {score.lr:.3g}")
        if score.wd_grid and score.weight_decay is not None:
            parts.append(f"wd {score.weight_decay:g}")
        if score.epoch is not None:
            parts.append(f"ep {score.epoch}")
        if score.C is not None:
            parts.append(f"C {score.C:.3g}")
    if score.block is not None:
        parts.append(f"block {score.block}")
    if score.k_used is not None and score.readout.rsplit("@", 1)[-1] != str(score.k_used):
        parts.append(f"k used {score.k_used}")
    return parts


def short_checkpoint(run: RunSummary) -> str:
    p = run.provenance
    if p.random_init:
        return "random-init"
    sha = (p.checkpoint or "")[:12]
    return " · ".join(x for x in (p.checkpoint_file, sha) if x) or "—"
