"""The gradient protocols (auto, mae, ep): each read-out's bank trained, its head chosen, tested, checked."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.choices import LOGREG_POOL
from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.probe.bank import load_heads
from vitprobe.probe.baseline import (
    MAX_FEATURES,
    RIDGE_GRID,
    RidgeAccumulator,
    RidgeBaseline,
    RidgeScorer,
    choose,
)
from vitprobe.probe.engine import BankRun, NonFiniteTokens, evaluate, fit, make_run
from vitprobe.probe.logreg import readout_batches
from vitprobe.probe.outcome import ReadoutResult
from vitprobe.probe.protocols import ProbeConfig, Schedule, lr_factor
from vitprobe.probe.selection import Check, health, lars_budget, pick
from vitprobe.probe.validate import refuse_nonfinite
from vitprobe.tokens import Split

if TYPE_CHECKING:
    from rich.console import Console


def train_gradient(
    fit_split: Split,
    full_split: Split,
    selection: Split | None,
    test_split: Split,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    schedule: Schedule,
    *,
    seed: int,
    chance: float,
    sizes: dict[str, int],
    console: Console | None,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    positions: dict[str, int | None],
    blocks: int,
) -> dict[str, ReadoutResult]:
    """Train one bank per read-out on `fit_split`, choose each read-out's head on `selection` (None: no
    image to select on — the middle of the grid at the last epoch), refit on `full_split` if asked, test.

    `positions[name]`: the read-out's position on the batches' block axis (`train_probes`); `blocks`: the
    length of that axis (1 without one)."""
    dim = fit_split.source.dim
    blrs = [blr for blr, _ in cfg.grid]  # head k of every bank: (base lr, weight decay) = cfg.grid[k]
    wds = [wd for _, wd in cfg.grid]
    lrs = [cfg.lr(blr, schedule.batch_size) for blr in blrs]
    common = {
        "keys": keys,
        "device": device,
        "norm": norm,
        "num_classes": num_classes,
        "seed": seed,
        "amp": cfg.amp,
        "shuffle_shards": cfg.shuffle_shards,
    }
    runs = [
        make_run(
            spec,
            blrs,
            lrs,
            wds=wds,
            dim=dim,
            num_classes=num_classes,
            seed=seed,
            optimizer=cfg.optimizer_spec,
            stop_epoch=schedule.epochs,
            device=device,
            layer=positions.get(spec.name),
            blocks=blocks,
            select_last=cfg.select_epoch == "last",
        )
        for spec in specs
    ]
    # selecting on test evaluates it once; without a holdout, only the test curve is recorded
    evals = [test_split] if selection is None or selection is test_split else [selection, test_split]
    try:
        fit(
            runs,
            fit_split,
            evals,
            schedule,
            select=selection.name if selection else None,
            console=console,
            description=f"{len(runs) * len(lrs)} heads × {schedule.epochs} epochs",
            check_finite=fit_split.memory is None,
            **common,
        )  # loaded tokens were checked when loaded
    except NonFiniteTokens:
        refuse_nonfinite(fit_split.source, keys, None)  # names the rows
        raise

    chosen: dict[str, tuple[BankRun, int]] = {}
    for r in runs:
        usable = [s is not None and bool(ok) for s, ok in zip(r.best_states, r.finite.tolist(), strict=True)]
        if selection is None:  # nothing to select on: the middle lr of the grid, the first weight decay
            middle = cfg.lr_grid[len(cfg.lr_grid) // 2]
            distance = [
                -abs(cfg.lr_grid.index(b) - cfg.lr_grid.index(middle)) - cfg.weight_decay.index(w)
                for b, w in cfg.grid
            ]
            k = pick(distance, [0.0] * len(lrs), usable, what=r.spec.name)
        else:
            k = pick(r.best_score.tolist(), r.best_loss.tolist(), usable, what=f"read-out {r.spec.name}")
        chosen[r.spec.name] = (r, k)

    finals: dict[str, ProbeHead] = {}
    for name, (r, k) in chosen.items():
        finals[name] = build_head(r.spec, dim, num_classes, blocks=blocks)
        finals[name].load_state_dict(r.best_states[k])
    if cfg.refit:  # ProbeConfig refuses --refit with --select-on test
        refits = {
            name: make_run(
                r.spec,
                (r.blrs[k],),
                (r.lrs[k],),
                wds=(r.wds[k],),
                dim=dim,
                num_classes=num_classes,
                seed=seed,
                optimizer=cfg.optimizer_spec,
                stop_epoch=r.best_epoch[k],
                device=device,
                layer=r.layer,
                blocks=blocks,
            )
            for name, (r, k) in chosen.items()
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
        for name, refit in refits.items():
            finals[name].load_state_dict(refit.best_states[0])
    banks = [
        (
            load_heads(chosen[n][0].spec, [h.eval()], dim, num_classes, blocks=blocks).to(device),
            chosen[n][0].layer,
        )
        for n, h in finals.items()
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

    references = {}
    if selection is not None and selection is not test_split:  # λ needs rows of its own to be chosen on
        pooled = {n: (r.spec, r.layer) for n, (r, _) in chosen.items() if r.spec.pool in LOGREG_POOL.values}
        references = ridge_baselines(
            pooled, fit_split, selection, test_split,
            blocks=blocks, batch_size=max(schedule.batch_size, 1024),
            keys=keys, device=device, norm=norm, num_classes=num_classes,
        )  # fmt: skip
    out: dict[str, ReadoutResult] = {}
    for (name, (r, k)), metrics in zip(chosen.items(), tested, strict=True):
        test = metrics[0]
        epochs = r.curves["epoch"]
        at = epochs.index(r.best_epoch[k])
        w, w0 = r.best_states[k]["linear.weight"].cpu(), r.init_weight[k].cpu()
        movement = float((w - w0).norm() / w0.norm().clamp(min=1e-12))
        budget = None
        if cfg.optimizer == "lars":
            factors = sum(lr_factor(t, schedule) for t in range(r.best_epoch[k] * schedule.steps_per_epoch))
            budget = lars_budget(r.lrs[k], factors, momentum=cfg.momentum)
        selection_top1 = float(r.best_score[k]) if selection is not None else None
        chosen_lr, chosen_wd = cfg.lr_grid.index(r.blrs[k]), cfg.weight_decay.index(r.wds[k])
        checks = health(
            pool=name,
            grid=list(cfg.lr_grid) if selection is not None else [r.blrs[k]],  # no choice, no grid edge
            chosen=chosen_lr if selection is not None else 0,
            wd_grid=list(cfg.weight_decay) if selection is not None else None,
            wd_chosen=chosen_wd,
            diverged=[
                _label(b, w, cfg) for b, w, ok in zip(r.blrs, r.wds, r.finite.tolist(), strict=True) if not ok
            ],
            selection_curve=[row[k] for row in r.curves[f"{selection.name}_top1"]] if selection else None,
            epochs_evaluated=epochs,
            best_epoch=r.best_epoch[k],
            train_top1=r.curves["train_top1"][at][k],
            chance=chance,
            movement=movement,
            movement_budget=budget,
            selection_top1=selection_top1 if selection is not test_split else None,
            test_top1=test.top1,
            selected_on=selection.name if selection else "none",
            baseline_top1=references[name].test_top1 if name in references else None,
            **sizes,
        )
        if selection is None:
            checks.append(no_holdout_check(name, f"base lr {r.blrs[k]:g}"))
        out[name] = ReadoutResult(
            spec=r.spec,
            head=finals[name].eval(),
            test=test,
            selection_top1=selection_top1,
            blr=r.blrs[k],
            lr=r.lrs[k],
            weight_decay=r.wds[k],
            epoch=r.best_epoch[k],
            curves=_curves(r, cfg),
            movement=movement,
            refit=cfg.refit,
            test_top1_before_refit=r.curves["test_top1"][at][k] if cfg.refit else None,
            baseline_top1=references[name].test_top1 if name in references else None,
            health=checks,
        )
    return out


@torch.no_grad()
def ridge_baselines(
    readouts: dict[str, tuple[HeadSpec, int | None]],
    fit_split: Split,
    selection: Split,
    test_split: Split,
    *,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    blocks: int,
    batch_size: int,
) -> dict[str, RidgeBaseline]:
    """The ridge reference (`vitprobe.probe.baseline`) of each pooled read-out (name -> (spec, position on
    the batches' block axis)): one pass over the fit rows for the statistics, one over the selection and
    test rows to score every λ. Read-outs wider than MAX_FEATURES are left out."""
    if not readouts:
        return {}
    dim = fit_split.source.dim
    modules = {  # parameter-free read-outs, each at its block position
        n: (build_head(spec, dim, 2, blocks=blocks).readout.to(device).eval(), layer)
        for n, (spec, layer) in readouts.items()
    }

    def features(split: Split) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return readout_batches(split, modules, keys=keys, device=device, norm=norm, batch_size=batch_size)

    stats: dict[str, RidgeAccumulator] = {}
    for feats, labels in features(fit_split):
        for n, f in feats.items():
            if f.shape[1] <= MAX_FEATURES:
                stats.setdefault(n, RidgeAccumulator(f.shape[1], num_classes, device)).add(f, labels)
    fitted = {n: a.classifiers(RIDGE_GRID) for n, a in stats.items()}
    scores = {}
    for split in (selection, test_split):
        scorers = {n: RidgeScorer(*fitted[n]) for n in fitted}
        for feats, labels in features(split):
            for n, scorer in scorers.items():
                scorer.add(feats[n], labels)
        scores[split.name] = {n: s.top1() for n, s in scorers.items()}
    return {n: choose(scores[selection.name][n], scores[test_split.name][n], RIDGE_GRID) for n in fitted}


def no_holdout_check(pool: str, value: str) -> Check:
    """The warning of a low-shot subset too small to select on."""
    return Check(
        "no_holdout",
        "warning",
        f"{pool}: every class has a single train image, so nothing could be held out to choose the lr or "
        f"epoch; {value} and the last epoch are reported unselected",
        "use more --shots (2 or more per class), or give one value with --lr-grid (--c-grid) to choose it",
    )


def _label(blr: float, wd: float, cfg: ProbeConfig) -> str:
    """A head's key in the curves: the base lr as `%g`, plus `,wd=%g` when several weight decays train."""
    return f"{blr:g}" if len(cfg.weight_decay) == 1 else f"{blr:g},wd={wd:g}"


def _curves(r: BankRun, cfg: ProbeConfig) -> dict[str, dict[str, Any]]:
    """Per head (key: `_label`): blr, lr, weight decay, diverged and every curve of that head."""
    out = {}
    names = [n for n in r.curves if n != "epoch"]
    for k, (blr, lr, wd) in enumerate(zip(r.blrs, r.lrs, r.wds, strict=True)):
        entry: dict[str, Any] = {
            "blr": blr,
            "lr": lr,
            "weight_decay": wd,
            "diverged": not bool(r.finite[k]),
            "epoch": list(r.curves["epoch"]),
        }
        for n in names:
            entry[n] = [row[k] for row in r.curves[n]]
        out[_label(blr, wd, cfg)] = entry
    return out
