"""Batched optimisers: LARS, SGD and AdamW over stacked head parameters, each head slice with its own lr.

A stacked parameter has a leading head axis K (slice k is head k's tensor), so K heads that differ only in
learning rate train as one set of tensors. Each optimiser applies, slice by slice, exactly the update of
its reference, with the head's learning rate:

- `lars`: MAE / Beyond [cls] `util/lars.py` (also efficient-probing's): for a matrix (a slice with more
  than one dimension) dp = g + wd·w and dp *= 0.001·‖w‖/‖dp‖ (1 where either norm is 0), then
  mu = momentum·mu + dp, w -= lr·mu; vectors (biases) skip the decay and the trust ratio. The norms are
  per head slice, as the reference computes them per parameter tensor. timm's `Lars` differs only with
  weight decay > 0 (it divides by ‖g‖ + wd·‖w‖ + 1e-8): tests check parity with both at wd 0.
- `sgd`: `torch.optim.SGD` (momentum, dampening 0, no Nesterov), weight decay added to the gradient.
- `adamw`: `torch.optim.AdamW` (decoupled decay, bias-corrected moments, amsgrad off).

Each head has its own weight decay too (a grid over lr × weight decay is one bank). Weight decay applies to
matrices only unless `decay_vectors` (beyond_cls's plain `SGD(head.parameters(),
weight_decay=wd)` decays every parameter). Parity with the references: tests/test_probe_optim.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitprobe.choices import OPTIMIZERS
from vitprobe.errors import ProbeError


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimiser and its hyper-parameters (the learning rates are per head, given separately)."""

    kind: str = "sgd"  # one of OPTIMIZERS
    momentum: float = 0.9  # LARS / SGD momentum
    weight_decay: float = 0.0  # L2 (LARS, SGD) or decoupled (AdamW) decay
    decay_vectors: bool = False  # decay biases too (beyond_cls's plain SGD decays every parameter)
    trust: float = 0.001  # LARS trust coefficient (MAE util/lars.py)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decays (torch defaults)
    eps: float = 1e-8  # AdamW denominator epsilon (torch default)

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ProbeError(f"unknown --optimizer {self.kind!r}", f"use one of {', '.join(OPTIMIZERS)}")


class BatchedOptimizer:
    """One optimiser for stacked parameters whose leading axis is the head; head k steps with `lrs[k]`.

    It keeps `torch.optim.Optimizer`'s `param_groups` / `state` / `zero_grad` shape but does not subclass
    it: the first `Optimizer.__init__` of a process imports `torch._dynamo` (3-5 s of every `vitprobe
    probe` command on this machine), and nothing here needs Optimizer's hooks, schedulers or state dicts.

    Args:
        params: (parameter, is_matrix) pairs; `is_matrix` says whether one head's slice is a matrix
            (LARS adaptation and weight decay) or a vector (bias).
        spec: the optimiser.
        lrs: (K,) peak learning rate of each head; `step(factor)` uses `lrs * factor`.
        weight_decays: (K,) weight decay of each head; None = `spec.weight_decay` for every head.
    """

    def __init__(
        self,
        params: Sequence[tuple[torch.nn.Parameter, bool]],
        spec: OptimizerSpec,
        lrs: torch.Tensor,
        weight_decays: torch.Tensor | None = None,
    ) -> None:
        matrices = [p for p, is_matrix in params if is_matrix]
        vectors = [p for p, is_matrix in params if not is_matrix]
        self.param_groups: list[dict[str, Any]] = [
            {"params": ps, "matrix": is_matrix}
            for ps, is_matrix in ((matrices, True), (vectors, False))
            if ps
        ]
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)  # per parameter
        self.spec = spec
        self.lrs = lrs.detach().clone().float()
        self.num_heads = len(self.lrs)
        wds = torch.full_like(self.lrs, spec.weight_decay) if weight_decays is None else weight_decays
        self.wds = wds.detach().clone().float()
        if len(self.wds) != self.num_heads:
            raise ValueError(f"{len(self.wds)} weight decays for {self.num_heads} heads")
        self.any_decay = bool((self.wds != 0).any())  # once, not a device sync per step
        for p, _ in params:
            if p.shape[0] != self.num_heads:
                raise ValueError(
                    f"stacked parameter of shape {tuple(p.shape)} has no head axis of {self.num_heads}"
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (None, or zeros in place), as `Optimizer.zero_grad`."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def _per_head(self, values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(K,) values shaped to broadcast over a stacked parameter (K, ...)."""
        return values.to(device=p.device, dtype=p.dtype).view(-1, *([1] * (p.ndim - 1)))

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        """One update of every head, at learning rate `lrs * factor` (the schedule's factor)."""
        spec = self.spec
        for group in self.param_groups:
            decayed = (group["matrix"] or spec.decay_vectors) and self.any_decay
            for p in group["params"]:
                if p.grad is None:
                    continue
                lr = self._per_head(self.lrs * factor, p)
                decay = self._per_head(self.wds, p) if decayed else None
                state = self.state[p]
                if spec.kind == "lars":
                    self._lars(p, state, lr, decay, adapt=group["matrix"])
                elif spec.kind == "sgd":
                    self._sgd(p, state, lr, decay)
                else:
                    self._adamw(p, state, lr, decay)

    def _lars(
        self, p: torch.Tensor, state: dict, lr: torch.Tensor, decay: torch.Tensor | None, *, adapt: bool
    ) -> None:
        dp = p.grad
        if adapt:
            dp = dp if decay is None else dp + decay * p
            w_norm = p.flatten(1).norm(dim=1)  # (K,) per head slice
            d_norm = dp.flatten(1).norm(dim=1)  # (K,)
            one = torch.ones_like(w_norm)
            q = torch.where(w_norm > 0, torch.where(d_norm > 0, self.spec.trust * w_norm / d_norm, one), one)
            dp = dp * self._per_head(q, p)
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        mu = state["mu"]
        mu.mul_(self.spec.momentum).add_(dp)
        p.sub_(lr * mu)

    def _sgd(self, p: torch.Tensor, state: dict, lr: torch.Tensor, decay: torch.Tensor | None) -> None:
        d_p = p.grad if decay is None else p.grad + decay * p
        if self.spec.momentum != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.clone(d_p).detach()
            else:
                state["momentum_buffer"].mul_(self.spec.momentum).add_(d_p)
            d_p = state["momentum_buffer"]
        p.sub_(lr * d_p)

    def _adamw(self, p: torch.Tensor, state: dict, lr: torch.Tensor, decay: torch.Tensor | None) -> None:
        beta1, beta2 = self.spec.betas
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        if decay is not None:
            p.mul_(1 - lr * decay)
        grad = p.grad
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        denom = (state["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(self.spec.eps)
        p.sub_((lr / bias_correction1) * state["exp_avg"] / denom)
