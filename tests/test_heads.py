"""Probe heads: read-outs against reference formulas written out here, and the shared BN → Linear head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitprobe.errors import ProbeError
from vitprobe.heads import AbMILPReadout, AttentiveReadout, HeadSpec, build_head
from vitprobe.tokens import Tokens, apply_final_norm

B, N, D = 3, 16, 8


def make_tokens(seed: int = 0, *, reg: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    return Tokens(
        cls=torch.randn(B, D, generator=g),
        patches=torch.randn(B, N, D, generator=g),
        reg=torch.randn(B, reg, D, generator=g) if reg else None,
    )


def test_abmilp_with_uniform_scores_is_mean_pooling() -> None:
    tokens = make_tokens()
    readout = AbMILPReadout(D)
    nn.init.zeros_(readout.score[0].weight)
    nn.init.zeros_(readout.score[0].bias)
    pooled, scores = readout(tokens)
    torch.testing.assert_close(pooled, tokens.patches.mean(dim=1))
    torch.testing.assert_close(scores, torch.full((B, N), 1 / N))


def test_abmilp_uniform_with_content_all_averages_prefix_and_patches() -> None:
    tokens = make_tokens(reg=2)
    readout = AbMILPReadout(D, content="all")
    nn.init.zeros_(readout.score[0].weight)
    nn.init.zeros_(readout.score[0].bias)
    pooled, scores = readout(tokens)
    everything = torch.cat([tokens.cls[:, None], tokens.reg, tokens.patches], dim=1)  # (B, 1 + 2 + N, D)
    torch.testing.assert_close(pooled, everything.mean(dim=1))
    assert scores.shape == (B, N)  # maps cover the patches only
    torch.testing.assert_close(scores, torch.full((B, N), 1 / (N + 3)))


def test_abmilp_matches_the_beyond_cls_formula() -> None:
    """s_i = softmax_i(w·z_i + b) over patch tokens, z = Σ_i s_i z_i, with D + 1 parameters."""
    tokens = make_tokens(1)
    readout = AbMILPReadout(D)
    assert sum(p.numel() for p in readout.parameters()) == D + 1
    w, b = readout.score[0].weight[0].detach(), readout.score[0].bias[0].detach()
    for i in range(B):
        logits = [float(tokens.patches[i, j] @ w + b) for j in range(N)]
        expo = [math.exp(v - max(logits)) for v in logits]
        s = [e / sum(expo) for e in expo]
        z = sum(s[j] * tokens.patches[i, j] for j in range(N))
        pooled, scores = readout(tokens)
        torch.testing.assert_close(pooled[i], z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores[i], torch.tensor(s), rtol=1e-5, atol=1e-7)


def test_abmilp_depth_adds_linear_act_layers_before_the_score() -> None:
    readout = AbMILPReadout(D, depth=2, act="relu")
    kinds = [type(m) for m in readout.score]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in readout.parameters()) == 2 * (D * D + D) + D + 1
    pooled, _ = readout(make_tokens())
    assert pooled.shape == (B, D)


def test_attentive_matches_the_efficient_probing_formula() -> None:
    """Query j attends over raw patch tokens; its output is chunk j of the value projection."""
    torch.manual_seed(0)
    queries = 4
    readout = AttentiveReadout(D, queries=queries)
    tokens = make_tokens(2)
    pooled, attn = readout(tokens)
    assert attn.shape == (B, queries, N)
    chunk = D // queries
    for i in range(B):
        x = tokens.patches[i]  # (N, D)
        v = x @ readout.value.weight.T  # (N, D)
        expected = []
        for j in range(queries):
            a = torch.softmax(x @ readout.queries[j] / math.sqrt(D), dim=0)  # (N,)
            expected.append((a[:, None] * v[:, j * chunk:(j + 1) * chunk]).sum(dim=0))
            torch.testing.assert_close(attn[i, j], a)
        torch.testing.assert_close(pooled[i], torch.cat(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool,feature_dim", [("cls", D), ("mean", D), ("cls+mean", 2 * D), ("abmilp", D),
                                              ("attentive", D)])
def test_every_head_is_readout_then_mae_batchnorm_then_linear(pool: str, feature_dim: int) -> None:
    torch.manual_seed(0)
    head = build_head(HeadSpec(pool=pool), D, num_classes=5)
    assert isinstance(head.norm, nn.BatchNorm1d)
    assert head.norm.affine is False and head.norm.eps == 1e-6
    assert head.linear.in_features == feature_dim and head.linear.out_features == 5
    assert torch.all(head.linear.bias == 0)
    big = build_head(HeadSpec(pool=pool), 256, num_classes=100).linear.weight  # MAE: trunc_normal_(std=0.01)
    assert 0.009 < float(big.detach().std()) < 0.011
    tokens = make_tokens()
    head.eval()
    features, _ = head.readout(tokens)
    expected = head.linear(torch.nn.functional.batch_norm(features, head.norm.running_mean,
                                                           head.norm.running_var, eps=1e-6))
    torch.testing.assert_close(head(tokens), expected)


def test_cls_mean_readout_concatenates() -> None:
    head = build_head(HeadSpec(pool="cls+mean"), D, 3)
    tokens = make_tokens()
    features, _ = head.readout(tokens)
    torch.testing.assert_close(features, torch.cat([tokens.cls, tokens.patches.mean(1)], dim=1))


def test_mean_readout_uses_stored_mean_of_pooled_caches() -> None:
    head = build_head(HeadSpec(pool="mean"), D, 3)
    mean = torch.randn(B, D)
    features, _ = head.readout(Tokens(mean=mean))
    assert torch.equal(features, mean)


def test_final_norm_equals_the_backbones_layernorm() -> None:
    norm = nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    tokens = make_tokens(reg=1)
    out = apply_final_norm(tokens, norm.weight.detach(), norm.bias.detach(), 1e-6)
    torch.testing.assert_close(out.patches, norm(tokens.patches))
    torch.testing.assert_close(out.cls, norm(tokens.cls))
    torch.testing.assert_close(out.reg, norm(tokens.reg))
    assert out.mean is None


def test_bad_specs_and_missing_tokens_are_refused() -> None:
    with pytest.raises(ProbeError, match="unknown read-out"):
        HeadSpec(pool="max")
    with pytest.raises(ProbeError, match="abmilp-act"):
        HeadSpec(pool="abmilp", abmilp_act="gelu")
    with pytest.raises(ProbeError, match="divisible"):
        AttentiveReadout(D, queries=3)
    head = build_head(HeadSpec(pool="abmilp"), D, 3)
    with pytest.raises(ProbeError, match="patch tokens"):
        head(Tokens(cls=torch.randn(B, D)))
