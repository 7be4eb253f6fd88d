"""The report's sections, laid out once from the report model into a `Document`: results pivot, probe
health, read-outs, accuracy vs depth, why [cls] loses, localisation, maps, learning curves, weakest
classes, provenance, notes."""

from __future__ import annotations

from vitprobe.report.document import (
    FLAG,
    RANDOM_INIT_WARNING,
    WHY_TEXT,
    Alarm,
    Cell,
    Document,
    FigureBlock,
    Glossary,
    Heading,
    Items,
    Table,
    Text,
    fmt,
    run_cell,
    score_cell,
    short_checkpoint,
    slug,
)
from vitprobe.report.figures import DEPTH_FIGURE, Figure
from vitprobe.report.model import Report, RunSummary


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
        _depth(doc, report, figures)
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
                Cell(short_checkpoint(r)),
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
                f"test images]; below: selected lr (and weight decay when several were trained) and epoch, "
                f"health verdict. {FLAG} = not a clean number (see Probe health)." + _caption_extras(runs),
            )
        )


def _caption_extras(runs: list[RunSummary]) -> str:
    """What the pivot's caption adds for low-shot runs and per-layer sweeps among `runs`."""
    shown = [s for r in runs for s in r.pivot_scores()]
    text = ""
    if any(s.seeds for s in shown):
        text += (
            " Low-shot: mean ± std over seeds (each seed its own train subset and head), the interval of "
            "the mean over the test images, and each seed's choices."
        )
    if any(s.block is not None for s in shown):
        text += (
            " Per-layer sweeps: each read-out at its last (deepest) block, not the best one (picking the "
            "best block on the test set would be optimistic); every block in Accuracy vs depth."
        )
    return text


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
                    Cell("—" if s.block is None else str(s.block), numeric=True),
                    score_cell(s, detail=False),
                    Cell(fmt(s.top5), numeric=True),
                    Cell(fmt(s.delta_vs_cls, signed=True), numeric=True),
                    Cell("—" if s.blr is None else f"{s.blr:g}", numeric=True),
                    Cell("—" if s.lr is None else f"{s.lr:.4g}", numeric=True),
                    Cell("—" if s.weight_decay is None else f"{s.weight_decay:g}", numeric=True),
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
                    "block",
                    "top-1 [95 % CI]",
                    "top-5",
                    "Δ top-1 vs [cls]",
                    "blr",
                    "lr",
                    "wd",
                    "epoch",
                    "verdict",
                    "health",
                ],
                rows,
                "Every read-out of every run (each block of a per-layer sweep; blocks are 0-based); Δ is "
                "against the same run's [cls] probe at the same block. Low-shot: mean ± std over seeds, "
                "the first seed's choices.",
            ),
        )


def _depth(doc: Document, report: Report, figures: list[Figure]) -> None:
    """Per-layer sweeps: test top-1 per block of each read-out, as a table and beside the attention and
    frequency statistics of the same blocks (the figure)."""
    runs = [r for r in report.runs if r.depth]
    if not runs:
        return
    blocks = sorted({b for r in runs for c in r.depth for b in c.blocks})
    rows = []
    for r in runs:
        for c in r.depth:
            at = dict(zip(c.blocks, zip(c.top1, c.ci, c.flagged, strict=True), strict=True))
            cells = []
            for b in blocks:
                if b not in at:
                    cells.append(Cell("—", numeric=True))
                    continue
                top1, ci, flagged = at[b]
                text = f"{top1:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" + (f" {FLAG}" if flagged else "")
                cells.append(Cell(text, flag=flagged, numeric=True))
            rows.append([run_cell(r), Cell(c.pool), *cells])
    doc.add(
        Heading("Accuracy vs depth", id="depth"),
        Text(
            "Per-layer sweeps: each read-out trained on every swept block's tokens (blocks are 0-based, as "
            "in the caches). The figure puts the [cls] self-attention and high-frequency energy of the same "
            "blocks beside it where the run has those analyses."
        ),
        Table(
            "depth",
            ["run", "read-out", *(f"block {b}" for b in blocks)],
            rows,
            f"Test top-1 (%) [95 % Wilson interval] per block. {FLAG} = a probe-health warning there.",
        ),
        *(FigureBlock(f) for f in figures if f.name == DEPTH_FIGURE),
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
    cross = [f for f in figures if f.run is None and f.name != DEPTH_FIGURE]
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
        row("block probed (0-based)", [_blocks(x.layer, x.layers) for x in p]),
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
        *([row("low-shot", [x.lowshot or "—" for x in p])] if any(x.lowshot for x in p) else []),
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


def _blocks(layer: int | None, layers: list[int]) -> str:
    if layers:
        return f"{', '.join(map(str, layers))} (per-layer sweep)"
    return "—" if layer is None else str(layer)
