"""The report as one document model: headings, tables, figures and lists, built once from the report model
and walked by every renderer (HTML, Markdown, the GitHub summary), so the page is written once.

Every table names its runs (a `run` column, or the runs as columns), every flagged number carries ⚠ and
the health list says why and what to run instead; a random-weights run says so on every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitprobe.report.figures import Figure
from vitprobe.report.model import Report, RunSummary, Score

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
    """`70.8 [57.1, 81.5]`, ⚠ when flagged, and the selected lr / epoch (or k used) below."""
    if score is None:
        return Cell("—", numeric=True)
    text = f"{score.top1:.1f} [{score.ci[0]:.1f}, {score.ci[1]:.1f}]" + (f" {FLAG}" if score.flagged else "")
    sub = None
    if detail:
        parts = []
        if score.lr is not None:
            parts.append(f"lr {score.lr:.3g}")
        if score.epoch is not None:
            parts.append(f"ep {score.epoch}")
        if score.C is not None:
            parts.append(f"C {score.C:.3g}")
        if score.k_used is not None and score.readout.rsplit("@", 1)[-1] != str(score.k_used):
            parts.append(f"k used {score.k_used}")
        parts.append(score.verdict)
        sub = " · ".join(parts)
    return Cell(text, sub=sub, flag=score.flagged, numeric=True)


def build_document(report: Report, figures: list[Figure], *, compact: bool = False) -> Document:
    """The report's document: compact = the GitHub summary (pivot, health, why [cls] loses; no figures)."""
    doc = Document(report.title)
    if report.random_init:
        doc.add(Alarm(f"{FLAG} {RANDOM_INIT_WARNING}", id="random-init-warning"))
    labels = ", ".join(r.label for r in report.runs)
    doc.add(
        Text(
            f"vitprobe {report.vitprobe} · created {report.created} · {len(report.runs)} run(s): "
            f"{labels}. Numbers are read from the runs' JSON files; nothing is recomputed."
        )
    )
    _results(doc, report)
    _health(doc, report)
    if not compact:
        _readouts(doc, report)
    _why(doc, report, [] if compact else figures)
    if compact:
        return doc
    _localization(doc, report, figures)
    own = [f for f in figures if f.name.startswith("run") and "attention_maps" in f.name]
    if own:
        doc.add(
            Heading("Attention maps", id="attention-maps"),
            Text("The last block's [cls]→patch attention (heads averaged) over the analysed images."),
            *(FigureBlock(f) for f in own),
        )
    curves = [f for f in figures if f.name.startswith("learning_curves_")]
    if curves:
        doc.add(
            Heading("Learning curves", id="learning-curves"),
            Text(
                "Selection-split top-1 (solid) and test top-1 (dashed) at each read-out's chosen base "
                "lr; dotted: chance."
            ),
            *(FigureBlock(f) for f in curves),
        )
    _weakest(doc, report)
    _provenance(doc, report)
    notes = [f"{r.label}: {n}" for r in report.runs for n in r.notes]
    if notes:
        doc.add(Heading("Notes", id="notes"), Items(notes, id="notes-list"))
    if report.random_init:
        doc.add(Alarm(f"{FLAG} {RANDOM_INIT_WARNING}"))
    return doc


def _results(doc: Document, report: Report) -> None:
    doc.add(Heading("Results", id="results"))
    readouts = report.readouts()
    if not readouts:
        doc.add(Text("No probing results (results.json / knn.json) in these runs.", note=False))
        return
    datasets = report.datasets
    for dataset in datasets:
        runs = [r for r in report.runs if r.dataset == dataset]
        n = sorted({s.n for r in runs for s in r.scores})
        rows = [
            [
                run_cell(r),
                Cell(r.provenance.model),
                Cell(_short_checkpoint(r)),
                *(score_cell(r.score(ro)) for ro in readouts),
            ]
            for r in runs
        ]
        doc.add(
            Table(
                id="pivot" if len(datasets) == 1 else f"pivot-{slug(dataset)}",
                header=["run", "model", "checkpoint", *readouts],
                rows=rows,
                caption=f"{dataset}: test top-1 (%) [95 % Wilson interval over {'/'.join(map(str, n))} "
                f"test images]; below: selected lr and epoch, health verdict. {FLAG} = not a clean number "
                "(see Probe health).",
            )
        )


