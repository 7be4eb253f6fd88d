"""Options shared by several commands, as `Annotated` aliases so each is declared once."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

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
        help="Dataset spec: imagefolder:DIR, imagenet:DIR, cub:DIR, csv:FILE or synthetic:needles.",
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split name (train, val, test, all).")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
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
