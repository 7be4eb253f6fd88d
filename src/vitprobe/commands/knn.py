"""`vitprobe knn` command."""

from __future__ import annotations

from vitprobe.commands._stub import not_implemented


def knn() -> None:
    """Not implemented yet."""
    not_implemented("knn")
