"""Parity of the batched optimisers with their references, head slice by head slice.

K stacked parameters trained by `BatchedOptimizer` must end where K separate parameters trained by the
reference optimiser end (same gradients, each with its own lr and the same schedule): torch's SGD and
AdamW, timm's Lars (identical to MAE's at weight decay 0), and MAE's `util/lars.py`, written out below as
the reference definition (gmum/beyond_cls and billpsomas/efficient-probing ship the same file).
"""

from __future__ import annotations

import math

import pytest
import torch

from vitprobe.probe.optim import BatchedOptimizer, OptimizerSpec


class MaeLars(torch.optim.Optimizer):
    """MAE util/lars.py: LARS without rate scaling or weight decay for parameters <= 1D."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient),
        )

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(
                            update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm), one
                        ),
                        one,
                    )
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def reference(kind: str, params: list[torch.nn.Parameter], lr: float, *, wd: float, decay_vectors: bool):
    """The reference optimiser for one head's parameters (matrices first, then vectors)."""
    matrices = [p for p in params if p.ndim > 1]
    vectors = [p for p in params if p.ndim <= 1]
    vector_wd = wd if decay_vectors else 0.0
    if kind == "mae-lars":
        return MaeLars(
            [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=lr, weight_decay=wd
        )
    if kind == "timm-lars":
        from timm.optim import Lars

        return Lars(
            [
                {"params": matrices, "always_adapt": True},
                {"params": vectors, "always_adapt": False, "weight_decay": 0.0},
            ],
            lr=lr,
            momentum=0.9,
            weight_decay=wd,
        )
    groups = [{"params": matrices}, {"params": vectors, "weight_decay": vector_wd}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
    if kind == "sgd-plain":
        return torch.optim.SGD(groups, lr=lr, momentum=0.0, weight_decay=wd)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)


CASES = [
    # (reference, our spec, weight decay)
    ("mae-lars", OptimizerSpec("lars"), 0.0),
    ("mae-lars", OptimizerSpec("lars", weight_decay=0.05), 0.05),
    ("timm-lars", OptimizerSpec("lars"), 0.0),
    ("sgd", OptimizerSpec("sgd"), 0.0),
    ("sgd", OptimizerSpec("sgd", weight_decay=1e-3), 1e-3),
    ("sgd-plain", OptimizerSpec("sgd", momentum=0.0, weight_decay=1e-3, decay_vectors=True), 1e-3),
    ("adamw", OptimizerSpec("adamw"), 0.0),
    ("adamw", OptimizerSpec("adamw", weight_decay=0.05), 0.05),
]


@pytest.mark.parametrize(("kind", "spec", "wd"), CASES, ids=[f"{c[0]}-wd{c[2]}" for c in CASES])
def test_batched_optimizer_matches_reference_per_head(kind: str, spec: OptimizerSpec, wd: float) -> None:
    torch.manual_seed(0)
    lrs = [0.003, 0.03, 0.3, 3.0]
    k = len(lrs)
    shapes = [(5, 7), (5,), (1, 7), (3, 2, 4)]
    init = [torch.randn(k, *s) for s in shapes]
    stacked = [torch.nn.Parameter(t.clone()) for t in init]
    ours = BatchedOptimizer([(p, p.ndim > 2) for p in stacked], spec, torch.tensor(lrs))
    singles = [[torch.nn.Parameter(t[h].clone()) for t in init] for h in range(k)]
    theirs = [reference(kind, singles[h], lrs[h], wd=wd, decay_vectors=spec.decay_vectors) for h in range(k)]
    steps = 60
    for step in range(steps):
        factor = 0.5 * (1 + math.cos(math.pi * step / steps))  # a cosine schedule, as the probes use
        grads = [torch.randn(k, *s) for s in shapes]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        ours.step(factor)
        for h in range(k):
            for p, g in zip(singles[h], grads, strict=True):
                p.grad = g[h].clone()
            for group in theirs[h].param_groups:
                group["lr"] = lrs[h] * factor
            theirs[h].step()
    for h in range(k):
        for p, q in zip(stacked, singles[h], strict=True):
            torch.testing.assert_close(p[h], q, rtol=1e-5, atol=1e-5)


def test_lars_trust_ratio_is_per_head_slice() -> None:
    """A head with a huge gradient does not shrink the other heads' LARS steps (norms per slice)."""
    p = torch.nn.Parameter(torch.ones(2, 3, 3))
    opt = BatchedOptimizer([(p, True)], OptimizerSpec("lars", momentum=0.0), torch.tensor([1.0, 1.0]))
    p.grad = torch.stack([torch.ones(3, 3), 1000 * torch.ones(3, 3)])
    opt.step()
    # each slice moves by trust × ‖w‖ (the gradient direction is the same), whatever its gradient's size
    torch.testing.assert_close(p[0], p[1])
    torch.testing.assert_close((torch.ones(3, 3) - p[0]).norm(), torch.tensor(0.001 * 3.0))


def test_unknown_optimizer_is_refused() -> None:
    from vitprobe.errors import ProbeError

    with pytest.raises(ProbeError, match="unknown --optimizer"):
        OptimizerSpec("rmsprop")


@pytest.mark.parametrize(
    ("kind", "spec"),
    [("mae-lars", OptimizerSpec("lars")), ("sgd", OptimizerSpec("sgd")), ("adamw", OptimizerSpec("adamw"))],
)
def test_each_head_has_its_own_weight_decay(kind: str, spec: OptimizerSpec) -> None:
    """An lr × weight-decay grid in one bank: head k matches the reference with (lr_k, wd_k)."""
    torch.manual_seed(1)
    grid = [(0.01, 0.0), (0.01, 0.05), (0.3, 0.0), (0.3, 0.05)]
    k = len(grid)
    shapes = [(5, 7), (5,)]
    init = [torch.randn(k, *s) for s in shapes]
    stacked = [torch.nn.Parameter(t.clone()) for t in init]
    ours = BatchedOptimizer(
        [(p, p.ndim > 2) for p in stacked],
        spec,
        torch.tensor([lr for lr, _ in grid]),
        torch.tensor([wd for _, wd in grid]),
    )
    singles = [[torch.nn.Parameter(t[h].clone()) for t in init] for h in range(k)]
    theirs = [reference(kind, singles[h], lr, wd=wd, decay_vectors=False) for h, (lr, wd) in enumerate(grid)]
    for _ in range(30):
        grads = [torch.randn(k, *s) for s in shapes]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        ours.step()
        for h in range(k):
            for p, g in zip(singles[h], grads, strict=True):
                p.grad = g[h].clone()
            theirs[h].step()
    for h in range(k):
        for p, q in zip(stacked, singles[h], strict=True):
            torch.testing.assert_close(p[h], q, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stacked[0][0], stacked[0][1])  # the decay made a difference
