"""The logistic-regression protocol: full-batch L-BFGS on standardised pooled features, C chosen on a holdout.

As DINOv2's `eval/log_regression.py` and CLIP's linear-probe evaluation: multinomial logistic regression
with an L2 penalty, minimising C·Σ_i CE_i + ½‖W‖² (scikit-learn's objective; the intercept is not
penalised) over a grid of C, warm-started from the previous C. Features are standardised with the fit
rows' mean and variance, exactly what `BatchNorm1d(affine=False, eps=1e-6)` does in eval mode, so the
fitted model is saved as an ordinary `ProbeHead` (BN statistics + Linear) that `--predict` can use.
Parity with scikit-learn's LogisticRegression: tests/test_probe_logreg.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.probe.bank import BN_EPS


@dataclass
class LogRegFit:
    """One C of the sweep: the weights, how the fit ended, and its accuracy on the selection split."""

    C: float
    weight: torch.Tensor  # (num_classes, F)
    bias: torch.Tensor  # (num_classes,)
    iterations: int
    converged: bool
    selection_top1: float = float("nan")
    selection_loss: float = float("nan")


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per feature (BatchNorm's statistics)."""
    return x.mean(dim=0), x.var(dim=0, unbiased=False)


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LogRegFit:
    """Multinomial L2 logistic regression on (n, F) features by L-BFGS (strong-Wolfe line search).

    Minimises mean CE + ‖W‖² / (2 C n), the same minimiser as scikit-learn's C·Σ CE + ½‖W‖².
    """
    n, f = x.shape
    weight = init[0].clone() if init else torch.zeros(num_classes, f, dtype=x.dtype, device=x.device)
    bias = init[1].clone() if init else torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    penalty = 1.0 / (2.0 * C * n)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LogRegFit(
        C=C,
        weight=weight.detach(),
        bias=bias.detach(),
        iterations=iterations,
        converged=iterations < max_iter,
    )


@torch.no_grad()
def score(fit: LogRegFit, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 and mean cross-entropy of a fit on standardised features."""
    logits = x @ fit.weight.T + fit.bias
    return float((logits.argmax(dim=1) == y).float().mean()), float(F.cross_entropy(logits, y))


def sweep(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_sel: torch.Tensor | None,
    y_sel: torch.Tensor | None,
    num_classes: int,
    c_grid: Sequence[float],
    *,
    max_iter: int = 1000,
) -> list[LogRegFit]:
    """Fit every C (ascending, each warm-started from the last) and score each on the selection rows."""
    fits: list[LogRegFit] = []
    init = None
    for C in sorted(c_grid):
        fit = fit_logreg(x_fit, y_fit, num_classes, C, max_iter=max_iter, init=init)
        init = (fit.weight, fit.bias)
        if x_sel is not None and y_sel is not None and len(y_sel):
            fit.selection_top1, fit.selection_loss = score(fit, x_sel, y_sel)
        fits.append(fit)
    return fits


def to_head(spec: HeadSpec, fit: LogRegFit, mean: torch.Tensor, var: torch.Tensor, dim: int) -> ProbeHead:
    """The fit as a ProbeHead: BatchNorm running statistics = the standardisation, Linear = the fit."""
    head = build_head(spec, dim, fit.weight.shape[0])
    with torch.no_grad():
        head.norm.running_mean.copy_(mean)
        head.norm.running_var.copy_(var)
        head.linear.weight.copy_(fit.weight)
        head.linear.bias.copy_(fit.bias)
    return head.eval()


def standardised(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps): BatchNorm1d(affine=False) in eval mode."""
    return (x - mean) / torch.sqrt(var + BN_EPS)
