"""Attention statistics: explicit attention reproduces timm's modules; every statistic equals its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitprobe.analysis.attention import (
    AttentionAccumulator,
    analyze_attention,
    magnitude_names,
    patch_distances,
    stat_names,
)
from vitprobe.analysis.passes import TokenLayout, attention_hooks, explicit_attention
from vitprobe.errors import ModelError
from vitprobe.models import load_backbone

EPS = 1e-6
TINY = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)  # 4x4 grid of 16 px patches
VIT_VARIANTS = {
    "cls+layerscale": dict(init_values=0.5),
    "cls+2reg": dict(reg_tokens=2, qk_norm=True),
    "no-cls+1reg": dict(class_token=False, reg_tokens=1, global_pool="avg"),
}
BEIT = dict(
    img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, use_abs_pos_emb=False, init_values=0.1
)
BEIT_VARIANTS = {
    "beit-rel-pos": dict(use_rel_pos_bias=True),
    "beit-shared-rel-pos": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
}


def tiny_backbone(kind: str, seed: int = 0):
    """A tiny backbone with seeded, large weights (peaked, non-uniform attention)."""
    if kind in VIT_VARIANTS:
        backbone = load_backbone(
            "timm:vit_tiny_patch16_224", random_init=True, arch_overrides={**TINY, **VIT_VARIANTS[kind]}
        )
    else:
        backbone = load_backbone(
            "timm:beit_base_patch16_224", random_init=True, arch_overrides={**BEIT, **BEIT_VARIANTS[kind]}
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            scale = 1.0 if "relative_position_bias_table" in name or "qkv.weight" in name else 0.3
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    backbone.model.eval()
    return backbone


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # (n, 3, H, W)


def loader(x: torch.Tensor, batch_size: int = 3) -> DataLoader:
    n = x.shape[0]
    return DataLoader(TensorDataset(x, torch.zeros(n), torch.arange(n)), batch_size=batch_size)


def call_kwargs(model: torch.nn.Module) -> dict:
    """The extra arguments each model's blocks pass to their attention."""
    rel = getattr(model, "rel_pos_bias", None)
    return {"shared_rel_pos_bias": rel()} if rel is not None else {}


# ----------------------------------------------------------------------------------------------------
# explicit attention == the module's (fused) forward


@pytest.mark.parametrize("kind", [*VIT_VARIANTS, *BEIT_VARIANTS])
def test_explicit_attention_reproduces_module_output(kind: str) -> None:
    model = tiny_backbone(kind).model
    x = torch.randn(3, 17 + (model.num_prefix_tokens - 1), model.embed_dim)  # (B, T, D)
    for blk in model.blocks:
        assert blk.attn.fused_attn  # the module's own forward uses SDPA
        with torch.no_grad():
            expected = blk.attn(x, **call_kwargs(model))
            probs, out = explicit_attention(blk.attn, x, **call_kwargs(model))
        assert probs.shape == (3, 2, x.shape[1], x.shape[1])
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, x.shape[1]))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_beit_attention_includes_relative_position_bias() -> None:
    """Written out: softmax(q·kᵀ·scale + table[index]); it differs from the attention without the bias."""
    model = tiny_backbone("beit-rel-pos").model
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32)  # (B, T, D)
    with torch.no_grad():
        probs, _ = explicit_attention(attn, x)
        bias_qkv = torch.cat(
            [attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]
        )  # k has no bias in BEiT
        qkv = (
            (x @ attn.qkv.weight.T + bias_qkv).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        )  # (3, B, H, T, Dh)
        q, k = qkv[0], qkv[1]
        table = attn.relative_position_bias_table  # (num_rel, H)
        bias = torch.stack([table[attn.relative_position_index, h] for h in range(2)])  # (H, T, T)
        with_bias = (q @ k.transpose(-2, -1) * 16**-0.5 + bias).softmax(-1)
        without_bias = (q @ k.transpose(-2, -1) * 16**-0.5).softmax(-1)
    torch.testing.assert_close(probs, with_bias, atol=1e-6, rtol=1e-5)
    assert (probs - without_bias).abs().max() > 0.05


