"""`vitprobe report`: one report from one or more run directories (never recomputes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (--out of probe / knn / analyze).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output file [default: report.html / report.md / report.json; "
            "github: appended to $GITHUB_STEP_SUMMARY when set, else printed].",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="html (self-contained), md (figures beside it), json, github."),
    ] = "html",
    title: Annotated[str, typer.Option("--title", help="Report title.")] = "vitprobe report",
) -> None:
    """Report results.json / knn.json / attention.json / frequency.json / localization.json of runs."""
    from vitprobe.report import ReportConfig, write_report

    console = Console(stderr=True, highlight=False)
    config = ReportConfig(
        runs=tuple(str(r) for r in runs), out=None if out is None else str(out), format=fmt, title=title
    )
    result = write_report(config, on_progress=lambda msg: console.print(f"[dim]{msg}[/]"))
    if result.report["random_init"]:
        console.print(
            "[bold red]⚠ random weights:[/] at least one run used --random-init; "
            "its numbers do not describe a pretrained model"
        )
    for note in (n for r in result.report["runs"] for n in r["notes"]):
        console.print(f"[yellow]note:[/] {note}")
    if result.path is None:
        typer.echo(result.text, nl=False)
    else:
        extra = f" (+ {len(result.figure_files)} figures)" if result.figure_files else ""
        console.print(f"wrote [bold]{result.path}[/]{extra}")
