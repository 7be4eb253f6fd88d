"""Backbones: presets build, official-layout files load exactly, mismatches and unsafe files fail.

Official layouts are written from tiny versions of each preset's real timm architecture (`arch_overrides`),
in the key layout of the official release; the slow tests do the same at the real ViT-B/16 and BEiT-v2-B size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vitprobe.cli import app
from vitprobe.errors import CheckpointError, KeyMismatchError, ModelError, WeightsUnavailableError
from vitprobe.files import sha256_file
from vitprobe.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    create_timm_backbone,
    load_backbone,
    load_state_dict_strict,
    preset_num_params,
)

runner = CliRunner()
StateDict = dict[str, torch.Tensor]


def tiny(name: str) -> dict[str, int]:
    """A two-block, 32-wide version of a preset's architecture with a 2x2 patch grid."""
    patch = PRESETS[name].patch
    return {"img_size": 2 * patch, "embed_dim": 32, "depth": 2, "num_heads": 2}


def random_state_dict(name: str, overrides: dict[str, int], seed: int) -> StateDict:
    """Random values for every key of the (tiny) architecture, unlike any initialisation."""
    preset = PRESETS[name]
    model = create_timm_backbone(preset.timm, device="meta", **{**preset.timm_kwargs, **overrides})
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def block_keys(sd: StateDict, block: int = 0) -> StateDict:
    return {k.removeprefix(f"blocks.{block}."): v for k, v in sd.items() if k.startswith(f"blocks.{block}.")}


# ---- writers: one per official layout; each returns the keys the remap must drop ------------------

ARGS = argparse.Namespace(model="vit", lr=1.5e-4, betas=[0.9, 0.95], output_dir="/out", norm_pix_loss=True)


def write_mae_pretrain(want: StateDict, other: StateDict, path: Path) -> list[str]:
    optimizer = {"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    torch.save(
        {
            "model": want,
            "optimizer": optimizer,
            "epoch": 799,
            "args": ARGS,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        },
        path,
    )
    return []


def write_mae_visualize(want: StateDict, other: StateDict, path: Path) -> list[str]:
    dim = want["cls_token"].shape[-1]
    decoder = {
        "mask_token": torch.randn(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, dim),
        "decoder_embed.bias": torch.randn(16),
        "decoder_pos_embed": torch.randn(1, 5, 16),
        "decoder_blocks.0.norm1.weight": torch.randn(16),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
        "decoder_norm.weight": torch.randn(16),
        "decoder_pred.weight": torch.randn(768, 16),
    }
    torch.save({"model": {**want, **decoder}}, path)
    return sorted(decoder)


def write_bare(want: StateDict, other: StateDict, path: Path) -> list[str]:
    torch.save(want, path)
    return []


def dino_head(dim: int, *, ibot: bool = False) -> StateDict:
    """DINOHead (facebookresearch/dino vision_transformer.py): a 3-layer MLP `mlp.{0,2,4}` and a weight-normed
    `last_layer`; iBOTHead (bytedance/ibot models/head.py) adds the patch head `last_layer2`."""
    head = {
        "mlp.0.weight": torch.randn(16, dim),
        "mlp.0.bias": torch.randn(16),
        "mlp.2.weight": torch.randn(16, 16),
        "mlp.2.bias": torch.randn(16),
        "mlp.4.weight": torch.randn(8, 16),
        "mlp.4.bias": torch.randn(8),
        "last_layer.weight_g": torch.randn(32, 1),
        "last_layer.weight_v": torch.randn(32, 8),
    }
    if ibot:
        head |= {"last_layer2.weight_g": torch.randn(24, 1), "last_layer2.weight_v": torch.randn(24, 8)}
    return {f"head.{k}": v for k, v in head.items()}


