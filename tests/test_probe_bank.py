"""Parity of head banks with separate heads: K stacked heads end where K independent ProbeHeads end.

The reference is `vitprobe.heads.ProbeHead` (one head, nanoGPT-style readable) with the reference optimiser
of tests/test_probe_optim.py; the bank trains K such heads at once (same initial weights, same batches,
one lr each). After training, every head's parameters and BatchNorm statistics agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_probe_optim import reference
from vitprobe.heads import HeadSpec, build_head
from vitprobe.probe.bank import load_heads
from vitprobe.probe.optim import BatchedOptimizer, OptimizerSpec
from vitprobe.tokens import Tokens

DIM, CLASSES, PATCHES = 16, 5, 9

BLOCKS = 5
MULTI = [HeadSpec("cls-cat", n_last_blocks=3), HeadSpec("cls-cat+mean", n_last_blocks=2), HeadSpec("fusion")]
SPECS = [
    HeadSpec("cls"),
    HeadSpec("mean"),
    HeadSpec("cls+mean"),
    HeadSpec("abmilp"),
    HeadSpec("abmilp", abmilp_depth=1, abmilp_act="relu"),
    HeadSpec("abmilp", abmilp_content="all"),
    HeadSpec("attentive", queries=4),
    *MULTI,
]
OPTIMIZERS = [
    ("mae-lars", OptimizerSpec("lars")),
    ("sgd", OptimizerSpec("sgd")),
    ("adamw", OptimizerSpec("adamw")),
]


def batch(
    seed: int, n: int = 32, dtype: torch.dtype = torch.float32, *, spec: HeadSpec | None = None
) -> tuple[Tokens, torch.Tensor]:
    """Tokens of one block, or of BLOCKS blocks (a block axis) for the multi-block read-outs."""
    g = torch.Generator().manual_seed(seed)
    if spec is not None and spec.multi_block:
        tokens = Tokens(
            cls=torch.randn(n, BLOCKS, DIM, generator=g, dtype=dtype),
            patches=torch.randn(n, BLOCKS, PATCHES, DIM, generator=g, dtype=dtype),
        )
        return tokens, torch.randint(0, CLASSES, (n,), generator=g)
    tokens = Tokens(
        cls=torch.randn(n, DIM, generator=g, dtype=dtype),
        patches=torch.randn(n, PATCHES, DIM, generator=g, dtype=dtype),
        reg=torch.randn(n, 2, DIM, generator=g, dtype=dtype),
    )
    return tokens, torch.randint(0, CLASSES, (n,), generator=g)


def fresh_heads(spec: HeadSpec, k: int) -> list:
    heads = []
    for i in range(k):
        torch.manual_seed(100 + i)  # different initial weights per head, as heads of different seeds
        heads.append(build_head(spec, DIM, CLASSES, blocks=BLOCKS))
        if spec.pool == "fusion":  # start away from equal weights, so the fusion weights matter
            torch.nn.init.normal_(heads[-1].readout.weights)
    return heads


def bank_of(spec: HeadSpec, heads: list):
    return load_heads(spec, heads, DIM, CLASSES, blocks=BLOCKS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.pool}-d{s.abmilp_depth}-{s.abmilp_content}")
def test_bank_forward_equals_separate_heads(spec: HeadSpec) -> None:
    heads = fresh_heads(spec, 3)
    bank = bank_of(spec, heads)
    tokens, _ = batch(0, spec=spec)
    for mode in ("train", "eval"):
        bank.train(mode == "train")
        for h in heads:
            h.train(mode == "train")
        logits, scores = bank.forward_with_scores(tokens)
        for k, h in enumerate(heads):
            ref_logits, ref_scores = h.forward_with_scores(tokens)
            torch.testing.assert_close(logits[k], ref_logits, rtol=1e-5, atol=1e-5)
            if ref_scores is not None:
                torch.testing.assert_close(scores[k], ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.pool}-d{s.abmilp_depth}-{s.abmilp_content}")
@pytest.mark.parametrize(("kind", "opt"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_bank_training_equals_separate_heads(spec: HeadSpec, kind: str, opt: OptimizerSpec) -> None:
    """In float64, so the comparison sees the algorithm and not float32 rounding over 25 large steps."""
    lrs = [0.01, 0.1, 1.0] if kind != "adamw" else [1e-3, 1e-2, 1e-1]
    heads = [h.double() for h in fresh_heads(spec, len(lrs))]
    bank = bank_of(spec, heads).double().train()
    ours = BatchedOptimizer(bank.optim_params(), opt, torch.tensor(lrs))
    theirs = [
        reference(kind, list(h.parameters()), lr, wd=0.0, decay_vectors=False)
        for h, lr in zip(heads, lrs, strict=True)
    ]
    for h in heads:
        h.train()
    for step in range(25):
        tokens, labels = batch(step, dtype=torch.float64, spec=spec)
        factor = 1.0 - step / 25
        logits = bank(tokens)  # (K, B, C)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(lrs)), reduction="none")
        ours.zero_grad()
        losses.view(len(lrs), -1).mean(dim=1).sum().backward()
        ours.step(factor)
        for h, o, lr in zip(heads, theirs, lrs, strict=True):
            o.zero_grad()
            F.cross_entropy(h(tokens), labels).backward()
            for group in o.param_groups:
                group["lr"] = lr * factor
            o.step()
    # The AbMILP score bias shifts every token's score equally, so softmax ignores it and its gradient is
    # rounding noise; AdamW normalises that noise into lr-sized random steps in both implementations. It has
    # no effect on any output (checked below with the logits), so it is not compared under AdamW.
    last = f"readout.score.{2 * spec.abmilp_depth}.bias"
    skip = {last} if kind == "adamw" and spec.pool == "abmilp" else set()
    for k, h in enumerate(heads):
        ours_state, ref_state = bank.head_state(k), h.state_dict()
        assert set(ours_state) == set(ref_state)
        for name, ref in ref_state.items():
            if name in skip:
                continue
            diff = float((ours_state[name].double() - ref.double()).abs().max())
            assert torch.allclose(ours_state[name].double(), ref.double(), rtol=1e-5, atol=1e-5), (name, diff)
    bank.eval()
    tokens, _ = batch(99, dtype=torch.float64, spec=spec)
    logits = bank(tokens)
    for k, h in enumerate(heads):
        torch.testing.assert_close(logits[k], h.eval()(tokens), rtol=1e-5, atol=1e-5)


def test_head_state_round_trips_into_a_probe_head() -> None:
    """head_state(k) is a ProbeHead state dict (the saved-head format): it loads strictly."""
    for spec in SPECS:
        heads = fresh_heads(spec, 2)
        bank = bank_of(spec, heads)
        fresh = build_head(spec, DIM, CLASSES, blocks=BLOCKS)
        fresh.load_state_dict(bank.head_state(1), strict=True)
        tokens, _ = batch(3, spec=spec)
        torch.testing.assert_close(fresh.eval()(tokens), heads[1].eval()(tokens))


def test_a_diverged_head_does_not_touch_the_others() -> None:
    """NaN in one head's weights leaves the other heads' losses and gradients finite."""
    spec = HeadSpec("abmilp")
    bank = load_heads(spec, fresh_heads(spec, 3), DIM, CLASSES).train()
    with torch.no_grad():
        bank.weight[1].fill_(float("nan"))
    tokens, labels = batch(0)
    losses = (
        F.cross_entropy(bank(tokens).flatten(0, 1), labels.repeat(3), reduction="none").view(3, -1).mean(1)
    )
    losses.sum().backward()
    assert torch.isfinite(losses[[0, 2]]).all() and not torch.isfinite(losses[1])
    assert torch.isfinite(bank.weight.grad[[0, 2]]).all()
    assert torch.isfinite(bank.score_weight.grad[[0, 2]]).all()
