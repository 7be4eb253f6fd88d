"""`vitprobe demo`: the offline end-to-end demo (placeholder until the pipeline pieces land)."""

from __future__ import annotations

import typer


def demo() -> None:
    """Run the whole pipeline offline on a synthetic dataset (not built yet: prints a note, exits 0)."""
    typer.echo("demo not built yet: the offline end-to-end demo lands with issue 6")
