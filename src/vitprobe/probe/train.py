"""Training probes from token sources: every read-out × learning rate (or C) in one pass, selected, tested.

`train_probes` is the library core of `vitprobe probe`: it splits off the holdout, plans the schedule,
trains one bank per read-out (`engine.fit`) or sweeps logistic regression (`logreg`), picks each read-out's
head, optionally refits it, evaluates it on the test source and runs the health checks. It reads tokens
only through `vitprobe.tokens`; `runs.run_probe` turns its result into results.json and saved heads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.probe import logreg
from vitprobe.probe.bank import load_heads
from vitprobe.probe.engine import BankRun, Metrics, evaluate, fit, make_run
from vitprobe.probe.protocols import ProbeConfig, Schedule, lr_factor, plan_schedule
from vitprobe.probe.selection import Check, health, lars_budget, pick, stratified_holdout
from vitprobe.tokens import (
    Split,
    TokenSource,
    iter_batches,
    load_whole,
    memory_budget,
    pooled_source,
    to_tokens,
)

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class ReadoutResult:
    """One read-out's reported head: how it was chosen, its test metrics, curves and health."""

    spec: HeadSpec
    head: ProbeHead  # the reported head (the chosen one, or its refit), on the CPU, eval mode
    test: Metrics
    selection_top1: float | None  # on the selection split (holdout, or test when optimistic)
    blr: float | None = None  # chosen base lr (gradient protocols)
    lr: float | None = None
    epoch: int | None = None  # chosen epoch (1-based)
    C: float | None = None  # chosen L2 strength (logreg)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)  # per grid value
    sweep: list[dict[str, Any]] | None = None  # logreg: one entry per C
    health: list[Check] = field(default_factory=list)
    movement: float | None = None  # |W - W0| / |W0| of the chosen head's Linear
    refit: bool = False
    test_top1_before_refit: float | None = None

    @property
    def verdict(self) -> str:
        return "warning" if any(c.severity == "warning" for c in self.health) else "ok"


@dataclass
class ProbeOutcome:
    """What `train_probes` returns."""

    readouts: dict[str, ReadoutResult]
    selection: dict[str, Any]
    schedule: Schedule | None
    timing: dict[str, Any]


def load_decision(
    cfg: ProbeConfig, sources: Sequence[TokenSource], keys: Sequence[str], device: torch.device
) -> tuple[bool, torch.device, bool, str]:
    """Whether to load the sources whole, where, whether to pin host memory (for a CUDA device), and why
    (recorded as results.json `timing.load`).

    Whole on the GPU when the rows fit in half its free memory; otherwise in host memory (pinned when the
    heads train on CUDA, so batches copy asynchronously); with `auto`, streamed when they exceed
    `preload_gb` or half the host memory available now.
    """
    cpu = torch.device("cpu")
    need = sum(s.row_bytes(keys) * s.num_rows for s in sources)
    if cfg.load == "stream":
        return False, cpu, False, f"stream (--load stream; {need / 1e9:.2f} GB of tokens)"
    if cfg.load == "auto":
        budget, why = memory_budget(cfg.preload_gb)
        if need > budget:
            return False, cpu, False, f"stream (auto): {need / 1e9:.2f} GB of tokens exceed {why}"
    chose = "memory (auto)" if cfg.load == "auto" else "memory (--load memory)"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need < free // 2:
            return True, device, False, f"{chose} on {device}: {need / 1e9:.2f} GB, {free / 1e9:.1f} GB free"
        return True, cpu, True, f"{chose}, pinned host memory: {need / 1e9:.2f} GB exceed half the GPU's free"
    return True, cpu, False, f"{chose}: {need / 1e9:.2f} GB of tokens"


