"""State-dict remaps: one small pure function per official checkpoint layout, chosen by tell-tale keys.

Each layout function takes a checkpoint's top-level mapping (what `vitprobe.checkpoints.read_checkpoint`
returns) and gives back a `Remapped`: the backbone's tensors under timm's key names, plus the keys it renamed
and dropped so the load report can say so. Nothing here touches a model; strict loading (every backbone key
consumed, nothing left over) happens in `vitprobe.models.load_state_dict_strict`.

The per-family functions (`remap_mae`, `remap_dino`, ...) are what presets name: they detect the layout,
refuse layouts of another method loudly, call the layout function, and drop a classifier head left in the
file (`head.*`, any layout) with a note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from vitprobe.errors import CheckpointError
from vitprobe.remap.common import LAYOUT_TITLES, Remapped, StateDict, drop, is_classifier, model_entry
from vitprobe.remap.renamed import (
    remap_beitv2_pretrain,
    remap_data2vec2,
    remap_latentmim,
    remap_mmpretrain,
    remap_simmim,
)
from vitprobe.remap.timm_names import (
    remap_dino_backbone,
    remap_dino_full,
    remap_dinov2,
    remap_ibot,
    remap_ijepa,
    remap_mae_pretrain,
    remap_mae_visualize,
    remap_mocov3,
    remap_timm,
)

__all__ = [
    "LAYOUTS",
    "LAYOUT_TITLES",
    "Remapped",
    "StateDict",
    "detect_layout",
    "remap_any",
    "remap_beitv2",
    "remap_data2vec2_family",
    "remap_dino",
    "remap_dinov2_family",
    "remap_ibot_family",
    "remap_ijepa_family",
    "remap_latentmim_family",
    "remap_mae",
    "remap_mmpretrain_family",
    "remap_mocov3_family",
    "remap_simmim_family",
]

LAYOUTS: dict[str, Callable[..., Remapped]] = {
    "timm": remap_timm,
    "mae_pretrain": remap_mae_pretrain,
    "mae_visualize": remap_mae_visualize,
    "dino_backbone": remap_dino_backbone,
    "dino_full": remap_dino_full,
    "ibot": remap_ibot,
    "ijepa": remap_ijepa,
    "dinov2": remap_dinov2,
    "beitv2_pretrain": remap_beitv2_pretrain,
    "mocov3": remap_mocov3,
    "mmpretrain": remap_mmpretrain,
    "latentmim": remap_latentmim,
    "simmim": remap_simmim,
    "data2vec2": remap_data2vec2,
}


def detect_layout(ckpt: Mapping[str, Any]) -> str:
    """Name the layout of a checkpoint from its tell-tale keys; a bare state dict is `"bare"`.

    Raises:
        CheckpointError: no known layout matches.
    """
    keys = set(ckpt)
    if "teacher" in keys or "student" in keys:
        return "dino_full"
    if "target_encoder" in keys or ("encoder" in keys and "predictor" in keys):
        return "ijepa"
    if "state_dict" in keys and isinstance(ckpt["state_dict"], Mapping):
        return _state_dict_layout([str(k) for k in ckpt["state_dict"]], keys)
    if isinstance(ckpt.get("model", ckpt.get("module")), Mapping):
        return _model_layout([str(k) for k in model_entry(ckpt)])
    import torch

    if keys and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "dinov2" if "mask_token" in keys or "register_tokens" in keys else "bare"
    shown = sorted(map(str, keys))[:12]
    raise CheckpointError(
        f"unrecognised checkpoint layout (top-level keys: {shown})",
        "vitprobe reads the official files of MAE, DINO, iBOT, I-JEPA, DINOv2, BEiT-v2, MoCo v3, mmpretrain "
        "(MFF), Latent MIM, SimMIM and data2vec 2.0, and timm state dicts; see docs/models.md",
    )


def _state_dict_layout(inner: list[str], keys: set[str]) -> str:
    """`{'state_dict': ...}` files: MoCo v3, Latent MIM, mmpretrain or iBOT, told apart by their keys."""
    bare = [k.removeprefix("module.") for k in inner]
    if any(k.startswith(("base_encoder.", "momentum_encoder.")) for k in bare) or "arch" in keys:
        return "mocov3"
    lmim = any(k.startswith(("decoder.", "target_encoder.")) for k in bare)
    if lmim and any(k.startswith("encoder.") for k in bare):
        return "latentmim"
    mm_names = ("backbone.layers.", "backbone.patch_embed.projection.")
    if "meta" in keys or any(k.startswith(mm_names) for k in inner):
        return "mmpretrain"
    return "ibot"


def _model_layout(inner: list[str]) -> str:
    """`{'model': ...}` files: data2vec 2.0, SimMIM, BEiT-v2, MAE training or MAE pretrain."""
    if any(k.removeprefix("model.").startswith("modality_encoders.") for k in inner):
        return "data2vec2"
    if any(k.startswith("encoder.") for k in inner):
        return "simmim"
    beit = ("lm_head.", "cls_pt_layers.", "rel_pos_bias.")
    if any(k.startswith(beit) or k.endswith(".q_bias") for k in inner):
        return "beitv2_pretrain"
    if any(k.startswith("decoder_") for k in inner) or "mask_token" in inner:
        return "mae_visualize"
    return "mae_pretrain"


def _dispatch(
    ckpt: Mapping[str, Any], family: str, accepted: Mapping[str, Callable[..., Remapped]], branch: str | None
) -> Remapped:
    layout = detect_layout(ckpt)
    if layout not in accepted:
        readable = "; ".join(LAYOUT_TITLES[name] for name in accepted if name in LAYOUT_TITLES)
        found = LAYOUT_TITLES.get(layout, "bare state dict")
        raise CheckpointError(
            f"the checkpoint looks like a {found}, but {family} presets read: {readable}",
            "pick the preset of the method that made the file (`vitprobe models list`), "
            "or load it with --model timm:ARCH",
        )
    return drop_classifier(accepted[layout](ckpt, branch=branch))


def drop_classifier(remapped: Remapped) -> Remapped:
    """Drop a classifier (or projection) head `head.*` / `head_dist.*` the file still carries, with a note."""
    sd: StateDict
    sd, heads = drop(remapped.state_dict, is_classifier)
    if not heads:
        return remapped
    shown = ", ".join(heads[:4]) + (", ..." if len(heads) > 4 else "")
    note = f"head dropped ({shown}): vitprobe probes the backbone"
    dropped = tuple(sorted(remapped.dropped + heads))
    return dataclasses.replace(remapped, state_dict=sd, dropped=dropped, notes=(*remapped.notes, note))


_BARE_TIMM = {"bare": remap_timm}


def remap_mae(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MAE presets: MAE pretrain, MAE visualize/training, mmpretrain's MAE, or timm's layout."""
    accepted = {
        "mae_pretrain": remap_mae_pretrain,
        "mae_visualize": remap_mae_visualize,
        "mmpretrain": remap_mmpretrain,
        **_BARE_TIMM,
    }
    return _dispatch(ckpt, "MAE", accepted, branch)


