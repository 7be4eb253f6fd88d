"""Probe engine: every bank of heads trained in one pass over the train rows, evaluated, selected per head.

Each batch is read, moved and normalised once for all heads; each read-out is one `HeadBank` of K heads
(one per learning rate) with one batched optimiser, and one backward pass serves every bank. A head keeps
its best state on the selection split (best top-1, ties to the lower loss, then the earlier epoch). A head
whose loss stops being finite (or blows up past 100× a uniform guess's) is marked diverged and never
selected. K heads in one bank end where K
separately trained `ProbeHead`s end (tests/test_probe_bank.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.probe.bank import HeadBank, load_heads
from vitprobe.probe.optim import BatchedOptimizer, OptimizerSpec
from vitprobe.probe.protocols import Schedule, lr_factor
from vitprobe.probe.selection import DIVERGED_LOSS
from vitprobe.progress import make_progress
from vitprobe.tokens import Split, Tokens, iter_batches, non_finite, to_tokens

if TYPE_CHECKING:
    from rich.console import Console


class NonFiniteTokens(Exception):
    """A batch held inf/NaN tokens (raised by `fit` at the next evaluation; the caller names the rows)."""


def head_seed(seed: int, spec: HeadSpec) -> int:
    """Seed of a head's initial weights: the run seed and the read-out only, never which other heads train
    beside it, so a head alone and a head among many start the same."""
    return (seed * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(spec.pool))) % (2**63)


def init_head(spec: HeadSpec, dim: int, num_classes: int, seed: int, *, blocks: int = 1) -> ProbeHead:
    """A fresh ProbeHead drawn from `head_seed(seed, spec)` (MAE's init: Linear trunc-normal std 0.01)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed(seed, spec))
        return build_head(spec, dim, num_classes, blocks=blocks)


def amp_context(device: torch.device, amp: str) -> Any:
    """bf16 autocast for the heads' forward: on CUDA with `auto`, anywhere with `bf16`, never with `off`."""
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


@dataclass
class Metrics:
    """Accuracy of one head on one split."""

    top1: float
    top5: float
    per_class: list[float]  # accuracy per class (NaN for classes without samples)
    num_samples: int
    loss: float


@dataclass
class BankRun:
    """One read-out's bank of heads (one per base lr) with its optimiser, curves and best states."""

    spec: HeadSpec
    bank: HeadBank
    optimizer: BatchedOptimizer
    blrs: tuple[float, ...]  # each head's base lr
    lrs: tuple[float, ...]  # each head's lr
    wds: tuple[float, ...]  # each head's weight decay
    stop_epoch: int  # train up to and including this epoch (1-based)
    layer: int | None = None  # position on the batch's layer axis; None when the batch has one block
    select_last: bool = False  # heads count at the end of their schedule, not at their best evaluation
    curves: dict[str, list[Any]] = field(default_factory=dict)  # "epoch": [...], other keys: [[K values]]
    best_score: torch.Tensor | None = None  # (K,) selection top-1 of each head's best state
    best_loss: torch.Tensor | None = None  # (K,)
    best_epoch: list[int] = field(default_factory=list)
    best_states: list[dict[str, torch.Tensor] | None] = field(default_factory=list)
    init_weight: torch.Tensor | None = None  # (K, C, F) the Linear at the start (for the movement check)
    finite: torch.Tensor | None = None  # (K,) False once a head's training loss was not finite
    _loss_sum: torch.Tensor | None = None
    _correct: torch.Tensor | None = None
    _count: int = 0

    @property
    def num_heads(self) -> int:
        return self.bank.num_heads

    def reset_meters(self, device: torch.device) -> None:
        self._loss_sum = torch.zeros(self.num_heads, device=device)
        self._correct = torch.zeros(self.num_heads, device=device)
        self._count = 0


def make_run(
    spec: HeadSpec,
    blrs: Sequence[float],
    lrs: Sequence[float],
    *,
    wds: Sequence[float] | None = None,
    dim: int,
    num_classes: int,
    seed: int,
    optimizer: OptimizerSpec,
    stop_epoch: int,
    device: torch.device,
    layer: int | None = None,
    blocks: int = 1,
    select_last: bool = False,
) -> BankRun:
    """A bank of len(blrs) heads for `spec` (head k: base lr blrs[k], lr lrs[k], weight decay wds[k]; all 0
    when None), all from the seed's initial head; `blocks` stored blocks for multi-block read-outs."""
    wds = tuple(wds) if wds is not None else (0.0,) * len(blrs)
    head = init_head(spec, dim, num_classes, seed, blocks=blocks)
    bank = load_heads(spec, [head] * len(blrs), dim, num_classes, blocks=blocks).to(device)
    as_tensor = lambda values: torch.tensor(list(values), dtype=torch.float32, device=device)  # noqa: E731
    run = BankRun(
        spec=spec,
        bank=bank,
        optimizer=BatchedOptimizer(bank.optim_params(), optimizer, as_tensor(lrs), as_tensor(wds)),
        blrs=tuple(blrs),
        lrs=tuple(lrs),
        wds=wds,
        stop_epoch=stop_epoch,
        layer=layer,
        select_last=select_last,
        best_score=torch.full((len(blrs),), -1.0),
        best_loss=torch.full((len(blrs),), float("inf")),
        best_epoch=[0] * len(blrs),
        best_states=[None] * len(blrs),
        init_weight=bank.weight.detach().clone(),
        finite=torch.ones(len(blrs), dtype=torch.bool, device=device),
    )
    run.reset_meters(device)
    return run


def _batch_tokens(
    batch: dict[str, torch.Tensor], layers: set[int | None], device: torch.device, norm: dict[str, Any] | None
) -> dict[int | None, Tokens]:
    """The batch as Tokens for each block position the active banks read (moved once per block)."""
    return {layer: to_tokens(batch, device, norm, layer=layer) for layer in layers}


@torch.no_grad()
def evaluate(
    banks: Sequence[tuple[HeadBank, int | None]],
    split: Split,
    keys: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    amp: str = "off",
    shuffle_shards: int = 4,
) -> list[list[Metrics]]:
    """Top-1, top-5, per-class accuracy and loss of every head of each (bank, layer) on a split (view 0)."""
    for bank, _ in banks:
        bank.eval()
    k5 = min(5, num_classes)
    correct1 = [torch.zeros(b.num_heads, num_classes, device=device) for b, _ in banks]
    correct5 = [torch.zeros(b.num_heads, device=device) for b, _ in banks]
    loss_sum = [torch.zeros(b.num_heads, device=device) for b, _ in banks]
    counts = torch.zeros(num_classes, device=device)
    layers = {layer for _, layer in banks}
    for batch in iter_batches(split, keys, batch_size, shuffle_shards=shuffle_shards):
        views = _batch_tokens(batch, layers, device, norm)
        labels = batch["labels"].to(device).long()
        counts += torch.bincount(labels, minlength=num_classes)
        for i, (bank, layer) in enumerate(banks):
            with amp_context(device, amp):
                logits = bank(views[layer]).float()  # (K, B, C)
            k = bank.num_heads
            top = logits.topk(k5, dim=2).indices  # (K, B, k5)
            hit1 = (top[:, :, 0] == labels).float()  # (K, B)
            correct1[i].scatter_add_(1, labels.expand(k, -1), hit1)
            correct5[i] += (top == labels[None, :, None]).any(dim=2).sum(dim=1)
            loss_sum[i] += (
                F.cross_entropy(logits.flatten(0, 1), labels.repeat(k), reduction="none")
                .view(k, -1)
                .sum(dim=1)
            )
    n = counts.sum().clamp(min=1)
    out = []
    for i, (bank, _) in enumerate(banks):
        per_class = torch.where(counts > 0, correct1[i] / counts.clamp(min=1), torch.nan)  # (K, C)
        top1 = (correct1[i].sum(dim=1) / n).tolist()
        top5 = (correct5[i] / n).tolist()
        loss = (loss_sum[i] / n).tolist()
        out.append(
            [
                Metrics(
                    top1=top1[k],
                    top5=top5[k],
                    per_class=per_class[k].tolist(),
                    num_samples=int(counts.sum()),
                    loss=loss[k],
                )
                for k in range(bank.num_heads)
            ]
        )
    return out


def fit(
    runs: Sequence[BankRun],
    train: Split,
    evals: Sequence[Split],
    schedule: Schedule,
    *,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    seed: int,
    amp: str = "off",
    shuffle_shards: int = 4,
    select: str | None = None,
    console: Console | None = None,
    description: str = "probing",
    check_finite: bool = False,
) -> None:
    """Train every run in one pass per epoch, evaluating on `evals` every `schedule.eval_every` epochs.

    With `check_finite` (streamed tokens, not checked when loaded), a batch with inf/NaN tokens raises
    `NonFiniteTokens` at the end of its epoch (checked on the device by `non_finite`, without a sync per
    step).

    With `select`, each head keeps its best state on that split; without it, the state at the run's
    `stop_epoch` becomes its best state. Curves record, per evaluation, each head's train loss and accuracy
    (since the previous evaluation) and top-1 / loss on every split of `evals`.
    """
    generator = torch.Generator().manual_seed(seed)
    last_epoch = max(r.stop_epoch for r in runs)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    progress = make_progress(console, transient=True)
    step = 0
    with progress:
        task = progress.add_task(description, total=schedule.steps_per_epoch * last_epoch)
        for epoch in range(last_epoch):
            active = [r for r in runs if epoch < r.stop_epoch]
            for r in active:
                r.bank.train()
            layers = {r.layer for r in active}
            for batch in iter_batches(
                train,
                keys,
                schedule.batch_size,
                epoch=epoch,
                generator=generator,
                drop_last=True,
                shuffle_shards=shuffle_shards,
            ):
                views = _batch_tokens(batch, layers, device, norm)
                if check_finite:
                    for t in (t for v in views.values() for t in v.parts()):
                        bad |= non_finite(t)
                labels = batch["labels"].to(device).long()
                total = torch.zeros((), device=device)
                for r in active:
                    with amp_context(device, amp):
                        logits = r.bank(views[r.layer]).float()  # (K, B, C)
                    k = r.num_heads
                    losses = (
                        F.cross_entropy(logits.flatten(0, 1), labels.repeat(k), reduction="none")
                        .view(k, -1)
                        .mean(dim=1)
                    )  # (K,): each head's mean loss on the batch
                    total = total + losses.sum()
                    detached = losses.detach()
                    r.finite &= torch.isfinite(detached)
                    r._loss_sum += torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0)
                    r._correct += (logits.detach().argmax(dim=2) == labels).float().mean(dim=1)
                    r._count += 1
                    r.optimizer.zero_grad(set_to_none=True)
                total.backward()  # the heads share no parameters: each gets its own loss's gradient
                factor = lr_factor(step, schedule)
                for r in active:
                    r.optimizer.step(factor)
                step += 1
                progress.advance(task)
            if check_finite and bool(bad):
                raise NonFiniteTokens
            done = epoch + 1
            evaluating = [r for r in active if done % schedule.eval_every == 0 or done == r.stop_epoch]
            if evaluating:
                _evaluate_and_select(
                    evaluating,
                    done,
                    evals,
                    keys=keys,
                    device=device,
                    norm=norm,
                    num_classes=num_classes,
                    batch_size=schedule.batch_size,
                    amp=amp,
                    shuffle_shards=shuffle_shards,
                    select=select,
                )


