"""`vitprobe demo`: the whole pipeline offline on synthetic needles (one study), ending in an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprobe.commands.options import OutputFormat, OutputFormatOpt


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
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
) -> None:
    """Run data → extract → probe (cls / mean / AbMILP) → k-NN → analyses → localisation → report, offline."""
    import time

    from vitprobe.demo import DEFAULT_MODEL, DemoConfig, run_demo
    from vitprobe.output import Output

    output = Output(fmt)
    config = DemoConfig(
        out=str(out),
        model=model,
        random_init=True if random_init or model == DEFAULT_MODEL else None,
        n=n,
        epochs=epochs,
        device=device,
    )
    start = time.perf_counter()

    def say(message: str) -> None:
        if message.startswith("⚠"):
            output.alarm(message.lstrip("⚠ "))
        else:
            output.info(message)

    result = run_demo(config, say=say, console=output.err if output.err.is_terminal else None)
    total = time.perf_counter() - start
    payload = {
        "out": str(result.out),
        "report": str(result.report),
        "run": str(result.run_dir),
        "random_init": result.random_init,
        "top1": result.accuracies,
        "maxboxaccv2": result.localization,
        "flagged": result.flagged,
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "total_seconds": round(total, 2),
    }

    def human(console: object) -> None:
        from rich.table import Table

        tag = " (RANDOM WEIGHTS)" if result.random_init else ""
        table = Table(title=f"demo results{tag}: test top-1 and MaxBoxAccV2 (%)")
        table.add_column("read-out / map")
        table.add_column("value", justify="right")
        for name, acc in result.accuracies.items():
            table.add_row(f"probe {name} top-1", f"{acc:.1f}" + (" ⚠" if name in result.flagged else ""))
        for name, v in result.localization.items():
            table.add_row(f"MaxBoxAccV2 {name}", f"{v:.1f}")
        console.print(table)  # type: ignore[attr-defined]
        console.print(f"done in {total:.0f}s")  # type: ignore[attr-defined]
        console.print(f"report: {result.report}  (open it in a browser)", markup=False)  # type: ignore[attr-defined]
        console.print(f"run:    {result.run_dir}  (vitprobe report {result.run_dir})", markup=False)  # type: ignore[attr-defined]

    output.result(payload, human=human)
    if result.flagged:
        output.warn(f"probe-health warnings on {', '.join(result.flagged)}: see the report's Probe health")
    if result.random_init:
        output.alarm(
            "random weights: the backbone is untrained; these numbers only show the pipeline runs, "
            "not what any pretrained model can do"
        )
