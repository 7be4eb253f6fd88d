"""The result of a remap (`Remapped`), the title of every layout, and the small pure helpers remaps share.

Nothing here touches a model or a file; the layout functions in `vitprobe.remap.timm_names` and
`vitprobe.remap.renamed` are built from these helpers.
"""

from __future__ import annotations

import re
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
    branch: str | None = None  # the sub-network taken from a multi-network checkpoint (teacher, ...)


# Every layout, declared once: its key in `vitprobe.remap.LAYOUTS` and the phrase messages use for it.
LAYOUT_TITLES: dict[str, str] = {
    "timm": "timm-layout state dict",
    "mae_pretrain": "MAE pretrain checkpoint ({'model': encoder}; also MoCo v3's convert_to_deit.py output)",
    "mae_visualize": "MAE visualize/training checkpoint ({'model': encoder + decoder})",
    "dino_backbone": "DINO backbone-only state dict",
    "dino_full": "DINO/iBOT full training checkpoint ({'teacher', 'student', ...})",
    "ibot": "iBOT backbone checkpoint ({'state_dict': ...})",
    "ijepa": "I-JEPA checkpoint ({'encoder', 'target_encoder', 'predictor', ...})",
    "dinov2": "DINOv2 backbone state dict (with mask_token)",
    "beitv2_pretrain": "BEiT-v2 pretraining checkpoint ({'model': ...} with lm_head / cls_pt_layers)",
    "mocov3": "MoCo v3 checkpoint ({'state_dict': module.base_encoder / module.momentum_encoder, ...})",
    "mmpretrain": "mmpretrain checkpoint ({'meta', 'state_dict': backbone.layers.N.ln1, ...})",
    "latentmim": "Latent MIM checkpoint ({'state_dict': encoder / target_encoder / decoder, ...})",
    "simmim": "SimMIM checkpoint ({'model': encoder.* + decoder, 'config', ...})",
    "data2vec2": "data2vec 2.0 checkpoint ({'model': modality_encoders.IMAGE.* + blocks.*, 'cfg', ...})",
}

CLASSIFIER_PREFIXES = ("head.", "head_dist.")  # timm's classifier names once a layout is remapped


def tensors(obj: Any, where: str) -> StateDict:
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


def strip_prefixes(sd: StateDict, prefixes: tuple[str, ...]) -> tuple[StateDict, int]:
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


def drop(sd: StateDict, rule: Callable[[str], bool]) -> tuple[StateDict, tuple[str, ...]]:
    """Split off the keys for which `rule(key)` is true; return (kept, sorted dropped keys)."""
    kept = {k: v for k, v in sd.items() if not rule(k)}
    return kept, tuple(sorted(k for k in sd if rule(k)))


def rename_key(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    """`key` renamed by the first matching `(regex, replacement)` of `rules`; unchanged when none matches."""
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def rename(sd: StateDict, rules: tuple[tuple[str, str], ...]) -> tuple[StateDict, int]:
    """Rename every key with `rename_key`; count the renamed keys.

    Keys no rule matches are kept as they are, so strict loading names them if the model lacks them.
    """
    out: StateDict = {}
    renamed = 0
    for key, value in sd.items():
        new = rename_key(key, rules)
        if new in out:
            raise CheckpointError(f"two keys map to {new!r}", "check the checkpoint")
        out[new] = value
        renamed += new != key
    return out, renamed


def take_prefix(sd: StateDict, prefix: str) -> StateDict:
    """The keys under `prefix` (`encoder.`), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def model_entry(ckpt: Mapping[str, Any]) -> Any:
    """The network of a `{'model': ...}` checkpoint (some BEiT releases say `{'module': ...}`)."""
    return ckpt["model"] if "model" in ckpt else ckpt["module"]


def check_branch(layout: str, branch: str | None, allowed: tuple[str, ...], default: str) -> str:
    """The branch to take from a multi-network layout; a branch it does not have is refused."""
    branch = branch or default
    if branch not in allowed:
        raise CheckpointError(
            f"branch {branch!r} does not exist in a {LAYOUT_TITLES[layout]}",
            f"use one of {', '.join(allowed)}",
        )
    return branch


def no_branch(layout: str, branch: str | None) -> None:
    """Refuse `--branch` for a layout that holds one network."""
    if branch is not None:
        raise CheckpointError(
            f"a {LAYOUT_TITLES[layout]} holds one network, so branch {branch!r} does not apply",
            "leave out --branch (it picks teacher/student, encoder/target_encoder or the momentum encoder)",
        )


def is_classifier(key: str) -> bool:
    """A key of a classifier head in timm's names (`head.weight`, `head_dist.bias`)."""
    return key.startswith(CLASSIFIER_PREFIXES)
