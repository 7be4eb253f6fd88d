"""Remaps: each official layout is detected by its tell-tale keys and renamed/dropped as documented."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vitprobe.errors import CheckpointError
from vitprobe.remap import (
    LAYOUT_TITLES,
    LAYOUTS,
    Remapped,
    StateDict,
    detect_layout,
    remap_any,
    remap_beitv2,
    remap_dino,
    remap_ibot_family,
    remap_ijepa_family,
    remap_mae,
)

ENCODER = {  # a two-block ViT encoder in timm's names (shapes do not matter to remaps)
    "cls_token": torch.ones(1, 1, 4),
    "pos_embed": torch.ones(1, 5, 4),
    "patch_embed.proj.weight": torch.ones(4, 3, 2, 2),
    "blocks.0.attn.qkv.weight": torch.ones(12, 4),
    "blocks.1.attn.qkv.weight": torch.full((12, 4), 2.0),
    "norm.weight": torch.ones(4),
}


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_remaps(
    ckpt: dict[str, Any], layout: str, remap: Callable[..., Remapped], kept: StateDict, dropped: StateDict
) -> Remapped:
    """`ckpt` is detected as `layout`; `remap` keeps exactly `kept` and drops exactly `dropped`'s keys."""
    assert detect_layout(ckpt) == layout
    out = remap(ckpt)
    assert out.layout == layout and out.dropped == tuple(sorted(dropped))
    assert_same_tensors(out.state_dict, kept)
    return out


def test_every_layout_has_a_title() -> None:
    assert set(LAYOUTS) == set(LAYOUT_TITLES)


def test_mae_pretrain_unwraps_model_and_ignores_training_state() -> None:
    ckpt = {
        "model": dict(ENCODER),
        "optimizer": {"state": {}},
        "epoch": 799,
        "args": argparse.Namespace(lr=1e-3),
        "scaler": {"scale": 65536.0},
    }
    assert assert_remaps(ckpt, "mae_pretrain", remap_mae, ENCODER, {}).renamed == 0


def test_mae_visualize_drops_decoder_and_mask_token() -> None:
    decoder = {
        "mask_token": torch.zeros(1, 1, 2),
        "decoder_embed.weight": torch.zeros(2, 4),
        "decoder_pos_embed": torch.zeros(1, 5, 2),
        "decoder_blocks.0.norm1.weight": torch.zeros(2),
        "decoder_norm.weight": torch.zeros(2),
        "decoder_pred.weight": torch.zeros(12, 2),
    }
    assert_remaps({"model": {**ENCODER, **decoder}}, "mae_visualize", remap_mae, ENCODER, decoder)


def test_dino_backbone_is_timm_names() -> None:
    assert detect_layout(ENCODER) == "bare"
    out = remap_dino(ENCODER)
    assert out.layout == "dino_backbone" and out.renamed == 0
    assert_same_tensors(out.state_dict, ENCODER)


