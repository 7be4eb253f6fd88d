"""The seed papers' backbones (issue 13): each official layout, written as its reference save code writes it
(tests/layout_writers.py), loads strictly into its preset with every tensor in place; the renamed layouts
compute what the reference model computes (forward parity against the reference definitions written out
here); a classifier head is dropped with a note in every layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from layout_writers import (
    D2V,
    Written,
    random_state_dict,
    tiny,
    write_data2vec2,
    write_data2vec2_teacher,
    write_dinov2_official,
    write_latentmim,
    write_latentmim_target,
    write_mmpretrain_classifier,
    write_mmpretrain_mae,
    write_mmpretrain_maskfeat,
    write_mmpretrain_mff,
    write_mocov3,
    write_mocov3_lincls,
    write_mocov3_momentum,
    write_simmim,
)
from vitprobe.checkpoints import read_checkpoint
from vitprobe.cli import app
from vitprobe.errors import CheckpointError, WeightsUnavailableError
from vitprobe.files import sha256_file
from vitprobe.models import PRESETS, build_preset, load_backbone
from vitprobe.remap import LAYOUTS

runner = CliRunner()
StateDict = dict[str, torch.Tensor]

# preset (or timm:NAME with that preset's tiny architecture), layout, writer, file name, branch
CASES: list[tuple[str, str, Callable[..., Written], str, str | None]] = [
    (
        "mff-b16-300e",
        "mmpretrain",
        write_mmpretrain_mff,
        "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k.pth",
        None,
    ),
    (
        "mff-b16-800e",
        "mmpretrain",
        write_mmpretrain_classifier,
        "vit-base-p16_8xb2048-linear-coslr-90e.pth",
        None,
    ),
    (
        "mae-b16",
        "mmpretrain",
        write_mmpretrain_mae,
        "mae_vit-base-p16_8xb512-fp16-coslr-1600e_in1k.pth",
        None,
    ),
    ("latentmim-b16", "latentmim", write_latentmim, "checkpoint_0800.pth", None),
    ("latentmim-b16", "latentmim", write_latentmim_target, "checkpoint_latest.pth", "target_encoder"),
    ("simmim-b16", "simmim", write_simmim, "simmim_pretrain__vit_base__img224__800ep.pth", None),
    ("data2vec2-b16", "data2vec2", write_data2vec2, "base_imagenet.pt", None),
    ("data2vec2-b16", "data2vec2", write_data2vec2_teacher, "base_imagenet.pt", "teacher"),
    ("mocov3-b16", "mocov3", write_mocov3, "vit-b-300ep.pth.tar", None),
    ("mocov3-b16", "mocov3", write_mocov3_momentum, "vit-b-300ep.pth.tar", "momentum_encoder"),
    ("mocov3-b16", "mocov3", write_mocov3_lincls, "linear-vit-b-300ep.pth.tar", None),
    ("dinov2-l14", "dinov2", write_dinov2_official, "dinov2_vitl14_pretrain.pth", None),
    ("dinov2-g14", "dinov2", write_dinov2_official, "dinov2_vitg14_pretrain.pth", None),
    ("dinov2-s14-reg", "dinov2", write_dinov2_official, "dinov2_vits14_reg4_pretrain.pth", None),
    ("dinov2-g14-reg", "dinov2", write_dinov2_official, "dinov2_vitg14_reg4_pretrain.pth", None),
]
DEFAULT_BRANCH = {"latentmim": "encoder", "data2vec2": "student", "mocov3": "base_encoder"}


def assert_loaded(model: torch.nn.Module, want: StateDict) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(
    ("name", "layout", "writer", "filename", "branch"),
    CASES,
    ids=[f"{c[0]}-{c[2].__name__[6:]}" for c in CASES],
)
def test_official_layout_loads_exactly(
    tmp_path: Path, name: str, layout: str, writer: Callable[..., Written], filename: str, branch: str | None
) -> None:
    overrides = tiny(name)
    want, other = random_state_dict(name, overrides, seed=1), random_state_dict(name, overrides, seed=2)
    path = tmp_path / filename
    expected, dropped = writer(want, other, path)
    backbone = load_backbone(name, checkpoint=str(path), arch_overrides=overrides, branch=branch)
    assert_loaded(backbone.model, expected)
    report = backbone.report
    assert report.layout == layout and report.sha256 == sha256_file(path) and not report.random_init
    assert sorted(report.dropped) == dropped
    if layout in DEFAULT_BRANCH and "lincls" not in writer.__name__:
        assert report.branch == (branch or DEFAULT_BRANCH[layout])
    size = int(overrides["img_size"])
    (tokens,) = backbone.intermediates(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, backbone.num_prefix_tokens + 4, 32) and torch.isfinite(tokens).all()


def test_mff_fusion_weights_are_reported_not_loaded(tmp_path: Path) -> None:
    """MFF's `proj_weights` are softmax-normalised fusion weights over the fused blocks (mff.py:154): the
    note gives them per block, with the blocks taken from the config text stored in `meta['cfg']`."""
    overrides = tiny("mff-b16-300e")
    want = random_state_dict("mff-b16-300e", overrides, seed=3)
    write_mmpretrain_mff(want, want, tmp_path / "mff.pth")
    backbone = load_backbone("mff-b16-300e", checkpoint=str(tmp_path / "mff.pth"), arch_overrides=overrides)
    weights = torch.softmax(torch.tensor([0.3, -0.2]), dim=0).tolist()
    note = next(n for n in backbone.report.notes if n.startswith("MFF fusion"))
    assert f"block 0: {weights[0]:.3f}, block 1: {weights[1]:.3f}" in note
    assert "backbone.proj_weights" in backbone.report.dropped
    assert any("neck.*" in n for n in backbone.report.notes)


def test_mmpretrain_maskfeat_loads_through_timm_names(tmp_path: Path) -> None:
    """The mmpretrain remap reads MaskFeat too (mask token, HOG buffers and the linear neck dropped)."""
    overrides = tiny("mae-b16")
    want = random_state_dict("mae-b16", overrides, seed=4)
    _, dropped = write_mmpretrain_maskfeat(want, want, tmp_path / "maskfeat.pth")
    backbone = load_backbone(
        "timm:vit_base_patch16_224", checkpoint=str(tmp_path / "maskfeat.pth"), arch_overrides=overrides
    )
    assert_loaded(backbone.model, want)
    assert backbone.report.layout == "mmpretrain" and sorted(backbone.report.dropped) == dropped


def _add_head(path: Path, layout: str, dim: int) -> list[str]:
    """Add a classifier `head` to a written file where that layout's classifier would sit."""
    ckpt = read_checkpoint(path)
    head = {"weight": torch.randn(10, dim), "bias": torch.randn(10)}
    if layout in ("mae_pretrain", "mae_visualize", "beitv2_pretrain", "simmim", "data2vec2"):
        prefix, where = ("encoder.head." if layout == "simmim" else "head."), ckpt["model"]
    elif layout in ("ibot", "mmpretrain", "mocov3", "latentmim"):
        prefix = {
            "ibot": "head.",
            "mmpretrain": "backbone.head.",
            "mocov3": "module.base_encoder.head.",
            "latentmim": "module.encoder.head.",
        }[layout]
        where = ckpt["state_dict"]
    elif layout == "dino_full":
        prefix, where = "backbone.head.", ckpt["teacher"]
    elif layout == "ijepa":
        prefix, where = "module.head.", ckpt["target_encoder"]
    else:  # bare state dicts: timm, dino_backbone, dinov2
        prefix, where = "head.", ckpt
    where.update({f"{prefix}{k}": v for k, v in head.items()})
    torch.save(ckpt, path)
    return [f"{prefix}{k}" for k in head]


