"""Selection and probe health: the holdout split, which head is reported, and whether to trust it.

`stratified_holdout` carves the selection split from the train rows; `pick` chooses a read-out's head among
its learning rates; `health` checks a chosen head and says, for each problem, what to run instead. A head
with a warning is never shown as a clean number (terminal, results.json, report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from vitprobe.errors import ProbeError
from vitprobe.probe.baseline import shortfall_margin

UNDER_TRAINED_MOVEMENT = 1.0  # a trained Linear moves at least its own initial norm (init std 0.01)
NEAR_CHANCE = 0.05  # training top-1 within this of the majority-class rate: nothing was learnt
MIN_HOLDOUT_ROWS = 30  # fewer holdout images than this make the lr / epoch choice noise
MAX_AUTO_HOLDOUT = 0.3  # --min-holdout raises the holdout fraction at most to this
DIVERGED_LOSS = 100.0  # a mean training loss above this × ln(classes) (a uniform guess) has blown up


@dataclass(frozen=True)
class Check:
    """One health finding: `code` for machines, `message` and `fix` for people."""

    code: str
    severity: str  # "warning": the number is not trustworthy as is; "note": worth knowing
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def text(self) -> str:
        return f"{self.message} — fix: {self.fix}"


def stratified_holdout(
    labels: torch.Tensor, groups: torch.Tensor, fraction: float, seed: int, *, at_least_one: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows into (train, holdout) positions, holding out `fraction` of each class's groups.

    Groups are dataset indices, so the views of one image never straddle the split. Each class keeps at
    least one group on the train side; with `at_least_one` (low-shot subsets) every class that has two
    groups gives at least one to the holdout.
    """
    generator = torch.Generator().manual_seed(seed)
    uniq, first = _first_occurrence(groups)
    group_labels = labels[first]
    held = []
    for c in torch.unique(group_labels).tolist():
        members = uniq[group_labels == c]
        count = _held_count(fraction, len(members), at_least_one)
        if count > 0:
            held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held_groups = torch.cat(held) if held else groups[:0]
    is_held = torch.isin(groups, held_groups)
    positions = torch.arange(len(labels))
    return positions[~is_held], positions[is_held]


def holdout_fraction(
    labels: torch.Tensor,
    groups: torch.Tensor,
    fraction: float,
    min_images: int,
    *,
    cap: float = MAX_AUTO_HOLDOUT,
) -> float:
    """`fraction`, or the smallest whole percent above it (up to `cap`) whose stratified holdout holds at
    least `min_images` images; `cap` when none does. It depends on the class sizes only, not on the seed."""
    _, first = _first_occurrence(groups)
    sizes = torch.bincount(labels[first]).tolist()
    sizes = [m for m in sizes if m > 0]

    def held(f: float) -> int:
        return sum(_held_count(f, m, at_least_one=False) for m in sizes)

    if min_images <= 0 or held(fraction) >= min_images or fraction >= cap:
        return fraction
    for percent in range(math.floor(100 * fraction) + 1, math.floor(100 * cap + 1e-9) + 1):  # whole percents
        if held(percent / 100) >= min_images:
            return percent / 100
    return cap


def _held_count(fraction: float, groups: int, at_least_one: bool) -> int:
    """How many of a class's `groups` the stratified holdout takes: `fraction` of them rounded, at least
    one with `at_least_one`, and never all of them."""
    count = round(fraction * groups)
    return min(max(count, 1) if at_least_one else count, groups - 1)


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values and the position of each one's first occurrence."""
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniq),), len(values), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return uniq, first


def pick(scores: Sequence[float], losses: Sequence[float], usable: Sequence[bool], *, what: str) -> int:
    """Index of the best candidate: highest score, then lowest loss, then the first (grid order)."""
    candidates = [i for i, ok in enumerate(usable) if ok]
    if not candidates:
        raise ProbeError(
            f"{what}: every learning rate diverged (the training loss became inf/NaN)",
            "lower the --lr-grid, or check the cache for inf/NaN tokens",
        )
    return min(candidates, key=lambda i: (-scores[i], losses[i], i))


def _binomial_gap(p: float, n_a: int, n_b: int) -> float:
    """Three standard errors of the difference of two accuracies near p on n_a and n_b samples."""
    p = min(max(p, 0.01), 0.99)
    return 3 * math.sqrt(p * (1 - p) * (1 / max(n_a, 1) + 1 / max(n_b, 1)))


