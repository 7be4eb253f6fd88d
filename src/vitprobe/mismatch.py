"""Strict loading and its diagnostics: every key and shape must match, or `KeyMismatchError` lists the
missing, unexpected and mis-shaped keys and guesses why (another size, a prefix, a fine-tuned file, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING

from vitprobe.errors import KeyMismatchError

if TYPE_CHECKING:
    import torch
    from torch import nn


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str = "the checkpoint",
    model_name: str | None = None,
) -> None:
    """Copy `state_dict` into `model`, requiring the same keys and shapes (non-persistent buffers excluded).

    Raises:
        KeyMismatchError: lists the first 10 missing, unexpected and mis-shaped keys with their counts,
            and the likely cause.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        name = model_name or type(model).__name__
        parts = [f"{what} does not fit {name}:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{len(items)} {label} keys: {', '.join(items[:10])}{more};")
        parts.append(f"likely cause: {likely_cause(state_dict, model, name, missing, unexpected)}")
        raise KeyMismatchError(
            " ".join(parts),
            "pass a checkpoint made for this architecture, or the matching preset (`vitprobe models list`)",
        )
    model.load_state_dict(dict(state_dict), strict=True)


_VIT_SIZES = {
    (192, 12): "ViT-Ti",
    (384, 12): "ViT-S",
    (768, 12): "ViT-B",
    (1024, 24): "ViT-L",
    (1280, 32): "ViT-H",
    (1408, 40): "ViT-g",
    (1536, 40): "ViT-g",
}


def _shape_of(dim: int | None, depth: int | None, patch: int | None) -> str:
    size = _VIT_SIZES.get((dim, depth), "ViT") if dim else "ViT"
    return f"{size}{f'/{patch}' if patch else ''} (dim {dim}, {depth} blocks)"


def _arch_of_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None, int | None]:
    """(dim, depth, patch) read from a ViT-style state dict, None where the keys do not say."""
    proj = sd.get("patch_embed.proj.weight")
    dim = int(proj.shape[0]) if proj is not None else None
    if dim is None and "cls_token" in sd:
        dim = int(sd["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    patch = int(proj.shape[-1]) if proj is not None and proj.ndim == 4 else None
    return dim, (max(blocks) + 1 if blocks else None), patch


@cache
def _preset_shapes() -> dict[str, tuple[int | None, int | None, int | None]]:
    """(dim, depth, patch) of every preset, from the registry (no model is built)."""
    from vitprobe.presets import PRESETS

    return {name: (*p.size, p.patch) for name, p in PRESETS.items()}


def likely_cause(
    state_dict: Mapping[str, torch.Tensor],
    model: nn.Module,
    name: str,
    missing: Sequence[str],
    unexpected: Sequence[str],
) -> str:
    """One sentence guessing why a state dict does not fit a model (size, prefix, layout or fine-tuning)."""
    expected = model.state_dict()
    file_arch = _arch_of_state_dict(state_dict)
    model_arch = _arch_of_state_dict(expected)
    if file_arch[0] and (file_arch[:2] != model_arch[:2] or (file_arch[2] and file_arch[2] != model_arch[2])):
        same = [n for n, shape in _preset_shapes().items() if shape[:2] == file_arch[:2]]
        same = [n for n in same if not file_arch[2] or _preset_shapes()[n][2] == file_arch[2]]
        return f"looks like a {_shape_of(*file_arch)} checkpoint but {name} is a {_shape_of(*model_arch)}" + (
            f"; presets of that size: {', '.join(same)}" if same else ""
        )
    for prefix in ("module.", "backbone.", "encoder.", "model.", "trunk."):
        if unexpected and sum(k.startswith(prefix) for k in unexpected) >= len(unexpected) / 2:
            return f"the file's keys carry a {prefix!r} prefix that this layout does not strip"
    if "reg_token" in unexpected or "register_tokens" in unexpected:
        return (
            "a DINOv2 checkpoint with register tokens (…_reg4_pretrain.pth), but this model has none; "
            "use the dinov2-*-reg presets (timm:vit_*_patch14_reg4_dinov2.lvd142m)"
        )
    if "reg_token" in missing:
        return "this model has register tokens but the file has none: use the preset without -reg"
    if any(k.startswith("norm_pre.") for k in unexpected):
        return "a LayerNorm before the blocks (norm_pre: data2vec 2.0 or CLIP style), which this model lacks"
    if any(k.startswith("fc_norm.") for k in unexpected) and any(k.startswith("norm.") for k in missing):
        return (
            "a fine-tuned checkpoint (fc_norm after average pooling); presets expect self-supervised weights"
        )
    if (
        any("attn.relative_position_bias_table" in k for k in unexpected)
        and "rel_pos_bias.relative_position_bias_table" in missing
    ):
        return "per-block relative position bias (BEiT fine-tuned or v1), but this model shares one bias"
    if "rel_pos_bias.relative_position_bias_table" in unexpected:
        return "a shared relative position bias (BEiT-v2 pretraining), but this model has none"
    if (
        "pos_embed" in state_dict
        and "pos_embed" in expected
        and state_dict["pos_embed"].shape != expected["pos_embed"].shape
    ):
        return (
            f"position embeddings of shape {tuple(state_dict['pos_embed'].shape)} in the file vs "
            f"{tuple(expected['pos_embed'].shape)} in the model: another image size (--img-size resamples "
            "them), or with/without [cls]"
        )
    if any(k.endswith(".ls1.gamma") for k in missing) or any(k.endswith(".ls1.gamma") for k in unexpected):
        return "layer scale (ls1/ls2.gamma) present in only one of file and model"
    return f"the file was saved from a different architecture than {name}"