def _file_in_layout(layout: str, tmp_path: Path) -> tuple[str, Path, dict[str, float]]:
    """A tiny file in `layout` (via the writers of test_models.py and layout_writers.py), and its preset."""
    import test_models as tm

    by_layout = {
        "timm": ("mae-h14", tm.write_timm_safetensors),
        "mae_pretrain": ("mae-b16", tm.write_mae_pretrain),
        "mae_visualize": ("mae-l16", tm.write_mae_visualize),
        "dino_backbone": ("dino-s16", tm.write_bare),
        "dino_full": ("dino-b8", tm.write_dino_full),
        "ibot": ("ibot-b16", tm.write_ibot),
        "ijepa": ("ijepa-h14", tm.write_ijepa),
        "dinov2": ("dinov2-s14", tm.write_dinov2),
        "beitv2_pretrain": ("beitv2-b16", tm.write_beitv2_pretrain),
        "mocov3": ("mocov3-b16", write_mocov3),
        "mmpretrain": ("mff-b16-300e", write_mmpretrain_mff),
        "latentmim": ("latentmim-b16", write_latentmim),
        "simmim": ("simmim-b16", write_simmim),
        "data2vec2": ("data2vec2-b16", write_data2vec2),
    }
    name, writer = by_layout[layout]
    overrides = tiny(name)
    want = random_state_dict(name, overrides, seed=5)
    path = tmp_path / ("model.pth" if layout != "timm" else "model.safetensors")
    if layout == "timm":
        want = {**want}  # safetensors cannot take an extra head afterwards: write it in directly
        want.update({"head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)})
    writer(want, want, path)
    return name, path, overrides


# where a head left in a file is reported: in timm's names once remapped, except inside the projector
# of the two layouts whose `head` already is a projection MLP (dropped, with its own note)
HEAD_REPORTED_AS = {"latentmim": "encoder.head.", "mocov3": "module.base_encoder.head."}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_classifier_head_is_dropped_with_a_note_in_every_layout(tmp_path: Path, layout: str) -> None:
    name, path, overrides = _file_in_layout(layout, tmp_path)
    if layout != "timm":  # the timm file was written with its head
        _add_head(path, layout, 32)
    backbone = load_backbone(name, checkpoint=str(path), arch_overrides=overrides)
    assert backbone.report.layout == layout
    reported = HEAD_REPORTED_AS.get(layout, "head.")
    assert {f"{reported}weight", f"{reported}bias"} <= set(backbone.report.dropped)
    assert any("head" in note and "dropped" in note for note in backbone.report.notes)
    assert not any(k.startswith("head.") for k in backbone.model.state_dict())


# ---- forward parity with the reference definitions ------------------------------------------------------


def _attention(
    x: torch.Tensor,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    proj_w: torch.Tensor,
    proj_b: torch.Tensor,
    heads: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head self-attention as the reference blocks write it out (softmax explicit)."""
    b, n, d = x.shape
    qkv = (
        F.linear(x, qkv_w, qkv_b).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    )  # (3, B, H, N, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        attn = attn + bias
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
    return F.linear(out, proj_w, proj_b)


def _ln(x: torch.Tensor, sd: StateDict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-6)


def _mlp(x: torch.Tensor, sd: StateDict, fc1: str, fc2: str) -> torch.Tensor:
    return F.linear(
        F.gelu(F.linear(x, sd[f"{fc1}.weight"], sd[f"{fc1}.bias"])), sd[f"{fc2}.weight"], sd[f"{fc2}.bias"]
    )


def _load(
    name: str, writer: Callable[..., Written], tmp_path: Path, **kw: object
) -> tuple[StateDict, object]:
    overrides = tiny(name)
    want = random_state_dict(name, overrides, seed=11)
    writer(want, random_state_dict(name, overrides, seed=12), tmp_path / "w.pth")
    backbone = load_backbone(name, checkpoint=str(tmp_path / "w.pth"), arch_overrides=overrides, **kw)
    return read_checkpoint(tmp_path / "w.pth"), backbone


def test_data2vec2_tokens_equal_the_reference_post_ln_encoder(tmp_path: Path) -> None:
    """fairseq examples/data2vec/models: images.py (patch embed + fixed positions), base.py:302-319 (the
    extra token prepended after the positions, then the context encoder), modules.py:60-94 (BlockEncoder:
    its norm before the blocks when layer_norm_first=False) and :306-323 (AltBlock, post-LN)."""
    ckpt, backbone = _load("data2vec2-b16", write_data2vec2, tmp_path)
    sd, x = ckpt["model"], torch.randn(2, 3, 32, 32)
    t = F.conv2d(x, sd[f"{D2V}local_encoder.proj.weight"], sd[f"{D2V}local_encoder.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2) + sd[f"{D2V}fixed_positional_encoder.positions"]  # (B, N, D)
    t = torch.cat([sd[f"{D2V}extra_tokens"].expand(2, -1, -1), t], dim=1)  # (B, 1 + N, D)
    t = _ln(t, sd, f"{D2V}context_encoder.norm")
    for p in [f"{D2V}context_encoder.blocks.0", f"{D2V}context_encoder.blocks.1", "blocks.0", "blocks.1"]:
        t = _ln(
            t
            + _attention(
                t,
                sd[f"{p}.attn.qkv.weight"],
                sd[f"{p}.attn.qkv.bias"],
                sd[f"{p}.attn.proj.weight"],
                sd[f"{p}.attn.proj.bias"],
                heads=2,
            ),
            sd,
            f"{p}.norm1",
        )
        t = _ln(t + _mlp(t, sd, f"{p}.mlp.fc1", f"{p}.mlp.fc2"), sd, f"{p}.norm2")
    (got,) = backbone.intermediates(x)
    torch.testing.assert_close(got, t, atol=1e-4, rtol=1e-4)
    assert type(backbone.final_norm).__name__ == "Identity"


def test_latentmim_tokens_equal_the_reference_vit(tmp_path: Path) -> None:
    """LatentMIM vits.py:254-284 (`VIT.forward`): Patchify (vits.py:39-58, gap 0), Linear embedding, [cls],
    `pos_embeds[pid]` with pid + 1 for the patches and 0 for [cls], pre-LN blocks, `norm`."""
    ckpt, backbone = _load("latentmim-b16", write_latentmim, tmp_path)
    sd = {
        k.removeprefix("module.encoder."): v for k, v in ckpt["state_dict"].items() if ".encoder." in k[:16]
    }
    x = torch.randn(2, 3, 32, 32)
    p = x.reshape(2, 3, 2, 16, 2, 16)  # (n, c, h, p, w, q)
    p = torch.einsum("nchpwq->nhwpqc", p).reshape(2, 4, 16 * 16 * 3)  # (B, N, p*p*3)
    t = F.linear(p, sd["embed.proj.weight"], sd["embed.proj.bias"])
    t = torch.cat([sd["cls_token"].repeat(2, 1, 1), t], dim=1)
    t = t + sd["pos_embed.pos_embeds"][torch.arange(5)]  # pid 0 = [cls], 1 + i = patch i
    for i in range(2):
        b = f"blocks.{i}"
        t = t + _attention(
            _ln(t, sd, f"{b}.norm1"),
            sd[f"{b}.attn.qkv.weight"],
            sd[f"{b}.attn.qkv.bias"],
            sd[f"{b}.attn.proj.weight"],
            sd[f"{b}.attn.proj.bias"],
            heads=2,
        )
        t = t + _mlp(_ln(t, sd, f"{b}.norm2"), sd, f"{b}.mlp.fc1", f"{b}.mlp.fc2")
    torch.testing.assert_close(backbone.model.forward_features(x), _ln(t, sd, "norm"), atol=1e-4, rtol=1e-4)


def _beit_relative_position_index(w: int) -> torch.Tensor:
    """SimMIM models/vision_transformer.py:189-204 (`RelativePositionBias`), for a w x w window."""
    coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij")).flatten(
        1
    )  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # (N, N, 2)
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    num = (2 * w - 1) ** 2 + 3
    index = torch.zeros((w * w + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def test_simmim_tokens_equal_the_reference_beit_encoder(tmp_path: Path) -> None:
    """SimMIM models/vision_transformer.py:92-121 (attention with qkv bias cat(q_bias, 0, v_bias) and the
    shared relative position bias), :145-152 (blocks with gamma_1/2), :308-322 (forward_features up to
    `norm`); the bias table indexed as `RelativePositionBias` builds it (:179-213)."""
    ckpt, backbone = _load("simmim-b16", write_simmim, tmp_path)
    sd = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    x = torch.randn(2, 3, 32, 32)
    t = (
        F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
        .flatten(2)
        .transpose(1, 2)
    )
    t = torch.cat([sd["cls_token"].expand(2, -1, -1), t], dim=1)  # (B, 5, D)
    table = sd["rel_pos_bias.relative_position_bias_table"]
    bias = table[_beit_relative_position_index(2).view(-1)].view(5, 5, -1).permute(2, 0, 1)  # (H, 5, 5)
    for i in range(2):
        b = f"blocks.{i}"
        qkv_b = torch.cat(
            [sd[f"{b}.attn.q_bias"], torch.zeros_like(sd[f"{b}.attn.v_bias"]), sd[f"{b}.attn.v_bias"]]
        )
        y = _attention(
            _ln(t, sd, f"{b}.norm1"),
            sd[f"{b}.attn.qkv.weight"],
            qkv_b,
            sd[f"{b}.attn.proj.weight"],
            sd[f"{b}.attn.proj.bias"],
            heads=2,
            bias=bias.unsqueeze(0),
        )
        t = t + sd[f"{b}.gamma_1"] * y
        t = t + sd[f"{b}.gamma_2"] * _mlp(_ln(t, sd, f"{b}.norm2"), sd, f"{b}.mlp.fc1", f"{b}.mlp.fc2")
    torch.testing.assert_close(backbone.model.forward_features(x), _ln(t, sd, "norm"), atol=1e-4, rtol=1e-4)


def test_mmpretrain_tokens_equal_the_reference_vit(tmp_path: Path) -> None:
    """mmpretrain vision_transformer.py:106-109 (x + attn(ln1 x); ffn(ln2 x, identity=x), mmcv FFN:
    layers.0.0 Linear, GELU, layers.1 Linear) and :459-488 (patch embedding, [cls], pos_embed, final ln1)."""
    ckpt, backbone = _load("mff-b16-300e", write_mmpretrain_mff, tmp_path)
    sd = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    x = torch.randn(2, 3, 32, 32)
    t = F.conv2d(x, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=16)
    t = torch.cat([sd["cls_token"].expand(2, -1, -1), t.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    for i in range(2):
        b = f"layers.{i}"
        t = t + _attention(
            _ln(t, sd, f"{b}.ln1"),
            sd[f"{b}.attn.qkv.weight"],
            sd[f"{b}.attn.qkv.bias"],
            sd[f"{b}.attn.proj.weight"],
            sd[f"{b}.attn.proj.bias"],
            heads=2,
        )
        t = t + _mlp(_ln(t, sd, f"{b}.ln2"), sd, f"{b}.ffn.layers.0.0", f"{b}.ffn.layers.1")
    torch.testing.assert_close(backbone.model.forward_features(x), _ln(t, sd, "ln1"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["dinov2-s14-reg", "dinov2-g14"])
def test_dinov2_tokens_equal_the_reference(tmp_path: Path, name: str) -> None:
    """dinov2 models/vision_transformer.py:214-233 (`prepare_tokens_with_masks`: [cls] + patches, + pos_embed
    with its [cls] row, registers inserted after [cls] without position), layers/block.py (x + ls1(attn(
    norm1 x)); x + ls2(mlp(norm2 x))), layers/swiglu_ffn.py:30-34 (SwiGLU: silu(x1) * x2, x1 first)."""
    ckpt, backbone = _load(name, write_dinov2_official, tmp_path)
    sd, x = ckpt, torch.randn(2, 3, 28, 28)
    t = (
        F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
        .flatten(2)
        .transpose(1, 2)
    )
    t = torch.cat([sd["cls_token"].expand(2, -1, -1), t], dim=1) + sd["pos_embed"]  # (B, 1 + N, D)
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(2, -1, -1), t[:, 1:]], dim=1)
    for i in range(2):
        b = f"blocks.{i}"
        y = _attention(
            _ln(t, sd, f"{b}.norm1"),
            sd[f"{b}.attn.qkv.weight"],
            sd[f"{b}.attn.qkv.bias"],
            sd[f"{b}.attn.proj.weight"],
            sd[f"{b}.attn.proj.bias"],
            heads=2,
        )
        t = t + sd[f"{b}.ls1.gamma"] * y
        h = _ln(t, sd, f"{b}.norm2")
        if f"{b}.mlp.w12.weight" in sd:
            x1, x2 = F.linear(h, sd[f"{b}.mlp.w12.weight"], sd[f"{b}.mlp.w12.bias"]).chunk(2, dim=-1)
            h = F.linear(F.silu(x1) * x2, sd[f"{b}.mlp.w3.weight"], sd[f"{b}.mlp.w3.bias"])
        else:
            h = _mlp(h, sd, f"{b}.mlp.fc1", f"{b}.mlp.fc2")
        t = t + sd[f"{b}.ls2.gamma"] * h
    torch.testing.assert_close(backbone.model.forward_features(x), _ln(t, sd, "norm"), atol=1e-4, rtol=1e-4)


def test_dinov2_register_presets_resample_with_the_register_models_rule(tmp_path: Path) -> None:
    """dinov2/hub/backbones.py:98-156: the register models interpolate with antialias=True and
    interpolate_offset=0.0, i.e. to the output size (vision_transformer.py:194-209), not by scale factor."""
    file_size = {**tiny("dinov2-s14-reg"), "img_size": 7 * 14}  # a 7x7 grid in the file, 2x2 in the model
    want = random_state_dict("dinov2-s14-reg", file_size, seed=21)
    expected, _ = write_dinov2_official(want, want, tmp_path / "reg.pth")
    backbone = load_backbone(
        "dinov2-s14-reg", checkpoint=str(tmp_path / "reg.pth"), arch_overrides=tiny("dinov2-s14-reg")
    )
    patches = expected["pos_embed"].reshape(1, 7, 7, 32).permute(0, 3, 1, 2)  # (1, D, 7, 7)
    resized = F.interpolate(patches, size=(2, 2), mode="bicubic", antialias=True)  # (1, D, 2, 2)
    pos = resized.permute(0, 2, 3, 1).reshape(1, 4, 32)
    assert_loaded(backbone.model, {**expected, "pos_embed": pos})
    assert any("from 7x7 to 2x2" in note for note in backbone.report.notes)


# ---- presets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_frozen_param_count_equals_the_built_model(name: str) -> None:
    """Issue 12: `models list` reads frozen counts; each must equal the architecture built (meta device)."""
    model = build_preset(name, device="meta")
    assert PRESETS[name].params == sum(p.numel() for p in model.parameters())
    assert PRESETS[name].size == (model.embed_dim, len(model.blocks))  # used by the mismatch messages


def test_dinov2_giant_count_by_formula() -> None:
    """ViT-g/14 (dinov2 vit_giant2: 1536 wide, 40 blocks, SwiGLU hidden 4096, layer scale), at 224 px."""
    d, depth, hidden, tokens = 1536, 40, 4096, 1 + 16 * 16
    block = (
        4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * hidden * d + 2 * hidden) + (hidden * d + d) + 2 * d
    )
    total = (3 * 14 * 14 * d + d) + d + tokens * d + depth * block + 2 * d
    assert PRESETS["dinov2-g14"].params == total
    assert PRESETS["dinov2-g14-reg"].params == total - d + 4 * d  # no [cls] position, 4 registers


def test_models_list_builds_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import vitprobe.models

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("models list built a model")

    monkeypatch.setattr(vitprobe.models, "create_timm_backbone", forbidden)
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["presets"]}
    assert rows["dinov2-g14"]["params"] == 1_134_769_664 and rows["latentmim-b16"]["manual_download"] is True


@pytest.mark.parametrize("name", ["latentmim-b16", "simmim-b16"])
def test_manual_download_presets_say_where_to_get_the_file(name: str) -> None:
    with pytest.raises(WeightsUnavailableError, match="cannot download") as info:
        load_backbone(name)
    assert "drive.google.com" in info.value.message and "--checkpoint" in (info.value.hint or "")


def test_branch_of_latentmim_data2vec_mocov3_is_checked(tmp_path: Path) -> None:
    overrides = tiny("mocov3-b16")
    want = random_state_dict("mocov3-b16", overrides, seed=7)
    write_mocov3(want, want, tmp_path / "m.pth.tar")
    with pytest.raises(CheckpointError, match="use one of base_encoder, momentum_encoder"):
        load_backbone(
            "mocov3-b16", checkpoint=str(tmp_path / "m.pth.tar"), arch_overrides=overrides, branch="teacher"
        )


def test_cli_show_data2vec2_reports_post_ln_and_dropped_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    preset = PRESETS["data2vec2-b16"]
    kwargs = {**preset.timm_kwargs, **tiny("data2vec2-b16")}
    monkeypatch.setitem(PRESETS, "tiny-d2v", dataclasses.replace(preset, name="tiny-d2v", timm_kwargs=kwargs))
    want = random_state_dict("data2vec2-b16", tiny("data2vec2-b16"), seed=8)
    write_data2vec2(want, want, tmp_path / "base_imagenet.pt")
    result = runner.invoke(
        app, ["models", "show", "tiny-d2v", "--checkpoint", str(tmp_path / "base_imagenet.pt"), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["layout"] == "data2vec2" and info["branch"] == "student" and info["final_norm"] == "Identity"
    assert any("post-LN" in n for n in info["notes"]) and any("_ema" in n for n in info["notes"])
    assert info["depth"] == 4 and math.isclose(info["crop_pct"], 0.875)


# ---- real sizes (slow) -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "writer"),
    [
        ("mff-b16-300e", write_mmpretrain_mff),
        ("data2vec2-b16", write_data2vec2),
        ("latentmim-b16", write_latentmim),
    ],
)
def test_real_size_official_layout(tmp_path: Path, name: str, writer: Callable[..., Written]) -> None:
    want = random_state_dict(name, {}, seed=9)  # the real ViT-B/16 keys and shapes
    expected, dropped = writer(want, want, tmp_path / "w.pth")
    backbone = load_backbone(name, checkpoint=str(tmp_path / "w.pth"))
    assert_loaded(backbone.model, expected)
    assert sorted(backbone.report.dropped) == dropped and backbone.report.num_params == PRESETS[name].params


def test_attention_analysis_hooks_the_post_ln_blocks() -> None:
    """The attention pass (vitprobe.analysis.attention) recomputes data2vec 2.0's attention from the block
    input itself (post-LN: attention sees the un-normalised residual stream), and leaves the output as is."""
    from vitprobe.analysis.attention import attention_hooks

    backbone = load_backbone("data2vec2-b16", random_init=True, arch_overrides=tiny("data2vec2-b16"))
    model, x = backbone.model, torch.randn(2, 3, 32, 32)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        plain = model.forward_features(x)
        with attention_hooks(model, lambda i, inp, probs, out: seen.__setitem__(i, (inp, probs))):
            hooked = model.forward_features(x)
    assert sorted(seen) == [0, 1, 2, 3] and torch.equal(plain, hooked)
    inp, probs = seen[2]
    attn = model.blocks[2].attn
    qkv = attn.qkv(inp).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    expected = ((qkv[0] * 16**-0.5) @ qkv[1].transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
    torch.testing.assert_close(probs, expected)
