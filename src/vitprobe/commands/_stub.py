"""Placeholder for commands a later release fills in."""

from __future__ import annotations

from vitprobe.errors import NotImplementedYetError


def not_implemented(command: str) -> None:
    """Raise the exit-2 error for a command that does not exist yet."""
    raise NotImplementedYetError(f"`vitprobe {command}` is not implemented yet", "see the open issues")
