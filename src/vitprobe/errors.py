"""Errors vitprobe raises on bad input; each message says what went wrong, where, and how to fix it.

The CLI formats every `VitprobeError` in one place (`vitprobe.cli.main`): one red line with the message and
the hint, exit code 1. `VITPROBE_DEBUG=1` shows the traceback too. Use `assert` only for internal invariants.
"""

from __future__ import annotations


class VitprobeError(Exception):
    """Base class: a problem the user can fix.

    Args:
        message: what went wrong and where (name the file, key or option).
        hint: how to fix it (the command or option to use).
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ModelError(VitprobeError):
    """Unknown preset or timm name, or an architecture that vitprobe cannot probe."""


class CheckpointError(VitprobeError):
    """A checkpoint file that cannot be read safely, or whose layout is not recognised."""


class KeyMismatchError(CheckpointError):
    """Strict loading failed: the remapped state dict does not match the architecture."""


class WeightsUnavailableError(CheckpointError):
    """Weights cannot be downloaded (offline, or no network) and are not cached."""


class DatasetError(VitprobeError):
    """A dataset spec that does not parse, or files missing from a dataset layout."""


class CacheError(VitprobeError):
    """A token cache that is missing, incomplete, corrupt or inconsistent with the request."""


class ProbeError(VitprobeError):
    """A probing run or a saved head that cannot be used as asked."""
