"""Remaps of layouts whose backbone keys are already timm's ViT names: MAE, DINO, iBOT, I-JEPA, DINOv2,
MoCo v3 and timm's own. Each function unwraps the file, strips prefixes, picks a branch and drops what is
not the backbone; none renames a parameter inside a block (DINOv2's SwiGLU and registers aside).

The reference save code each layout follows is cited, file and line, in docs/models.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vitprobe.remap.common import (
    Remapped,
    check_branch,
    drop,
    model_entry,
    no_branch,
    strip_prefixes,
    take_prefix,
    tensors,
)


def remap_timm(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """timm's own layout: a bare state dict in timm's key names (what timm's hub files hold).

    A classifier `head.*`, like in every layout, is dropped by the family entry point and reported.
    """
    no_branch("timm", branch)
    return Remapped(tensors(ckpt, "the checkpoint"), "timm")


def remap_mae_pretrain(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MAE pretrain checkpoint (facebookresearch/mae `mae_pretrain_vit_{base,large,huge}.pth`).

    `{'model': encoder}` (training files also hold `optimizer`, `epoch`, `args`, `scaler`, ignored); the
    encoder already uses timm's ViT key names, so nothing is renamed. MoCo v3's `convert_to_deit.py` writes
    the same `{'model': ...}` layout.
    """
    no_branch("mae_pretrain", branch)
    return Remapped(tensors(model_entry(ckpt), "checkpoint['model']"), "mae_pretrain")


def remap_mae_visualize(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MAE "visualize" / full training checkpoint (`mae_visualize_vit_large.pth`, `checkpoint-N.pth`).

    `{'model': encoder + decoder}`: drops `decoder_*` (decoder_embed, decoder_pos_embed, decoder_blocks,
    decoder_norm, decoder_pred) and `mask_token`, which only the pixel decoder uses.
    """
    no_branch("mae_visualize", branch)
    sd = tensors(model_entry(ckpt), "checkpoint['model']")
    sd, dropped = drop(sd, lambda k: k.startswith("decoder_") or k == "mask_token")
    return Remapped(sd, "mae_visualize", dropped=dropped, notes=("MAE decoder and mask token dropped",))


def remap_dino_backbone(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINO backbone-only checkpoint (facebookresearch/dino `dino_vit{small,base}{16,8}_pretrain.pth`).

    A bare state dict already in timm's names; `module.` / `backbone.` prefixes (backbones extracted by
    hand from training checkpoints) are stripped.
    """
    no_branch("dino_backbone", branch)
    sd, renamed = strip_prefixes(tensors(ckpt, "the checkpoint"), ("module.", "backbone."))
    return Remapped(sd, "dino_backbone", renamed=renamed)


def remap_dino_full(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINO / iBOT full training checkpoint (`dino_vit*_pretrain_full_checkpoint.pth`, `checkpoint.pth`).

    `{'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'/'ibot_loss', ...}`. The student was
    saved from DDP (`module.backbone.*`), the teacher usually not (`backbone.*`). Takes the teacher by
    default (the network DINO and iBOT evaluate); drops the projection `head.*` and iBOT's `masked_embed`.
    """
    branch = check_branch("dino_full", branch, ("teacher", "student"), "teacher")
    sd = tensors(ckpt[branch], f"checkpoint[{branch!r}]")
    sd, dropped = drop(sd, lambda k: k.removeprefix("module.").startswith("head."))
    sd, renamed = strip_prefixes(sd, ("module.", "backbone."))
    sd, dropped_mim = drop(sd, lambda k: k == "masked_embed")
    note = f"took the {branch} network" + (" (the one DINO and iBOT evaluate)" if branch == "teacher" else "")
    return Remapped(sd, "dino_full", renamed, tuple(sorted(dropped + dropped_mim)), (note,), branch)


def remap_ibot(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """iBOT released backbone (bytedance/ibot `checkpoint_teacher.pth` / `checkpoint_student.pth`).

    `{'state_dict': backbone}` in timm's names, sometimes with `module.` / `backbone.` prefixes; drops the
    masked-image-modelling embedding `masked_embed`.
    """
    no_branch("ibot", branch)
    sd = tensors(ckpt["state_dict"], "checkpoint['state_dict']")
    sd, renamed = strip_prefixes(sd, ("module.", "backbone."))
    sd, dropped = drop(sd, lambda k: k == "masked_embed")
    return Remapped(sd, "ibot", renamed=renamed, dropped=dropped)


def remap_ijepa(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """I-JEPA checkpoint (facebookresearch/ijepa `IN1K-vit.h.14-300e.pth.tar`).

    `{'encoder', 'predictor', 'target_encoder', 'opt', 'scaler', 'epoch', 'loss', ...}`, encoders saved
    from DDP (`module.` prefix). Takes `target_encoder` (the EMA encoder) by default: the I-JEPA paper
    evaluates the target encoder. `branch='encoder'` gives the context encoder, which is what timm's own
    I-JEPA conversion loads. The predictor is ignored. There is no [cls] token.
    """
    branch = check_branch("ijepa", branch, ("target_encoder", "encoder"), "target_encoder")
    sd, renamed = strip_prefixes(tensors(ckpt[branch], f"checkpoint[{branch!r}]"), ("module.",))
    note = (
        "took the target (EMA) encoder, which the I-JEPA paper evaluates"
        if branch == "target_encoder"
        else "took the context encoder (timm's I-JEPA weights use this one)"
    )
    return Remapped(sd, "ijepa", renamed=renamed, notes=(note,), branch=branch)


_SWIGLU_NAMES = (  # DINOv2's SwiGLUFFNFused -> timm's SwiGLUPacked
    (re.compile(r"^(blocks\.\d+\.mlp\.)w12\."), r"\1fc1."),
    (re.compile(r"^(blocks\.\d+\.mlp\.)w3\."), r"\1fc2."),
)


def remap_dinov2(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINOv2 official backbone (facebookresearch/dinov2 `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`).

    A bare state dict in timm's names (layer scale as `blocks.N.ls1.gamma`) plus the iBOT-style
    `mask_token`, which is dropped. ViT-g's SwiGLU FFN `mlp.w12` / `mlp.w3` becomes timm's packed
    `mlp.fc1` / `mlp.fc2` (the same tensors: timm's `SwiGLUPacked` gates with the first half as DINOv2 does).
    With registers, DINOv2 adds `pos_embed[:, 0]` to [cls] and gives the registers no position, while
    timm's register models keep `pos_embed` for the patches only (`no_embed_class`): the [cls] position is
    folded into `cls_token` and `register_tokens` becomes `reg_token` (what timm's `_convert_dinov2` does).
    """
    no_branch("dinov2", branch)
    sd, dropped = drop(tensors(ckpt, "the checkpoint"), lambda k: k == "mask_token")
    renamed = 0
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, replacement in _SWIGLU_NAMES:
            new = pattern.sub(replacement, new)
        renamed += new != key
        out[new] = value
    notes: tuple[str, ...] = ()
    if "register_tokens" in out:
        pos_embed = out["pos_embed"]  # (1, 1 + M*M, D): [cls] position first, then the patches
        out["reg_token"] = out.pop("register_tokens")  # (1, R, D)
        out["cls_token"] = out["cls_token"] + pos_embed[:, :1]  # (1, 1, D)
        out["pos_embed"] = pos_embed[:, 1:]  # (1, M*M, D)
        renamed += 1
        notes = ("register tokens: the [cls] position embedding is folded into cls_token (timm's layout)",)
    return Remapped(out, "dinov2", renamed=renamed, dropped=dropped, notes=notes)


def remap_mocov3(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MoCo v3 checkpoint (facebookresearch/moco-v3 `vit-b-300ep.pth.tar`; `linear-vit-b-300ep.pth.tar`).

    Pretraining: `{'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}`, the state dict of the DDP-wrapped
    `MoCo_ViT`: `module.base_encoder.*` (timm 0.4.9 ViT names; its `head` is the 3-layer projector, dropped),
    `module.momentum_encoder.*` and `module.predictor.*`. Takes `base_encoder` by default, the network MoCo
    v3's linear evaluation and `convert_to_deit.py` take; `branch='momentum_encoder'` gives the EMA one.
    Linear-classification checkpoints hold one DDP-wrapped ViT (`module.*` with a classifier `head`).
    """
    sd = tensors(ckpt["state_dict"], "checkpoint['state_dict']")
    encoders = {k.removeprefix("module.").split(".")[0] for k in sd} & {"base_encoder", "momentum_encoder"}
    if not encoders:  # linear classification: one network
        no_branch("mocov3", branch)
        out, renamed = strip_prefixes(sd, ("module.",))
        return Remapped(out, "mocov3", renamed=renamed)
    branch = check_branch("mocov3", branch, ("base_encoder", "momentum_encoder"), "base_encoder")
    prefix = "module." if any(k.startswith("module.") for k in sd) else ""
    out = take_prefix(sd, f"{prefix}{branch}.")
    out, projector = drop(out, lambda k: k.startswith("head."))
    note = f"took the {branch}" + (" (the one MoCo v3 evaluates)" if branch == "base_encoder" else "")
    notes = (note, "projection MLP (head.*) dropped; the predictor and the other encoder are not loaded")
    dropped = tuple(f"{prefix}{branch}.{k}" for k in projector)
    return Remapped(out, "mocov3", renamed=len(out), dropped=dropped, notes=notes, branch=branch)