def test_beit_shared_bias_reaches_the_hooks() -> None:
    """In a full forward the hook sees the shared relative position bias `Beit` passes to each block."""
    backbone = tiny_backbone("beit-shared-rel-pos")
    model = backbone.model
    seen: list[torch.Tensor] = []
    x = images(2)
    with attention_hooks(model, lambda block, xin, probs, y: seen.append(probs)), torch.no_grad():
        model.forward_features(x)
        tokens = model.pos_drop(torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1))
        normed = model.blocks[0].norm1(tokens)  # (B, T, D), the first attention's input
    with torch.no_grad():
        with_shared, _ = explicit_attention(
            model.blocks[0].attn, normed, shared_rel_pos_bias=model.rel_pos_bias()
        )
        without, _ = explicit_attention(model.blocks[0].attn, normed)
    torch.testing.assert_close(seen[0], with_shared)
    assert (seen[0] - without).abs().max() > 0.05


def test_hooks_leave_the_model_unchanged_and_are_removed() -> None:
    model = tiny_backbone("cls+layerscale").model
    x = images(2)
    with torch.no_grad():
        before = model.forward_features(x)
        with attention_hooks(model, lambda *args: None):
            during = model.forward_features(x)
        after = model.forward_features(x)
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(after, before)
    for blk in model.blocks:
        assert not blk.attn._forward_hooks and not blk._forward_pre_hooks


def test_unsupported_attention_is_a_model_error() -> None:
    model = torch.nn.Module()
    block = torch.nn.Module()
    block.attn = torch.nn.Identity()
    model.blocks = torch.nn.ModuleList([block])
    with pytest.raises(ModelError, match="cannot recompute"):
        with attention_hooks(model, lambda *args: None):
            pass


# ----------------------------------------------------------------------------------------------------
# golden values: every statistic, written out from its definition


