"""Errors vitprobe raises on bad input; each message says what went wrong, where, and how to fix it.

The CLI formats every `VitprobeError` in one place (`vitprobe.cli.main`): one red line with the message and
the hint, exit code 1. `VITPROBE_DEBUG=1` shows the traceback too. Use `assert` only for internal invariants.

An error raised in a DataLoader worker process reaches the main process as torch rebuilds it: the same class
called with one string, "Caught X in DataLoader worker process N.\nOriginal Traceback ...". `VitprobeError`
recognises that string and takes back the worker's message and hint (a worker-side exception carries them in
a note of its traceback), so the user sees the worker's one line, not the traceback.
"""

from __future__ import annotations

import json
import sys

_WORKER_NOTE = "vitprobe-error: "  # prefix of the note that carries message and hint out of a worker


class VitprobeError(Exception):
    """Base class: a problem the user can fix.

    Args:
        message: what went wrong and where (name the file, key or option).
        hint: how to fix it (the command or option to use).
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        if hint is None:
            message, hint = _from_worker_text(type(self), message)
        super().__init__(message)
        self.message = message
        self.hint = hint
        if _in_dataloader_worker() and hasattr(self, "add_note"):  # Python >= 3.11
            self.add_note(_WORKER_NOTE + json.dumps({"message": message, "hint": hint}))

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def _in_dataloader_worker() -> bool:
    """Whether this process is a torch DataLoader worker (without importing torch when it is not loaded)."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


def _from_worker_text(cls: type[VitprobeError], text: str) -> tuple[str, str | None]:
    """(message, hint) of the worker error behind torch's re-raise text; `(text, None)` for any other text.

    torch's `ExceptionWrapper.reraise` calls `cls(f"Caught {cls.__name__} {where}.\nOriginal {traceback}")`.
    The traceback ends with the worker's exception line and, on Python >= 3.11, its notes; the last
    `_WORKER_NOTE` note holds the message and the hint. Without the note (Python 3.10) the exception line
    gives the message with the hint in parentheses.
    """
    if not (text.startswith(f"Caught {cls.__name__} ") and "\nOriginal Traceback" in text):
        return text, None
    at = text.rfind("\n" + _WORKER_NOTE)
    if at >= 0:
        line = text[at + 1 + len(_WORKER_NOTE) :].split("\n", 1)[0]
        try:
            carried = json.loads(line)
            return str(carried["message"]), carried["hint"]
        except (ValueError, KeyError, TypeError):
            pass
    head = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(head)
    return (text[at + len(head) :].strip(), None) if at >= 0 else (text, None)


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