def write_dino_full(
    want: StateDict, other: StateDict, path: Path, branch: str = "teacher", *, ibot: bool = False
) -> list[str]:
    """main_dino.py / main_ibot.py `save_dict`: the student is DDP-wrapped (`module.backbone.*`,
    `module.head.*`), the teacher of a ViT is not (`backbone.*`, `head.*`); `args` is the argparse Namespace,
    `fp16_scaler` the GradScaler state. iBOT's student also holds `masked_embed` (1, D)."""
    dim = want["cls_token"].shape[-1]
    teacher_sd, student_sd = (want, other) if branch == "teacher" else (other, want)
    teacher = {**{f"backbone.{k}": v for k, v in teacher_sd.items()}, **dino_head(dim, ibot=ibot)}
    student_backbone = {**student_sd, **({"masked_embed": torch.randn(1, dim)} if ibot else {})}
    student = {
        f"module.{k}": v
        for k, v in {
            **{f"backbone.{k}": v for k, v in student_backbone.items()},
            **dino_head(dim, ibot=ibot),
        }.items()
    }
    loss = {"center": torch.zeros(1, 32)} | ({"center2": torch.zeros(1, 1, 24)} if ibot else {})
    torch.save(
        {
            "student": student,
            "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100,
            "args": ARGS,
            "ibot_loss" if ibot else "dino_loss": loss,
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        },
        path,
    )
    if branch == "teacher":
        return sorted(dino_head(dim, ibot=ibot))
    return sorted([f"module.{k}" for k in dino_head(dim, ibot=ibot)] + (["masked_embed"] if ibot else []))


def write_dino_full_student(want: StateDict, other: StateDict, path: Path) -> list[str]:
    return write_dino_full(want, other, path, branch="student")


def write_ibot_full(want: StateDict, other: StateDict, path: Path) -> list[str]:
    return write_dino_full(want, other, path, branch="student", ibot=True)


def write_ibot(want: StateDict, other: StateDict, path: Path) -> list[str]:
    """bytedance/ibot extract_backbone_weights.py: `{'state_dict': backbone}`, `backbone.` stripped (the
    released `checkpoint_teacher.pth`); here from a student, so with `masked_embed` (1, D)."""
    dim = want["cls_token"].shape[-1]
    torch.save({"state_dict": {**want, "masked_embed": torch.randn(1, dim)}}, path)
    return ["masked_embed"]


def write_ijepa(want: StateDict, other: StateDict, path: Path, branch: str = "target_encoder") -> list[str]:
    target, context = (want, other) if branch == "target_encoder" else (other, want)
    torch.save(
        {
            "encoder": {f"module.{k}": v for k, v in context.items()},
            "predictor": {"module.predictor_embed.weight": torch.randn(16, 32)},
            "target_encoder": {f"module.{k}": v for k, v in target.items()},
            "opt": {"state": {}, "param_groups": []},
            "scaler": None,
            "epoch": 300,
            "loss": 0.1,
            "batch_size": 2048,
            "world_size": 16,
            "lr": 1e-3,
        },
        path,
    )
    return []


def write_ijepa_context(want: StateDict, other: StateDict, path: Path) -> list[str]:
    return write_ijepa(want, other, path, branch="encoder")


def write_dinov2(want: StateDict, other: StateDict, path: Path) -> list[str]:
    torch.save({**want, "mask_token": torch.randn(1, want["cls_token"].shape[-1])}, path)
    return ["mask_token"]


def write_beitv2_pretrain(want: StateDict, other: StateDict, path: Path) -> list[str]:
    """microsoft/unilm beit2 utils.save_model: `{'model', 'optimizer', 'epoch', 'args', 'scaler'}`, the model
    being VisionTransformerForMaskedImageModelingCLS (modeling_pretrain.py) with the shared lm head."""
    dim = want["cls_token"].shape[-1]
    n = want["rel_pos_bias.relative_position_bias_table"].shape[0]
    grid = (round((n - 3) ** 0.5) + 1) // 2  # n = (2 grid - 1)^2 + 3 relative positions
    tokens = 1 + grid * grid
    extra = {
        "mask_token": torch.randn(1, 1, dim),
        "lm_head.weight": torch.randn(8192, dim),
        "lm_head.bias": torch.randn(8192),
        "rel_pos_bias.relative_position_index": torch.randint(0, n, (tokens, tokens)),
    }
    for i in range(2):  # the two [cls]-pretraining blocks, same keys as a backbone block
        extra.update({f"cls_pt_layers.{i}.{k}": v.clone() for k, v in block_keys(want).items()})
    args = argparse.Namespace(**vars(ARGS), window_size=(grid, grid), patch_size=(16, 16), early_layers=9)
    torch.save(
        {
            "model": {**want, **extra},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 299,
            "args": args,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        },
        path,
    )
    return sorted(extra)


def write_timm_safetensors(want: StateDict, other: StateDict, path: Path) -> list[str]:
    save_file(want, path)
    return []


