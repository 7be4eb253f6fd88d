"""`vitprobe probe` command: parse options, build a ProbeConfig, call `vitprobe.probe`, print a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitprobe.choices import (
    ABMILP_ACT,
    ABMILP_CONTENT,
    AMP,
    LOAD,
    OPTIMIZER,
    POOL,
    PROTOCOL,
    SELECT_EPOCH,
    SELECT_ON,
)
from vitprobe.commands.extract import Interrupted
from vitprobe.commands.options import (
    DeviceOpt,
    FinalNormOpt,
    OutputFormat,
    OutputFormatOpt,
    output,
    parse_number_list,
)
from vitprobe.errors import ProbeError

console = Console(highlight=False)


Pool = POOL.enum("Pool")
Optimizer = OPTIMIZER.enum("Optimizer")
Protocol = PROTOCOL.enum("Protocol")
Amp = AMP.enum("Amp")
SelectOn = SELECT_ON.enum("SelectOn")
SelectEpoch = SELECT_EPOCH.enum("SelectEpoch")
Act = ABMILP_ACT.enum("Act")
Content = ABMILP_CONTENT.enum("Content")
Load = LOAD.enum("Load")


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
    protocol: Annotated[
        Protocol,
        typer.Option(
            "--protocol",
            help="Named recipe the defaults come from: auto (converged by default: SGD, 13 lrs x 3 weight "
            "decays, >= 25,000 steps, heads compared at the end of their schedule), mae (MAE / Beyond [cls] "
            "LARS recipe), ep (efficient probing), logreg (L-BFGS logistic regression on pooled features). "
            "Options below override it.",
        ),
    ] = Protocol.auto,
    pool: Annotated[
        list[Pool] | None,
        typer.Option("--pool", help="Read-out to train; repeat for several (default: cls, mean, abmilp)."),
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="Block(s) to probe: one (default: the deepest stored; negative counts from the model's last "
            "block, -1 = last), a list (3,7,11) or all: a per-layer sweep trains every read-out on each "
            "block in the same pass, named pool@block.",
        ),
    ] = None,
    n_last_blocks: Annotated[
        int,
        typer.Option(
            "--n-last-blocks", min=1, help="cls-cat read-outs: [cls] of the last n stored blocks (DINOv2: 4)."
        ),
    ] = 4,
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
    queries: Annotated[
        int | None,
        typer.Option("--queries", min=1, help="Queries of the attentive read-out (auto 4, ep 32)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Minimum epochs (auto 10, mae 90).")
    ] = None,
    min_steps: Annotated[
        int | None,
        typer.Option(
            "--min-steps", min=0, help="Minimum optimiser steps; epochs grow to reach them (auto 25000)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=2, help="Rows per step (auto 256, mae 16384, ep 4096).")
    ] = None,
    optimizer: Annotated[
        Optimizer | None, typer.Option("--optimizer", help="auto: sgd; mae and ep: lars.")
    ] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="LARS / SGD momentum (0.9).")] = None,
    blr: Annotated[
        float | None, typer.Option("--blr", help="One base lr (lr = blr × batch / 256); same as --lr-grid X.")
    ] = None,
    lr_grid: Annotated[
        str | None,
        typer.Option(
            "--lr-grid", help="Base lrs trained side by side, comma-separated (auto: 0.001 ... 10)."
        ),
    ] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option("--warmup-epochs", min=0.0, help="Linear warm-up epochs (auto 0, mae 10).")
    ] = None,
    weight_decay: Annotated[
        str | None,
        typer.Option(
            "--weight-decay", help="Weight decays trained side by side (× the lr grid), comma-separated."
        ),
    ] = None,
    c_grid: Annotated[
        str | None, typer.Option("--c-grid", help="logreg: L2 strengths C, comma-separated (1e-6 ... 1e5).")
    ] = None,
    max_iter: Annotated[
        int | None, typer.Option("--max-iter", min=1, help="logreg: L-BFGS iterations per C (1000).")
    ] = None,
    select_on: Annotated[
        SelectOn,
        typer.Option("--select-on", help="Pick lr/epoch on a train holdout, or on test (optimistic)."),
    ] = SelectOn.holdout,
    select_epoch: Annotated[
        SelectEpoch | None,
        typer.Option(
            "--select-epoch",
            help="Which epoch of each head counts: best (its best evaluation, early stopping; mae, ep) or "
            "last (the end of its schedule; auto).",
        ),
    ] = None,
    holdout: Annotated[
        float, typer.Option("--holdout", help="Stratified holdout fraction (at least; see --min-holdout).")
    ] = 0.1,
    min_holdout: Annotated[
        int | None,
        typer.Option(
            "--min-holdout",
            min=0,
            help="Raise the holdout fraction (up to 0.3) until it holds this many images (0: off) "
            "[default: 30].",
        ),
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Retrain on the full train cache with the lr and epoch chosen on the holdout "
            "(not with --select-on test).",
        ),
    ] = False,
    shots: Annotated[
        int | None, typer.Option("--shots", min=1, help="Low-shot: train on K images per class (per seed).")
    ] = None,
    train_fraction: Annotated[
        float | None,
        typer.Option(
            "--train-fraction", help="Low-shot: train on this class-stratified fraction (e.g. 0.01)."
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Low-shot: subsets drawn; mean ± std over them is reported.")
    ] = 1,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", min=0, help="Evaluate every N epochs (0: ~100 evaluations).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Head init, data order and holdout split.")] = 0,
    amp: Annotated[
        Amp, typer.Option("--amp", help="bf16 autocast for the heads (auto: on CUDA).")
    ] = Amp.auto,
    load: Annotated[
        Load,
        typer.Option("--load", help="Load caches whole (memory), stream shards, or decide by size (auto)."),
    ] = Load.auto,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an earlier probe run's results.json and heads/ in --out."),
    ] = False,
    device: DeviceOpt = "auto",
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
) -> None:
    """Train [cls] / mean / AbMILP / attentive heads on a token cache, all read-outs × lrs in one pass.

    Each read-out's lr and epoch are chosen on a train holdout and its test accuracy is reported with a
    health verdict. `vitprobe predict HEAD --cache CACHE` evaluates a saved head (and exports its maps).
    """
    if train is None or test is None or out is None:
        raise ProbeError(
            "`vitprobe probe` needs --train CACHE --test CACHE --out RUN_DIR",
            "pass --train, --test and --out (`vitprobe predict HEAD --cache CACHE` evaluates a saved head)",
        )
    if blr is not None and lr_grid is not None:
        raise ProbeError("--blr and --lr-grid both set the base lrs", "pass one of them")
    from vitprobe.probe import ProbeConfig, run_probe

    grid = (
        parse_floats(lr_grid, "--lr-grid") if lr_grid is not None else ((blr,) if blr is not None else None)
    )
    cfg = ProbeConfig.from_protocol(
        protocol.value,
        pools=tuple(p.value for p in pool) if pool else None,
        layer=parse_layer(layer),
        n_last_blocks=n_last_blocks,
        final_norm=final_norm,
        abmilp_depth=abmilp_depth,
        abmilp_act=abmilp_act.value,
        abmilp_content=abmilp_content.value,
        queries=queries,
        epochs=epochs,
        min_steps=min_steps,
        batch_size=batch_size,
        optimizer=optimizer.value if optimizer else None,
        momentum=momentum,
        lr_grid=grid,
        warmup_epochs=warmup_epochs,
        weight_decay=parse_floats(weight_decay, "--weight-decay") if weight_decay is not None else None,
        c_grid=parse_floats(c_grid, "--c-grid") if c_grid is not None else None,
        max_iter=max_iter,
        select_on=select_on.value,
        select_epoch=select_epoch.value if select_epoch else None,
        holdout=holdout,
        min_holdout=min_holdout,
        refit=refit,
        eval_every=eval_every,
        shots=shots,
        train_fraction=train_fraction,
        seeds=seeds,
        seed=seed,
        device=device,
        amp=amp.value,
        load=load.value,
    )
    output_ = output(fmt)
    try:
        results = run_probe(
            train, test, cfg, out, explicit_pools=bool(pool), overwrite=overwrite, console=output_.err
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"probe interrupted: nothing new was written to {out} (results and heads are written only once "
            "every head is trained)",
            "re-run the command; fewer --epochs or a shorter --lr-grid make it quicker",
        ) from None
    if output_.json:  # the human table prints them beside the numbers
        for warning in results["warnings"]:
            output_.warn(warning)
    output_.result(results, human=lambda stdout: print_results(results, stdout))
    output_.info(f"results: {out / 'results.json'}  heads: {out / 'heads'}")


def print_results(results: dict[str, Any], console: Console = console) -> None:
    """A rich table of the read-outs' test accuracies and health, then the notes, warnings and fixes."""
    selection = results["selection"]
    protocol = results["protocol"]["name"]
    layers = results.get("layers") or [results["layer"]]
    where = f"block {layers[0]}" if len(layers) == 1 else f"blocks {', '.join(map(str, layers))}"
    title = f"probe ({protocol}), {where}" + (" + final norm" if results["final_norm"] else "")
    title += f" — selected on {selection['split']}" + (" (optimistic)" if selection["optimistic"] else "")
    schedule = results.get("schedule")
    table = Table(title=title)
    grid = "C" if protocol == "logreg" else "blr"
    columns = ["read-out", "top-1", "top-5", grid, "lr", "epoch", f"{selection['split']} top-1"]
    ridge = any(r.get("baseline_top1") is not None for r in results["readouts"].values())
    columns += ["ridge top-1"] * ridge + ["health"]  # the closed-form reference (docs/probing.md)
    for column in columns:
        table.add_column(column, justify="left" if column in ("read-out", "health") else "right")
    for name, r in results["readouts"].items():
        flagged = r["verdict"] != "ok"
        codes = ", ".join(c["code"] for c in r["health"] if c["severity"] == "warning")
        table.add_row(
            name + (" (refit)" if r["refit"] else ""),
            f"{100 * r['top1']:.2f}"
            + (f" ± {100 * r['top1_std']:.2f}" if r.get("seeds") else "")
            + (" ⚠" if flagged else ""),
            f"{100 * r['top5']:.2f}",
            f"{r['C']:.3g}" if grid == "C" else f"{r['blr']:g}",
            "—" if r["lr"] is None else f"{r['lr']:.4g}",
            "—" if r["epoch"] is None else str(r["epoch"]),
            "—" if r["selection_top1"] is None else f"{100 * r['selection_top1']:.2f}",
            *(["—" if r.get("baseline_top1") is None else f"{100 * r['baseline_top1']:.2f}"] * ridge),
            f"[yellow]{escape(codes)}[/]" if flagged else "[green]ok[/]",
        )
    console.print(table)
    per_layer = results.get("per_layer")
    if per_layer:
        depth = Table(title="test top-1 by block")
        depth.add_column("read-out")
        for block in layers:
            depth.add_column(str(block), justify="right")
        for pool, entry in per_layer.items():
            by_block = dict(zip(entry["layers"], entry["top1"], strict=True))
            best = max(by_block, key=lambda b: by_block[b])
            depth.add_row(
                pool,
                *(
                    f"[bold]{100 * by_block[b]:.2f}[/]" if b == best else f"{100 * by_block[b]:.2f}"
                    for b in layers
                ),
            )
        console.print(depth)
    if schedule:
        console.print(
            f"[dim]schedule: batch {schedule['batch_size']}, {schedule['epochs']} epochs × "
            f"{schedule['steps_per_epoch']} steps = {schedule['total_steps']} steps"
            + (" (epochs raised to reach --min-steps)" if schedule["scaled"] else "")
            + "[/]"
        )
    if selection["split"] == "holdout":
        fraction = selection.get("holdout_fraction")
        raised = fraction is not None and fraction > results["config"]["holdout"]
        rows = selection["train_rows"] + selection["holdout_rows"]
        console.print(
            f"[dim]holdout: {selection['holdout_rows']} of {rows} train rows"
            + (f" ({fraction:g}: --holdout raised to hold --min-holdout images)" if raised else "")
            + "[/]"
        )
    lowshot = selection.get("lowshot")
    if lowshot:
        subset = (
            f"{lowshot['shots']} shots per class"
            if lowshot["shots"]
            else f"{lowshot['train_fraction']:g} of the train images"
        )
        console.print(f"[dim]low-shot: {subset}, mean ± std over seeds {lowshot['seeds']}[/]")
    for note in results["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
    for r in results["readouts"].values():
        for c in r["health"]:
            style = "bold yellow" if c["severity"] == "warning" else "dim"
            console.print(
                f"[{style}]{c['severity']}:[/] {escape(c['message'])} [dim]— fix: {escape(c['fix'])}[/]"
            )
    for warning in results["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")


def parse_layer(text: str | None) -> int | tuple[int, ...] | str | None:
    """`--layer`: None, "all", one block ("-1") or a list of blocks ("3,7,11")."""
    if text is None or text.strip() == "all":
        return None if text is None else "all"
    blocks = parse_number_list(text, "--layer", kind=int, example="-1, 3,7,11 or all")
    return blocks[0] if len(blocks) == 1 else blocks