def remap_dino(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINO presets: backbone-only (bare, same names as timm) or full training checkpoints."""
    return _dispatch(ckpt, "DINO", {"bare": remap_dino_backbone, "dino_full": remap_dino_full}, branch)


def remap_ibot_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """iBOT presets: released `{'state_dict'}` backbones, full teacher/student checkpoints, or bare."""
    accepted = {"ibot": remap_ibot, "dino_full": remap_dino_full, "bare": remap_dino_backbone}
    return _dispatch(ckpt, "iBOT", accepted, branch)


def remap_ijepa_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """I-JEPA presets: official checkpoints (target encoder by default) or timm's layout."""
    return _dispatch(ckpt, "I-JEPA", {"ijepa": remap_ijepa, **_BARE_TIMM}, branch)


def remap_dinov2_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINOv2 presets: official backbones (with `mask_token`; registers, SwiGLU) or timm's layout."""
    return _dispatch(ckpt, "DINOv2", {"dinov2": remap_dinov2, **_BARE_TIMM}, branch)


def remap_beitv2(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """BEiT-v2 presets: official pretraining checkpoints or timm's layout of the same architecture."""
    return _dispatch(ckpt, "BEiT-v2", {"beitv2_pretrain": remap_beitv2_pretrain, **_BARE_TIMM}, branch)


def remap_mocov3_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MoCo v3 presets: official checkpoints, `convert_to_deit.py` output (`{'model'}`) or timm's layout."""
    accepted = {"mocov3": remap_mocov3, "mae_pretrain": remap_mae_pretrain, **_BARE_TIMM}
    return _dispatch(ckpt, "MoCo v3", accepted, branch)


def remap_mmpretrain_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MFF presets (and any mmpretrain ViT): mmpretrain checkpoints or timm's layout."""
    return _dispatch(ckpt, "MFF", {"mmpretrain": remap_mmpretrain, **_BARE_TIMM}, branch)


def remap_latentmim_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """Latent MIM presets: official training checkpoints or timm's layout."""
    return _dispatch(ckpt, "Latent MIM", {"latentmim": remap_latentmim, **_BARE_TIMM}, branch)


def remap_simmim_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """SimMIM presets: official checkpoints or timm's `Beit` layout."""
    return _dispatch(ckpt, "SimMIM", {"simmim": remap_simmim, **_BARE_TIMM}, branch)


def remap_data2vec2_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """data2vec 2.0 presets: official fairseq checkpoints or the timm-layout state dict of its backbone."""
    return _dispatch(ckpt, "data2vec 2.0", {"data2vec2": remap_data2vec2, **_BARE_TIMM}, branch)


def remap_any(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """`timm:NAME` models: timm's layout, or any official layout above, detected from its keys."""
    accepted = {name: fn for name, fn in LAYOUTS.items() if name not in ("timm", "dino_backbone")}
    return _dispatch(ckpt, "timm:NAME", {**accepted, **_BARE_TIMM}, branch)