# preset, layout the report must name, writer, file name, branch passed to load_backbone
CASES: list[tuple[str, str, Callable[..., list[str]], str, str | None]] = [
    ("mae-b16", "mae_pretrain", write_mae_pretrain, "mae_pretrain_vit_base.pth", None),
    ("mae-l16", "mae_visualize", write_mae_visualize, "mae_visualize_vit_large.pth", None),
    ("mae-h14", "timm", write_timm_safetensors, "model.safetensors", None),
    ("dino-s16", "dino_backbone", write_bare, "dino_deitsmall16_pretrain.pth", None),
    ("dino-b8", "dino_full", write_dino_full, "dino_vitbase8_pretrain_full_checkpoint.pth", None),
    ("dino-s8", "dino_full", write_dino_full_student, "checkpoint.pth", "student"),
    ("ibot-b16", "ibot", write_ibot, "checkpoint_teacher.pth", None),
    ("ibot-b16", "dino_full", write_ibot_full, "checkpoint.pth", "student"),
    ("ijepa-h14", "ijepa", write_ijepa, "IN1K-vit.h.14-300e.pth.tar", None),
    ("ijepa-h14", "ijepa", write_ijepa_context, "IN1K-vit.h.14-300e.pth.tar", "encoder"),
    ("dinov2-s14", "dinov2", write_dinov2, "dinov2_vits14_pretrain.pth", None),
    ("dinov2-b14", "timm", write_timm_safetensors, "model.safetensors", None),
    ("beitv2-b16", "beitv2_pretrain", write_beitv2_pretrain, "beitv2_base_patch16_224_pt1k.pth", None),
    ("beitv2-l16", "beitv2_pretrain", write_beitv2_pretrain, "beitv2_large_patch16_224_pt1k.pth", None),
]


def assert_loaded(model: torch.nn.Module, want: StateDict) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(
    ("name", "layout", "writer", "filename", "branch"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[4] or 'default'}" for c in CASES],
)
def test_official_layout_loads_exactly(
    tmp_path: Path,
    name: str,
    layout: str,
    writer: Callable[..., list[str]],
    filename: str,
    branch: str | None,
) -> None:
    overrides = tiny(name)
    want, other = random_state_dict(name, overrides, seed=1), random_state_dict(name, overrides, seed=2)
    path = tmp_path / filename
    dropped = writer(want, other, path)
    backbone = load_backbone(name, checkpoint=str(path), arch_overrides=overrides, branch=branch)
    assert_loaded(backbone.model, want)
    report = backbone.report
    assert report.layout == layout and report.random_init is False
    assert report.sha256 == sha256_file(path) == report.checkpoint_id
    assert report.source == str(path.resolve())
    assert sorted(report.dropped) == dropped
    assert report.branch == (branch or {"dino_full": "teacher", "ijepa": "target_encoder"}.get(layout))
    assert report.num_params == sum(v.numel() for v in want.values())
    size = overrides["img_size"]
    tokens = backbone.intermediates(torch.randn(2, 3, size, size))
    assert tokens[0].shape == (2, backbone.num_prefix_tokens + 4, 32) and torch.isfinite(tokens[0]).all()


def dinov2_interpolate_pos_encoding(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """facebookresearch/dinov2 dinov2/models/vision_transformer.py `interpolate_pos_encoding`, written out
    for the released models (interpolate_offset=0.1, interpolate_antialias=False, one [cls] position)."""
    pos = pos_embed.float()
    cls_pos, patch_pos = pos[:, 0], pos[:, 1:]
    n = patch_pos.shape[1]
    m = int(n**0.5)
    assert m * m == n
    dim = pos.shape[-1]
    patch_pos = torch.nn.functional.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=False,
        scale_factor=(float(h + 0.1) / m, float(w + 0.1) / m),
    )
    assert (h, w) == patch_pos.shape[-2:]
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1).to(pos_embed.dtype)


