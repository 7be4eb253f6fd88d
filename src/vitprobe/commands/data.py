"""`vitprobe data` commands: list dataset kinds, show what a spec holds, check its images, make needles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.options import JsonOpt

if TYPE_CHECKING:
    from vitprobe.data import Kind

app = typer.Typer(
    help="List dataset kinds, inspect a dataset spec, check its images, generate synthetic needles.",
    no_args_is_help=True,
)
console = Console(highlight=False)

SHOWN_CLASSES = 8  # class names listed in the table (all of them in --json)


@app.command("show")
def show(
    spec: Annotated[
        str,
        typer.Argument(
            help="KIND:PATH[?key=value&...], e.g. cub:DIR or dtd:DIR?partition=3 (see `data kinds`)."
        ),
    ],
    split: Annotated[
        str | None, typer.Option("--split", help="Show only this split (default: every split).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Images and classes per split, class names, whether boxes exist, and the fingerprint.

    Without --split, every split the layout offers (`all` only when it is the only one).
    """
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


@app.command("kinds")
def kinds(as_json: JsonOpt = False) -> None:
    """The dataset kinds: spec, layout on disk, splits, `?key=value` parameters, boxes."""
    from dataclasses import asdict

    from vitprobe.data import KINDS

    def splits_of(kind: Kind) -> str:
        return ", ".join(kind.splits) if isinstance(kind.splits, tuple) else kind.splits_help

    if as_json:
        rows = [
            {"kind": name, "spec": f"{name}:{kind.path}", "layout": kind.layout, "splits": splits_of(kind),
             "params": [asdict(p) for p in kind.params], "boxes": kind.boxes, "torchvision": kind.torchvision}
            for name, kind in KINDS.items()
        ]  # fmt: skip
        typer.echo(json.dumps(rows, indent=2))
        return
    title = "dataset kinds (--data KIND:PATH[?key=value&...]; file layouts: --json, docs/datasets.md)"
    table = Table(title=title, title_justify="left")
    for column in ("spec", "splits", "boxes", "torchvision layout"):
        table.add_column(column, overflow="fold")
    for name, kind in KINDS.items():
        params = "&".join(
            f"{p.name}=" + ("|".join(p.choices) if p.choices else f"{p.low or 0}..{p.high or ''}")
            for p in kind.params
        )
        spec = f"{name}:{kind.path}" + (f"[?{params}]" if params else "")
        table.add_row(*(escape(c) for c in (spec, splits_of(kind), kind.boxes, kind.torchvision or "")))
    console.print(table)


@app.command("check")
def check(
    spec: Annotated[str, typer.Argument(help="A dataset spec (see `data kinds`).")],
    split: Annotated[
        str | None, typer.Option("--split", help="Check only this split (default: every split).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes (0: in this one).")] = 2,
    as_json: JsonOpt = False,
) -> None:
    """Decode every image once, as extraction will: list missing, undecodable and suspicious files.

    Exits with 1 when an image cannot be used (errors), 0 when there are only warnings (e.g. corrupt JPEG
    data, very large images) or none.
    """
    from vitprobe.data import list_splits, open_dataset
    from vitprobe.data.check import check_images
    from vitprobe.devices import loader_workers
    from vitprobe.progress import progress_bar

    splits = [split] if split is not None else [s for s in list_splits(spec) if s != "all"] or ["all"]
    checked = []  # (split, number of images, problems)
    for name in splits:
        dataset = open_dataset(spec, name)
        with progress_bar(len(dataset), f"checking {name}", rate_unit="img/s") as advance:
            checked.append((name, len(dataset), check_images(dataset, workers=loader_workers(workers),
                                                             on_progress=advance)))  # fmt: skip
    if as_json:
        splits_json = {name: {"num_images": n, "problems": [p.to_dict() for p in problems]}
                       for name, n, problems in checked}  # fmt: skip
        typer.echo(json.dumps({"spec": spec, "splits": splits_json}, indent=2))
    else:
        for name, n, problems in checked:
            n_errors = sum(p.level == "error" for p in problems)
            warned = len(problems) - n_errors
            console.print(f"{escape(name)}: {n} images, {n_errors} error(s), {warned} warning(s)")
            for p in problems:
                colour = "red" if p.level == "error" else "yellow"
                console.print(f"  [{colour}]{p.level}:[/] {escape(p.message)}", soft_wrap=True)
    if any(p.level == "error" for _, _, problems in checked for p in problems):
        raise typer.Exit(1)


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
