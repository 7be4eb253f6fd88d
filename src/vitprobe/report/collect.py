"""Collecting a report: run directories' result files (typed models) → the report model. Never recomputes.

A run directory holds any of results.json, knn.json, attention.json, frequency.json, localization.json
(`vitprobe.results.RUN_FILES`). Each is parsed by its model; a file that does not parse, or whose version
this vitprobe does not know, stops the report with the file, the key and the fix. Missing files are
skipped with a note.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from vitprobe import results as R
from vitprobe.errors import VitprobeError
from vitprobe.report import stats
from vitprobe.report.model import (
    Curves,
    MapScore,
    Report,
    RunProvenance,
    RunSummary,
    Spectrum,
    WhyRow,
)
from vitprobe.report.provenance import consistency_notes, provenance
from vitprobe.report.scores import (
    depth_curves,
    knn_scores,
    learning_curves,
    probe_scores,
    weakest_classes,
    with_deltas,
)

ATTENTION_STATS = ("cls_self", "cls_entropy", "patch_entropy", "attention_distance")
FREQUENCY_STATS = ("high_freq_energy_ratio", "headline")
REDRAWN_FIGURES = ("attention_curves", "frequency_spectrum", "frequency_headline")  # drawn by the report


class ReportError(VitprobeError):
    """Run directories that hold nothing to report, or an output that cannot be written."""


class Run:
    """The parsed result files of one run directory."""

    def __init__(self, path: Path, files: dict[str, R.Versioned], notes: list[str]) -> None:
        self.path, self.files, self.notes = path, files, notes

    def get(self, kind: str) -> R.Versioned | None:
        return self.files.get(kind)

    @property
    def probe(self) -> R.ProbeResults | None:
        return self.files.get("probe")  # type: ignore[return-value]

    @property
    def knn(self) -> R.KnnResults | None:
        return self.files.get("knn")  # type: ignore[return-value]

    @property
    def attention(self) -> R.AttentionResults | None:
        return self.files.get("attention")  # type: ignore[return-value]

    @property
    def frequency(self) -> R.FrequencyResults | None:
        return self.files.get("frequency")  # type: ignore[return-value]

    @property
    def localization(self) -> R.LocalizationResults | None:
        return self.files.get("localization")  # type: ignore[return-value]


def read_run(path: Path) -> Run:
    """Parse every result file of a run directory (or one result file)."""
    if path.is_file():
        candidates, root = [path], path.parent
    elif path.is_dir():
        candidates, root = [path / name for name in R.RUN_FILES], path
    else:
        raise ReportError(f"{path}: no such run directory", "pass the --out directory of a vitprobe run")
    files: dict[str, R.Versioned] = {}
    notes, problems = [], []
    for file in candidates:
        if not file.is_file():
            notes.append(f"{file.name} not found: skipped")
            continue
        try:
            model = R.load(file)
        except R.ResultsError as exc:
            problems.append(str(exc))
            continue
        files[model.kind] = model
    if problems:
        raise ReportError(
            f"{path}: " + "; ".join(problems),
            "re-run the command that wrote that file with this vitprobe (it may have been cut off, edited "
            "by hand, or written by another version)",
        )
    if not files:
        raise ReportError(
            f"{path}: none of {', '.join(R.RUN_FILES)} found",
            "run `vitprobe run STUDY.toml`, or `vitprobe probe --out DIR` / `vitprobe analyze ... --out DIR`",
        )
    return Run(root, files, notes)


def default_labels(paths: Sequence[Path]) -> list[str]:
    """Each run's directory name; where two share it, the shortest path suffix that tells them apart."""
    parts = [p.resolve().parts if p.is_dir() else p.resolve().parent.parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        for depth in range(1, len(mine) + 1):
            label = "/".join(mine[-depth:])
            if all("/".join(other[-depth:]) != label for j, other in enumerate(parts) if j != i):
                break
        labels.append(label)
    return labels


def collect_report(
    paths: Sequence[str | os.PathLike[str]],
    *,
    labels: Sequence[str] = (),
    datasets: Sequence[str] = (),
    title: str = "vitprobe report",
) -> Report:
    """Read every run and build the report model (docs/report-format.md).

    Args:
        paths: run directories (or single result files).
        labels: one name per run for every table and legend (default: the directory names).
        datasets: one dataset name per run for pivots over datasets (default: from the results).
        title: the report title.

    Raises:
        ReportError: no paths, a path with nothing to report, a malformed or unknown-version file, or
            labels that are not one per run and unique.
    """
    from vitprobe import __version__

    if not paths:
        raise ReportError("no run directories given", "vitprobe report RUN_DIR [RUN_DIR ...]")
    dirs = [Path(p) for p in paths]
    for what, given in (("--label", labels), ("--dataset", datasets)):
        if given and len(given) != len(dirs):
            raise ReportError(
                f"{len(given)} {what} for {len(dirs)} runs", f"give one {what} per run, in the runs' order"
            )
    names = list(labels) or default_labels(dirs)
    runs = [read_run(p) for p in dirs]
    summaries = [
        summarise(run, label, datasets[i] if datasets else None)
        for i, (run, label) in enumerate(zip(runs, names, strict=True))
    ]
    pairs = [(s.group, s.dataset) for s in summaries]
    if len(set(pairs)) != len(pairs):
        raise ReportError(
            f"two runs share a label and dataset: {[p for p in pairs if pairs.count(p) > 1][0]}",
            "give every run its own --label",
        )
    if len(set(names)) != len(names):  # one model on several datasets: tell its runs apart everywhere
        for s in summaries:
            s.label = f"{s.group} · {s.dataset}"
    definitions: dict[str, str] = {}
    for run in runs:
        for doc, keys in ((run.attention, ATTENTION_STATS), (run.frequency, FREQUENCY_STATS)):
            if doc is not None:
                definitions.update({k: str(doc.definitions[k]) for k in keys if k in doc.definitions})
    return Report(
        title=title,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        vitprobe=__version__,
        runs=summaries,
        why_cls_loses=[row for s in summaries if (row := why_row(s)) is not None],
        definitions=definitions,
    )


def summarise(run: Run, label: str, dataset: str | None) -> RunSummary:
    """One run's summary: scores, curves, analyses, provenance and notes."""
    prov = provenance(run)
    num_classes = run.probe.num_classes if run.probe else None
    trivial_top5 = num_classes is not None and num_classes <= 5
    scores = with_deltas(probe_scores(run.probe, trivial_top5) + knn_scores(run.knn, trivial_top5))
    notes = list(run.notes) + _file_notes(run) + consistency_notes(run)
    if trivial_top5:
        notes.append(f"top-5 not shown: with {num_classes} classes (5 or fewer) top-5 is always 100 %")
    figures, missing = _figure_files(run)
    notes += missing
    summary = RunSummary(
        label=label,
        group=label,
        dataset=dataset or _dataset_label(prov),
        path=str(run.path),
        files=[R.KINDS[k].FILE or k for k in run.files],
        provenance=prov,
        scores=scores,
        depth=depth_curves(run.probe, scores),
        learning_curves=[],
        weakest_classes={},
        attention=attention_curves(run.attention),
        frequency=frequency_curves(run.frequency),
        spectrum=spectrum(run.frequency),
        localization={
            name: MapScore(m.max_box_acc_v2, dict(m.max_box_acc), m.num_images)
            for name, m in (run.localization.maps.items() if run.localization else ())
        },
        figure_files=figures,
        notes=[],
        num_classes=num_classes,
    )
    swept = bool(summary.depth) or any(s.block is not None for s in scores)
    if swept:
        blocks = ", ".join(map(str, prov.layers)) or "several"
        notes.append(
            f"per-layer sweep over blocks {blocks}: the pivot, learning curves and weakest classes show each "
            "read-out at the last block; Accuracy vs depth shows every block"
        )
    shown = {s.readout for s in summary.pivot_scores()} if swept else None
    summary.learning_curves = learning_curves(run.probe, shown)
    summary.weakest_classes = weakest_classes(run.probe, shown)
    summary.notes = list(dict.fromkeys(notes))
    return summary


def attention_curves(doc: R.AttentionResults | None) -> Curves | None:
    if doc is None:
        return None
    b = doc.backbone
    references = {
        "cls_entropy": stats.uniform_entropy(b.num_patches),
        "patch_entropy": stats.uniform_entropy(b.num_patches),
        "attention_distance": stats.uniform_distance(b.grid, b.patch_size),
    }
    if b.has_cls:
        references["cls_self"] = stats.uniform_self_share(b.num_tokens)
    series = {k: list(doc.stats[k].mean) for k in ATTENTION_STATS if k in doc.stats}
    return Curves(
        blocks=list(doc.blocks),
        labels=[str(x) for x in doc.blocks],
        series=series,
        references={k: v for k, v in references.items() if k in series},
        definitions={k: str(doc.definitions[k]) for k in series if k in doc.definitions},
    )


def frequency_curves(doc: R.FrequencyResults | None) -> Curves | None:
    if doc is None:
        return None
    return Curves(
        blocks=list(doc.blocks),
        labels=["embed" if b is None else str(b) for b in doc.blocks],
        series={"high_freq_energy_ratio": list(doc.high_freq_energy_ratio), "headline": list(doc.headline)},
        definitions={k: str(doc.definitions[k]) for k in FREQUENCY_STATS if k in doc.definitions},
    )


def spectrum(doc: R.FrequencyResults | None) -> Spectrum | None:
    if doc is None:
        return None
    labels = ["embed" if b is None else f"block {b}" for b in doc.blocks]
    return Spectrum(list(doc.frequency), labels, [list(row) for row in doc.delta_log_amplitude])


def why_row(s: RunSummary) -> WhyRow | None:
    """The run's "why [cls] loses" row, or None when it has none of those numbers."""
    cls, mean, abmilp = s.score("cls"), s.score("mean"), s.score("abmilp")  # a sweep's: the last block
    att = s.attention.series if s.attention else {}
    refs = s.attention.references if s.attention else {}
    freq = s.frequency.series if s.frequency else {}

    def last(d: dict[str, list[float]], k: str) -> float | None:
        return d[k][-1] if d.get(k) else None

    row = WhyRow(
        run=s.label,
        cls=cls,
        mean=mean,
        abmilp=abmilp,
        abmilp_minus_cls=abmilp.top1 - cls.top1 if abmilp and cls else None,
        abmilp_minus_mean=abmilp.top1 - mean.top1 if abmilp and mean else None,
        cls_self_last=last(att, "cls_self"),
        cls_self_uniform=refs.get("cls_self"),
        cls_entropy_last=last(att, "cls_entropy"),
        patch_entropy_last=last(att, "patch_entropy"),
        entropy_uniform=refs.get("patch_entropy"),
        high_frequency_ratio_last=last(freq, "high_freq_energy_ratio"),
        maxboxaccv2={name: m.max_box_acc_v2 for name, m in s.localization.items()},
    )
    useful = (cls, abmilp, row.cls_self_last, row.high_frequency_ratio_last, row.maxboxaccv2 or None)
    return row if any(v is not None for v in useful) else None


def _dataset_label(prov: RunProvenance) -> str:
    if not prov.dataset:
        return "—"
    kind, _, rest = prov.dataset.partition(":")
    name = Path(rest).name if rest else kind
    return f"{name or prov.dataset} ({prov.split})" if prov.split else (name or prov.dataset)


def _file_notes(run: Run) -> list[str]:
    """The warnings and notes the result files carry, in file order."""
    out: list[str] = []
    for doc in run.files.values():
        for key in ("warnings", "notes"):
            out.extend(str(n) for n in getattr(doc, key, []) or [])
    return out


def _figure_files(run: Run) -> tuple[list[str], list[str]]:
    """Figures the analyses wrote that the report embeds (map grids, box figures), and notes on missing."""
    listed: list[str] = []
    for doc in (run.attention, run.localization):
        if doc is not None:
            listed += [f for f in doc.figures if Path(f).stem not in REDRAWN_FIGURES]
    pngs = {Path(f).with_suffix("") for f in listed if f.lower().endswith(".png")}
    chosen = [f for f in listed if f.lower().endswith(".png") or Path(f).with_suffix("") not in pngs]
    present = [f for f in dict.fromkeys(chosen) if (run.path / f).is_file()]
    missing = [f"figure {f} is listed but missing: not shown" for f in chosen if f not in present]
    return present, missing