@pytest.mark.parametrize("writer", [write_dinov2, write_timm_safetensors])
def test_dinov2_weights_of_another_grid_get_dinov2s_own_pos_embed(
    tmp_path: Path, writer: Callable[..., list[str]]
) -> None:
    """The official (and timm's) DINOv2 weights are 518 px, 37x37; the preset runs at 224 px, 16x16, as
    DINOv2's linear evaluation does, with the position embeddings DINOv2 itself computes for that size."""
    model_size, file_size = tiny("dinov2-s14"), {**tiny("dinov2-s14"), "img_size": 7 * 14}  # 2x2 vs 7x7
    want = random_state_dict("dinov2-s14", file_size, seed=5)
    assert want["pos_embed"].shape == (1, 1 + 7 * 7, 32)
    writer(want, want, tmp_path / "w.pth")
    backbone = load_backbone("dinov2-s14", checkpoint=str(tmp_path / "w.pth"), arch_overrides=model_size)
    got = backbone.model.state_dict()
    expected = {**want, "pos_embed": dinov2_interpolate_pos_encoding(want["pos_embed"], 2, 2)}
    assert_loaded(backbone.model, expected)
    assert got["pos_embed"].shape == (1, 1 + 2 * 2, 32)
    assert any("pos_embed resampled from 7x7 to 2x2" in note for note in backbone.report.notes)


def test_dinov2_preset_is_224px_like_dinov2s_linear_evaluation() -> None:
    """dinov2/data/transforms.py make_classification_eval_transform: resize 256, center crop 224, bicubic."""
    for name in ("dinov2-s14", "dinov2-b14"):
        backbone = load_backbone(name, random_init=True, device="meta")
        cfg = backbone.data_config()
        assert cfg["input_size"] == (3, 224, 224) and backbone.grid == (16, 16)
        assert cfg["crop_pct"] == 224 / 256 and cfg["interpolation"] == "bicubic"


def test_other_presets_never_resample_pos_embed(tmp_path: Path) -> None:
    """Strictness: a file of another image size still fails for presets without a run-time rule."""
    want = random_state_dict("dino-s16", {**tiny("dino-s16"), "img_size": 64}, seed=6)
    torch.save(want, tmp_path / "w.pth")
    with pytest.raises(KeyMismatchError, match="position embeddings of shape"):
        load_backbone("dino-s16", checkpoint=str(tmp_path / "w.pth"), arch_overrides=tiny("dino-s16"))


def test_timm_name_takes_timm_layout_safetensors(tmp_path: Path) -> None:
    ref = create_timm_backbone("test_vit")
    want = {k: v + 1.0 for k, v in ref.state_dict().items()}
    save_file(want, tmp_path / "model.safetensors")
    backbone = load_backbone("timm:test_vit", checkpoint=str(tmp_path / "model.safetensors"))
    assert_loaded(backbone.model, want)
    assert backbone.report.layout == "timm" and backbone.report.dropped == []


# ---- presets --------------------------------------------------------------------------------------


def vit_params(dim: int, depth: int, patch: int, tokens: int, mlp: int = 4) -> int:
    """Parameter count of a timm ViT with [cls], learned pos-embed, qkv bias and final norm (no head)."""
    patch_embed = 3 * patch * patch * dim + dim
    block = (
        2 * 2 * dim
        + (dim * 3 * dim + 3 * dim)
        + (dim * dim + dim)
        + (dim * mlp * dim + mlp * dim)
        + (mlp * dim * dim + dim)
    )
    return patch_embed + dim + tokens * dim + depth * block + 2 * dim


def test_param_counts_match_the_vit_formula() -> None:
    assert preset_num_params("mae-b16") == vit_params(768, 12, 16, 197) == 85_798_656
    assert preset_num_params("dino-s16") == vit_params(384, 12, 16, 197)
    assert preset_num_params("mae-l16") == vit_params(1024, 24, 16, 197)
    assert preset_num_params("mae-h14") == vit_params(1280, 32, 14, 257)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_random_init_on_meta(name: str) -> None:
    preset = PRESETS[name]
    backbone = load_backbone(name, random_init=True, device="meta")
    report = backbone.report
    assert report.random_init and report.checkpoint_id == "random-init" and report.sha256 is None
    assert any("random" in note for note in report.notes)
    assert report.num_params == preset_num_params(name) > 20_000_000
    registers = 4 if name.endswith("-reg") else 0  # DINOv2 with registers (arXiv 2309.16588): 4 after [cls]
    assert backbone.num_reg_tokens == registers
    assert backbone.has_cls == preset.has_cls
    assert backbone.num_prefix_tokens == int(preset.has_cls) + registers
    assert backbone.patch_size == preset.patch
    # never dropped for a pooled fc_norm; data2vec 2.0's post-LN blocks end normalised, with no final norm
    assert type(backbone.final_norm).__name__ == ("Identity" if preset.arch == "data2vec2" else "LayerNorm")
    cfg = backbone.data_config()
    assert cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD and cfg["interpolation"] == "bicubic"
    # the linear-probe eval transform of beyond_cls / MAE / DINO / iBOT / DINOv2: resize 256, center crop 224
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 224 / 256
    resize = next(t for t in backbone.transform().transforms if type(t).__name__ == "Resize")
    assert resize.size == 256


