"""Reports: run directories' result files → one HTML / Markdown / JSON / GitHub / CSV / LaTeX report.

The data flows one way and nothing is recomputed: `collect` parses each run's files with their typed
models (vitprobe.results) into the report model (`model`), `figures` draws from that model, `document`
lays the page out once, and `render` (html, md, github) or `pivot` (csv, latex) writes it. Every table
and legend names the run; every number with a probe-health warning carries ⚠ and its fix.
docs/report-format.md describes the contents and the JSON.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vitprobe.choices import PIVOT, REPORT_FORMAT
from vitprobe.files import atomic_write
from vitprobe.report.collect import ReportError, collect_report
from vitprobe.report.document import RANDOM_INIT_WARNING
from vitprobe.report.figures import Figure, make_figures
from vitprobe.report.model import REPORT_FORMAT as REPORT_FILE_FORMAT
from vitprobe.report.model import REPORT_VERSION, Report
from vitprobe.report.pivot import pivot, to_csv, to_latex
from vitprobe.report.render import render_html, render_markdown
from vitprobe.report.sections import build_document

FORMATS = REPORT_FORMAT.names


@dataclass(frozen=True)
class ReportConfig:
    """How `vitprobe report` runs."""

    runs: tuple[str, ...]  # run directories (or result files), one model x dataset each
    out: str | None = None  # output file; None: report.<ext> here (github: $GITHUB_STEP_SUMMARY / stdout)
    format: str = "html"  # html, md, json, github, csv, latex (vitprobe.choices.REPORT_FORMAT)
    title: str = "vitprobe report"  # the page title
    labels: tuple[str, ...] = ()  # one name per run for every table and legend (default: directory names)
    datasets: tuple[str, ...] = ()  # one dataset name per run (default: from the results)
    pivot: str = "readouts"  # csv / latex: read-outs across, or datasets across (with `readout`)
    readout: str | None = None  # the read-out of a pivot over datasets


@dataclass
class ReportOutput:
    """What `write_report` wrote."""

    path: Path | None  # None: printed (github without --out and $GITHUB_STEP_SUMMARY)
    text: str  # the rendered report
    report: Report
    figure_files: list[Path] = field(default_factory=list)
    bytes: int = 0


EXTENSIONS = {"html": "html", "md": "md", "json": "json", "csv": "csv", "latex": "tex"}


def default_out(fmt: str) -> str | None:
    """report.html / .md / .json / .csv / .tex; github: $GITHUB_STEP_SUMMARY when set, else stdout (None)."""
    if fmt == "github":
        return os.environ.get("GITHUB_STEP_SUMMARY") or None
    return f"report.{EXTENSIONS[fmt]}"


def write_report(config: ReportConfig, *, on_progress: Callable[[str], None] | None = None) -> ReportOutput:
    """`vitprobe report`: read the runs, render in `config.format`, write atomically.

    The GitHub summary is appended (that file collects every step's summary); other formats replace `out`.
    """
    from vitprobe.results import dumps_strict

    REPORT_FORMAT.check(config.format)
    PIVOT.check(config.pivot)
    say = on_progress or (lambda _msg: None)
    report = collect_report(config.runs, labels=config.labels, datasets=config.datasets, title=config.title)
    say(f"read {len(report.runs)} run(s): {', '.join(r.label for r in report.runs)}")
    out = config.out if config.out is not None else default_out(config.format)
    path = Path(out) if out else None
    if config.format in ("json", "csv", "latex"):
        text = {
            "json": lambda: dumps_strict(report.to_dict()),
            "csv": lambda: to_csv(report, by=config.pivot, readout=config.readout),
            "latex": lambda: to_latex(report, by=config.pivot, readout=config.readout),
        }[config.format]()
        _write(path, text)
        return ReportOutput(path, text, report, bytes=len(text.encode()))
    if config.format == "github":
        text = render_markdown(build_document(report, [], compact=True), github=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:  # the job summary accumulates steps
                f.write(text)
        return ReportOutput(path, text, report, bytes=len(text.encode()))
    figures = make_figures(report)
    say(f"drew {len(figures)} figure(s)")
    doc = build_document(report, figures)
    if config.format == "html":
        text = render_html(doc)
        _write(path, text)
        return ReportOutput(path, text, report, bytes=len(text.encode()))
    assert path is not None
    fig_dir = path.parent / f"{path.stem}_figures"  # Markdown: figures next to it
    written, rel = [], {}
    for f in figures:
        target = fig_dir / f.name
        atomic_write(target, lambda tmp, data=f.data: tmp.write_bytes(data))
        written.append(target)
        rel[f.name] = f"{fig_dir.name}/{f.name}"
    text = render_markdown(doc, rel)
    _write(path, text)
    return ReportOutput(path, text, report, written, bytes=len(text.encode()))


def _write(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror}", "choose a writable --out path") from exc


__all__ = [
    "FORMATS",
    "RANDOM_INIT_WARNING",
    "REPORT_FILE_FORMAT",
    "REPORT_VERSION",
    "Figure",
    "Report",
    "ReportConfig",
    "ReportError",
    "ReportOutput",
    "build_document",
    "collect_report",
    "default_out",
    "make_figures",
    "pivot",
    "render_html",
    "render_markdown",
    "to_csv",
    "to_latex",
    "write_report",
]
