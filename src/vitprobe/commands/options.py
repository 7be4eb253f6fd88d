"""Options shared by several commands, as `Annotated` aliases so each is declared once."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from vitprobe.dataconfig import INTERPOLATIONS
from vitprobe.errors import VitprobeError

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Preset name (see `vitprobe models list`) or `timm:NAME`."),
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="Official checkpoint file or URL to load into the preset's architecture "
        "(with timm:NAME, a state dict in timm's layout).",
    ),
]
RandomInitOpt = Annotated[
    bool,
    typer.Option("--random-init", help="Build the architecture with random weights (tests, offline demo)."),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Dataset spec KIND:PATH[?key=value&...], e.g. cub:DIR or dtd:DIR?partition=1 "
        "(`vitprobe data kinds` lists them).",
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split name (train, val, test, all).")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")
]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
LayerOpt = Annotated[
    int | None,
    typer.Option(
        "--layer",
        help="Block to use when the cache holds several (default: the deepest stored; negative counts from "
        "the model's last block, -1 = last).",
    ),
]
FinalNormOpt = Annotated[
    bool,
    typer.Option(
        "--final-norm", help="Apply the backbone's final LayerNorm (from the cache) to tokens first."
    ),
]


def str_choices(name: str, values: Sequence[str]) -> type[Enum]:
    """A `str` Enum whose members are `values` (typer shows them as the option's choices)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


def parse_number_list(
    text: str, option: str, *, kind: type[int] | type[float], example: str
) -> tuple[Any, ...]:
    """`"-1,-4"` -> (-1, -4) for a comma-separated option; a VitprobeError names the option and an example."""
    try:
        values = tuple(kind(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise VitprobeError(
            f"{option} {text!r} is not a comma-separated list of {noun}", f"e.g. {option} {example}"
        ) from None
    if not values:
        raise VitprobeError(f"{option} is empty", f"e.g. {option} {example}")
    return values


def _output_formats() -> type[Enum]:
    from vitprobe.choices import OUTPUT_FORMAT

    return OUTPUT_FORMAT.enum("OutputFormat")


OutputFormat = _output_formats()
OutputFormatOpt = Annotated[
    OutputFormat,  # type: ignore[valid-type]
    typer.Option(
        "--format",
        help="human: tables for people; json: one JSON object on stdout (diagnostics stay on stderr).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]


def output(fmt: Any, as_json: bool = False) -> Any:
    """The command's `vitprobe.output.Output` for `--format` (`--json` is the short form of json)."""
    from vitprobe.output import Output

    return Output("json" if as_json else str(getattr(fmt, "value", fmt)))


ImgSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--img-size",
        min=1,
        help="Input size in pixels (square, a multiple of the patch size); the model is built for it and the "
        "position embeddings are resampled (timm's resample_abs_pos_embed; DINOv2's own rule for DINOv2).",
    ),
]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="Normalisation mean, 1 or 3 comma-separated values.")
]
StdOpt = Annotated[
    str | None, typer.Option("--std", help="Normalisation std, 1 or 3 comma-separated values.")
]
CropPctOpt = Annotated[
    float | None,
    typer.Option("--crop-pct", help="Center crop, a fraction of the resized image (0.875: 256 -> 224)."),
]
Interpolation = str_choices("Interpolation", INTERPOLATIONS)
InterpolationOpt = Annotated[
    Interpolation | None,  # type: ignore[valid-type]
    typer.Option("--interpolation", help="Resize interpolation."),
]


def data_overrides(
    img_size: int | None,
    mean: str | None,
    std: str | None,
    crop_pct: float | None,
    interpolation: Enum | None,
) -> dict[str, Any]:
    """The data-config options as `LoadConfig` / `ExtractConfig` fields (mean/std parsed to tuples)."""
    example = "0.5,0.5,0.5"
    return {
        "img_size": img_size,
        "mean": None if mean is None else parse_number_list(mean, "--mean", kind=float, example=example),
        "std": None if std is None else parse_number_list(std, "--std", kind=float, example=example),
        "crop_pct": crop_pct,
        "interpolation": None if interpolation is None else interpolation.value,
    }