@pytest.mark.parametrize("name", ["beitv2-b16", "beitv2-l16"])
def test_beitv2_presets_are_the_pretraining_architecture(name: str) -> None:
    model = load_backbone(name, random_init=True, device="meta").model
    assert (
        model.rel_pos_bias is not None and model.pos_embed is None
    )  # one shared bias, no absolute pos-embed
    assert model.blocks[0].attn.relative_position_bias_table is None
    assert isinstance(model.fc_norm, torch.nn.Identity) and model.global_pool == "token"
    assert "relative_position_index" not in " ".join(model.state_dict())  # buffers, not keys


def test_random_init_tokens_on_cpu() -> None:
    backbone = load_backbone("timm:test_vit", random_init=True)
    (tokens,) = backbone.intermediates(torch.randn(2, 3, 160, 160), [-1])
    assert tokens.shape == (2, 1 + 10 * 10, 64)


def test_img_size_override_keeps_the_transform_in_step() -> None:
    backbone = load_backbone("dino-s16", random_init=True, device="meta", arch_overrides=tiny("dino-s16"))
    assert backbone.data_config()["input_size"] == (3, 32, 32)
    assert backbone.grid == (2, 2)


def test_unknown_preset_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="unknown model") as info:
        load_backbone("mae-b17", random_init=True, device="meta")
    assert "mae-b16" in info.value.hint


def test_timm_name_typos_suggest_close_names() -> None:
    with pytest.raises(ModelError) as info:
        load_backbone("timm:vit_base_patch16_22", random_init=True, device="meta")
    assert "did you mean timm:vit_base_patch16_224" in info.value.hint
    with pytest.raises(ModelError) as info:  # a real architecture with a wrong pretrained tag
        load_backbone("timm:vit_base_patch16_224.maex", random_init=True, device="meta")
    assert "timm:vit_base_patch16_224.mae" in info.value.hint
    with pytest.raises(ModelError, match="unknown model") as info:  # a timm name without its prefix
        load_backbone("vit_small_patch16_224.dino", random_init=True, device="meta")
    assert "did you mean timm:vit_small_patch16_224.dino?" in info.value.hint


def test_beitv2_default_weights_are_the_official_release() -> None:
    """microsoft/unilm beit2/README.md links the pt1k files on the addf400/files GitHub release; the Azure
    blob URLs it gave before need a SAS token and no longer download."""
    for size in ("base", "large"):
        preset = PRESETS[f"beitv2-{size[0]}16"]
        assert preset.weights == (
            f"https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_{size}_patch16_224_pt1k.pth"
        )


def test_unknown_or_non_vit_timm_names_are_model_errors() -> None:
    with pytest.raises(ModelError, match="cannot build timm model 'not_a_model'"):
        load_backbone("timm:not_a_model", random_init=True, device="meta")
    with pytest.raises(ModelError, match="not a plain ViT"):
        load_backbone("timm:resnet18", random_init=True, device="meta")


def test_random_init_and_checkpoint_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="both"):
        load_backbone("timm:test_vit", random_init=True, checkpoint=str(tmp_path / "x.pth"))
    with pytest.raises(ModelError, match="--branch encoder picks a network"):
        load_backbone("ijepa-h14", random_init=True, branch="encoder", device="meta")


# ---- strictness -----------------------------------------------------------------------------------


def test_vit_large_checkpoint_into_mae_b16_names_both_sizes() -> None:
    model = load_backbone("mae-b16", random_init=True, device="meta").model
    large = create_timm_backbone("vit_large_patch16_224.mae", device="meta").state_dict()
    with pytest.raises(KeyMismatchError) as info:
        load_state_dict_strict(model, large, what="mae_pretrain_vit_large.pth", model_name="mae-b16")
    message = info.value.message
    assert (
        "looks like a ViT-L/16 (dim 1024, 24 blocks) checkpoint "
        "but mae-b16 is a ViT-B/16 (dim 768, 12 blocks); presets of that size: mae-l16, beitv2-l16"
        in message
    )
    assert f"{12 * 12} unexpected keys: blocks.12." in message and "(+134 more)" in message
    assert "150 mis-shaped keys: blocks.0.attn.proj.bias: file (1024,) vs model (768,)" in message


