"""The output layer: what a command prints. Human tables or `--format json`; diagnostics always on stderr.

How a command adopts it (three lines; see commands/report.py for a whole example):

    from vitprobe.commands.options import OutputFormatOpt      # the shared `--format human|json` option
    out = Output(fmt)                                           # fmt: "human" or "json"
    out.info("read 2 runs"); out.warn("..."); out.note("...")   # stderr, in both formats
    out.result(payload, human=lambda console: console.print(table))   # once, at the end

With `json`, `result` writes `payload` as one strict JSON object on stdout (nothing else goes to stdout)
and `human` is not called; with `human`, `human(console)` prints to stdout. A `VitprobeError` raised while
a json Output is active is printed by the CLI as `{"error": {...}}` on stdout too (and as one line on
stderr), so scripts always get one object.

Consoles never hard-wrap when stdout/stderr is not a terminal (logs, CI, pipes): rich would otherwise
cut every line at 80 columns. `make_console` is the one place consoles are made.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from vitprobe.choices import OUTPUT_FORMAT

if TYPE_CHECKING:
    from rich.console import Console

UNWRAPPED_WIDTH = 4096  # columns given to a console that writes to a file or pipe: long lines stay whole
_active: ContextVar[Output | None] = ContextVar("vitprobe_output", default=None)


def make_console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """A rich console for stdout or stderr; wide and soft-wrapping when not a terminal."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream,
        highlight=False,
        soft_wrap=not terminal,
        width=None if terminal else UNWRAPPED_WIDTH,
        quiet=quiet,
    )


class Output:
    """Where one command's output goes: the result on stdout (human or JSON), diagnostics on stderr."""

    def __init__(self, fmt: str = "human") -> None:
        self.format = OUTPUT_FORMAT.check(str(getattr(fmt, "value", fmt)))
        self.err = make_console(stderr=True)
        self._out: Console | None = None
        self._done = False
        _active.set(self)

    @property
    def json(self) -> bool:
        return self.format == "json"

    @property
    def console(self) -> Console:
        """The stdout console for human output (progress bars go to `err`)."""
        if self._out is None:
            self._out = make_console(stderr=False, quiet=self.json)
        return self._out

    def info(self, message: str) -> None:
        """A progress line (stderr, dim); `message` is printed as written, never as markup."""
        self.err.print(message, style="dim", markup=False)

    def note(self, message: str) -> None:
        self._labelled("note", "yellow", message)

    def warn(self, message: str) -> None:
        self._labelled("warning", "bold yellow", message)

    def alarm(self, message: str) -> None:
        """A warning that must not be missed (random weights): bold red."""
        self._labelled("⚠", "bold red", message)

    def _labelled(self, label: str, style: str, message: str) -> None:
        from rich.text import Text

        self.err.print(Text.assemble((f"{label}: ", style), message))

    def result(self, payload: Any, *, human: Callable[[Console], None] | None = None) -> None:
        """The command's result, once: JSON on stdout, or `human(console)` for people."""
        if self._done:
            raise AssertionError("Output.result called twice: one command prints one result")
        self._done = True
        if self.json:
            write_json_stdout(payload)
        elif human is not None:
            human(self.console)


def write_json_stdout(payload: Any) -> None:
    """`payload` as one strict JSON object (no NaN) on stdout, newline-terminated."""
    sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False, default=_default) + "\n")
    sys.stdout.flush()


def _default(obj: Any) -> Any:
    from vitprobe.files import _json_default

    return _json_default(obj)


def active() -> Output | None:
    """The Output of the command running in this context (the CLI's error formatter reads its format)."""
    return _active.get()


def reset() -> None:
    """Forget the active Output (the CLI calls this before each command)."""
    _active.set(None)
