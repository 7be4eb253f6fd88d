"""`vitprobe report` command."""

from __future__ import annotations

from vitprobe.commands._stub import not_implemented


def report() -> None:
    """Not implemented yet."""
    not_implemented("report")