def test_wrong_width_checkpoint_fails_with_key_lists(tmp_path: Path) -> None:
    wide = random_state_dict("dino-s16", {**tiny("dino-s16"), "embed_dim": 48, "depth": 3}, seed=0)
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(KeyMismatchError) as info:
        load_backbone("dino-s16", checkpoint=str(tmp_path / "wide.pth"), arch_overrides=tiny("dino-s16"))
    message = info.value.message
    assert "unexpected keys: blocks.2." in message and "mis-shaped keys" in message
    assert "(dim 48, 3 blocks)" in message and "(dim 32, 2 blocks)" in message
    assert str(tmp_path / "wide.pth") in message and "DINO backbone-only" in message


def test_prefixed_keys_are_diagnosed(tmp_path: Path) -> None:
    sd = create_timm_backbone("test_vit").state_dict()
    save_file({f"model.{k}": v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    with pytest.raises(KeyMismatchError, match="'model.' prefix") as info:
        load_backbone("timm:test_vit", checkpoint=str(tmp_path / "prefixed.safetensors"))
    assert f"{len(sd)} missing keys" in info.value.message


def test_fine_tuned_beit_is_not_taken_for_pretraining_weights(tmp_path: Path) -> None:
    fine_tuned = create_timm_backbone("beitv2_base_patch16_224", device="meta", **tiny("beitv2-b16"))
    torch.save(
        {"model": {k: torch.zeros(v.shape) for k, v in fine_tuned.state_dict().items()}}, tmp_path / "ft.pth"
    )
    with pytest.raises(KeyMismatchError) as info:
        load_backbone("beitv2-b16", checkpoint=str(tmp_path / "ft.pth"), arch_overrides=tiny("beitv2-b16"))
    assert "fine-tuned checkpoint (fc_norm" in info.value.message
    assert (
        "missing keys: norm.bias, norm.weight, rel_pos_bias.relative_position_bias_table"
        in info.value.message
    )


def test_dinov2_with_registers_is_diagnosed(tmp_path: Path) -> None:
    want = random_state_dict("dinov2-s14", tiny("dinov2-s14"), seed=7)
    dim = want["cls_token"].shape[-1]
    extra = {"register_tokens": torch.randn(1, 4, dim), "mask_token": torch.randn(1, dim)}
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save({**want, **extra}, path)
    with pytest.raises(KeyMismatchError, match="1 unexpected keys: reg_token") as info:
        load_backbone("dinov2-s14", checkpoint=str(path), arch_overrides=tiny("dinov2-s14"))
    assert "with register tokens" in info.value.message and "dinov2-*-reg presets" in info.value.message


def test_foreign_method_is_refused_before_building(tmp_path: Path) -> None:
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}}, tmp_path / "mae.pth")
    with pytest.raises(CheckpointError, match="MAE pretrain checkpoint") as info:
        load_backbone("dino-b16", checkpoint=str(tmp_path / "mae.pth"))
    assert str(tmp_path / "mae.pth") in info.value.message


# ---- offline and unsafe ---------------------------------------------------------------------------


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITPROBE_CACHE", str(tmp_path / "empty-cache"))


@pytest.mark.usefixtures("offline")
def test_offline_default_weights_say_what_to_download() -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("mae-b16")
    assert "model.safetensors from hf-hub:timm/vit_base_patch16_224.mae" in info.value.message
    assert "--checkpoint" in info.value.hint


@pytest.mark.usefixtures("offline")
def test_offline_official_url_names_the_file() -> None:
    with pytest.raises(WeightsUnavailableError, match="beitv2_base_patch16_224_pt1k.pth") as info:
        load_backbone("beitv2-b16")
    assert "--checkpoint /path/to/beitv2_base_patch16_224_pt1k.pth" in info.value.hint


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_list_json_has_every_preset() -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["presets"]}
    assert list(rows) == list(PRESETS)
    assert rows["mae-b16"]["params"] == 85_798_656 and rows["mae-b16"]["family"] == "MIM"
    assert rows["ijepa-h14"]["has_cls"] is False and rows["ijepa-h14"]["family"] == "JEA"
    assert rows["beitv2-b16"]["weights"].endswith("beitv2_base_patch16_224_pt1k.pth")
    assert {"arch", "patch", "weights", "license"} <= set(rows["dino-s8"])