def _evaluate_and_select(
    runs: Sequence[BankRun],
    done: int,
    evals: Sequence[Split],
    *,
    select: str | None,
    **common: Any,
) -> None:
    """Record one evaluation point in each run's curves and update its heads' best states."""
    batch_size = max(common.pop("batch_size"), 1024)  # evaluation has no gradient: bigger batches
    scores = {
        s.name: evaluate([(r.bank, r.layer) for r in runs], s, batch_size=batch_size, **common) for s in evals
    }
    blown_up = DIVERGED_LOSS * math.log(max(common["num_classes"], 2))
    for i, r in enumerate(runs):
        mean_loss = (r._loss_sum / max(r._count, 1)).cpu()
        r.finite &= (mean_loss < blown_up).to(r.finite.device)  # a blown-up loss counts as diverged
        finite = r.finite.cpu()
        r.curves.setdefault("epoch", []).append(done)
        r.curves.setdefault("train_loss", []).append(
            [float(v) if f else None for v, f in zip(mean_loss.tolist(), finite.tolist(), strict=True)]
        )
        r.curves.setdefault("train_top1", []).append((r._correct / max(r._count, 1)).cpu().tolist())
        r.reset_meters(r._loss_sum.device)
        for name, per_bank in scores.items():
            metrics = per_bank[i]
            r.curves.setdefault(f"{name}_top1", []).append(
                [m.top1 if f else None for m, f in zip(metrics, finite.tolist(), strict=True)]
            )
            r.curves.setdefault(f"{name}_loss", []).append(
                [m.loss if f else None for m, f in zip(metrics, finite.tolist(), strict=True)]
            )
        if select is None:
            if done == r.stop_epoch:
                for k in range(r.num_heads):
                    r.best_epoch[k], r.best_states[k] = done, r.bank.head_state(k)
            continue
        top1 = torch.tensor([m.top1 for m in scores[select][i]])
        loss = torch.tensor([m.loss for m in scores[select][i]])
        if r.select_last:  # the state at the end of the schedule, whatever the earlier evaluations said
            better = finite & torch.tensor(done == r.stop_epoch)
        else:
            better = finite & ((top1 > r.best_score) | ((top1 == r.best_score) & (loss < r.best_loss)))
        for k in better.nonzero().flatten().tolist():
            r.best_score[k], r.best_loss[k], r.best_epoch[k] = top1[k], loss[k], done
            r.best_states[k] = r.bank.head_state(k)
