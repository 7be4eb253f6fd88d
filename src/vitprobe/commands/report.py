"""`vitprobe report`: one report from one or more run directories (never recomputes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprobe.choices import PIVOT, REPORT_FORMAT

ReportFormat = REPORT_FORMAT.enum("ReportFormat")
Pivot = PIVOT.enum("Pivot")


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (the --out of probe / knn / analyze).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output file, or - for stdout [default: report.html / .md / .csv / .tex; json: stdout; "
            "github: appended to $GITHUB_STEP_SUMMARY when set, else stdout].",
        ),
    ] = None,
    fmt: Annotated[
        ReportFormat,  # type: ignore[valid-type]
        typer.Option("--format", "-f", help=REPORT_FORMAT.help() + "."),
    ] = ReportFormat("html"),  # type: ignore[assignment]
    title: Annotated[str, typer.Option("--title", help="Report title.")] = "vitprobe report",
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="Name of each run in every table and legend, in the runs' order "
            "(repeat once per run; default: the directory names).",
        ),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset", help="Dataset name of each run, for --pivot datasets (default: from the results)."
        ),
    ] = None,
    pivot: Annotated[
        Pivot,  # type: ignore[valid-type]
        typer.Option("--pivot", help="csv / latex: " + PIVOT.help() + "."),
    ] = Pivot("readouts"),  # type: ignore[assignment]
    readout: Annotated[
        str | None, typer.Option("--readout", help="The read-out of --pivot datasets (e.g. abmilp, k-NN@20).")
    ] = None,
) -> None:
    """Report results.json / knn.json / attention.json / frequency.json / localization.json of runs.

    Starts with the pivot table (runs × read-outs, 95 % intervals, selected lr, weight decay and epoch,
    probe-health verdicts; low-shot runs as mean ± std over seeds; a per-layer sweep at its last block, with
    every block in Accuracy vs depth); every table and legend names the run.
    """
    from vitprobe.output import Output
    from vitprobe.report import ReportConfig, write_report

    fmt_name = str(getattr(fmt, "value", fmt))
    to_stdout = out is not None and str(out) == "-" or (out is None and fmt_name == "json")
    if to_stdout and fmt_name == "md":
        from vitprobe.report import ReportError

        raise ReportError("--format md writes its figures beside the file", "pass --out FILE.md")
    output = Output("json" if fmt_name == "json" else "human")
    config = ReportConfig(
        runs=tuple(str(r) for r in runs),
        out="" if to_stdout else (None if out is None else str(out)),  # "": render, write nothing
        format=fmt_name,
        title=title,
        labels=tuple(label or ()),
        datasets=tuple(dataset or ()),
        pivot=str(getattr(pivot, "value", pivot)),
        readout=readout,
    )
    result = write_report(config, on_progress=output.info)
    if result.report.random_init:
        output.alarm(
            "random weights: at least one run used --random-init; its numbers do not describe a "
            "pretrained model"
        )
    for run, score in result.report.flagged():
        output.warn(f"{run.label} · {score.readout}: {score.verdict} — not a clean number (see Probe health)")
    for run in result.report.runs:
        for note in run.notes:
            output.note(f"{run.label}: {note}")
    if result.path is None:
        import sys

        sys.stdout.write(result.text)
        sys.stdout.flush()
    else:
        extra = f" (+ {len(result.figure_files)} figures)" if result.figure_files else ""
        output.info(f"wrote {result.path}{extra}, {result.bytes / 1e6:.2f} MB")
