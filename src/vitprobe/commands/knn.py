"""`vitprobe knn` command: parse options, build a KnnConfig, call `vitprobe.knn.run_knn`, print a table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vitprobe.choices import KNN_POOL
from vitprobe.commands.options import (
    DeviceOpt,
    FinalNormOpt,
    LayerOpt,
    OutputFormat,
    OutputFormatOpt,
    output,
    parse_number_list,
)

if TYPE_CHECKING:
    from rich.console import Console

KnnPool = KNN_POOL.enum("KnnPool")


def parse_ks(text: str) -> tuple[int, ...]:
    """`10,20,100` -> (10, 20, 100)."""
    return parse_number_list(text, "--k", kind=int, example="10,20,100,200")


def knn(
    train: Annotated[Path, typer.Option("--train", help="Token cache of the train split (the neighbours).")],
    test: Annotated[Path, typer.Option("--test", help="Token cache of the test split.")],
    k: Annotated[str, typer.Option("--k", help="Neighbour counts, comma-separated.")] = "10,20,100,200",
    temperature: Annotated[
        float, typer.Option("--temperature", help="T in the exp(sim / T) weights.")
    ] = 0.07,
    pool: Annotated[
        KnnPool,  # type: ignore[valid-type]
        typer.Option("--pool", help="[cls] token or mean of patch tokens."),
    ] = KnnPool("cls"),  # type: ignore[assignment]
    layer: LayerOpt = None,
    final_norm: FinalNormOpt = False,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=0, help="Test rows per similarity batch; 0 = sized to memory."),
    ] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", file_okay=False, help="Directory for knn.json.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier knn.json in --out.")
    ] = False,
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
) -> None:
    """Weighted k-NN (DINO protocol) of a test cache against a train cache: top-1 / top-5 per k."""
    from vitprobe.knn import KnnConfig, run_knn

    output_ = output(fmt)
    cfg = KnnConfig(
        ks=parse_ks(k),
        temperature=temperature,
        pool=str(getattr(pool, "value", pool)),
        layer=layer,
        final_norm=final_norm,
        batch_size=batch_size,
        device=device,
    )
    results = run_knn(train, test, cfg, out, overwrite=overwrite)
    for warning in results["warnings"]:
        output_.warn(warning)

    def human(console: Console) -> None:
        table = Table(
            title=f"k-NN ({cfg.pool}, block {results['layer']}, T={cfg.temperature:g}), "
            f"{results['num_train']} train / {results['num_test']} test"
        )
        for column in ("k", "top-1", "top-5"):
            table.add_column(column, justify="right")
        for kk, m in results["knn"].items():
            used = "" if str(m["k_used"]) == kk else f" (used {m['k_used']})"
            table.add_row(escape(kk + used), f"{100 * m['top1']:.2f}", f"{100 * m['top5']:.2f}")
        console.print(table)

    output_.result(results, human=human)
    if out is not None:
        output_.info(f"results: {out / 'knn.json'}")