def _short_checkpoint(run: RunSummary) -> str:
    p = run.provenance
    if p.random_init:
        return "random-init"
    sha = (p.checkpoint or "")[:12]
    return " · ".join(x for x in (p.checkpoint_file, sha) if x) or "—"


def _health(doc: Document, report: Report) -> None:
    doc.add(Heading("Probe health", id="health"))
    items = []
    for run, score in report.flagged():
        for f in score.findings:
            if f.severity == "warning":
                message = f.message.removeprefix(f"{score.readout}: ").removeprefix("k-NN: ")
                items.append(f"{run.label} · {score.readout}: {message} — fix: {f.fix}")
        if score.optimistic:
            items.append(
                f"{run.label} · {score.readout}: selected on the test set (--select-on test): "
                "optimistic — fix: select on the holdout (the default)"
            )
    if items:
        doc.add(Items(items, id="health-warnings"))
    elif any(r.scores for r in report.runs):
        doc.add(Text("Every read-out passed the probe-health checks.", note=False))


def _readouts(doc: Document, report: Report) -> None:
    rows = []
    for r in report.runs:
        for s in r.scores:
            codes = ", ".join(f.code for f in s.findings) or "—"
            rows.append(
                [
                    run_cell(r),
                    Cell(r.dataset),
                    Cell(s.readout),
                    score_cell(s, detail=False),
                    Cell(fmt(s.top5), numeric=True),
                    Cell(fmt(s.delta_vs_cls, signed=True) if s.readout != "cls" else "—", numeric=True),
                    Cell("—" if s.blr is None else f"{s.blr:g}", numeric=True),
                    Cell("—" if s.lr is None else f"{s.lr:.4g}", numeric=True),
                    Cell("—" if s.epoch is None else str(s.epoch), numeric=True),
                    Cell(s.verdict, flag=s.flagged),
                    Cell(codes),
                ]
            )
    if rows:
        doc.add(
            Heading("Read-outs", id="readouts"),
            Table(
                "readouts",
                [
                    "run",
                    "dataset",
                    "read-out",
                    "top-1 [95 % CI]",
                    "top-5",
                    "Δ top-1 vs [cls]",
                    "blr",
                    "lr",
                    "epoch",
                    "verdict",
                    "health",
                ],
                rows,
                "Every read-out of every run; Δ is against the same run's [cls] probe.",
            ),
        )


def _why(doc: Document, report: Report, figures: list[Figure]) -> None:
    rows = []
    for w in report.why_cls_loses:
        run = next(r for r in report.runs if r.label == w.run)
        loc = " / ".join(fmt(w.maxboxaccv2.get(k)) for k in ("cls_attention", "abmilp"))
        rows.append(
            [
                run_cell(run),
                score_cell(w.cls, detail=False),
                score_cell(w.mean, detail=False),
                score_cell(w.abmilp, detail=False),
                Cell(fmt(w.abmilp_minus_cls, signed=True), numeric=True),
                Cell(fmt(w.abmilp_minus_mean, signed=True), numeric=True),
                Cell(f"{fmt(w.cls_self_last, 3)} (1/T = {fmt(w.cls_self_uniform, 3)})"),
                Cell(fmt(w.cls_entropy_last, 2), numeric=True),
                Cell(fmt(w.patch_entropy_last, 2), numeric=True),
                Cell(fmt(w.entropy_uniform, 2), numeric=True),
                Cell(fmt(w.high_frequency_ratio_last, 3), numeric=True),
                Cell(loc),
            ]
        )
    cross = [f for f in figures if f.run is None]
    if not rows and not cross:
        return
    doc.add(Heading("Why [cls] loses", id="why-cls-loses"), Text(WHY_TEXT))
    if rows:
        doc.add(
            Table(
                "why-cls-loses",
                [
                    "run",
                    "[cls] top-1",
                    "mean top-1",
                    "AbMILP top-1",
                    "AbMILP − [cls]",
                    "AbMILP − mean",
                    "cls_self (last)",
                    "[cls] entropy (last)",
                    "patch entropy (last)",
                    "ln N",
                    "HF ratio (last)",
                    "MaxBoxAccV2 [cls] / AbMILP",
                ],
                rows,
                "Top-1 in % [95 % CI]; entropies in nats; blocks are 0-based.",
            )
        )
    if report.definitions:
        doc.add(Glossary(sorted(report.definitions.items())))
    doc.add(*(FigureBlock(f) for f in cross))


