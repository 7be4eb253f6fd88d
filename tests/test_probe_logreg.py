"""The logistic-regression protocol against scikit-learn's LogisticRegression on the same features.

scikit-learn minimises C·Σ CE + ½‖W‖² (multinomial, lbfgs, intercept unpenalised); `fit_logreg` minimises the
same objective divided by C·n. On scikit-learn's digits, standardised, both must reach the same optimum:
equal objective, weights equal to L-BFGS tolerance, identical predictions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitprobe.heads import HeadSpec
from vitprobe.probe import ProbeConfig, train_probes
from vitprobe.probe.logreg import fit_logreg, standardise, standardised, to_head
from vitprobe.sources import MemorySource
from vitprobe.tokens import Tokens


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


def objective(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, C: float) -> float:
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    ce = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(axis=1)))
    return float(C * ce.sum() + 0.5 * (w**2).sum())


@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_fit_logreg_reaches_scikit_learns_optimum(C: float) -> None:
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te, y_tr, _ = digits()
    x = torch.tensor(x_tr, dtype=torch.float64)
    mean, var = standardise(x)
    z = standardised(x, mean, var)
    y = torch.tensor(y_tr)
    ours = fit_logreg(z, y, 10, C, max_iter=5000, tol=1e-9)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(z.numpy(), y_tr)
    assert ours.converged
    ours_obj = objective(ours.weight.numpy(), ours.bias.numpy(), z.numpy(), y_tr, C)
    ref_obj = objective(ref.coef_, ref.intercept_, z.numpy(), y_tr, C)
    assert ours_obj == pytest.approx(ref_obj, rel=1e-6)
    np.testing.assert_allclose(ours.weight.numpy(), ref.coef_, rtol=1e-3, atol=2e-3 * np.abs(ref.coef_).max())
    z_te = standardised(torch.tensor(x_te, dtype=torch.float64), mean, var)
    ours_pred = (z_te @ ours.weight.T + ours.bias).argmax(dim=1).numpy()
    assert (ours_pred == ref.predict(z_te.numpy())).mean() >= 0.995


def test_fitted_model_is_a_probe_head_with_batchnorm_statistics() -> None:
    """The exported head (BN running stats = standardisation, Linear = fit) predicts what the fit predicts."""
    x_tr, x_te, y_tr, _ = digits()
    x = torch.tensor(x_tr, dtype=torch.float64)
    mean, var = standardise(x)
    fit = fit_logreg(standardised(x, mean, var), torch.tensor(y_tr), 10, 1.0)
    head = to_head(HeadSpec("cls"), fit, mean.float(), var.float(), 64)
    z_te = standardised(torch.tensor(x_te, dtype=torch.float64), mean, var)
    expected = (z_te @ fit.weight.T + fit.bias).float()
    with torch.no_grad():
        got = head(Tokens(cls=torch.tensor(x_te, dtype=torch.float32)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_logreg_protocol_sweep_equals_scikit_learn_per_c() -> None:
    """`--protocol logreg` on digits: for every C of the grid, holdout and test accuracy equal scikit-learn's
    on the same fit / holdout rows; the chosen C has the best holdout accuracy, ties to the lower loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vitprobe.probe.selection import stratified_holdout

    x_tr, x_te, y_tr, y_te = digits()
    train = MemorySource({"cls": torch.tensor(x_tr, dtype=torch.float32), "labels": torch.tensor(y_tr)})
    test = MemorySource({"cls": torch.tensor(x_te, dtype=torch.float32), "labels": torch.tensor(y_te)})
    grid = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    cfg = ProbeConfig.from_protocol("logreg", pools=("cls",), c_grid=grid)
    out = train_probes(train, test, cfg, [cfg.head_spec("cls")], keys=["cls"]).readouts["cls"]
    fit_rows, held = stratified_holdout(train.labels, train.indices, cfg.holdout, cfg.seed)
    scaler = StandardScaler().fit(x_tr[fit_rows])
    assert [s["C"] for s in out.sweep] == list(grid)
    for C, ours in zip(grid, out.sweep, strict=True):
        m = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x_tr[fit_rows]), y_tr[fit_rows])
        assert ours["holdout_top1"] == pytest.approx(
            m.score(scaler.transform(x_tr[held]), y_tr[held]), abs=1e-6
        )
        assert ours["test_top1"] == pytest.approx(m.score(scaler.transform(x_te), y_te), abs=1.01 / len(y_te))
    best = max(out.sweep, key=lambda s: (s["holdout_top1"], -s["holdout_loss"]))
    assert out.C == best["C"] and out.test.top1 == pytest.approx(best["test_top1"], abs=1e-6)
