"""`vitprobe demo`: the whole pipeline offline on synthetic needles, ending in an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)


def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for data, caches, results and report.html.")
    ] = Path("vitprobe-demo"),
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Backbone: the tiny timm:test_vit by default (random weights, offline); "
            "a preset such as mae-b16 uses its pretrained weights (needs network or a cached copy).",
        ),
    ] = "timm:test_vit",
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Random weights for a preset too (always for the default).")
    ] = False,
    n: Annotated[int, typer.Option("--n", min=8, help="Synthetic images, half train / half test.")] = 4000,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Probe epochs.")] = 60,
    device: Annotated[
        str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")
    ] = "auto",
) -> None:
    """Run data → extract → probe (cls / mean / AbMILP) → k-NN → analyses → localisation → report, offline."""
    import time

    from vitprobe.demo import DEFAULT_MODEL, DemoConfig, run_demo

    config = DemoConfig(
        out=str(out),
        model=model,
        random_init=True if random_init or model == DEFAULT_MODEL else None,
        n=n,
        epochs=epochs,
        device=device,
    )
    start = time.perf_counter()
    result = run_demo(
        config, say=lambda msg: console.print(_style(msg)), console=console if console.is_terminal else None
    )
    total = time.perf_counter() - start
    tag = " (RANDOM WEIGHTS)" if result.random_init else ""
    table = Table(title=f"demo results{tag}: test top-1 and MaxBoxAccV2 (%)")
    table.add_column("read-out / map")
    table.add_column("value", justify="right")
    for name, acc in result.accuracies.items():
        table.add_row(f"probe {name} top-1", f"{acc:.1f}")
    for name, v in result.localization.items():
        table.add_row(f"MaxBoxAccV2 {name}", f"{v:.1f}")
    console.print(table)
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"done in {total:.0f}s ({steps})")
    console.print(f"report: [bold]{escape(str(result.report))}[/]  (open it in a browser)")
    console.print(f"run:    {escape(str(result.run_dir))}  (vitprobe report {escape(str(result.run_dir))})")
    if result.random_init:
        console.print(
            "[bold red]⚠ random weights:[/] the backbone is untrained; these numbers only show the "
            "pipeline runs, not what any pretrained model can do"
        )


def _style(message: str) -> str:
    text = escape(message)
    return f"[bold red]{text}[/]" if message.startswith("⚠") else text
