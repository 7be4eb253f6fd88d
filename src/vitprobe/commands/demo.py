"""`vitprobe demo` command."""

from __future__ import annotations

from vitprobe.commands._stub import not_implemented


def demo() -> None:
    """Not implemented yet."""
    not_implemented("demo")
