"""State-dict remaps: one small pure function per official checkpoint layout, chosen by tell-tale keys.

Each layout function takes a checkpoint's top-level mapping (what `vitprobe.checkpoints.read_checkpoint`
returns) and gives back a `Remapped`: the backbone's tensors under timm's key names, plus the keys it renamed
and dropped so the load report can say so. Nothing here touches a model; strict loading (every backbone key
consumed, nothing left over) happens in `vitprobe.models.load_state_dict_strict`.

The per-family functions (`remap_mae`, `remap_dino`, ...) are what presets name: they detect the layout,
refuse layouts of another method loudly, and call the layout function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitprobe.errors import CheckpointError

if TYPE_CHECKING:
    from torch import Tensor

StateDict = dict[str, "Tensor"]


@dataclass(frozen=True)
class Remapped:
    """A backbone state dict in timm's key names and how it was obtained from the file."""

    state_dict: StateDict
    layout: str  # a key of LAYOUTS: which official layout the file had
    renamed: int = 0  # keys whose name changed (prefixes such as `module.` / `backbone.` stripped)
    dropped: tuple[str, ...] = ()  # keys removed on purpose: decoders, heads, mask tokens, index buffers
    notes: tuple[str, ...] = ()  # anything else a reader of the load report should know
    branch: str | None = (
        None  # the sub-network taken from a multi-network checkpoint (teacher, target_encoder)
    )


# --------------------------------------------------------------------------------------------------------
# small pure helpers


def _tensors(obj: Any, where: str) -> StateDict:
    """Check that `obj` is a mapping of str -> Tensor and return it as a new dict."""
    import torch

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} is a {type(obj).__name__}, expected a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{where} is not a state dict: {len(bad)} entries are not tensors, e.g. {bad[:5]}",
            "pass the file that holds the model weights",
        )
    return dict(obj)


def _strip_prefixes(sd: StateDict, prefixes: tuple[str, ...]) -> tuple[StateDict, int]:
    """Remove any leading run of `prefixes` (e.g. `module.backbone.`) from every key; count renamed keys."""
    out: StateDict = {}
    renamed = 0
    for key, value in sd.items():
        new = key
        while new.startswith(prefixes):
            new = new[len(next(p for p in prefixes if new.startswith(p))) :]
        renamed += new != key
        if new in out:
            raise CheckpointError(
                f"two keys map to {new!r} after stripping {prefixes}", "check the checkpoint"
            )
        out[new] = value
    return out, renamed


def _drop(sd: StateDict, rule: Callable[[str], bool]) -> tuple[StateDict, tuple[str, ...]]:
    """Split off the keys for which `rule(key)` is true; return (kept, sorted dropped keys)."""
    kept = {k: v for k, v in sd.items() if not rule(k)}
    return kept, tuple(sorted(k for k in sd if rule(k)))


def _model_entry(ckpt: Mapping[str, Any]) -> Any:
    """The network of a `{'model': ...}` checkpoint (some BEiT releases say `{'module': ...}`)."""
    return ckpt["model"] if "model" in ckpt else ckpt["module"]


def _check_branch(layout: str, branch: str | None, allowed: tuple[str, ...], default: str) -> str:
    branch = branch or default
    if branch not in allowed:
        raise CheckpointError(
            f"branch {branch!r} does not exist in a {LAYOUT_TITLES[layout]}",
            f"use one of {', '.join(allowed)}",
        )
    return branch


def _no_branch(layout: str, branch: str | None) -> None:
    if branch is not None:
        raise CheckpointError(
            f"a {LAYOUT_TITLES[layout]} holds one network, so branch {branch!r} does not apply",
            "leave out --branch (it picks teacher/student or encoder/target_encoder)",
        )


# --------------------------------------------------------------------------------------------------------
# one function per layout


