"""`vitprobe models list|show`: the preset table, and what loading one model gives (its load report)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.options import (
    CheckpointOpt,
    CropPctOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    OutputFormat,
    OutputFormatOpt,
    RandomInitOpt,
    StdOpt,
    data_overrides,
    output,
)

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(help="List the supported backbones and inspect how one loads.", no_args_is_help=True)

BranchOpt = Annotated[
    str | None,
    typer.Option(
        "--branch",
        help="Network to take from a multi-network file: teacher/student (DINO, iBOT, data2vec 2.0), "
        "target_encoder/encoder (I-JEPA, Latent MIM), momentum_encoder/base_encoder (MoCo v3). Default: the "
        "one the method evaluates.",
    ),
]


@app.command("list")
def list_models(
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
    as_json: JsonOpt = False,
) -> None:
    """Table of presets: family (MIM/JEA), parameters, [cls], timm architecture, weights, license."""
    from vitprobe.models import preset_rows

    out = output(fmt, as_json)
    rows = preset_rows()
    out.result({"presets": rows}, human=lambda console: console.print(_preset_table(rows, console.width)))


_LIST_GAP = 2  # characters between columns (padding collapsed with the blank separator of SIMPLE_HEAD)
_MIN_ARCH_WIDTH = 10  # below this the other columns are cut short instead (terminals under ~70 columns)
ARCH = "timm architecture"


def _preset_table(rows: list[dict[str, Any]], width: int) -> Table:
    """The `models list` table, laid out for a terminal `width` columns wide.

    Only the architecture column wraps, and only after `_` or before `.` (never inside a word), so names
    stay readable at 80 columns; at 120 columns every row is one line.
    """
    cells = [
        [
            r["name"],
            r["family"],
            f"{r['params'] / 1e6:.1f}M",
            "yes" if r["has_cls"] else "no",
            r["arch"],
            _weights_kind(r),
            r["license"],
        ]
        for r in rows
    ]
    headers = ["name", "family", "params", escape("[cls]"), ARCH, "weights", "license"]
    fixed = sum(max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers) if h != ARCH)
    arch_width = max(width - fixed - _LIST_GAP * (len(headers) - 1), _MIN_ARCH_WIDTH)
    table = Table(
        title="vitprobe presets (any timm model also works as timm:NAME)",
        caption="weights: hub = timm's copy on the Hugging Face hub, official = the authors' release, "
        "manual = behind a link vitprobe cannot download (pass the file with --checkpoint); `--format json` "
        "gives each source and the patch size",
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
    )
    for header in headers:
        right = header == "params"
        table.add_column(
            header,
            no_wrap=header != ARCH,
            justify="right" if right else "left",
            min_width=_MIN_ARCH_WIDTH if header == ARCH else None,
        )
    for row in cells:
        row[4] = _wrap_name(row[4], arch_width)
        table.add_row(*row)
    return table


def _weights_kind(row: dict[str, Any]) -> str:
    """`hub` (timm's copy), `official` (the authors' URL) or `manual` (a page to download from by hand)."""
    if row["manual_download"]:
        return "manual"
    return "hub" if row["weights"].startswith("hf-hub:") else "official"


def _wrap_name(name: str, width: int) -> str:
    """Break a timm name into lines of at most `width` characters, after `_` or before `.` only."""
    lines = [""]
    for part in re.split(r"(?<=_)|(?=\.)", name):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Preset name (see `vitprobe models list`) or timm:NAME.")],
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    branch: BranchOpt = None,
    img_size: ImgSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
    as_json: JsonOpt = False,
) -> None:
    """Build and load NAME, then print the load report: source, sha256, keys remapped and dropped,
    parameters, image size, mean/std, interpolation, patch grid, prefix tokens, depth and width."""
    from vitprobe.models import LoadConfig, inspect_model

    config = LoadConfig(
        model=name, checkpoint=checkpoint, random_init=random_init, branch=branch,
        **data_overrides(img_size, mean, std, crop_pct, interpolation),
    )
    out = output(fmt, as_json)
    info = inspect_model(config)
    if info["random_init"]:
        out.alarm(f"{info['model']}: random weights (--random-init), not a pretrained model")
    out.result(info, human=lambda console: _print_report(info, console))


def _print_report(info: dict[str, Any], console: Console) -> None:
    table = Table(show_header=False, title=f"{escape(info['model'])} ({escape(info['timm_name'])})")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    weights = escape(info["source"])
    if info["random_init"]:
        weights = "[bold red]RANDOM INIT: not a pretrained model[/]"
    dropped, branch = info["dropped"], info["branch"]
    cls = escape("[cls]")
    rows = [
        ("weights", weights),
        ("sha256", info["sha256"] or "-"),
        ("layout", escape(info["layout"] or "-") + (f", branch {escape(branch)}" if branch else "")),
        ("keys renamed", str(info["remapped"])),
        ("keys dropped", f"{len(dropped)}" + (f": {escape(_summarise(dropped))}" if dropped else "")),
        ("parameters", f"{info['num_params']:,} ({info['num_params'] / 1e6:.1f}M)"),
        ("image size", "x".join(map(str, info["image_size"]))),
        ("mean / std", f"{_fmt(info['mean'])} / {_fmt(info['std'])}"),
        ("interpolation, crop", f"{info['interpolation']}, crop_pct {info['crop_pct']}"),
        ("patch, grid", f"{info['patch_size']} px, {info['grid'][0]}x{info['grid'][1]} patches"),
        ("prefix tokens", f"{info['num_prefix_tokens']} ({cls}: {'yes' if info['has_cls'] else 'no'}, "
         f"registers: {info['num_reg_tokens']})"),
        ("depth, dim", f"{info['depth']} blocks, {info['dim']}"),
        ("final norm", info["final_norm"]),
    ]
    rows += [("note", escape(note)) for note in info["notes"]]
    for field, value in rows:
        table.add_row(field, value)
    console.print(table)


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _summarise(keys: list[str], limit: int = 6) -> str:
    """Group dropped keys by their first name part: `decoder_blocks.* (96), mask_token`."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    parts = [keys[0] if len(keys) == 1 else f"{head}.* ({len(keys)})" for head, keys in groups.items()]
    more = f", ... ({len(parts) - limit} more groups)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
