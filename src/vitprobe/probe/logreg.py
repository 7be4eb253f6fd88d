"""The logistic-regression protocol: full-batch L-BFGS on standardised pooled features, C chosen on a holdout.

As DINOv2's `eval/log_regression.py` and CLIP's linear-probe evaluation: multinomial logistic regression
with an L2 penalty, minimising C·Σ_i CE_i + ½‖W‖² (scikit-learn's objective; the intercept is not
penalised) over a grid of C, warm-started from the previous C. Features are standardised with the fit
rows' mean and variance, exactly what `BatchNorm1d(affine=False, eps=1e-6)` does in eval mode, so the
fitted model is saved as an ordinary `ProbeHead` (BN statistics + Linear) that `vitprobe predict` can use.
Parity with scikit-learn's LogisticRegression: tests/test_probe_logreg.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.probe.bank import BN_EPS, load_heads
from vitprobe.probe.engine import evaluate
from vitprobe.probe.outcome import ReadoutResult
from vitprobe.probe.selection import Check, health, pick
from vitprobe.probe.validate import refuse_nonfinite
from vitprobe.tokens import Split, iter_batches, to_tokens

if TYPE_CHECKING:
    from vitprobe.probe.protocols import ProbeConfig


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


@torch.no_grad()
def readout_batches(
    split: Split,
    readouts: dict[str, tuple[torch.nn.Module, int | None]],
    *,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    batch_size: int = 4096,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Batch by batch over a split (view 0): each parameter-free read-out's vectors (name -> (B, F)), read at
    its block position (name -> (module, position); None: the batch has one block, or the module reads
    them all), and the labels (B,). Each block position is moved and normalised once per batch."""
    layers = {layer for _, layer in readouts.values()}
    for batch in iter_batches(split, keys, batch_size):
        views = {layer: to_tokens(batch, device, norm, layer=layer) for layer in layers}
        labels = batch["labels"].to(device).long()
        yield {n: module(views[layer])[0] for n, (module, layer) in readouts.items()}, labels


@torch.no_grad()
def pooled_features(
    split: Split,
    spec: HeadSpec,
    *,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    dtype: torch.dtype,
    position: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The read-out vector (B, F) of every row of a split (view 0), and the labels: the parameter-free
    read-out of `spec` itself (cls, mean, cls+mean, cls-cat), at block `position` of a batch with a block
    axis (None: the batch has one block, or the read-out reads them all)."""
    readout = build_head(spec, split.source.dim, 2).readout.to(device)
    feats, labels = [], []
    for f, y in readout_batches(split, {"f": (readout, position)}, keys=keys, device=device, norm=norm):
        feats.append(f["f"].to(dtype))  # (B, F)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def train_logreg(
    fit_split: Split,
    selection: Split | None,
    test_split: Split,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    *,
    seed: int,
    chance: float,
    sizes: dict[str, int],
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    positions: dict[str, int | None],
    blocks: int,
) -> dict[str, ReadoutResult]:
    """`--protocol logreg`: sweep C per read-out, choose on `selection` (None: C nearest 1), refit, test.

    Deterministic: `seed` only names the trial (the fit has no randomness)."""
    from vitprobe.probe.gradient import no_holdout_check

    dtype = torch.float32 if device.type == "cuda" else torch.float64  # scikit-learn fits in float64
    dim = fit_split.source.dim
    get = {"keys": keys, "device": device, "norm": norm, "dtype": dtype}
    held = selection is not None and selection is not test_split
    all_rows = torch.sort(torch.cat([fit_split.rows, selection.rows]) if held else fit_split.rows).values
    out: dict[str, ReadoutResult] = {}
    for spec in specs:
        get["position"] = positions.get(spec.name)
        x_fit, y_fit = pooled_features(fit_split, spec, **get)
        x_test, y_test = pooled_features(test_split, spec, **get)
        x_sel, y_sel = pooled_features(selection, spec, **get) if selection is not None else (None, None)
        for x, split in ((x_fit, fit_split), (x_sel, selection), (x_test, test_split)):
            if x is not None and not torch.isfinite(x).all():
                refuse_nonfinite(split.source, keys, None)
        mean, var = standardise(x_fit)
        z_fit, z_test = standardised(x_fit, mean, var), standardised(x_test, mean, var)
        z_sel = standardised(x_sel, mean, var) if x_sel is not None else None
        fits = sweep(z_fit, y_fit, z_sel, y_sel, num_classes, cfg.c_grid, max_iter=cfg.max_iter)
        if selection is None:  # nothing to select on: the C nearest 1 (scikit-learn's default)
            k = min(range(len(fits)), key=lambda i: abs(math.log10(fits[i].C)))
        else:
            k = pick(
                [f.selection_top1 for f in fits],
                [f.selection_loss for f in fits],
                [True] * len(fits),
                what=f"logreg {spec.name}",
            )
        best, head_mean, head_var, before = fits[k], mean, var, None
        if cfg.refit:
            before = score(best, z_test, y_test)[0]
            x_all, y_all = pooled_features(
                Split("train", fit_split.source, all_rows, fit_split.memory), spec, **get
            )
            head_mean, head_var = standardise(x_all)
            best = fit_logreg(
                standardised(x_all, head_mean, head_var),
                y_all,
                num_classes,
                best.C,
                max_iter=cfg.max_iter,
                init=(best.weight, best.bias),
            )
        head = to_head(spec, best, head_mean.float().cpu(), head_var.float().cpu(), dim)
        bank = load_heads(spec, [head], dim, num_classes, blocks=blocks).to(device)
        test = evaluate(
            [(bank, positions.get(spec.name))],
            test_split,
            keys,
            batch_size=4096,
            device=device,
            norm=norm,
            num_classes=num_classes,
        )[0][0]
        name = selection.name if selection is not None else "none"
        results = [
            {
                "C": f.C,
                f"{name}_top1": f.selection_top1,
                f"{name}_loss": f.selection_loss,
                "test_top1": score(f, z_test, y_test)[0],
                "iterations": f.iterations,
                "converged": f.converged,
            }
            for f in fits
        ]
        selection_top1 = fits[k].selection_top1 if selection is not None else None
        checks = health(
            pool=spec.name,
            grid=[f.C for f in fits] if selection is not None else [best.C],
            chosen=k if selection is not None else 0,
            diverged=[],
            selection_curve=None,
            epochs_evaluated=[],
            best_epoch=0,
            train_top1=score(best, standardised(x_fit, head_mean, head_var), y_fit)[0],
            chance=chance,
            movement=None,
            movement_budget=None,
            selection_top1=selection_top1 if held else None,
            test_top1=test.top1,
            selected_on=name,
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
        if selection is None:
            checks.append(no_holdout_check(spec.name, f"C {best.C:g}"))
        out[spec.name] = ReadoutResult(
            spec=spec,
            head=head,
            test=test,
            selection_top1=selection_top1,
            C=best.C,
            sweep=results,
            health=checks,
            refit=cfg.refit,
            test_top1_before_refit=before,
        )
    return out
