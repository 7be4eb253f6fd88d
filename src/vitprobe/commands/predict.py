"""`vitprobe predict`: a saved head evaluated on a token cache (metrics, predictions, attention maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprobe.commands.options import DeviceOpt, OutputFormat, OutputFormatOpt


def predict(
    head: Annotated[Path, typer.Argument(help="A saved head: RUN_DIR/heads/<pool>.safetensors.")],
    cache: Annotated[Path, typer.Option("--cache", help="The token cache to evaluate the head on.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", file_okay=False, help="Folder for predictions.json (a row per image)."),
    ] = None,
    export_maps: Annotated[
        Path | None,
        typer.Option(
            "--export-maps",
            dir_okay=False,
            help="abmilp / attentive heads: write per-patch attention maps (n, h, w) to this "
            ".safetensors file (for `vitprobe analyze localization --abmilp-maps`).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 1024,
    device: DeviceOpt = "auto",
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
) -> None:
    """Evaluate a saved head on a cache of the same backbone, block and classes: top-1 / top-5."""
    from vitprobe.output import Output
    from vitprobe.probe import PredictConfig
    from vitprobe.probe import predict as run_predict

    output = Output(fmt)
    result = run_predict(
        head,
        cache,
        cfg=PredictConfig(batch_size=batch_size, device=device),
        out_dir=out,
        export_maps=export_maps,
    )
    summary = {k: result[k] for k in ("head", "cache", "pool", "layer", "num_samples", "top1", "top5")}
    summary["predictions"] = str(out / "predictions.json") if out is not None else None
    summary["maps"] = result.get("maps")

    def human(console: object) -> None:
        from rich.table import Table

        table = Table(title=f"{result['pool']} head on {cache}")
        for column in ("samples", "top-1", "top-5"):
            table.add_column(column, justify="right")
        top1, top5 = f"{100 * result['top1']:.2f}", f"{100 * result['top5']:.2f}"
        table.add_row(str(result["num_samples"]), top1, top5)
        console.print(table)  # type: ignore[attr-defined]

    output.result(summary, human=human)
    if out is not None:
        output.info(f"predictions: {out / 'predictions.json'}")
    if export_maps is not None:
        output.info(f"attention maps: {export_maps}")
