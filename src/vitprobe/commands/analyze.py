"""`vitprobe analyze` commands: attention statistics, frequency analysis, localisation (JSON + figures)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.options import (
    CheckpointOpt,
    DeviceOpt,
    OutDirOpt,
    OutputFormat,
    OutputFormatOpt,
    RandomInitOpt,
    output,
    parse_number_list,
    str_choices,
)

if TYPE_CHECKING:
    from rich.console import Console

    from vitprobe.output import Output

app = typer.Typer(
    help="Analyses that explain probing results: attention statistics, Fourier spectra of token maps, "
    "localisation (MaxBoxAccV2). Blocks are numbered from 0, as in timm and the token caches.",
    no_args_is_help=True,
)
HUMAN = OutputFormat("human")

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Preset name or `timm:NAME` (default: the model of --cache)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", help="Dataset spec, e.g. cub:DIR or imagefolder:DIR (default: the data of --cache)."
    ),
]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Split name (default: the split of --cache).")]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Token cache (`vitprobe extract --out`): gives model, weights, data and split; its images "
        "are analysed. --model/--checkpoint/--data/--split given beside it must agree with it.",
    ),
]
LimitOpt = Annotated[
    int,
    typer.Option(
        "--limit",
        min=0,
        help="Images to analyse, evenly spaced over the split or the --cache's images (0 = all).",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier result of this analysis in --out.")
]
CompareOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--compare",
        help="Earlier `--out` directory of the same analysis to overlay on the figures (repeat for several).",
    ),
]
Source = str_choices("Source", ("auto", "cache", "backbone"))


@app.command("attention")
def attention(
    out: OutDirOpt,
    model: ModelOpt = None,
    data: DataOpt = None,
    split: SplitOpt = None,
    cache: CacheOpt = None,
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
    overwrite: OverwriteOpt = False,
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
) -> None:
    """Per block × head attention statistics ([cls] share, entropies, distance, magnitudes) + figures."""
    from vitprobe.analysis.attention import AttentionConfig, run_attention

    out_ = output(fmt)
    config = AttentionConfig(
        **_pass_options(locals()),
        compare=tuple(str(p) for p in compare or ()),
        rollout=rollout,
        n_maps=maps,
    )
    run = run_attention(config)
    stats = run.result["stats"]

    def human(console: Console) -> None:
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

    _finish(out_, run.json_path, [run.maps_path] if run.maps_path else [], run.figures, run.result, human)


@app.command("frequency")
def frequency(
    out: OutDirOpt,
    model: ModelOpt = None,
    data: DataOpt = None,
    split: SplitOpt = None,
    cache: CacheOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    limit: LimitOpt = 1000,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    blocks: Annotated[
        str,
        typer.Option(
            "--blocks", help="Blocks to analyse: `all`, or 0-based indices such as 0,5,-1 (-1 = the last)."
        ),
    ] = "all",
    source: Annotated[
        Source,  # type: ignore[valid-type]
        typer.Option(
            "--source",
            help="Token maps from: auto (the --cache's tokens when it holds the blocks' patch tokens, else "
            "the backbone), cache, or backbone (adds the patch-embedding layer).",
        ),
    ] = "auto",
    compare: CompareOpt = None,
    overwrite: OverwriteOpt = False,
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
) -> None:
    """Fourier analysis of the token maps: Δ log amplitude vs frequency per layer, high-frequency headline."""
    from vitprobe.analysis.frequency import FrequencyConfig, run_frequency

    out_ = output(fmt)
    chosen = (
        None
        if blocks.strip().lower() == "all"
        else parse_number_list(blocks, "--blocks", kind=int, example="0,5,-1")
    )
    config = FrequencyConfig(
        **_pass_options(locals()),
        compare=tuple(str(p) for p in compare or ()),
        blocks=chosen,
        source=str(getattr(source, "value", source)),
    )
    run = run_frequency(config)
    result = run.result

    def human(console: Console) -> None:
        table = Table(
            title=f"frequency: {escape(result['label'])}, {result['n_images']} images ({result['source']})"
        )
        for column in ("layer", f"Δ log amp @ {result['frequency'][-1]:.2f}π", "high-freq energy ratio"):
            table.add_column(column, justify="right")
        for layer, head, ratio in zip(
            result["layers"], result["headline"], result["high_freq_energy_ratio"], strict=False
        ):
            table.add_row(layer, f"{head:.3f}", f"{ratio:.3f}")
        console.print(table)

    _finish(out_, run.json_path, [], run.figures, result, human)


@app.command("localization")
def localization(
    out: OutDirOpt,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Backbone whose last-block [cls] attention is scored (default: of --cache)."
        ),
    ] = None,
    data: DataOpt = None,
    split: SplitOpt = None,
    cache: CacheOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    head: Annotated[
        list[Path] | None,
        typer.Option(
            "--head",
            help="Saved head of `vitprobe probe` (RUN/heads/abmilp.safetensors or attentive.safetensors): "
            "its per-patch maps on --cache are computed and scored (repeat for several).",
        ),
    ] = None,
    abmilp_maps: Annotated[
        Path | None,
        typer.Option(
            "--abmilp-maps",
            help="Maps of an abmilp or attentive head, from `vitprobe predict HEAD --export-maps "
            "FILE`; scored under the head's pool name.",
        ),
    ] = None,
    cls_attention: Annotated[
        bool,
        typer.Option(
            "--cls-attention/--no-cls-attention",
            help="Score the backbone's last-block [cls] attention (when --model or --cache names one).",
        ),
    ] = True,
    quantize: Annotated[
        bool,
        typer.Option(
            "--quantize/--no-quantize",
            help="Threshold 8-bit score maps as clovaai/wsolevaluation does (--no-quantize: the float maps).",
        ),
    ] = True,
    limit: LimitOpt = 0,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 4,
    device: DeviceOpt = "auto",
    figures: Annotated[
        int, typer.Option("--figures", min=0, help="Images drawn with true and predicted boxes.")
    ] = 6,
    overwrite: OverwriteOpt = False,
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
) -> None:
    """MaxBoxAccV2 (Choe et al.) of [cls] attention and AbMILP / attentive heads' maps against the boxes."""
    from vitprobe.analysis.localization import LocalizationConfig, run_localization

    out_ = output(fmt)
    config = LocalizationConfig(
        **_pass_options(locals()),
        cls_attention=cls_attention,
        heads=tuple(str(p) for p in head or ()),
        abmilp_maps=None if abmilp_maps is None else str(abmilp_maps),
        quantize=quantize,
        n_figures=figures,
    )
    run = run_localization(config)
    result = run.result

    def human(console: Console) -> None:
        table = Table(title=f"localization: {escape(result['label'])}, MaxBoxAccV2 (%)")
        for column in ("map", "block", "MaxBoxAccV2", "δ=30", "δ=50", "δ=70", "images"):
            table.add_column(column, justify="right")
        for name, res in result["maps"].items():
            per = res["max_box_acc"]
            block = "" if res["block"] is None else str(res["block"])
            scores = [f"{res['max_box_acc_v2']:.1f}", *(f"{per[d]:.1f}" for d in ("30", "50", "70"))]
            table.add_row(name, block, *scores, str(res["num_images"]))
        console.print(table)

    if result["random_init"]:
        out_.alarm("random weights: these maps come from an untrained backbone")
    _finish(out_, run.json_path, [], run.figures, result, human)


def _pass_options(given: dict[str, Any]) -> dict[str, Any]:
    """The config fields every analysis shares, from a command's arguments (`--limit 0` = all → None)."""
    cache = given["cache"]
    return {
        "out": str(given["out"]),
        "model": given["model"],
        "data": given["data"],
        "split": given["split"],
        "cache": None if cache is None else str(cache),
        "checkpoint": given["checkpoint"],
        "random_init": given["random_init"],
        "limit": given["limit"] or None,
        "batch_size": given["batch_size"],
        "num_workers": given["workers"],
        "device": given["device"],
        "overwrite": given["overwrite"],
    }


def _finish(
    out: Output,
    json_path: Path,
    others: list[Path],
    figures: list[Path],
    result: dict[str, Any],
    human: Any,
) -> None:
    """Notes on stderr, then the result: the table (human) or, with json, the result file's content plus
    the files written."""
    for note in result.get("notes", []):
        if "random weights" not in note:  # said in the title and, for localisation, in red
            out.note(note)
    written = [str(p) for p in [json_path, *others, *figures]]
    out.result({**result, "written": written}, human=human)
    out.info(f"wrote {json_path}")
    for path in [*others, *figures]:
        out.info(f"      {path}")