def remap_timm(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """timm's own layout: a bare state dict in timm's key names (what timm's hub files hold).

    A classifier `head.*` is dropped (vitprobe builds backbones with `num_classes=0`) and reported.
    """
    _no_branch("timm", branch)
    sd, dropped = _drop(_tensors(ckpt, "the checkpoint"), lambda k: k.startswith(("head.", "head_dist.")))
    notes = ("classifier head dropped: vitprobe probes the backbone",) if dropped else ()
    return Remapped(sd, "timm", dropped=dropped, notes=notes)


def remap_mae_pretrain(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MAE pretrain checkpoint (facebookresearch/mae `mae_pretrain_vit_{base,large,huge}.pth`).

    `{'model': encoder}` (training files also hold `optimizer`, `epoch`, `args`, `scaler`, ignored); the
    encoder already uses timm's ViT key names, so nothing is renamed.
    """
    _no_branch("mae_pretrain", branch)
    return Remapped(_tensors(_model_entry(ckpt), "checkpoint['model']"), "mae_pretrain")


def remap_mae_visualize(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MAE "visualize" / full training checkpoint (`mae_visualize_vit_large.pth`, `checkpoint-N.pth`).

    `{'model': encoder + decoder}`: drops `decoder_*` (decoder_embed, decoder_pos_embed, decoder_blocks,
    decoder_norm, decoder_pred) and `mask_token`, which only the pixel decoder uses.
    """
    _no_branch("mae_visualize", branch)
    sd = _tensors(_model_entry(ckpt), "checkpoint['model']")
    sd, dropped = _drop(sd, lambda k: k.startswith("decoder_") or k == "mask_token")
    return Remapped(sd, "mae_visualize", dropped=dropped, notes=("MAE decoder and mask token dropped",))


def remap_dino_backbone(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINO backbone-only checkpoint (facebookresearch/dino `dino_vit{small,base}{16,8}_pretrain.pth`).

    A bare state dict already in timm's names; `module.` / `backbone.` prefixes (backbones extracted by
    hand from training checkpoints) are stripped and a projection `head.*` is dropped.
    """
    _no_branch("dino_backbone", branch)
    sd, renamed = _strip_prefixes(_tensors(ckpt, "the checkpoint"), ("module.", "backbone."))
    sd, dropped = _drop(sd, lambda k: k.startswith("head."))
    return Remapped(sd, "dino_backbone", renamed=renamed, dropped=dropped)


def remap_dino_full(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINO / iBOT full training checkpoint (`dino_vit*_pretrain_full_checkpoint.pth`, `checkpoint.pth`).

    `{'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'/'ibot_loss', ...}`. The student was
    saved from DDP (`module.backbone.*`), the teacher usually not (`backbone.*`). Takes the teacher by
    default (the network DINO and iBOT evaluate); drops the projection `head.*` and iBOT's `masked_embed`.
    """
    branch = _check_branch("dino_full", branch, ("teacher", "student"), "teacher")
    sd = _tensors(ckpt[branch], f"checkpoint[{branch!r}]")
    sd, dropped = _drop(sd, lambda k: k.removeprefix("module.").startswith("head."))
    sd, renamed = _strip_prefixes(sd, ("module.", "backbone."))
    sd, dropped_mim = _drop(sd, lambda k: k == "masked_embed")
    note = f"took the {branch} network" + (" (the one DINO and iBOT evaluate)" if branch == "teacher" else "")
    return Remapped(sd, "dino_full", renamed, tuple(sorted(dropped + dropped_mim)), (note,), branch)


def remap_ibot(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """iBOT released backbone (bytedance/ibot `checkpoint_teacher.pth` / `checkpoint_student.pth`).

    `{'state_dict': backbone}` in timm's names, sometimes with `module.` / `backbone.` prefixes; drops the
    masked-image-modelling embedding `masked_embed` and any projection `head.*`.
    """
    _no_branch("ibot", branch)
    sd, renamed = _strip_prefixes(
        _tensors(ckpt["state_dict"], "checkpoint['state_dict']"), ("module.", "backbone.")
    )
    sd, dropped = _drop(sd, lambda k: k == "masked_embed" or k.startswith("head."))
    return Remapped(sd, "ibot", renamed=renamed, dropped=dropped)


def remap_ijepa(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """I-JEPA checkpoint (facebookresearch/ijepa `IN1K-vit.h.14-300e.pth.tar`).

    `{'encoder', 'predictor', 'target_encoder', 'opt', 'scaler', 'epoch', 'loss', ...}`, encoders saved
    from DDP (`module.` prefix). Takes `target_encoder` (the EMA encoder) by default: the I-JEPA paper
    evaluates the target encoder. `branch='encoder'` gives the context encoder, which is what timm's own
    I-JEPA conversion loads. The predictor is ignored. There is no [cls] token.
    """
    branch = _check_branch("ijepa", branch, ("target_encoder", "encoder"), "target_encoder")
    sd, renamed = _strip_prefixes(_tensors(ckpt[branch], f"checkpoint[{branch!r}]"), ("module.",))
    note = (
        "took the target (EMA) encoder, which the I-JEPA paper evaluates"
        if branch == "target_encoder"
        else "took the context encoder (timm's I-JEPA weights use this one)"
    )
    return Remapped(sd, "ijepa", renamed=renamed, notes=(note,), branch=branch)


def remap_dinov2(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINOv2 official backbone (facebookresearch/dinov2 `dinov2_vit{s,b,l,g}14_pretrain.pth`).

    A bare state dict in timm's names (layer scale as `blocks.N.ls1.gamma`) plus the iBOT-style
    `mask_token`, which is dropped. Register variants (`register_tokens`) are not supported here.
    """
    _no_branch("dinov2", branch)
    sd, dropped = _drop(_tensors(ckpt, "the checkpoint"), lambda k: k == "mask_token")
    return Remapped(sd, "dinov2", dropped=dropped)


def resample_pos_embed_dinov2(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """DINOv2's position embeddings for another patch grid, computed as its own model does at run time.

    facebookresearch/dinov2 `dinov2/models/vision_transformer.py` `interpolate_pos_encoding` (with the
    released models' `interpolate_offset=0.1`, `interpolate_antialias=False`): the prefix rows are kept, the
    square M x M patch grid is resized bicubically with scale factor (h + 0.1) / M, (w + 0.1) / M, in float32.
    Loading these once equals what the official model adds to the tokens of an image of that size.

    Args:
        pos_embed: (1, P + M * M, D) as stored in the file.
        grid: the target patch grid (h, w).
        num_prefix: prefix rows (the [cls] position) copied unchanged.
    """
    import torch
    from torch.nn import functional as F

    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:].float()  # (1, P, D), (1, M*M, D)
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise CheckpointError(
            f"pos_embed holds {patches.shape[1]} patch positions, not a square grid", "check the checkpoint"
        )
    dim = patches.shape[-1]
    resized = F.interpolate(
        patches.reshape(1, side, side, dim).permute(0, 3, 1, 2),  # (1, D, M, M)
        scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side),
        mode="bicubic",
        antialias=False,
    )  # (1, D, h, w)
    assert tuple(resized.shape[-2:]) == tuple(grid), (resized.shape, grid)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)  # (1, h*w, D)
    return torch.cat([prefix, resized.to(pos_embed.dtype)], dim=1)


_BEITV2_PRETRAIN_ONLY = ("lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")


def remap_beitv2_pretrain(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """BEiT-v2 pretraining checkpoint (microsoft/unilm beit2 `beitv2_{base,large}_patch16_224_pt1k.pth`).

    `{'model': ...}` whose backbone keys are already timm's `Beit` names: the shared relative position
    bias `rel_pos_bias.relative_position_bias_table`, layer scale `blocks.N.gamma_1/2`, and the separate
    `attn.q_bias` / `attn.v_bias`. Dropped: `mask_token`, the visual-token head `lm_head.*`, the [cls]
    pretraining blocks `cls_pt_layers.*` (and `cls_pt_norm.*` / `cls_pt_lm_head.*` when present), and the
    `relative_position_index` buffers, which timm recomputes (they are not parameters).
    """
    _no_branch("beitv2_pretrain", branch)
    sd = _tensors(_model_entry(ckpt), "checkpoint['model']")
    sd, dropped = _drop(
        sd,
        lambda k: (
            k == "mask_token" or k.startswith(_BEITV2_PRETRAIN_ONLY) or k.endswith("relative_position_index")
        ),
    )
    notes = ("BEiT-v2 pretraining heads (lm_head, cls_pt_layers) and mask token dropped",)
    return Remapped(sd, "beitv2_pretrain", dropped=dropped, notes=notes)


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
}

LAYOUT_TITLES: dict[str, str] = {
    "timm": "timm-layout state dict",
    "mae_pretrain": "MAE pretrain checkpoint ({'model': encoder})",
    "mae_visualize": "MAE visualize/training checkpoint ({'model': encoder + decoder})",
    "dino_backbone": "DINO backbone-only state dict",
    "dino_full": "DINO/iBOT full training checkpoint ({'teacher', 'student', ...})",
    "ibot": "iBOT backbone checkpoint ({'state_dict': ...})",
    "ijepa": "I-JEPA checkpoint ({'encoder', 'target_encoder', 'predictor', ...})",
    "dinov2": "DINOv2 backbone state dict (with mask_token)",
    "beitv2_pretrain": "BEiT-v2 pretraining checkpoint ({'model': ...} with lm_head / cls_pt_layers)",
}


# --------------------------------------------------------------------------------------------------------
# layout detection and the per-family entry points that presets name


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
        return "ibot"
    if isinstance(ckpt.get("model", ckpt.get("module")), Mapping):
        inner = [str(k) for k in _model_entry(ckpt)]
        if any(
            k.startswith(("lm_head.", "cls_pt_layers.", "rel_pos_bias.")) or k.endswith(".q_bias")
            for k in inner
        ):
            return "beitv2_pretrain"
        if any(k.startswith("decoder_") for k in inner) or "mask_token" in inner:
            return "mae_visualize"
        return "mae_pretrain"
    import torch

    if keys and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "dinov2" if "mask_token" in keys else "bare"
    shown = sorted(map(str, keys))[:12]
    raise CheckpointError(
        f"unrecognised checkpoint layout (top-level keys: {shown})",
        "vitprobe reads MAE, DINO, iBOT, I-JEPA, DINOv2 and BEiT-v2 official files and timm state dicts; "
        "see docs/models.md",
    )


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
    return accepted[layout](ckpt, branch=branch)


def remap_mae(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """MAE presets: MAE pretrain, MAE visualize/training, or timm's layout (timm's hub copies)."""
    accepted = {"mae_pretrain": remap_mae_pretrain, "mae_visualize": remap_mae_visualize, "bare": remap_timm}
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
    return _dispatch(ckpt, "I-JEPA", {"ijepa": remap_ijepa, "bare": remap_timm}, branch)


def remap_dinov2_family(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """DINOv2 presets: official backbones (with `mask_token`) or timm's layout."""
    return _dispatch(ckpt, "DINOv2", {"dinov2": remap_dinov2, "bare": remap_timm}, branch)


def remap_beitv2(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """BEiT-v2 presets: official pretraining checkpoints or timm's layout of the same architecture."""
    return _dispatch(ckpt, "BEiT-v2", {"beitv2_pretrain": remap_beitv2_pretrain, "bare": remap_timm}, branch)


def remap_any(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """`timm:NAME` models: timm's layout, or any official layout above, detected from its keys."""
    accepted = {name: fn for name, fn in LAYOUTS.items() if name not in ("timm", "dino_backbone")}
    return _dispatch(ckpt, "timm:NAME", {**accepted, "bare": remap_timm}, branch)