def health(
    *,
    pool: str,
    grid: Sequence[float],
    chosen: int,
    diverged: Sequence[float | str],
    selection_curve: Sequence[float | None] | None,
    epochs_evaluated: Sequence[int],
    best_epoch: int,
    train_top1: float | None,
    chance: float,
    movement: float | None,
    movement_budget: float | None,
    selection_top1: float | None,
    test_top1: float,
    selection_rows: int,
    test_rows: int,
    selected_on: str,
    grid_name: str = "--lr-grid",
    wd_grid: Sequence[float] | None = None,
    wd_chosen: int = 0,
    baseline_top1: float | None = None,
) -> list[Check]:
    """Every finding about one read-out's chosen head (see docs/probing.md, "Probe health")."""
    checks: list[Check] = []

    def add(code: str, severity: str, message: str, fix: str) -> None:
        checks.append(Check(code, severity, f"{pool}: {message}", fix))

    what, value = ("base lr" if grid_name == "--lr-grid" else grid_name[2:]), grid[chosen]
    if len(grid) > 1 and value == max(grid):
        add(
            "grid_edge_high",
            "warning",
            f"the chosen {what} {value:g} is the largest in the grid; the optimum may lie above it",
            f"extend {grid_name} upward (e.g. add {value * 2:g},{value * 5:g})",
        )
    elif len(grid) > 1 and value == min(grid):
        add(
            "grid_edge_low",
            "warning",
            f"the chosen {what} {value:g} is the smallest in the grid; the optimum may lie below it",
            f"extend {grid_name} downward (e.g. add {value / 5:g},{value / 2:g})",
        )
    if wd_grid is not None and len(wd_grid) > 1 and max(wd_grid) > 0:
        wd = wd_grid[wd_chosen]
        if wd == max(wd_grid):
            add(
                "grid_edge_high",
                "warning",
                f"the chosen weight decay {wd:g} is the largest in the grid; the optimum may lie above it",
                f"extend --weight-decay upward (e.g. add {wd * 10:g})",
            )
        elif wd == min(wd_grid) and wd > 0:
            add(
                "grid_edge_low",
                "warning",
                f"the chosen weight decay {wd:g} is the smallest in the grid; the optimum may lie below it",
                f"extend --weight-decay downward (e.g. add 0,{wd / 10:g})",
            )
    if diverged:
        add(
            "diverged",
            "note",
            f"{what} {', '.join(v if isinstance(v, str) else f'{v:g}' for v in diverged)} diverged "
            "(training loss inf/NaN, or above "
            f"{DIVERGED_LOSS:g}x a uniform guess's) and were not selected",
            "nothing to do unless the chosen value is next to them",
        )
    if selection_curve is not None and len(epochs_evaluated) >= 4 and best_epoch == epochs_evaluated[-1]:
        cut = epochs_evaluated[-1] * 0.75
        pairs = zip(epochs_evaluated, selection_curve, strict=True)
        earlier = [v for e, v in pairs if e <= cut and v is not None]
        last = selection_curve[-1]
        # rose by more than one image: accuracies are counts / rows, so compare counts (float32 rounding
        # made a rise of exactly one image, 50 -> 51 of 79, read as more than 1 / 79)
        if earlier and last is not None and (last - max(earlier)) * max(selection_rows, 1) > 1.5:
            add(
                "not_converged",
                "warning",
                f"the best {selected_on} accuracy is at the last epoch ({best_epoch}) and was still rising "
                f"over the last quarter ({100 * max(earlier):.1f} -> {100 * last:.1f} %)",
                "train longer: raise --epochs or --min-steps (or use --protocol auto)",
            )
    if movement_budget is not None and movement_budget < UNDER_TRAINED_MOVEMENT:
        add(
            "too_few_steps",
            "warning",
            f"with LARS this schedule lets the head move at most ~{movement_budget:.2g}x its initial norm "
            "(trust 0.001 x the sum of per-step lrs / (1 - momentum)): too few optimiser steps for this "
            "train set",
            "use --protocol auto, or raise --epochs / --min-steps (or the lr) until the budget is >> 1",
        )
    elif movement is not None and movement < UNDER_TRAINED_MOVEMENT:
        add(
            "under_trained",
            "warning",
            f"the chosen head's Linear moved only {movement:.2g}x its initial norm (|W - W0| / |W0|): it "
            "is close to its random initialisation",
            "use --protocol auto, or raise --epochs / --min-steps or extend --lr-grid upward",
        )
    if train_top1 is not None and train_top1 - chance < NEAR_CHANCE:
        add(
            "train_near_chance",
            "warning",
            f"training accuracy {100 * train_top1:.1f} % is at chance ({100 * chance:.1f} %): the head "
            "learnt nothing",
            "check the cache (labels, tokens) and the lr grid; a random-init backbone can also cause this",
        )
    if baseline_top1 is not None and test_top1 < baseline_top1 - shortfall_margin(baseline_top1, test_rows):
        add(
            "below_baseline",
            "warning",
            f"test top-1 {100 * test_top1:.1f} % is {100 * (baseline_top1 - test_top1):.1f} points below a "
            f"closed-form ridge classifier on the same features ({100 * baseline_top1:.1f} %): the head did "
            "not converge, or its grid missed the good values",
            "use the default protocol (auto), or raise --epochs / --min-steps and widen --lr-grid",
        )
    if selected_on == "holdout" and selection_top1 is not None:
        gap = abs(selection_top1 - test_top1)
        if gap > max(0.05, _binomial_gap(test_top1, selection_rows, test_rows)):
            add(
                "holdout_test_gap",
                "warning",
                f"holdout top-1 {100 * selection_top1:.1f} % and test top-1 {100 * test_top1:.1f} % differ "
                f"by more than sampling noise ({selection_rows} vs {test_rows} images): train and test "
                "differ in distribution, or the holdout is unrepresentative",
                "check that the test cache is the split you mean; a larger --holdout gives a steadier choice",
            )
        if selection_rows < MIN_HOLDOUT_ROWS:
            add(
                "small_holdout",
                "warning",
                f"the holdout has only {selection_rows} images, so the lr / epoch choice is mostly noise",
                "raise --holdout (e.g. 0.4; --min-holdout raises it at most to 0.3), or repeat with other "
                "--seed values to see how far the number moves",
            )
    return checks


def lars_budget(lr: float, factors_sum: float, *, trust: float = 0.001, momentum: float = 0.9) -> float:
    """How far (in multiples of its own norm) LARS can move a weight matrix over a run: each step moves it
    by about trust × lr_t relative to its norm, amplified by 1 / (1 - momentum)."""
    return trust * lr * factors_sum / (1 - momentum)
