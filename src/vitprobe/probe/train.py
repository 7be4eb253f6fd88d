"""Training probes from token sources: every read-out × learning rate (or C) in one pass, selected, tested.

`train_probes` is the library core of `vitprobe probe`: it loads (or streams) the tokens once, draws the
train rows of each trial (all of them, or a low-shot subset per seed), carves the holdout, plans the
schedule, and hands each trial to the gradient protocols (`gradient.train_gradient`) or to logistic
regression (`logreg.train_logreg`). It reads tokens only through `vitprobe.tokens`; `runs.run_probe` turns
its outcome into results.json and saved heads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec
from vitprobe.probe import gradient, logreg, lowshot
from vitprobe.probe.outcome import ProbeOutcome, ReadoutResult
from vitprobe.probe.protocols import ProbeConfig, plan_schedule
from vitprobe.probe.selection import holdout_fraction, stratified_holdout
from vitprobe.probe.validate import check_labels, refuse_nonfinite
from vitprobe.sources import TokenSource
from vitprobe.tokens import Split, load_whole, memory_budget, pooled_source

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["ProbeOutcome", "ReadoutResult", "load_decision", "train_probes"]


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
    positions: dict[str, int | None] | None = None,
    blocks: int = 1,
) -> ProbeOutcome:
    """Train, select, optionally refit and test every read-out of `specs` on the sources.

    Sources of several blocks have a block axis (B, L, ...) of `blocks` blocks; `positions` gives each
    single-block read-out's position on it (None or absent: the batch has one block, or the read-out reads
    them all)."""
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
    if in_memory:  # streamed tokens are checked batch by batch while training (fit's check_finite)
        refuse_nonfinite(train_src, keys, train_memory)
        refuse_nonfinite(test_src, keys, test_memory)
    test_split = Split("test", test_src, torch.arange(test_src.num_rows), test_memory)
    all_rows = torch.arange(train_src.num_rows)
    trial = {
        "train_src": train_src,
        "train_memory": train_memory,
        "test_split": test_split,
        "cfg": cfg,
        "specs": specs,
        "keys": keys,
        "norm": norm,
        "device": device,
        "console": console,
        "positions": positions or {},
        "blocks": blocks,
    }
    if not cfg.lowshot:
        outcome = _trial(rows=all_rows, seed=cfg.seed, **trial)
    else:
        seeds = [cfg.seed + s for s in range(cfg.seeds)]
        outcomes = []
        for seed in seeds:
            rows, notes = lowshot.subset(
                train_src.labels, train_src.indices, shots=cfg.shots, fraction=cfg.train_fraction, seed=seed
            )
            outcomes.append(_trial(rows=rows, seed=seed, **trial))
            outcomes[-1].selection["warnings"] += notes
        outcome = lowshot.combine(outcomes, seeds)
        outcome.selection["lowshot"] = {
            "shots": cfg.shots,
            "train_fraction": cfg.train_fraction,
            "seeds": seeds,
            "train_rows": [o.selection["train_rows"] for o in outcomes],
            "holdout_rows": [o.selection["holdout_rows"] for o in outcomes],
        }
    outcome.timing.update(
        {
            "seconds": time.perf_counter() - start,
            "load": load,
            "in_memory": in_memory,
            "store_device": str(store),
            "pinned": pin,
            "pooled_features": pooled and cfg.load != "stream",
            "device": str(device),
            "heads": len(specs) * (len(cfg.c_grid) if cfg.protocol == "logreg" else len(cfg.grid)),
        }
    )
    return outcome


def _trial(
    *,
    rows: torch.Tensor,
    seed: int,
    train_src: TokenSource,
    train_memory: dict[str, torch.Tensor] | None,
    test_split: Split,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    keys: Sequence[str],
    norm: dict[str, Any] | None,
    device: torch.device,
    console: Console | None,
    positions: dict[str, int | None],
    blocks: int,
) -> ProbeOutcome:
    """One training of every read-out on the train `rows` (all of them, or a low-shot subset)."""
    selection: Split | None
    fraction = cfg.holdout
    if cfg.select_on == "holdout":
        labels, groups = train_src.labels[rows], train_src.indices[rows]
        if not cfg.lowshot:  # low-shot subsets hold out --holdout of each class, at least one image
            fraction = holdout_fraction(labels, groups, cfg.holdout, cfg.min_holdout)
        fit_pos, held_pos = stratified_holdout(labels, groups, fraction, seed, at_least_one=cfg.lowshot)
        fit_rows, held_rows = rows[fit_pos], rows[held_pos]
        if len(held_rows) == 0 and not cfg.lowshot:  # selection on nothing would pick the first candidate
            images = len(torch.unique(train_src.indices))
            raise ProbeError(
                f"--holdout {cfg.holdout:g} holds out no image: the train cache has {images} images in "
                f"{train_src.num_classes} classes, and {cfg.holdout:g} of each class rounds to 0 "
                "(a class keeps at least one image for training)",
                "pass a larger --holdout (e.g. 0.2), or --select-on test (optimistic)",
            )
        selection = Split("holdout", train_src, held_rows, train_memory) if len(held_rows) else None
    else:
        fit_rows, held_rows = rows, rows[:0]
        selection = test_split
    warnings = check_labels(train_src, fit_rows, test_split.source)
    fit_images = len(torch.unique(train_src.indices[fit_rows]))
    if cfg.select_on == "holdout" and not cfg.lowshot and fit_images < 5 * train_src.num_classes:
        raised = f", raised from --holdout {cfg.holdout:g} by --min-holdout" if fraction > cfg.holdout else ""
        held_images = len(torch.unique(train_src.indices[held_rows]))
        warnings.append(
            f"the holdout ({fraction:g} of each class{raised}) leaves {fit_images} train images for "
            f"{train_src.num_classes} classes (and holds out {held_images}): the heads learn from very few "
            "rows; a smaller --holdout (default 0.1) or --min-holdout 0 trains on more"
        )
    fit_split = Split("train", train_src, fit_rows, train_memory)
    labels = train_src.labels[fit_split.epoch_rows(0)]
    chance = float(torch.bincount(labels).max()) / max(len(labels), 1)
    sizes = {
        "selection_rows": len(selection.epoch_rows(None)) if selection is not None else 0,
        "test_rows": len(test_split.epoch_rows(None)),
    }
    common = {
        "keys": keys,
        "device": device,
        "norm": norm,
        "num_classes": train_src.num_classes,
        "positions": positions,
        "blocks": blocks,
    }
    schedule = None
    if cfg.protocol == "logreg":
        readouts = logreg.train_logreg(
            fit_split, selection, test_split, cfg, specs, seed=seed, chance=chance, sizes=sizes, **common
        )
    else:
        schedule = plan_schedule(cfg, len(fit_split.epoch_rows(0)))
        if cfg.warmup_epochs >= schedule.epochs:
            warnings.append(
                f"--warmup-epochs {cfg.warmup_epochs:g} is as long as the {schedule.epochs} epochs run: the "
                "lr rises for the whole run and never decays; use a warm-up shorter than --epochs"
            )
        readouts = gradient.train_gradient(
            fit_split,
            Split("train", train_src, rows, train_memory),
            selection,
            test_split,
            cfg,
            specs,
            schedule,
            seed=seed,
            chance=chance,
            sizes=sizes,
            console=console,
            **common,
        )
    return ProbeOutcome(
        readouts=readouts,
        selection={
            "split": cfg.select_on if selection is not None else "none",
            "rule": _rule(cfg, selection),
            "optimistic": cfg.select_on == "test",
            "train_rows": len(fit_rows),
            "holdout_rows": len(held_rows),
            "holdout_fraction": fraction if cfg.select_on == "holdout" else None,
            "test_rows": test_split.source.num_rows,
            "batch_size": schedule.batch_size if schedule else None,
            "refit": cfg.refit,
            "warnings": warnings,
        },
        schedule=schedule,
        timing={},
    )


def _rule(cfg: ProbeConfig, selection: Split | None) -> str:
    if selection is None:
        return (
            "no image could be held out (every class has one train image): the middle of the grid and "
            "the last epoch are reported, unselected"
        )
    epochs = "at the last epoch of each head" if cfg.select_epoch == "last" else "and epochs"
    if cfg.protocol == "logreg":
        epochs = "of C"
    if cfg.select_on == "holdout":
        return (
            f"max top-1 over the grid ({epochs}) on a stratified holdout of the train rows, ties to the "
            "lower holdout loss; test reported at that choice"
        )
    return f"max test top-1 over the grid ({epochs}): optimistic, as papers that report the best test epoch"
