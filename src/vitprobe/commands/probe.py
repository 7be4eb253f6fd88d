"""`vitprobe probe` command."""

from __future__ import annotations

from vitprobe.commands._stub import not_implemented


def probe() -> None:
    """Not implemented yet."""
    not_implemented("probe")
