"""The closed-form reference of a pooled read-out: a ridge classifier on the same features, for health.

A trained probe head that ends far below what a least-squares classifier reaches on the very same
features did not converge or was badly tuned, whatever its curves say (a 3-epoch single-lr run can sit a
few points above chance with every other check quiet). The reference is ridge regression onto one-hot
labels, on the features standardised by the fit rows' mean and variance (what the head's BatchNorm does),
with an intercept: W(λ) = (ZᵀZ/n + λI)⁻¹ ZᵀY/n, every λ of the grid from one eigendecomposition, λ chosen
on the selection rows (ties: the larger λ). It needs only sufficient statistics (n, Σx, XᵀX, per-class
Σx), gathered in one pass over the fit rows whether they are in memory or streamed, so it costs one extra
read of the train rows and one (F, F) eigendecomposition. It selects nothing: its test top-1 is recorded
beside the probe's (`baseline_top1`) and a large shortfall is a health warning (`shortfall_margin`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitprobe.probe.bank import BN_EPS  # the heads' BatchNorm eps: the reference standardises as they do

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # λ, in units of the standardised features' variance
MAX_FEATURES = 8192  # above this the (F, F) statistics cost more than the check is worth


@dataclass(frozen=True)
class RidgeBaseline:
    """The reference classifier's chosen λ and its accuracies."""

    lam: float
    selection_top1: float
    test_top1: float


class RidgeAccumulator:
    """Sufficient statistics of (n, F) features and their labels, in float64, added batch by batch."""

    def __init__(self, dim: int, num_classes: int, device: torch.device) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sum = torch.zeros(dim, **kw)  # Σ x, (F,)
        self.gram = torch.zeros(dim, dim, **kw)  # Σ x xᵀ, (F, F)
        self.class_sums = torch.zeros(num_classes, dim, **kw)  # Σ_{y=c} x, (C, F)
        self.counts = torch.zeros(num_classes, **kw)  # (C,)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of features (B, F) and labels (B,)."""
        x = x.double()
        y = y.to(x.device).long()
        self.n += len(x)
        self.sum += x.sum(dim=0)
        self.gram += x.T @ x
        self.class_sums.index_add_(0, y, x)
        self.counts += torch.bincount(y, minlength=len(self.counts)).double()

    def classifiers(self, grid: tuple[float, ...] = RIDGE_GRID) -> tuple[torch.Tensor, torch.Tensor]:
        """Every λ's classifier on the raw features: weights (Λ, F, C) and biases (Λ, C), grid order."""
        n = max(self.n, 1)
        mean = self.sum / n  # (F,)
        cov = self.gram / n - torch.outer(mean, mean)  # (F, F), biased, as BatchNorm
        std = (cov.diagonal().clamp(min=0) + BN_EPS).sqrt()  # (F,)
        corr = cov / torch.outer(std, std)  # ZᵀZ / n of the standardised features z = (x - μ) / σ
        # Zᵀ Y / n: z has zero column means, so centring Y only sets the intercept ȳ (the class frequencies)
        cross = (self.class_sums - self.counts[:, None] * mean) / std / n  # (C, F)
        s, v = torch.linalg.eigh(corr)  # (F,), (F, F)
        proj = v.T @ cross.T  # (F, C) in the eigenbasis
        prior = self.counts / n  # (C,)
        weights, biases = [], []
        for lam in grid:
            w = v @ (proj / (s.clamp(min=0) + lam)[:, None]) / std[:, None]  # (F, C), on raw x
            weights.append(w)
            biases.append(prior - mean @ w)  # (C,)
        return torch.stack(weights), torch.stack(biases)


class RidgeScorer:
    """Correct predictions of every λ's classifier, counted batch by batch on one split."""

    def __init__(self, weights: torch.Tensor, biases: torch.Tensor) -> None:
        self.weights, self.biases = weights, biases  # (Λ, F, C), (Λ, C)
        self.correct = torch.zeros(len(weights), dtype=torch.float64, device=weights.device)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        scores = torch.einsum("bf,lfc->lbc", x.double(), self.weights) + self.biases[:, None]  # (Λ, B, C)
        self.correct += (scores.argmax(dim=2) == y.to(scores.device).long()).double().sum(dim=1)
        self.n += len(x)

    def top1(self) -> list[float]:
        return (self.correct / self.n).tolist() if self.n else [math.nan] * len(self.correct)


def choose(
    selection_top1: list[float], test_top1: list[float], grid: tuple[float, ...] = RIDGE_GRID
) -> RidgeBaseline:
    """The λ with the best selection accuracy (ties: the larger λ) and its test accuracy."""
    order = sorted(range(len(grid)), key=lambda i: (-selection_top1[i], -grid[i]))
    i = order[0]
    return RidgeBaseline(grid[i], selection_top1[i], test_top1[i])


def shortfall_margin(baseline_top1: float, num_test: int) -> float:
    """How far below the reference a probe may fall before the warning: 10 points, or three standard
    errors of an accuracy on `num_test` images where that is more. Wide on purpose: on small sets ridge
    can beat a tuned logistic regression by a few points (square loss; measured up to 11.25 points, and the
    default probe by up to 8.75, on lfw's 80 test images, on the benchmark sets of docs/benchmarks.md), and
    the check is for heads that did not train, not for the last point."""
    p = min(max(baseline_top1, 0.01), 0.99)
    return max(0.10, 3 * math.sqrt(p * (1 - p) / max(num_test, 1)))