def reference_pass(
    model: torch.nn.Module, x: torch.Tensor
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per block, by hand: A (B, H, T, T), block input (B, T, D), attention branch before layer-scale."""
    out = []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # (B, T, D)
        for blk in model.blocks:
            attn = blk.attn
            B, T, D = tokens.shape
            qkv = blk.norm1(tokens) @ attn.qkv.weight.T + attn.qkv.bias  # (B, T, 3D)
            q, k, v = qkv.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(
                2, 0, 3, 1, 4
            )  # (B, H, T, Dh)
            q, k = attn.q_norm(q), attn.k_norm(k)
            A = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim), dim=-1)  # (B, H, T, T)
            y = attn.proj((A @ v).transpose(1, 2).reshape(B, T, D))  # (B, T, D)
            out.append((A.double().numpy(), tokens.double().numpy(), y.double().numpy()))
            tokens = blk(tokens)
    return out


def reference_statistics(
    A: np.ndarray, x: np.ndarray, y: np.ndarray, P: int, has_cls: bool, grid: int, ps: int
):
    """The issue's definitions, looping over images, heads and tokens. Returns {name: (B, H) or (B,)}."""
    B, H, T, _ = A.shape
    patches = range(P, T)
    regs = range(1 if has_cls else 0, P)
    centre = {
        P + r * grid + c: np.array([(r + 0.5) * ps, (c + 0.5) * ps]) for r in range(grid) for c in range(grid)
    }
    stats: dict[str, np.ndarray] = {}

    def put(name: str, b: int, h: int | None, value: float) -> None:
        stats.setdefault(name, np.zeros((B, H)) if h is not None else np.zeros(B))
        if h is None:
            stats[name][b] = value
        else:
            stats[name][b, h] = value

    for b in range(B):
        for h in range(H):
            a = A[b, h]
            mass = {i: sum(a[i, j] for j in patches) for i in range(T)}
            p = {i: {j: a[i, j] / (mass[i] + EPS) for j in patches} for i in range(T)}
            ent = {i: -sum(p[i][j] * math.log(p[i][j] + EPS) for j in patches) for i in range(T)}
            put("patch_self", b, h, np.mean([a[i, i] for i in patches]))
            put("patch_self_adj", b, h, np.mean([a[i, i] / (mass[i] + EPS) for i in patches]))
            put("patch_entropy", b, h, np.mean([ent[i] for i in patches]))
            dist = [sum(p[i][j] * np.linalg.norm(centre[i] - centre[j]) for j in patches) for i in patches]
            put("attention_distance", b, h, np.mean(dist))
            if has_cls:
                put("cls_self", b, h, a[0, 0])
                put("cls_self_adj", b, h, a[0, 0] / (mass[0] + EPS))
                put("cls_to_patch", b, h, np.mean([a[0, j] for j in patches]))
                put("patch_to_cls", b, h, np.mean([a[i, 0] for i in patches]))
                put("cls_entropy", b, h, ent[0])
            if P > int(has_cls):
                put("patch_to_reg", b, h, np.mean([sum(a[i, r] for r in regs) for i in patches]))
                if has_cls:
                    put("cls_to_reg", b, h, sum(a[0, r] for r in regs))
        ratio = [np.linalg.norm(y[b, t]) / (np.linalg.norm(x[b, t]) + EPS) for t in range(T)]
        put("magnitude_patch", b, None, np.mean(ratio[P:]))
        if has_cls:
            put("magnitude_cls", b, None, ratio[0])
    return stats


def rollout_by_hand(As: list[np.ndarray], P: int) -> np.ndarray:
    """Abnar & Zuidema: R = Π_l rownorm(0.5·mean_h A_l + 0.5·I), [cls] row over the patches. (B, N)."""
    B, _, T, _ = As[0].shape
    maps = []
    for b in range(B):
        R = np.eye(T)
        for A in As:
            M = 0.5 * A[b].mean(0) + 0.5 * np.eye(T)
            M = M / M.sum(1, keepdims=True)
            R = M @ R
        maps.append(R[0, P:])
    return np.stack(maps)


@pytest.mark.parametrize("kind", list(VIT_VARIANTS))
def test_every_statistic_equals_its_definition(kind: str) -> None:
    backbone = tiny_backbone(kind)
    layout = TokenLayout.of(backbone)
    x = images(5)
    acc = analyze_attention(backbone, loader(x, batch_size=3), torch.device("cpu"), rollout=True, n_maps=4)
    result = acc.result()
    assert result["n_images"] == 5
    blocks = reference_pass(backbone.model, x)
    expected_names = set(stat_names(layout)) | set(magnitude_names(layout))
    assert set(result["stats"]) == expected_names
    assert ("cls_self" in expected_names) == backbone.has_cls
    assert ("patch_to_reg" in expected_names) == (backbone.num_reg_tokens > 0)
    for block, (A, xin, y) in enumerate(blocks):
        ref = reference_statistics(A, xin, y, layout.num_prefix, layout.has_cls, 4, 16)
        assert set(ref) == expected_names
        for name, values in ref.items():
            got = result["stats"][name]
            if values.ndim == 2:  # per head, averaged over the 5 images
                np.testing.assert_allclose(got["per_head"][block], values.mean(0), rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(got["mean"][block], values.mean(), rtol=1e-6, atol=1e-9)
            else:
                assert got["per_head"] is None
                np.testing.assert_allclose(got["mean"][block], values.mean(), rtol=1e-6, atol=1e-9)
    maps = acc.maps()
    if not backbone.has_cls:
        assert maps == {}
        return
    P = layout.num_prefix
    last_cls = blocks[-1][0][:, :, 0, P:].mean(1).reshape(5, 4, 4)  # (B, N) -> (B, h, w)
    np.testing.assert_allclose(maps["cls_attention_last"].numpy(), last_cls[:4], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        maps["cls_attention_last_mean"].numpy(), last_cls.mean(0), rtol=1e-5, atol=1e-7
    )
    roll = rollout_by_hand([A for A, _, _ in blocks], P).reshape(5, 4, 4)  # (B, N) -> (B, h, w)
    np.testing.assert_allclose(maps["rollout"].numpy(), roll[:4], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["rollout_mean"].numpy(), roll.mean(0), rtol=1e-5, atol=1e-7)


def test_attention_varies_so_the_golden_test_can_fail() -> None:
    """The seeded weights give peaked attention: per-head values differ from the uniform ones."""
    backbone = tiny_backbone("cls+layerscale")
    acc = analyze_attention(backbone, loader(images(2)), torch.device("cpu"))
    stats = acc.result()["stats"]
    cls_self = np.asarray(stats["cls_self"]["per_head"])  # (L, H); uniform attention gives 1/17
    assert np.abs(cls_self * 17 - 1).max() > 0.3
    assert max(stats["patch_entropy"]["mean"]) < math.log(16) - 0.3


@pytest.mark.parametrize("kind", ["cls+2reg", "no-cls+1reg"])
def test_uniform_attention_gives_log_n_entropy_and_one_over_t(kind: str) -> None:
    """Zero q and k projections: A = 1/T everywhere, so H = log N, cls_self = 1/T, distance = mean d."""
    backbone = tiny_backbone(kind)
    with torch.no_grad():
        for blk in backbone.model.blocks:
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * dim] = 0  # rows of q and k
            blk.attn.qkv.bias[: 2 * dim] = 0
    layout = TokenLayout.of(backbone)
    T, N = layout.num_prefix + 16, 16
    stats = analyze_attention(backbone, loader(images(3)), torch.device("cpu")).result()["stats"]

    def each(name: str) -> np.ndarray:
        return np.asarray(stats[name]["per_head"])  # (L, H)

    np.testing.assert_allclose(each("patch_entropy"), math.log(N), atol=1e-4)
    np.testing.assert_allclose(each("patch_self"), 1 / T, rtol=1e-5)
    np.testing.assert_allclose(each("patch_self_adj"), 1 / N, rtol=1e-4)
    np.testing.assert_allclose(
        each("attention_distance"), patch_distances((4, 4), 16).mean().item(), rtol=1e-5
    )
    np.testing.assert_allclose(each("patch_to_reg"), layout.num_reg / T, rtol=1e-5)
    if backbone.has_cls:
        np.testing.assert_allclose(each("cls_self"), 1 / T, rtol=1e-5)
        np.testing.assert_allclose(each("cls_entropy"), math.log(N), atol=1e-4)
        np.testing.assert_allclose(each("cls_to_patch"), 1 / T, rtol=1e-5)
        np.testing.assert_allclose(each("patch_to_cls"), 1 / T, rtol=1e-5)
    else:
        assert "cls_self" not in stats and "magnitude_cls" not in stats


def test_patch_distances_in_pixels() -> None:
    d = patch_distances((2, 3), 16)  # patches row-major: (0,0) (0,1) (0,2) (1,0) ...
    assert d.shape == (6, 6)
    assert d[0, 1].item() == 16 and d[0, 2].item() == 32 and d[0, 3].item() == 16
    assert d[0, 5].item() == pytest.approx(math.hypot(16, 32))


@pytest.mark.parametrize("kind", list(BEIT_VARIANTS))
def test_beit_statistics_run_end_to_end(kind: str) -> None:
    backbone = tiny_backbone(kind)
    acc = analyze_attention(backbone, loader(images(4)), torch.device("cpu"), rollout=True)
    stats = acc.result()["stats"]
    assert np.asarray(stats["cls_self"]["per_head"]).shape == (2, 2)
    assert all(np.isfinite(np.asarray(v["mean"])).all() for v in stats.values())
    assert acc.maps()["rollout"].shape == (4, 4, 4)


def test_accumulator_rejects_a_wrong_token_count() -> None:
    acc = AttentionAccumulator(TokenLayout(1, True, (4, 4), 16), depth=1, num_heads=2)
    probs = torch.full((1, 2, 10, 10), 0.1)
    with pytest.raises(ModelError, match="expected 1 prefix"):
        acc.on_block(0, torch.ones(1, 10, 8), probs, torch.ones(1, 10, 8))


def test_statistics_in_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large batches are split into chunks of images for the float64 statistics; the sums do not change."""
    import vitprobe.analysis.attention as attention

    backbone = tiny_backbone("cls+2reg")
    x = images(4)
    whole = analyze_attention(backbone, loader(x, batch_size=4), torch.device("cpu")).result()
    monkeypatch.setattr(attention, "STATS_CHUNK_ELEMENTS", 2 * 19 * 19)  # one image per chunk
    chunked = analyze_attention(backbone, loader(x, batch_size=4), torch.device("cpu")).result()
    for name, entry in whole["stats"].items():
        np.testing.assert_allclose(chunked["stats"][name]["mean"], entry["mean"], rtol=1e-12)
