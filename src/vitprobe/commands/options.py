"""Options shared by several commands, as `Annotated` aliases so each is declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