def test_cli_list_table() -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.output
    assert "JEA" in result.output and "[cls]" in result.output


@pytest.mark.parametrize("width", [80, 120])
def test_cli_list_table_is_readable_at_terminal_width(width: int) -> None:
    """Every line fits; names are never cut, and timm names wrap only after `_` or before `.`."""
    from rich.console import Console

    from vitprobe.commands.models import _preset_table
    from vitprobe.models import preset_rows

    console = Console(width=width, record=True, color_system=None)
    console.print(_preset_table(preset_rows(), width))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    head = next(i for i, line in enumerate(lines) if line.startswith("name "))
    rows: list[list[str]] = []  # each preset's lines: the first starts with its name
    for line in lines[head + 2 :]:
        if line.split() and line.split()[0] in PRESETS:
            rows.append([line])
        elif rows and line.strip() and not line.strip().startswith("weights:"):
            rows[-1].append(line)
        else:
            break
    assert [r[0].split()[0] for r in rows] == list(PRESETS)
    start = lines[head].index("timm architecture") if width == 120 else lines[head].index("architecture")
    for preset, row in zip(PRESETS.values(), rows, strict=True):
        first = row[0].split()
        assert first[:4] == [preset.name, preset.family, f"{preset_num_params(preset.name) / 1e6:.1f}M",
                             "yes" if preset.has_cls else "no"]
        weights = "manual" if preset.manual else "hub" if preset.weights.startswith("hf-hub:") else "official"
        assert first[-1] == preset.license and first[-2] == weights
        pieces = [line[start:].split()[0] for line in row]
        assert "".join(pieces) == preset.timm
        assert all(p.endswith("_") or nxt.startswith(".") for p, nxt in zip(pieces, pieces[1:], strict=False))
        if width == 120:
            assert len(row) == 1


def test_wrap_name_breaks_only_after_underscore_or_before_dot() -> None:
    from vitprobe.commands.models import _wrap_name

    assert _wrap_name("vit_huge_patch14_gap_224.in1k_ijepa", 14) == "vit_huge_\npatch14_gap_\n224.in1k_ijepa"
    assert _wrap_name("vit_base_patch16_224.mae", 24) == "vit_base_patch16_224.mae"
    assert _wrap_name("vit_base_patch16_224.mae", 20) == "vit_base_patch16_224\n.mae"
    assert _wrap_name("averyveryverylongname", 5) == "averyveryverylongname"  # no break point: kept whole