def _localization(doc: Document, report: Report, figures: list[Figure]) -> None:
    rows = [
        [
            run_cell(r),
            Cell(name),
            Cell(fmt(m.max_box_acc_v2), numeric=True),
            *(Cell(fmt(m.max_box_acc.get(d)), numeric=True) for d in ("30", "50", "70")),
            Cell(str(m.num_images), numeric=True),
        ]
        for r in report.runs
        for name, m in r.localization.items()
    ]
    boxes = [f for f in figures if f.name.startswith("run") and "localization_" in f.name]
    if not rows:
        return
    doc.add(
        Heading("Localisation", id="localization"),
        Table(
            "localization",
            ["run", "map", "MaxBoxAccV2", "δ=30", "δ=50", "δ=70", "images"],
            rows,
            "MaxBoxAccV2 (%, Choe et al. 2020) of each map source against the boxes: the mean over IoU δ "
            "of the best box accuracy over thresholds.",
        ),
        *(FigureBlock(f) for f in boxes),
    )


def _weakest(doc: Document, report: Report) -> None:
    rows = [
        [run_cell(r), Cell(ro), Cell(", ".join(f"{c} {a:.1f}" for c, a in classes))]
        for r in report.runs
        for ro, classes in r.weakest_classes.items()
    ]
    if rows:
        doc.add(
            Heading("Weakest classes", id="weakest"),
            Table(
                "weakest",
                ["run", "read-out", "lowest per-class test top-1 (%)"],
                rows,
                "The five classes each read-out gets wrong most often.",
            ),
        )


def _provenance(doc: Document, report: Report) -> None:
    def row(name: str, values: list[str]) -> list[Cell]:
        return [Cell(name), *(Cell(v) for v in values)]

    rs = report.runs
    p = [r.provenance for r in rs]
    ckpt = [
        "random-init — RANDOM WEIGHTS"
        if x.random_init
        else " · ".join(v for v in (x.checkpoint_file, x.checkpoint) if v) or "unknown"
        for x in p
    ]
    rows = [
        row("model", [x.model + (f" (timm {x.timm_name})" if x.timm_name else "") for x in p]),
        row("checkpoint (file · sha256)", ckpt),
        row("dataset", [" / ".join(v for v in (x.dataset, x.split) if v) or "—" for x in p]),
        row("dataset fingerprint", [x.fingerprint or "—" for x in p]),
        row("block probed (0-based)", ["—" if x.layer is None else str(x.layer) for x in p]),
        row(
            "protocol",
            [
                "—"
                if x.protocol is None
                else x.protocol
                + (f" (overrides: {', '.join(x.protocol_overrides)})" if x.protocol_overrides else "")
                for x in p
            ],
        ),
        row("recipe", [x.protocol_text or "—" for x in p]),
        row("schedule", [x.schedule or "—" for x in p]),
        row("selection", [(x.selection or "—") + (" (optimistic)" if x.optimistic else "") for x in p]),
        row("versions", [", ".join(f"{k} {v}" for k, v in x.versions.items()) or "—" for x in p]),
        row("commands", ["; ".join(x.commands) or "—" for x in p]),
        row("vitprobe git commit", [", ".join(x.git) or "—" for x in p]),
        row("host", [", ".join(x.hosts) or "—" for x in p]),
        row("device", [", ".join(x.devices) or "—" for x in p]),
        row("files", [", ".join(r.files) for r in rs]),
    ]
    doc.add(
        Heading("Provenance", id="provenance"),
        Table("provenance", ["", *(r.label for r in rs)], rows, "How each run was made."),
    )