def dino_full() -> dict[str, object]:
    teacher = {
        **prefixed("backbone.", ENCODER),
        "head.mlp.0.weight": torch.zeros(8, 4),
        "head.last_layer.weight_g": torch.zeros(16, 1),
    }
    student_encoder = {k: v + 10 for k, v in ENCODER.items()}
    student = {**prefixed("module.backbone.", student_encoder), "module.head.mlp.0.weight": torch.zeros(8, 4)}
    return {
        "teacher": teacher,
        "student": student,
        "optimizer": {},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small"),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }


def test_dino_full_defaults_to_teacher_and_drops_projection_head() -> None:
    ckpt = dino_full()
    assert detect_layout(ckpt) == "dino_full"
    out = remap_dino(ckpt)
    assert out.branch == "teacher"
    assert out.renamed == len(ENCODER)  # every backbone key lost its "backbone." prefix
    assert out.dropped == ("head.last_layer.weight_g", "head.mlp.0.weight")
    assert_same_tensors(out.state_dict, ENCODER)


def test_dino_full_student_strips_module_backbone() -> None:
    out = remap_dino(dino_full(), branch="student")
    assert out.branch == "student" and out.dropped == ("module.head.mlp.0.weight",)
    assert_same_tensors(out.state_dict, {k: v + 10 for k, v in ENCODER.items()})


def test_ibot_state_dict_drops_masked_embed() -> None:
    masked = {"masked_embed": torch.zeros(1, 4)}  # (1, D) in bytedance/ibot models/vision_transformer.py
    assert_remaps({"state_dict": {**ENCODER, **masked}}, "ibot", remap_ibot_family, ENCODER, masked)


def test_ibot_full_checkpoint_drops_masked_embed_too() -> None:
    ckpt = dino_full()
    ckpt["teacher"]["backbone.masked_embed"] = torch.zeros(1, 4)
    out = remap_ibot_family(ckpt)
    assert "masked_embed" in out.dropped
    assert_same_tensors(out.state_dict, ENCODER)


def ijepa() -> dict[str, object]:
    target = {k: v * 3 for k, v in ENCODER.items()}
    return {
        "encoder": prefixed("module.", ENCODER),
        "target_encoder": prefixed("module.", target),
        "predictor": {"module.predictor_embed.weight": torch.zeros(2, 4)},
        "opt": {},
        "scaler": None,
        "epoch": 300,
        "loss": 0.1,
        "batch_size": 128,
        "world_size": 16,
        "lr": 1e-3,
    }


def test_ijepa_defaults_to_target_encoder() -> None:
    ckpt = ijepa()
    assert detect_layout(ckpt) == "ijepa"
    out = remap_ijepa_family(ckpt)
    assert out.branch == "target_encoder" and out.renamed == len(ENCODER)
    assert_same_tensors(out.state_dict, {k: v * 3 for k, v in ENCODER.items()})


def test_ijepa_context_encoder_on_request() -> None:
    out = remap_ijepa_family(ijepa(), branch="encoder")
    assert out.branch == "encoder"
    assert_same_tensors(out.state_dict, ENCODER)


def test_dinov2_drops_mask_token() -> None:
    mask_token = {"mask_token": torch.zeros(1, 4)}  # (1, D) in facebookresearch/dinov2
    assert_remaps({**ENCODER, **mask_token}, "dinov2", remap_any, ENCODER, mask_token)


def test_beitv2_pretrain_drops_pretraining_heads_and_index_buffers() -> None:
    backbone = {
        "cls_token": torch.ones(1, 1, 4),
        "rel_pos_bias.relative_position_bias_table": torch.ones(7, 2),
        "blocks.0.gamma_1": torch.ones(4),
        "blocks.0.attn.q_bias": torch.ones(4),
        "blocks.0.attn.v_bias": torch.ones(4),
        "norm.weight": torch.ones(4),
    }
    extra = {
        "mask_token": torch.zeros(1, 1, 4),
        "lm_head.weight": torch.zeros(8, 4),
        "lm_head.bias": torch.zeros(8),
        "cls_pt_layers.0.attn.q_bias": torch.zeros(4),
        "cls_pt_layers.1.gamma_1": torch.zeros(4),
        "rel_pos_bias.relative_position_index": torch.zeros(5, 5, dtype=torch.long),
    }
    assert_remaps({"model": {**backbone, **extra}}, "beitv2_pretrain", remap_beitv2, backbone, extra)


def test_timm_layout_drops_classifier_head_loudly() -> None:
    out = remap_any({**ENCODER, "head.weight": torch.zeros(10, 4), "head.bias": torch.zeros(10)})
    assert out.layout == "timm" and out.dropped == ("head.bias", "head.weight")
    assert out.notes and "head" in out.notes[0]


def test_remaps_do_not_mutate_their_input() -> None:
    ckpt = dino_full()
    before = sorted(ckpt["teacher"])
    remap_dino(ckpt)
    assert sorted(ckpt["teacher"]) == before


def test_a_foreign_method_is_refused_with_both_layouts_named() -> None:
    with pytest.raises(CheckpointError) as info:
        remap_mae(dino_full())
    assert "DINO/iBOT full training checkpoint" in info.value.message
    assert "MAE pretrain checkpoint" in info.value.message


def test_branch_of_another_layout_is_refused() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        remap_ijepa_family(ijepa(), branch="student")
    with pytest.raises(CheckpointError, match="does not exist"):
        remap_dino(dino_full(), branch="encoder")


def test_branch_on_a_single_network_file_is_refused() -> None:
    with pytest.raises(CheckpointError, match="holds one network"):
        remap_dino(ENCODER, branch="teacher")


def test_unrecognised_layout_names_its_keys() -> None:
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout") as info:
        detect_layout({"weights": [1, 2, 3], "config": "x"})
    assert "config" in info.value.message


def test_non_tensor_state_dict_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not tensors"):
        remap_mae({"model": {"blocks.0.x": [1.0, 2.0]}})


def test_module_wrapper_is_read_like_model() -> None:
    ckpt = {
        "module": {
            "cls_token": torch.ones(1, 1, 4),
            "blocks.0.attn.q_bias": torch.ones(4),
            "lm_head.weight": torch.zeros(8, 4),
        }
    }
    assert detect_layout(ckpt) == "beitv2_pretrain"
    out = remap_beitv2(ckpt)
    assert out.dropped == ("lm_head.weight",) and sorted(out.state_dict) == [
        "blocks.0.attn.q_bias",
        "cls_token",
    ]
