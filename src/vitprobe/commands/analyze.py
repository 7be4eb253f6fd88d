"""`vitprobe analyze` commands: attention statistics, frequency analysis, localisation (JSON + figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.options import (
    CheckpointOpt,
    DataOpt,
    DeviceOpt,
    ModelOpt,
    OutDirOpt,
    RandomInitOpt,
    SplitOpt,
)

app = typer.Typer(
    help="Analyses that explain probing results: attention statistics, Fourier spectra of token maps.",
    no_args_is_help=True,
)
console = Console(highlight=False)

LimitOpt = Annotated[
    int, typer.Option("--limit", min=0, help="Images to analyse, evenly spaced over the split (0 = all).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")]
CompareOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--compare",
        help="Earlier `--out` directory of the same analysis to overlay on the figures (repeat for several).",
    ),
]


@app.command("attention")
def attention(
    model: ModelOpt,
    data: DataOpt,
    split: SplitOpt,
    out: OutDirOpt,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    limit: LimitOpt = 1000,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    rollout: Annotated[
        bool, typer.Option("--rollout", help="Also compute attention rollout [cls]→patch maps.")
    ] = False,
    maps: Annotated[int, typer.Option("--maps", min=0, help="Images shown in the attention-map grid.")] = 8,
    compare: CompareOpt = None,
) -> None:
    """Per block × head attention statistics ([cls] share, entropies, distance, magnitudes) + figures."""
    from vitprobe.analysis.attention import AttentionConfig, run_attention

    config = AttentionConfig(
        **_pass_options(model, data, split, out, checkpoint, random_init, limit, batch_size, workers, device),
        compare=tuple(str(p) for p in compare or ()),
        rollout=rollout,
        n_maps=maps,
    )
    run = run_attention(config)
    stats = run.result["stats"]
    table = Table(
        title=f"attention: {escape(run.result['label'])}, {run.result['n_images']} images (head means)"
    )
    shown = [s for s in ("cls_self", "cls_entropy", "patch_entropy", "attention_distance") if s in stats]
    table.add_column("block", justify="right")
    for name in shown:
        table.add_column(name, justify="right")
    for block, *values in zip(run.result["blocks"], *(stats[s]["mean"] for s in shown), strict=False):
        table.add_row(str(block), *(f"{v:.3f}" for v in values))
    console.print(table)
    _print_written(run.json_path, [run.maps_path] if run.maps_path else [], run.figures)


@app.command("frequency")
def frequency(
    model: ModelOpt,
    data: DataOpt,
    split: SplitOpt,
    out: OutDirOpt,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    limit: LimitOpt = 1000,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    compare: CompareOpt = None,
) -> None:
    """Fourier analysis of the token maps: Δ log amplitude vs frequency per layer, high-frequency headline."""
    from vitprobe.analysis.frequency import FrequencyConfig, run_frequency

    config = FrequencyConfig(
        **_pass_options(model, data, split, out, checkpoint, random_init, limit, batch_size, workers, device),
        compare=tuple(str(p) for p in compare or ()),
    )
    run = run_frequency(config)
    result = run.result
    table = Table(title=f"frequency: {escape(result['label'])}, {result['n_images']} images")
    for column in ("layer", f"Δ log amp @ {result['frequency'][-1]:.2f}π", "high-freq energy ratio"):
        table.add_column(column, justify="right")
    for layer, head, ratio in zip(
        result["layers"], result["headline"], result["high_freq_energy_ratio"], strict=False
    ):
        table.add_row(layer, f"{head:.3f}", f"{ratio:.3f}")
    console.print(table)
    _print_written(run.json_path, [], run.figures)


def _pass_options(
    model: str | None,
    data: str,
    split: str,
    out: Path,
    checkpoint: str | None,
    random_init: bool,
    limit: int,
    batch_size: int,
    workers: int,
    device: str,
) -> dict[str, Any]:
    """The config fields every analysis pass shares, from the shared options (`--limit 0` = all → None)."""
    return {
        "model": model,
        "data": data,
        "split": split,
        "out": str(out),
        "checkpoint": checkpoint,
        "random_init": random_init,
        "limit": limit or None,
        "batch_size": batch_size,
        "num_workers": workers,
        "device": device,
    }


def _print_written(json_path: Path, others: list[Path], figures: list[Path]) -> None:
    console.print(f"wrote {escape(str(json_path))}")
    for path in [*others, *figures]:
        console.print(f"      {escape(str(path))}")


@app.command("localization")
def localization(
    data: DataOpt,
    split: SplitOpt,
    out: OutDirOpt,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Backbone whose last-block [cls] attention is scored."),
    ] = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    abmilp_maps: Annotated[
        Path | None,
        typer.Option(
            "--abmilp-maps",
            help="Maps of an abmilp or attentive head, from `vitprobe probe --predict HEAD --export-maps "
            "FILE`; scored under the head's pool name.",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="The token cache those maps came from (gives the eval transform)."),
    ] = None,
    limit: LimitOpt = 0,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    figures: Annotated[
        int, typer.Option("--figures", min=0, help="Images drawn with true and predicted boxes.")
    ] = 6,
) -> None:
    """MaxBoxAccV2 (Choe et al.) of [cls] attention and/or AbMILP or attentive maps against the boxes."""
    from vitprobe.localization import LocalizationConfig, run_localization

    config = LocalizationConfig(
        **_pass_options(model, data, split, out, checkpoint, random_init, limit, batch_size, workers, device),
        abmilp_maps=None if abmilp_maps is None else str(abmilp_maps),
        cache=None if cache is None else str(cache),
        n_figures=figures,
    )
    run = run_localization(config)
    result = run.result
    table = Table(title=f"localization: {escape(result['label'])}, MaxBoxAccV2 (%)")
    for column in ("map", "MaxBoxAccV2", "δ=30", "δ=50", "δ=70", "images"):
        table.add_column(column, justify="right")
    for name, res in result["maps"].items():
        per = res["max_box_acc"]
        table.add_row(name, f"{res['max_box_acc_v2']:.1f}", *(f"{per[d]:.1f}" for d in ("30", "50", "70")),
                      str(res["num_images"]))
    console.print(table)
    if result["random_init"]:
        console.print("[bold red]random weights:[/] these maps come from an untrained backbone")
    _print_written(run.json_path, [], run.figures)
