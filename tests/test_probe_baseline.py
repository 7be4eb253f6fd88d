"""The ridge reference of pooled read-outs: scikit-learn's RidgeClassifier exactly, batch-invariant, and
the health warning it drives fires on an untrained head and stays quiet on a trained one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitprobe.probe import ProbeConfig, train_probes
from vitprobe.probe.baseline import (
    BN_EPS,
    RIDGE_GRID,
    RidgeAccumulator,
    RidgeScorer,
    choose,
    shortfall_margin,
)
from vitprobe.sources import MemorySource


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # real 8x8 images, 64 features, some constant (all-zero) columns
    return torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)


@pytest.mark.parametrize("lam", [1e-3, 1.0, 100.0])
def test_the_ridge_classifier_is_scikit_learns(lam: float) -> None:
    from sklearn.linear_model import RidgeClassifier

    x, y = digits()
    acc = RidgeAccumulator(x.shape[1], 10, torch.device("cpu"))
    acc.add(x, y)
    weights, biases = acc.classifiers((lam,))
    ours = (x @ weights[0] + biases[0]).numpy()  # (n, C) on one-hot {0, 1} targets
    mean, std = x.mean(dim=0), (x.var(dim=0, unbiased=False) + BN_EPS).sqrt()
    z = ((x - mean) / std).numpy()  # the standardisation the head's BatchNorm applies
    ref = RidgeClassifier(alpha=lam * len(x), fit_intercept=True, solver="cholesky").fit(z, y.numpy())
    # scikit-learn regresses onto {-1, 1} targets with alpha on the summed loss: its scores are 2 * ours - 1
    np.testing.assert_allclose(2 * ours - 1, ref.decision_function(z), atol=1e-8)
    assert (ours.argmax(axis=1) == ref.predict(z)).all()


def test_statistics_added_in_batches_equal_one_pass_and_scores_count_correctly() -> None:
    x, y = digits()
    whole, parts = (RidgeAccumulator(64, 10, torch.device("cpu")) for _ in range(2))
    whole.add(x, y)
    for i in range(0, len(x), 500):
        parts.add(x[i : i + 500].float(), y[i : i + 500])  # the feed's dtype: fp32 batches
    (wa, ba), (wb, bb) = whole.classifiers(), parts.classifiers()
    torch.testing.assert_close(wa, wb, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ba, bb, rtol=1e-6, atol=1e-9)
    scorer = RidgeScorer(wa, ba)
    for i in range(0, len(x), 700):
        scorer.add(x[i : i + 700], y[i : i + 700])
    pairs = zip(wa, ba, strict=True)
    direct = [(torch.argmax(x @ w + b, dim=1) == y).double().mean().item() for w, b in pairs]
    assert scorer.top1() == pytest.approx(direct, abs=1e-12)
    assert max(direct) > 0.9  # digits pixels are close to linearly separable


def test_lambda_is_chosen_on_the_selection_rows_and_ties_keep_the_larger() -> None:
    sel = [0.5, 0.7, 0.7, 0.6, 0.1, 0.1, 0.1]
    test = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    chosen = choose(sel, test, RIDGE_GRID)
    assert chosen.lam == RIDGE_GRID[2] and chosen.test_top1 == 0.3 and chosen.selection_top1 == 0.7
    assert shortfall_margin(0.9, 100) == pytest.approx(0.10)  # the floor
    assert shortfall_margin(0.5, 20) == pytest.approx(3 * (0.25 / 20) ** 0.5)  # three standard errors


def _digits_sources() -> tuple[MemorySource, MemorySource]:
    x, y = digits()
    x = x.float()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    return (MemorySource({"cls": x[i], "labels": y[i]}) for i in (train, test))  # type: ignore[return-value]


def _probe(**kw: object):
    train, test = _digits_sources()
    base = {"pools": ("cls",), "min_steps": 0, "batch_size": 64, "weight_decay": (0.0,)}
    cfg = ProbeConfig.from_protocol("auto", **{**base, **kw})
    return train_probes(train, test, cfg, [cfg.head_spec("cls")], keys=["cls"]).readouts["cls"]


def test_an_untrained_head_is_flagged_below_the_ridge_reference() -> None:
    r = _probe(epochs=1, lr_grid=(1e-4, 2e-4), eval_every=1)  # 17 steps at a tiny lr: near its init
    assert r.baseline_top1 is not None and r.baseline_top1 > 0.9
    assert r.test.top1 < r.baseline_top1 - 0.10
    check = next(c for c in r.health if c.code == "below_baseline")
    assert check.severity == "warning" and r.verdict == "warning"
    assert f"{100 * r.baseline_top1:.1f} %" in check.message and "auto" in check.fix


def test_a_trained_head_is_not_flagged_and_records_the_reference() -> None:
    r = _probe(epochs=30, lr_grid=(0.1, 1.0, 10.0), eval_every=10)
    assert r.baseline_top1 is not None and r.test.top1 > 0.9
    assert "below_baseline" not in {c.code for c in r.health}


def test_the_command_prints_and_writes_the_reference_for_pooled_read_outs_only(tmp_path) -> None:
    import json

    from test_probe_cli import FAST, probe, write_cache

    train, test = write_cache(tmp_path / "train", n=60), write_cache(tmp_path / "test", n=30, seed=1)
    result = probe(
        train, test, tmp_path / "run", *FAST,
        "--pool", "cls", "--pool", "abmilp", "--format", "human",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ridge top-1" in result.output
    readouts = json.loads((tmp_path / "run" / "results.json").read_text())["readouts"]
    assert 0.0 <= readouts["cls"]["baseline_top1"] <= 1.0  # blobs: the reference separates them
    assert readouts["cls"]["baseline_top1"] > 0.9
    assert readouts["abmilp"]["baseline_top1"] is None  # a trained pooling has no closed form
