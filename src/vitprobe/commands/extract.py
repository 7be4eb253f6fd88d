"""`vitprobe extract` command."""

from __future__ import annotations

from vitprobe.commands._stub import not_implemented


def extract() -> None:
    """Not implemented yet."""
    not_implemented("extract")