def test_cli_show_random_init_json() -> None:
    result = runner.invoke(app, ["models", "show", "dino-s16", "--random-init", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["random_init"] is True and info["checkpoint_id"] == "random-init"
    assert info["grid"] == [14, 14] and info["num_prefix_tokens"] == 1 and info["dim"] == 384
    assert info["image_size"] == [224, 224] and info["mean"] == list(IMAGENET_MEAN)
    assert info["num_params"] == preset_num_params("dino-s16")


def test_cli_show_table_says_random_init() -> None:
    result = runner.invoke(app, ["models", "show", "timm:test_vit", "--random-init"])
    assert result.exit_code == 0, result.output
    assert "RANDOM INIT" in result.output and "10x10 patches" in result.output


@pytest.fixture
def tiny_beitv2(monkeypatch: pytest.MonkeyPatch) -> str:
    """A test-only preset: beitv2-b16's remap and settings on a tiny architecture, for the CLI."""
    preset = PRESETS["beitv2-b16"]
    kwargs = {**preset.timm_kwargs, **tiny("beitv2-b16")}
    monkeypatch.setitem(
        PRESETS, "tiny-beitv2", dataclasses.replace(preset, name="tiny-beitv2", timm_kwargs=kwargs)
    )
    return "tiny-beitv2"


def test_cli_show_official_beitv2_file(tmp_path: Path, tiny_beitv2: str) -> None:
    want = random_state_dict("beitv2-b16", tiny("beitv2-b16"), seed=3)
    dropped = write_beitv2_pretrain(want, want, tmp_path / "pt1k.pth")
    result = runner.invoke(
        app, ["models", "show", tiny_beitv2, "--checkpoint", str(tmp_path / "pt1k.pth"), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["layout"] == "beitv2_pretrain" and info["dropped"] == dropped
    assert info["sha256"] == sha256_file(tmp_path / "pt1k.pth") and info["random_init"] is False
    table = runner.invoke(app, ["models", "show", tiny_beitv2, "--checkpoint", str(tmp_path / "pt1k.pth")])
    assert table.exit_code == 0, table.output
    assert "beitv2_pretrain" in table.output and "lm_head.* (2)" in table.output


def test_dropped_keys_summary_names_a_lone_key() -> None:
    """Never `rel_pos_bias.* (1)`, which would read as if BEiT-v2's shared bias itself were dropped."""
    from vitprobe.commands.models import _summarise

    keys = ["lm_head.bias", "lm_head.weight", "mask_token", "rel_pos_bias.relative_position_index"]
    assert _summarise(keys) == "lm_head.* (2), mask_token, rel_pos_bias.relative_position_index"


def test_cli_show_timm_name_detects_dino_full_checkpoint(tmp_path: Path) -> None:
    want = {k: v + 2.0 for k, v in create_timm_backbone("test_vit").state_dict().items()}
    write_dino_full(want, {k: v - 1 for k, v in want.items()}, tmp_path / "checkpoint.pth")
    result = runner.invoke(
        app,
        [
            "models",
            "show",
            "timm:test_vit",
            "--checkpoint",
            str(tmp_path / "checkpoint.pth"),
            "--branch",
            "teacher",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["layout"] == "dino_full" and info["branch"] == "teacher" and info["remapped"] == len(want)


def test_cli_show_wrong_architecture_exits_1_with_key_lists(tmp_path: Path) -> None:
    shallow = create_timm_backbone("test_vit", depth=3).state_dict()
    save_file(shallow, tmp_path / "shallow.safetensors")
    result = runner.invoke(
        app, ["models", "show", "timm:test_vit", "--checkpoint", str(tmp_path / "shallow.safetensors")]
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "missing keys: blocks.3." in text and "likely cause" in text and "(dim 64, 3 blocks)" in text


def test_cli_show_refuses_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"model": {}, "x": WritesFile(marker)}, tmp_path / "evil.pth")
    result = runner.invoke(app, ["models", "show", "mae-b16", "--checkpoint", str(tmp_path / "evil.pth")])
    assert result.exit_code == 1 and "refused" in result.output
    assert not marker.exists()


@pytest.mark.usefixtures("offline")
def test_cli_show_offline_exits_1_naming_the_file() -> None:
    result = runner.invoke(app, ["models", "show", "ijepa-h14"])
    assert result.exit_code == 1
    text = "".join(result.output.split())
    assert "IN1K-vit.h.14-300e.pth.tar" in text and "--checkpoint" in text


class WritesFile:
    """A malicious checkpoint's payload: unpickling it would create `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


# ---- real sizes (slow): ViT-B/16 MAE and BEiT-v2-B pretraining layouts ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "writer", "filename"),
    [
        ("mae-b16", write_mae_visualize, "mae_visualize_vit_base.pth"),
        ("beitv2-b16", write_beitv2_pretrain, "beitv2_base_patch16_224_pt1k.pth"),
    ],
)
def test_real_size_official_layout(
    tmp_path: Path, name: str, writer: Callable[..., list[str]], filename: str
) -> None:
    want = random_state_dict(name, {}, seed=4)  # the real architecture's keys and shapes, random values
    dropped = writer(want, want, tmp_path / filename)
    backbone = load_backbone(name, checkpoint=str(tmp_path / filename))
    assert_loaded(backbone.model, want)
    assert backbone.report.dropped == dropped and backbone.report.num_params == preset_num_params(name)


@pytest.mark.slow
def test_real_size_dinov2_official_file_loads_into_the_224px_preset(tmp_path: Path) -> None:
    """dinov2_vits14_pretrain.pth has the hub model's shapes (518 px: pos_embed 1 + 37 * 37, mask_token)."""
    want = random_state_dict("dinov2-s14", {"img_size": 518}, seed=8)
    assert want["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    dropped = write_dinov2(want, want, tmp_path / "dinov2_vits14_pretrain.pth")
    backbone = load_backbone("dinov2-s14", checkpoint=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    pos_embed = dinov2_interpolate_pos_encoding(want["pos_embed"], 16, 16)  # (1, 1 + 16 * 16, 384)
    assert_loaded(backbone.model, {**want, "pos_embed": pos_embed})
    assert backbone.report.dropped == dropped == ["mask_token"] and backbone.grid == (16, 16)
    assert any("from 37x37 to 16x16" in note for note in backbone.report.notes)
