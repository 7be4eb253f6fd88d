"""`vitprobe run STUDY.toml`: a whole study (models × datasets × protocols) in one resumable command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprobe.commands.options import OutputFormat, OutputFormatOpt


def run(
    study: Annotated[Path, typer.Argument(help="The study file (see docs/studies/*.toml).", dir_okay=False)],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", file_okay=False, help="Output folder [default: the study's `out`]."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the steps and which are done; run nothing.")
    ] = False,
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
) -> None:
    """Run a study: caches (reused when done), probes, k-NN, analyses, one report. Resumable: a finished
    step is skipped, an interrupted one runs again (an extraction resumes from its last complete shard)."""
    from vitprobe.output import Output
    from vitprobe.study import load_study, run_study

    output = Output(fmt)
    spec = load_study(study, out=out)
    progress = output.err if output.err.is_terminal else None
    result = run_study(spec, say=_printer(output), console=progress, dry_run=dry_run)
    payload = {
        "study": str(study),
        "out": str(spec.out),
        "state": str(result.state),
        "report": None if result.report is None else str(result.report),
        "runs": [str(r) for r in result.runs],
        "ran": result.ran,
        "skipped": result.skipped,
        "seconds": {s.key: round(s.seconds, 3) for s in result.steps},
        "random_init": spec.random_init,
        "dry_run": dry_run,
    }

    def human(console: object) -> None:
        total = sum(s.seconds for s in result.steps)
        console.print(  # type: ignore[attr-defined]
            f"{len(result.ran)} step(s) ran, {len(result.skipped)} skipped (done before) in {total:.0f}s; "
            f"state: {result.state}"
        )
        if result.report is not None:
            console.print(f"report: {result.report}")  # type: ignore[attr-defined]

    output.result(payload, human=human)


def _printer(output: object):  # noqa: ANN202 - a say() callback
    def say(message: str) -> None:
        if message.startswith("⚠"):
            output.alarm(message.lstrip("⚠ "))  # type: ignore[attr-defined]
        else:
            output.info(message)  # type: ignore[attr-defined]

    return say
