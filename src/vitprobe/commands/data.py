"""`vitprobe data` commands: show what a dataset spec holds; generate the synthetic needles dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.options import JsonOpt

app = typer.Typer(help="Inspect datasets and generate the synthetic needles dataset.", no_args_is_help=True)
console = Console(highlight=False)

SHOWN_CLASSES = 8  # class names listed in the table (all of them in --json)


@app.command("show")
def show(
    spec: Annotated[
        str,
        typer.Argument(help="imagefolder:DIR, imagenet:DIR, cub:DIR, csv:FILE or synthetic:needles[?n=..]."),
    ],
    split: Annotated[
        str | None, typer.Option("--split", help="Show only this split (default: every split).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Images and classes per split, class names, whether boxes exist, and the fingerprint."""
    from vitprobe.data import summarize

    summary = summarize(spec, split)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=escape(spec), title_justify="left")
    for column in ("split", "images", "classes", "boxes", "fingerprint"):
        table.add_column(column, justify="right" if column in ("images", "classes") else "left")
    for name, info in summary["splits"].items():
        boxes = f"yes ({info['num_boxes']})" if info["has_boxes"] else "no"
        counts = str(info["num_images"]), str(info["num_classes"])
        table.add_row(name, *counts, boxes, info["fingerprint"][:16])
    console.print(table)
    first = next(iter(summary["splits"].values()))
    names = first["class_names"]
    more = f", … (+{len(names) - SHOWN_CLASSES}; all with --json)" if len(names) > SHOWN_CLASSES else ""
    console.print(f"root: {escape(first['root'])}")
    console.print(f"classes: {escape(', '.join(names[:SHOWN_CLASSES]))}{more}")
    for name, info in summary["splits"].items():
        for note in info["notes"]:
            console.print(f"[yellow]note ({escape(name)}):[/] {escape(note)}")


@app.command("make-synthetic")
def make_synthetic(
    directory: Annotated[Path, typer.Argument(help="Folder to create (must not exist, or be empty).")],
    n: Annotated[int, typer.Option("--n", help="Number of images (half train, half test).")] = 2000,
    classes: Annotated[int, typer.Option("--classes", help="Number of classes (glyphs).")] = 10,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same bytes.")] = 0,
) -> None:
    """Write the synthetic needles dataset (CUB layout with boxes) to DIRECTORY; open it as cub:DIRECTORY."""
    from vitprobe.synthetic import SyntheticConfig, make_synthetic

    config = SyntheticConfig(n=n, classes=classes, size=size, seed=seed)
    root = make_synthetic(directory, n=config.n, classes=config.classes, size=config.size, seed=config.seed)
    console.print(
        f"wrote {config.n} images of {config.classes} classes ({config.size} px, needle "
        f"{config.needle_side} px, seed {config.seed}) to {escape(str(root))}"
    )
    console.print(f"use it with: --data cub:{escape(str(root))}")
