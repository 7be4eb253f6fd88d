"""`vitprobe probe` command: parse options, build a ProbeConfig, call `vitprobe.train`, print a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitprobe.commands.extract import Interrupted
from vitprobe.commands.options import DeviceOpt, FinalNormOpt, LayerOpt, parse_number_list, str_choices
from vitprobe.errors import ProbeError

console = Console(highlight=False)


Pool = str_choices("Pool", ("cls", "mean", "cls+mean", "abmilp", "attentive"))
Optimizer = str_choices("Optimizer", ("lars", "sgd", "adamw"))
SelectOn = str_choices("SelectOn", ("holdout", "test"))
Act = str_choices("Act", ("tanh", "relu"))
Content = str_choices("Content", ("patch", "all"))
Load = str_choices("Load", ("auto", "memory", "stream"))


def parse_floats(text: str | None, option: str) -> tuple[float, ...]:
    """`0.05,0.1` -> (0.05, 0.1); None -> ()."""
    return parse_number_list(text, option, kind=float, example="0.05,0.1,0.2") if text is not None else ()


def probe(
    train: Annotated[
        Path | None,
        typer.Option("--train", help="Token cache of the train split."),
    ] = None,
    test: Annotated[
        Path | None,
        typer.Option("--test", help="Token cache of the test split."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", file_okay=False, help="RUN_DIR: results.json and heads/ go here."),
    ] = None,
    pool: Annotated[
        list[Pool] | None,
        typer.Option("--pool", help="Read-out to train; repeat for several (default: cls, mean, abmilp)."),
    ] = None,
    layer: LayerOpt = None,
    final_norm: FinalNormOpt = False,
    abmilp_depth: Annotated[
        int,
        typer.Option(
            "--abmilp-depth", min=0, help="Extra Linear+act layers before the AbMILP score (0 = D+1 params)."
        ),
    ] = 0,
    abmilp_act: Annotated[Act, typer.Option("--abmilp-act", help="Activation of those layers.")] = Act.tanh,
    abmilp_content: Annotated[
        Content,
        typer.Option("--abmilp-content", help="patch: pool patch tokens only; all: [cls]/registers too."),
    ] = Content.patch,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Queries of the attentive read-out.")] = 4,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs (MAE: 90).")] = 90,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Rows per step.")] = 1024,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="MAE uses LARS.")] = Optimizer.lars,
    blr: Annotated[float, typer.Option("--blr", help="Base lr; lr = blr × batch / 256.")] = 0.1,
    lr_grid: Annotated[
        str | None,
        typer.Option("--lr-grid", help="Base lrs trained side by side, comma-separated (default: --blr)."),
    ] = None,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", min=0, help="Linear warm-up epochs.")] = 10,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="MAE: 0.")] = 0.0,
    select_on: Annotated[
        SelectOn,
        typer.Option("--select-on", help="Pick lr/epoch on a train holdout, or on test (optimistic)."),
    ] = SelectOn.holdout,
    holdout: Annotated[float, typer.Option("--holdout", help="Stratified holdout fraction.")] = 0.1,
    refit: Annotated[
        bool, typer.Option(
            "--refit",
            help="Retrain on the full train cache with the lr and epoch chosen on the holdout "
            "(not with --select-on test).",
        )
    ] = False,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Evaluate every N epochs.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Head init, data order and holdout split.")] = 0,
    load: Annotated[
        Load,
        typer.Option("--load", help="Load caches whole (memory), stream shards, or decide by size (auto)."),
    ] = Load.auto,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an earlier probe run's results.json and heads/ in --out."),
    ] = False,
    device: DeviceOpt = "auto",
    predict: Annotated[
        Path | None,
        typer.Option(
            "--predict",
            help="Evaluate this saved head (heads/<pool>.safetensors).",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache", help="With --predict: the cache to evaluate on."
        ),
    ] = None,
    export_maps: Annotated[
        Path | None,
        typer.Option(
            "--export-maps", dir_okay=False, help="With --predict: write per-patch attention maps (n, h, w)."
        ),
    ] = None,
) -> None:
    """Train [cls] / mean / AbMILP / attentive heads on a token cache, all read-outs × lrs in one pass.

    Or, with `--predict HEAD --cache CACHE`, evaluate a saved head (and export its attention maps).
    """
    if predict is not None:
        _predict(predict, cache, out=out, export_maps=export_maps, batch_size=batch_size, device=device)
        return
    if train is None or test is None or out is None:
        raise ProbeError(
            "`vitprobe probe` needs --train CACHE --test CACHE --out RUN_DIR",
            "pass --train, --test and --out, or --predict HEAD --cache CACHE to evaluate a saved head",
        )
    from vitprobe.train import ProbeConfig, run_probe

    cfg = ProbeConfig(
        pools=tuple(p.value for p in pool) if pool else ProbeConfig.pools,
        layer=layer,
        final_norm=final_norm,
        abmilp_depth=abmilp_depth,
        abmilp_act=abmilp_act.value,
        abmilp_content=abmilp_content.value,
        queries=queries,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer.value,
        blr=blr,
        lr_grid=parse_floats(lr_grid, "--lr-grid"),
        warmup_epochs=warmup_epochs,
        weight_decay=weight_decay,
        select_on=select_on.value,
        holdout=holdout,
        refit=refit,
        eval_every=eval_every,
        seed=seed,
        device=device,
        load=load.value,
    )
    try:
        results = run_probe(
            train, test, cfg, out, explicit_pools=bool(pool), overwrite=overwrite, console=console
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"probe interrupted: nothing new was written to {out} (results and heads are written only once "
            "every head is trained)",
            "re-run the command; fewer --epochs or a shorter --lr-grid make it quicker",
        ) from None
    print_results(results)
    console.print(f"results: {out / 'results.json'}  heads: {out / 'heads'}")


def print_results(results: dict[str, Any]) -> None:
    """A rich table of the read-outs' test accuracies, with the notes and warnings."""
    selection = results["selection"]
    title = f"probe, block {results['layer']}" + (" + final norm" if results["final_norm"] else "")
    title += f" — selected on {selection['split']}" + (" (optimistic)" if selection["optimistic"] else "")
    table = Table(title=title)
    for column in ("read-out", "top-1", "top-5", "blr", "lr", "epoch", f"{selection['split']} top-1"):
        table.add_column(column, justify="left" if column == "read-out" else "right")
    for name, r in results["readouts"].items():
        table.add_row(
            name + (" (refit)" if r["refit"] else ""),
            f"{100 * r['top1']:.2f}",
            f"{100 * r['top5']:.2f}",
            f"{r['blr']:g}",
            f"{r['lr']:.4g}",
            str(r["epoch"]),
            f"{100 * r['selection_top1']:.2f}",
        )
    console.print(table)
    for note in results["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
    for warning in results["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")


def _predict(
    head: Path,
    cache: Path | None,
    *,
    out: Path | None,
    export_maps: Path | None,
    batch_size: int,
    device: str,
) -> None:
    if cache is None:
        raise ProbeError("--predict needs --cache CACHE", "pass the token cache to evaluate the head on")
    from vitprobe.train import PredictConfig, predict

    result = predict(
        head,
        cache,
        cfg=PredictConfig(batch_size=batch_size, device=device),
        out_dir=out,
        export_maps=export_maps,
    )
    table = Table(title=f"{result['pool']} head on {cache}")
    for column in ("samples", "top-1", "top-5"):
        table.add_column(column, justify="right")
    table.add_row(str(result["num_samples"]), f"{100 * result['top1']:.2f}", f"{100 * result['top5']:.2f}")
    console.print(table)
    if out is not None:
        console.print(f"predictions: {out / 'predictions.json'}")
    if export_maps is not None:
        console.print(f"attention maps: {export_maps}")