def check_labels(train: TokenSource, fit_rows: torch.Tensor, test: TokenSource) -> list[str]:
    """Refuse a train set of one class; warn about test classes the train rows never show."""
    present = torch.unique(train.labels[fit_rows])
    if len(present) < 2:
        only = train.class_names[int(present[0])] if len(present) else "none"
        raise ProbeError(
            f"the train rows hold a single class ({only!r}): a classifier cannot be trained or tested on it",
            "extract the train cache from a split with several classes (extract --limit takes the first "
            "images, which on a class-sorted dataset can be one class)",
        )
    unseen = sorted(set(torch.unique(test.labels).tolist()) - set(present.tolist()))
    if unseen:
        names = ", ".join(test.class_names[c] for c in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
        return [
            f"{len(unseen)} test classes never appear in the train rows ({names}): their test images "
            "cannot be classified correctly"
        ]
    return []


def train_probes(
    train_src: TokenSource,
    test_src: TokenSource,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    *,
    keys: Sequence[str],
    norm: dict[str, Any] | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
) -> ProbeOutcome:
    """Train, select, optionally refit and test every read-out of `specs` on the sources."""
    device = device or torch.device("cpu")
    start = time.perf_counter()
    if norm is not None:
        norm = {"weight": norm["weight"].to(device), "bias": norm["bias"].to(device), "eps": norm["eps"]}
    pooled = not any(s.needs_patches for s in specs)
    if pooled and cfg.load != "stream":  # [cls] / mean need 2D numbers per row, not the patch tokens
        train_src, test_src = (pooled_source(s, keys, norm, device) for s in (train_src, test_src))
        keys, norm = sorted({"cls", "mean"} & train_src.keys), None
    in_memory, store, pin, load = load_decision(cfg, [train_src, test_src], keys, device)
    # On the CPU, convert fp16 / bf16 tokens to fp32 once when that still fits, not in every step.
    widen = (
        in_memory
        and store.type == "cpu"
        and device.type == "cpu"
        and 2 * sum(s.row_bytes(keys) * s.num_rows for s in (train_src, test_src)) <= cfg.preload_gb * 2**30
    )
    dtype = torch.float32 if widen else None
    train_memory = load_whole(train_src, keys, store, pin=pin, dtype=dtype) if in_memory else None
    test_memory = load_whole(test_src, keys, store, pin=pin, dtype=dtype) if in_memory else None
    all_rows = torch.arange(train_src.num_rows)
    test_split = Split("test", test_src, torch.arange(test_src.num_rows), test_memory)

    if cfg.select_on == "holdout":
        fit_rows, held_rows = stratified_holdout(train_src.labels, train_src.indices, cfg.holdout, cfg.seed)
        if len(held_rows) == 0:  # selection on nothing would silently pick the first candidate
            images = len(torch.unique(train_src.indices))
            raise ProbeError(
                f"--holdout {cfg.holdout:g} holds out no image: the train cache has {images} images in "
                f"{train_src.num_classes} classes, and {cfg.holdout:g} of each class rounds to 0 "
                "(a class keeps at least one image for training)",
                "pass a larger --holdout (e.g. 0.2), or --select-on test (optimistic)",
            )
        selection = Split("holdout", train_src, held_rows, train_memory)
    else:
        fit_rows, held_rows = all_rows, all_rows[:0]
        selection = test_split
    warnings = check_labels(train_src, fit_rows, test_src)
    fit_split = Split("train", train_src, fit_rows, train_memory)
    evals = [selection, test_split] if selection is not test_split else [test_split]
    epoch_rows = len(fit_split.epoch_rows(0))
    common = {"keys": keys, "device": device, "norm": norm, "num_classes": train_src.num_classes}
    labels = train_src.labels[fit_split.epoch_rows(0)]
    chance = float(torch.bincount(labels).max()) / max(len(labels), 1)
    sizes = {"selection_rows": len(selection.epoch_rows(None)), "test_rows": len(test_split.epoch_rows(None))}

    if cfg.protocol == "logreg":
        schedule = None
        readouts = _train_logreg(
            fit_split, selection, test_split, cfg, specs, chance=chance, sizes=sizes, **common
        )
    else:
        schedule = plan_schedule(cfg, epoch_rows)
        readouts = _train_gradient(
            fit_split,
            Split("train", train_src, all_rows, train_memory),
            evals,
            selection,
            test_split,
            cfg,
            specs,
            schedule,
            chance=chance,
            sizes=sizes,
            console=console,
            **common,
        )
    return ProbeOutcome(
        readouts=readouts,
        selection={
            "split": cfg.select_on,
            "rule": (
                "max top-1 over the grid (and epochs) on a stratified holdout of the train cache, ties to "
                "the lower holdout loss; test reported at that choice"
                if cfg.select_on == "holdout"
                else "max test top-1 over the grid (and epochs): optimistic, as papers that report the best "
                "test epoch"
            ),
            "optimistic": cfg.select_on == "test",
            "train_rows": len(fit_rows),
            "holdout_rows": len(held_rows),
            "test_rows": test_src.num_rows,
            "batch_size": schedule.batch_size if schedule else None,
            "refit": cfg.refit,
            "warnings": warnings,
        },
        schedule=schedule,
        timing={
            "seconds": time.perf_counter() - start,
            "load": load,
            "in_memory": in_memory,
            "store_device": str(store),
            "pinned": pin,
            "pooled_features": pooled and cfg.load != "stream",
            "device": str(device),
            "heads": sum(len(cfg.c_grid if cfg.protocol == "logreg" else cfg.lr_grid) for _ in specs),
        },
    )


def _train_gradient(
    fit_split: Split,
    full_split: Split,
    evals: Sequence[Split],
    selection: Split,
    test_split: Split,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    schedule: Schedule,
    *,
    chance: float,
    sizes: dict[str, int],
    console: Console | None,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
) -> dict[str, ReadoutResult]:
    dim = fit_split.source.dim
    lrs = [cfg.lr(blr, schedule.batch_size) for blr in cfg.lr_grid]
    common = {
        "keys": keys,
        "device": device,
        "norm": norm,
        "num_classes": num_classes,
        "seed": cfg.seed,
        "amp": cfg.amp,
        "shuffle_shards": cfg.shuffle_shards,
    }
    runs = [
        make_run(
            spec,
            cfg.lr_grid,
            lrs,
            dim=dim,
            num_classes=num_classes,
            seed=cfg.seed,
            optimizer=cfg.optimizer_spec,
            stop_epoch=schedule.epochs,
            device=device,
        )
        for spec in specs
    ]
    heads = len(runs) * len(lrs)
    fit(
        runs,
        fit_split,
        evals,
        schedule,
        select=selection.name,
        console=console,
        description=f"{heads} heads × {schedule.epochs} epochs",
        **common,
    )

    chosen: dict[str, tuple[BankRun, int, ProbeHead]] = {}
    for r in runs:
        k = pick(
            r.best_score.tolist(),
            r.best_loss.tolist(),
            [s is not None for s in r.best_states],
            what=f"read-out {r.spec.name}",
        )
        head = build_head(r.spec, dim, num_classes)
        head.load_state_dict(r.best_states[k])
        chosen[r.spec.name] = (r, k, head.eval())

    refits: dict[str, BankRun] = {}
    if cfg.refit:  # ProbeConfig refuses --refit with --select-on test
        refits = {
            name: make_run(
                r.spec,
                (r.blrs[k],),
                (r.lrs[k],),
                dim=dim,
                num_classes=num_classes,
                seed=cfg.seed,
                optimizer=cfg.optimizer_spec,
                stop_epoch=r.best_epoch[k],
                device=device,
            )
            for name, (r, k, _) in chosen.items()
        }
        fit(
            list(refits.values()),
            full_split,
            [test_split],
            schedule,
            select=None,
            console=console,
            description="refit",
            **common,
        )

    finals: dict[str, ProbeHead] = {}
    for name, (r, _, head) in chosen.items():
        if name in refits:
            head = build_head(r.spec, dim, num_classes)
            head.load_state_dict(refits[name].best_states[0])
        finals[name] = head.eval()
    banks = [
        (load_heads(chosen[n][0].spec, [head], dim, num_classes).to(device), None)
        for n, head in finals.items()
    ]
    tested = evaluate(
        banks,
        test_split,
        keys,
        batch_size=max(schedule.batch_size, 1024),
        device=device,
        norm=norm,
        num_classes=num_classes,
        amp=cfg.amp,
        shuffle_shards=cfg.shuffle_shards,
    )

    out: dict[str, ReadoutResult] = {}
    for (name, (r, k, _)), metrics in zip(chosen.items(), tested, strict=True):
        test = metrics[0]
        curves = _curves(r, selection.name)
        epochs = r.curves["epoch"]
        at = epochs.index(r.best_epoch[k])
        w = r.best_states[k]["linear.weight"]
        w0 = r.init_weight[k].cpu()
        movement = float((w.cpu() - w0).norm() / w0.norm().clamp(min=1e-12))
        budget = None
        if cfg.optimizer == "lars":
            factors = sum(lr_factor(t, schedule) for t in range(r.best_epoch[k] * schedule.steps_per_epoch))
            budget = lars_budget(r.lrs[k], factors, momentum=cfg.momentum)
        sel_curve = [row[k] for row in r.curves[f"{selection.name}_top1"]]
        before = None
        if name in refits:
            before = r.curves["test_top1"][at][k]
        out[name] = ReadoutResult(
            spec=r.spec,
            head=finals[name],
            test=test,
            selection_top1=float(r.best_score[k]),
            blr=r.blrs[k],
            lr=r.lrs[k],
            epoch=r.best_epoch[k],
            curves=curves,
            movement=movement,
            refit=name in refits,
            test_top1_before_refit=before,
            health=health(
                pool=name,
                grid=list(cfg.lr_grid),
                chosen=k,
                diverged=[b for b, ok in zip(r.blrs, r.finite.tolist(), strict=True) if not ok],
                selection_curve=sel_curve,
                epochs_evaluated=epochs,
                best_epoch=r.best_epoch[k],
                train_top1=r.curves["train_top1"][at][k],
                chance=chance,
                movement=movement,
                movement_budget=budget,
                selection_top1=float(r.best_score[k]) if selection is not test_split else None,
                test_top1=test.top1,
                selected_on=selection.name,
                **sizes,
            ),
        )
    return out


def _curves(r: BankRun, selection: str) -> dict[str, dict[str, Any]]:
    """Per grid value (key: the blr as `%g`): blr, lr, diverged and every curve of that head."""
    out = {}
    names = [n for n in r.curves if n != "epoch"]
    for k, (blr, lr) in enumerate(zip(r.blrs, r.lrs, strict=True)):
        entry: dict[str, Any] = {
            "blr": blr,
            "lr": lr,
            "diverged": not bool(r.finite[k]),
            "epoch": list(r.curves["epoch"]),
        }
        for n in names:
            entry[n] = [row[k] for row in r.curves[n]]
        out[f"{blr:g}"] = entry
    return out


@torch.no_grad()
def pooled_features(
    split: Split,
    spec: HeadSpec,
    *,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The read-out vector of every row of a split (view 0, or the epoch-0 view for training rows)."""
    feats, labels = [], []
    for batch in iter_batches(split, keys, 4096):
        tokens = to_tokens(batch, device, norm)
        if spec.pool == "cls":
            f = tokens.cls
        elif spec.pool == "mean":
            f = tokens.patch_mean()
        else:
            f = torch.cat([tokens.cls, tokens.patch_mean()], dim=-1)
        feats.append(f.to(dtype))
        labels.append(batch["labels"].to(device).long())
    return torch.cat(feats), torch.cat(labels)


def _train_logreg(
    fit_split: Split,
    selection: Split,
    test_split: Split,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    *,
    chance: float,
    sizes: dict[str, int],
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
) -> dict[str, ReadoutResult]:
    dtype = torch.float32 if device.type == "cuda" else torch.float64  # scikit-learn fits in float64
    dim = fit_split.source.dim
    out: dict[str, ReadoutResult] = {}
    all_rows = torch.sort(
        torch.cat([fit_split.rows, selection.rows]) if selection is not test_split else fit_split.rows
    ).values
    for spec in specs:
        get = {"keys": keys, "device": device, "norm": norm, "dtype": dtype}
        x_fit, y_fit = pooled_features(fit_split, spec, **get)
        x_sel, y_sel = pooled_features(selection, spec, **get)
        x_test, y_test = pooled_features(test_split, spec, **get)
        mean, var = logreg.standardise(x_fit)
        z_fit, z_sel, z_test = (logreg.standardised(x, mean, var) for x in (x_fit, x_sel, x_test))
        fits = logreg.sweep(z_fit, y_fit, z_sel, y_sel, num_classes, cfg.c_grid, max_iter=cfg.max_iter)
        k = pick(
            [f.selection_top1 for f in fits],
            [f.selection_loss for f in fits],
            [True] * len(fits),
            what=f"logreg {spec.name}",
        )
        best = fits[k]
        head_mean, head_var = mean, var
        before = None
        if cfg.refit:
            before = logreg.score(best, z_test, y_test)[0]
            split = Split("train", fit_split.source, all_rows, fit_split.memory)
            x_all, y_all = pooled_features(split, spec, **get)
            head_mean, head_var = logreg.standardise(x_all)
            best = logreg.fit_logreg(
                logreg.standardised(x_all, head_mean, head_var),
                y_all,
                num_classes,
                best.C,
                max_iter=cfg.max_iter,
                init=(best.weight, best.bias),
            )
        head = logreg.to_head(spec, best, head_mean.float().cpu(), head_var.float().cpu(), dim)
        bank = load_heads(spec, [head], dim, num_classes).to(device)
        test = evaluate(
            [(bank, None)],
            test_split,
            keys,
            batch_size=4096,
            device=device,
            norm=norm,
            num_classes=num_classes,
        )[0][0]
        sweep = [
            {
                "C": f.C,
                f"{selection.name}_top1": f.selection_top1,
                f"{selection.name}_loss": f.selection_loss,
                "test_top1": logreg.score(f, z_test, y_test)[0],
                "iterations": f.iterations,
                "converged": f.converged,
            }
            for f in fits
        ]
        checks = health(
            pool=spec.name,
            grid=[f.C for f in fits],
            chosen=k,
            diverged=[],
            selection_curve=None,
            epochs_evaluated=[],
            best_epoch=0,
            train_top1=logreg.score(best, logreg.standardised(x_fit, head_mean, head_var), y_fit)[0],
            chance=chance,
            movement=None,
            movement_budget=None,
            selection_top1=fits[k].selection_top1 if selection is not test_split else None,
            test_top1=test.top1,
            selected_on=selection.name,
            grid_name="--c-grid",
            **sizes,
        )
        if not best.converged:
            checks.append(
                Check(
                    "not_converged",
                    "warning",
                    f"{spec.name}: L-BFGS stopped at --max-iter {cfg.max_iter} before converging "
                    f"(C = {best.C:g})",
                    "raise --max-iter",
                )
            )
        out[spec.name] = ReadoutResult(
            spec=spec,
            head=head,
            test=test,
            selection_top1=fits[k].selection_top1,
            C=best.C,
            sweep=sweep,
            health=checks,
            refit=cfg.refit,
            test_top1_before_refit=before,
        )
    return out
