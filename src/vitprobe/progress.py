"""Progress bars: one rich style for every long loop in vitprobe, silent when not on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def make_progress(
    console: Console | None, *, rate_unit: str | None = None, transient: bool = False, enabled: bool = True
) -> Progress:
    """A rich `Progress`: description, bar, n/total, optional rate (e.g. "img/s"), elapsed and ETA.

    Args:
        console: where to draw; None makes the bar silent (library calls without a console stay quiet).
        rate_unit: show items per second with this unit.
        transient: erase the bar when it finishes.
        enabled: False silences the bar (e.g. on torchrun ranks other than 0).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"-- {rate_unit}" if speed is None else f"{speed:,.1f} {rate_unit}")

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate_unit:
        columns.append(Rate())
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(
        *columns,
        console=console,
        transient=transient,
        disable=console is None or not (enabled and console.is_terminal),
    )


@contextmanager
def progress_bar(
    total: int, description: str, *, rate_unit: str | None = None
) -> Iterator[Callable[[int], None]]:
    """A transient bar on stderr for `total` items; yields `advance(n)`."""
    from rich.console import Console

    with make_progress(Console(stderr=True), rate_unit=rate_unit, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
