"""Low-shot protocols: K images per class (`--shots`) or a fraction of each class (`--train-fraction`).

Each seed draws its own class-stratified subset of the train images (views of an image stay together) and
its own head initialisation; the run trains and selects on each subset as on a full train set (the holdout
is carved from the subset, at least one image of every class that has two), and reports every seed's test
accuracy and their mean ± standard deviation. A subset too small to hold anything out (1-shot) cannot select
an lr or epoch: its heads are trained at the middle of the grid and read at the last epoch, and the result
says so (`no_holdout`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

import torch

from vitprobe.probe.engine import Metrics
from vitprobe.probe.outcome import ProbeOutcome, ReadoutResult
from vitprobe.probe.selection import _first_occurrence


def subset(
    labels: torch.Tensor, groups: torch.Tensor, *, shots: int | None, fraction: float | None, seed: int
) -> tuple[torch.Tensor, list[str]]:
    """Row positions of a class-stratified subset and notes (classes with fewer images than asked).

    `shots`: K groups (images) per class; `fraction`: round(F × n) groups per class, at least one.
    """
    generator = torch.Generator().manual_seed(seed)
    uniq, first = _first_occurrence(groups)
    group_labels = labels[first]
    chosen, short = [], []
    for c in torch.unique(group_labels).tolist():
        members = uniq[group_labels == c]
        want = shots if shots is not None else max(1, round(float(fraction) * len(members)))
        if want > len(members):
            short.append(c)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:want]])
    picked = torch.cat(chosen) if chosen else groups[:0]
    rows = torch.isin(groups, picked).nonzero().flatten()
    notes = []
    if short:
        notes.append(f"{len(short)} classes have fewer than {shots} train images; all of theirs were used")
    return rows, notes


def combine(outcomes: Sequence[ProbeOutcome], seeds: Sequence[int]) -> ProbeOutcome:
    """One outcome whose read-outs report the mean over seeds (first seed's head, curves and choices)."""
    first = outcomes[0]
    readouts = {}
    for name, r in first.readouts.items():
        per_seed = [o.readouts[name] for o in outcomes]
        top1 = [x.test.top1 for x in per_seed]
        mean_per_class = [
            _nanmean([x.test.per_class[c] for x in per_seed]) for c in range(len(r.test.per_class))
        ]
        test = Metrics(
            top1=statistics.fmean(top1),
            top5=statistics.fmean(x.test.top5 for x in per_seed),
            per_class=mean_per_class,
            num_samples=r.test.num_samples,
            loss=statistics.fmean(x.test.loss for x in per_seed),
        )
        checks = [
            replace(c, message=f"seed {s}: {c.message}")
            for s, x in zip(seeds, per_seed, strict=True)
            for c in x.health
        ]
        readouts[name] = replace(
            r,
            test=test,
            health=checks,
            top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0,
            seeds=[
                {
                    "seed": s,
                    "top1": x.test.top1,
                    "top5": x.test.top5,
                    "blr": x.blr,
                    "weight_decay": x.weight_decay,
                    "C": x.C,
                    "epoch": x.epoch,
                    "selection_top1": x.selection_top1,
                    "verdict": x.verdict,
                }
                for s, x in zip(seeds, per_seed, strict=True)
            ],
        )
    return replace(first, readouts=readouts)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


def describe(readout: ReadoutResult) -> str:
    """'72.4 ± 1.3' (percent) for a combined read-out, '72.4' otherwise."""
    top1 = 100 * readout.test.top1
    return f"{top1:.2f} ± {100 * readout.top1_std:.2f}" if readout.seeds else f"{top1:.2f}"
