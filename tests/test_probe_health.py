"""Probe health: every check fires on the situation it names, and stays quiet on a healthy run."""

from __future__ import annotations

import pytest
import torch

from vitprobe.errors import ProbeError
from vitprobe.probe import ProbeConfig, train_probes
from vitprobe.probe.selection import health
from vitprobe.sources import MemorySource


def blobs(n: int, *, classes: int = 4, dim: int = 8, seed: int = 0, noise: float = 1.0) -> MemorySource:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(n) % classes
    cls = means[labels] + noise * torch.randn(n, dim, generator=g)
    return MemorySource({"cls": cls, "labels": labels})


def run(train: MemorySource, test: MemorySource, protocol: str = "auto", **kw: object):
    base = {
        "pools": ("cls",),
        "epochs": 20,
        "min_steps": 0,
        "batch_size": 32,
        "eval_every": 1,
        "weight_decay": (0.0,),
    }
    cfg = ProbeConfig.from_protocol(protocol, **({**base, **kw} if protocol == "auto" else kw))
    return train_probes(train, test, cfg, [cfg.head_spec("cls")], keys=["cls"]).readouts["cls"]


def codes(readout) -> set[str]:
    return {c.code for c in readout.health}


def test_a_healthy_run_has_no_warning() -> None:
    r = run(blobs(400), blobs(200, seed=1), lr_grid=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0))
    assert r.verdict == "ok", [c.text() for c in r.health]
    assert r.test.top1 > 0.9 and r.movement is not None and r.movement > 1


def test_lr_at_the_top_of_the_grid_and_an_unmoved_head_are_flagged() -> None:
    r = run(blobs(400), blobs(200, seed=1), lr_grid=(1e-6, 2e-6))
    assert {"grid_edge_high", "under_trained"} <= codes(r) and r.verdict == "warning"
    edge = next(c for c in r.health if c.code == "grid_edge_high")
    assert "extend --lr-grid upward" in edge.fix and "4e-06" in edge.fix
    assert r.movement < 1


def test_a_grid_where_every_lr_diverges_is_refused() -> None:
    with pytest.raises(ProbeError, match="every learning rate diverged") as info:
        run(blobs(400), blobs(200, seed=1), lr_grid=(1e30, 1e33))
    assert "lower the --lr-grid" in info.value.hint


def test_diverged_lrs_are_never_selected() -> None:
    r = run(blobs(400), blobs(200, seed=1), lr_grid=(1.0, 1e30))  # loss ~1e27: blown up
    assert r.blr == 1.0 and "diverged" in codes(r)
    assert r.curves["1e+30"]["diverged"] is True and r.curves["1"]["diverged"] is False
    assert all(v is None for v in r.curves["1e+30"]["test_top1"][1:])


def test_the_paper_recipe_on_a_small_set_is_flagged_as_too_few_steps() -> None:
    """MAE's LARS recipe (blr 0.1, 90 epochs) on 400 rows: one step an epoch, the head barely moves."""
    r = run(blobs(400), blobs(200, seed=1), protocol="mae", pools=("cls",))
    assert "too_few_steps" in codes(r) and r.verdict == "warning"


def test_features_without_signal_are_flagged_as_training_at_chance() -> None:
    labels = torch.arange(400) % 4
    train = MemorySource({"cls": torch.zeros(400, 8), "labels": labels})  # constant: BatchNorm makes it 0
    test = MemorySource({"cls": torch.zeros(200, 8), "labels": torch.arange(200) % 4})
    r = run(train, test, lr_grid=(0.1,), epochs=5)
    assert "train_near_chance" in codes(r)


def test_a_test_set_unlike_the_holdout_is_flagged() -> None:
    """Test labels rotated by one class: the holdout says ~100 %, the test says ~0 %."""
    test = blobs(200, seed=1)
    test.labels = (test.labels + 1) % 4
    test.tensors["labels"] = test.labels
    r = run(blobs(400), test, lr_grid=(1.0,))
    assert "holdout_test_gap" in codes(r)


def test_a_tiny_holdout_is_flagged() -> None:
    r = run(blobs(40), blobs(40, seed=1), lr_grid=(1.0,))  # 10 % of 10 images per class: 4 holdout images
    assert "small_holdout" in codes(r)


def common(**kw: object) -> dict:
    base = dict(
        pool="cls",
        grid=[0.1, 1.0, 10.0],
        chosen=1,
        diverged=[],
        selection_curve=None,
        epochs_evaluated=[],
        best_epoch=0,
        train_top1=0.9,
        chance=0.25,
        movement=5.0,
        movement_budget=None,
        selection_top1=0.9,
        test_top1=0.9,
        selection_rows=500,
        test_rows=500,
        selected_on="holdout",
    )
    return {**base, **kw}


def test_a_selection_curve_still_rising_at_the_end_is_not_converged() -> None:
    epochs = list(range(1, 21))
    rising = [0.5 + 0.02 * e for e in epochs]
    checks = health(**common(selection_curve=rising, epochs_evaluated=epochs, best_epoch=20))
    assert [c.code for c in checks] == ["not_converged"]
    assert "raise --epochs or --min-steps" in checks[0].fix
    plateau = [min(0.5 + 0.05 * e, 0.8) for e in epochs[:-1]] + [0.8 + 1 / 1000]  # flat for the last half
    assert health(**common(selection_curve=plateau, epochs_evaluated=epochs, best_epoch=20)) == []
    # one more image of a 79-image holdout at the end, as float32 accuracies (50/79 -> 51/79): not a rise
    one = [float(torch.tensor(50 / 79, dtype=torch.float32))] * 19 + [float(torch.tensor(51 / 79))]
    assert one[-1] - one[0] > 1 / 79  # the rounding that used to fire the check
    small = {"epochs_evaluated": epochs, "best_epoch": 20, "selection_rows": 79}
    assert health(**common(selection_curve=one, **small)) == []
    two = one[:-1] + [float(torch.tensor(52 / 79))]  # two more images: still rising
    checks = health(**common(selection_curve=two, **small))
    assert [c.code for c in checks] == ["not_converged"]


def test_every_check_says_what_to_run_instead() -> None:
    checks = health(
        **common(
            grid=[0.1, 1.0],
            chosen=1,
            diverged=[10.0],
            train_top1=0.26,
            movement=0.1,
            selection_top1=0.95,
            test_top1=0.5,
            selection_rows=12,
        )
    )
    assert {c.code for c in checks} == {
        "grid_edge_high",
        "diverged",
        "under_trained",
        "train_near_chance",
        "holdout_test_gap",
        "small_holdout",
    }
    assert all(c.message.startswith("cls: ") and c.fix for c in checks)
