"""The `vitprobe` command line: wires the commands and formats errors in one place.

No torch import at module top, so `vitprobe --help` stays fast; each command module imports the library
inside its function. Set `VITPROBE_DEBUG=1` to see the traceback behind an error message.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from vitprobe import __version__
from vitprobe.commands import analyze, data, demo, extract, knn, models, predict, probe, report, run
from vitprobe.errors import VitprobeError


def format_error(exc: VitprobeError) -> str:
    """The one line a user sees for a `VitprobeError`."""
    text = f"[bold red]error:[/] [red]{_escape(exc.message)}[/]"
    if exc.hint:
        text += f" [yellow]— fix: {_escape(exc.hint)}[/]"
    return text


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _ErrorFormattingGroup(TyperGroup):
    """Top-level group: turns `VitprobeError` from any sub-command into a message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from vitprobe import output

        output.reset()
        try:
            return super().invoke(ctx)
        except VitprobeError as exc:
            if os.environ.get("RANK", "0") == "0":  # under torchrun, one message rather than one per rank
                err_console = output.make_console(stderr=True)
                if os.environ.get("VITPROBE_DEBUG"):
                    err_console.print_exception(show_locals=False)
                err_console.print(format_error(exc), soft_wrap=True)  # one line, never hard-wrapped
                active = output.active()
                if active is not None and active.json:  # scripts reading stdout get one object too
                    error = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
                    output.write_json_stdout({"error": error})
            raise typer.Exit(exc.exit_code) from exc


app = typer.Typer(
    cls=_ErrorFormattingGroup,
    name="vitprobe",
    help="Probe pretrained Vision Transformers beyond the [cls] token: extract tokens once, train "
    "[cls] / mean / AbMILP heads from the cache, analyse attention and frequency, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.command("extract")(extract.extract)
app.command("probe")(probe.probe)
app.command("knn")(knn.knn)
app.add_typer(analyze.app, name="analyze")
app.command("predict")(predict.predict)
app.command("report")(report.report)
app.command("run")(run.run)
app.command("demo")(demo.demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Probe pretrained Vision Transformers beyond the [cls] token."""


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
