"""`vitprobe data` commands."""

from __future__ import annotations

import typer

from vitprobe.commands._stub import not_implemented

app = typer.Typer(help="data commands.", no_args_is_help=True)


@app.command("todo")
def todo() -> None:
    """Not implemented yet."""
    not_implemented("data")
