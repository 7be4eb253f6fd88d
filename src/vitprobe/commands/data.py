"""`vitprobe data` commands: list dataset kinds, show what a spec holds, check its images, make needles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.options import JsonOpt, OutputFormat, OutputFormatOpt, output

if TYPE_CHECKING:
    from rich.console import Console

    from vitprobe.data import Kind

app = typer.Typer(
    help="List dataset kinds, inspect a dataset spec, check its images, generate synthetic needles.",
    no_args_is_help=True,
)
HUMAN = OutputFormat("human")
SHOWN_CLASSES = 8  # class names listed in the table (all of them in --format json)


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
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
    as_json: JsonOpt = False,
) -> None:
    """Images and classes per split, class names, whether boxes exist, and the fingerprint.

    Without --split, every split the layout offers (`all` only when it is the only one).
    """
    from vitprobe.data import summarize

    out = output(fmt, as_json)
    summary = summarize(spec, split)
    for name, info in summary["splits"].items():
        for note in info["notes"]:
            out.note(f"({name}) {note}")
    out.result(summary, human=lambda console: _print_summary(spec, summary, console))


def _print_summary(spec: str, summary: dict, console: Console) -> None:
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
    more = ""
    if len(names) > SHOWN_CLASSES:
        more = f", … (+{len(names) - SHOWN_CLASSES}; all with --format json)"
    console.print(f"root: {escape(first['root'])}")
    console.print(f"classes: {escape(', '.join(names[:SHOWN_CLASSES]))}{more}")


@app.command("kinds")
def kinds(
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
    as_json: JsonOpt = False,
) -> None:
    """The dataset kinds: spec, layout on disk, splits, `?key=value` parameters, boxes."""
    from dataclasses import asdict

    from vitprobe.data import KINDS

    def splits_of(kind: Kind) -> str:
        return ", ".join(kind.splits) if isinstance(kind.splits, tuple) else kind.splits_help

    rows = [
        {"kind": name, "spec": f"{name}:{kind.path}", "layout": kind.layout, "splits": splits_of(kind),
         "params": [asdict(p) for p in kind.params], "boxes": kind.boxes, "torchvision": kind.torchvision}
        for name, kind in KINDS.items()
    ]  # fmt: skip
    human = lambda console: _print_kinds(KINDS, splits_of, console)  # noqa: E731
    output(fmt, as_json).result({"kinds": rows}, human=human)


def _print_kinds(kinds: dict, splits_of: object, console: Console) -> None:
    title = "dataset kinds (--data KIND:PATH[?key=value&...]; file layouts: --format json, docs/datasets.md)"
    table = Table(title=title, title_justify="left")
    for column in ("spec", "splits", "boxes", "torchvision layout"):
        table.add_column(column, overflow="fold")
    for name, kind in kinds.items():
        params = "&".join(
            f"{p.name}=" + ("|".join(p.choices) if p.choices else f"{p.low or 0}..{p.high or ''}")
            for p in kind.params
        )
        spec = f"{name}:{kind.path}" + (f"[?{params}]" if params else "")
        cells = (spec, splits_of(kind), kind.boxes, kind.torchvision or "")  # type: ignore[operator]
        table.add_row(*(escape(c) for c in cells))
    console.print(table)


@app.command("check")
def check(
    spec: Annotated[str, typer.Argument(help="A dataset spec (see `data kinds`).")],
    split: Annotated[
        str | None, typer.Option("--split", help="Check only this split (default: every split).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes (0: in this one).")] = 2,
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
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

    out = output(fmt, as_json)
    splits = [split] if split is not None else [s for s in list_splits(spec) if s != "all"] or ["all"]
    checked = []  # (split, number of images, problems)
    for name in splits:
        dataset = open_dataset(spec, name)
        with progress_bar(len(dataset), f"checking {name}", rate_unit="img/s") as advance:
            checked.append((name, len(dataset), check_images(dataset, workers=loader_workers(workers),
                                                             on_progress=advance)))  # fmt: skip
    splits_json = {name: {"num_images": n, "problems": [p.to_dict() for p in problems]}
                   for name, n, problems in checked}  # fmt: skip

    def human(console: Console) -> None:
        for name, n, problems in checked:
            n_errors = sum(p.level == "error" for p in problems)
            warned = len(problems) - n_errors
            console.print(f"{escape(name)}: {n} images, {n_errors} error(s), {warned} warning(s)")
            for p in problems:
                colour = "red" if p.level == "error" else "yellow"
                console.print(f"  [{colour}]{p.level}:[/] {escape(p.message)}", soft_wrap=True)

    ok = not any(p.level == "error" for _, _, problems in checked for p in problems)
    out.result({"spec": spec, "ok": ok, "splits": splits_json}, human=human)
    if any(p.level == "error" for _, _, problems in checked for p in problems):
        raise typer.Exit(1)


@app.command("make-synthetic")
def make_synthetic(
    directory: Annotated[Path, typer.Argument(help="Folder to create (must not exist, or be empty).")],
    n: Annotated[int, typer.Option("--n", help="Number of images (half train, half test).")] = 2000,
    classes: Annotated[int, typer.Option("--classes", help="Number of classes (glyphs).")] = 10,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same bytes.")] = 0,
    fmt: OutputFormatOpt = HUMAN,  # type: ignore[assignment]
) -> None:
    """Write the synthetic needles dataset (CUB layout with boxes) to DIRECTORY; open it as cub:DIRECTORY."""
    from dataclasses import asdict

    from vitprobe.synthetic import SyntheticConfig, make_synthetic

    out = output(fmt)
    config = SyntheticConfig(n=n, classes=classes, size=size, seed=seed)
    root = make_synthetic(directory, n=config.n, classes=config.classes, size=config.size, seed=config.seed)
    payload = {"root": str(root), "data": f"cub:{root}", "config": asdict(config),
               "needle_side": config.needle_side}  # fmt: skip

    def human(console: Console) -> None:
        console.print(
            f"wrote {config.n} images of {config.classes} classes ({config.size} px, needle "
            f"{config.needle_side} px, seed {config.seed}) to {escape(str(root))}"
        )
        console.print(f"use it with: --data cub:{escape(str(root))}")

    out.result(payload, human=human)
