"""Presets: the literal registry of supported self-supervised backbones (timm architecture, default weights,
remap, data config, frozen parameter count). Torch-free: nothing here builds a model.

`vitprobe.models.load_backbone` builds and loads them; docs/models.md lists each preset's official file,
layout, remap and the reference code it follows.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitprobe.errors import ModelError
from vitprobe.posembed import resample_pos_embed_dinov2, resample_pos_embed_dinov2_reg
from vitprobe.remap import (
    Remapped,
    remap_beitv2,
    remap_data2vec2_family,
    remap_dino,
    remap_dinov2_family,
    remap_ibot_family,
    remap_ijepa_family,
    remap_latentmim_family,
    remap_mae,
    remap_mmpretrain_family,
    remap_mocov3_family,
    remap_simmim_family,
)

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
EVAL_CROP_PCT = 224 / 256  # resize 256, center crop 224


@dataclass(frozen=True)
class Preset:
    """One supported self-supervised backbone: where its architecture and weights come from."""

    name: str
    timm: str  # timm architecture, with its pretrained tag where timm has one (sets the data config)
    family: str  # "MIM" (masked image modelling) or "JEA" (joint-embedding architecture)
    method: str  # the paper's method name
    weights: str  # default weights: the official URL, or "hf-hub:REPO" (timm's converted copy)
    remap: Callable[..., Remapped]  # reads the official layouts of this method (and timm's layout)
    license: str  # license of the weights
    has_cls: bool  # whether the token sequence starts with a [cls] token
    patch: int  # patch size in pixels
    paper: str  # arXiv id of the method's paper
    params: int  # parameters of the backbone (no head), frozen here; a test checks each against the model
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra create_model arguments
    notes: str = ""
    # how the method's own model adapts `pos_embed` to another patch grid at run time (DINOv2); None: a
    # file with another grid fails strict loading (unless the user asks for another --img-size)
    resample_pos_embed: Callable[[torch.Tensor, tuple[int, int], int], torch.Tensor] | None = None
    arch: str | None = None  # extra create_model arguments from vitprobe.architectures.ARCHITECTURES
    manual: bool = False  # `weights` is a page vitprobe cannot download (Google Drive): --checkpoint needed

    @property
    def size(self) -> tuple[int, int]:
        """(width, depth) of the backbone, read from the size word of its timm name (tests check each
        against the built model); lets mismatch messages name presets of a file's size without building."""
        name = f"_{self.timm.split('.')[0]}_"
        return next(shape for word, shape in _SIZES.items() if f"_{word}_" in name)


_SIZES = {"small": (384, 12), "base": (768, 12), "large": (1024, 24), "huge": (1280, 32), "giant": (1536, 40)}


def eval_cfg(**overlay: Any) -> dict[str, Any]:
    """The data config of every preset: the linear-probe evaluation transform of the reference code.

    Bicubic resize to 256, center crop 224, ImageNet mean/std: gmum/beyond_cls `main_linprobe.py`
    (`transform_val`) and `util/datasets.py`, facebookresearch/mae `main_linprobe.py`, dino `eval_linear.py`,
    bytedance/ibot `evaluation/eval_linear.py`, dinov2 `data/transforms.py` (all `Resize(256)` +
    `CenterCrop(224)`). timm's tags say crop 0.9 (DINOv2: 518 px, crop 1.0); untagged names mean/std 0.5.
    """
    return {
        "pretrained_cfg_overlay": {
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bicubic",
            "crop_pct": EVAL_CROP_PCT,
            **overlay,
        }
    }


_BEIT_PRETRAIN_ARCH = {
    "use_shared_rel_pos_bias": True,  # BEiT-v2 / SimMIM pretraining: one relative position bias, all blocks
    "use_rel_pos_bias": False,
    "use_abs_pos_emb": False,
    "global_pool": "token",  # keeps `norm` (the default "avg" would replace it by an untrained fc_norm)
}
_MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/"
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"
# microsoft/unilm beit2/README.md (since commit edf2b0a, 2024): the Azure blob links it gave before need a
# SAS token that is no longer published; the GitHub release is the official download.
_BEITV2_URL = "https://github.com/addf400/files/releases/download/BEiT-v2/"
_IBOT_URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/"
_IJEPA_URL = "https://dl.fbaipublicfiles.com/ijepa/"
_MFF_URL = "https://download.openmmlab.com/mmpretrain/v1.0/mff/"


def _timm_hub_preset(name: str, timm: str, patch: int, *, official: str, **fields: Any) -> Preset:
    """A preset whose default weights are timm's hub copy of the official file named in its notes."""
    notes = fields.pop("notes", "")
    timm_kwargs = fields.pop("timm_kwargs", eval_cfg())
    return Preset(
        name=name, timm=timm, weights=f"hf-hub:timm/{timm}", has_cls=True, patch=patch,
        timm_kwargs=timm_kwargs, notes=f"{notes}{'; ' if notes else ''}official file: {official}", **fields,
    )


def _mae(name: str, size: str, patch: int, params: int) -> Preset:
    return _timm_hub_preset(
        name, f"vit_{size}_patch{patch}_224.mae", patch, official=f"{_MAE_URL}mae_pretrain_vit_{size}.pth",
        family="MIM", method="MAE", paper="2111.06377", remap=remap_mae, license="cc-by-nc-4.0",
        params=params,
    )


def _dino(name: str, size: str, patch: int, params: int) -> Preset:
    file = f"dino_{'deitsmall' if size == 'small' else 'vitbase'}{patch}_pretrain"
    return _timm_hub_preset(
        name, f"vit_{size}_patch{patch}_224.dino", patch, official=f"{_DINO_URL}{file}/{file}.pth",
        family="JEA", method="DINO", paper="2104.14294", remap=remap_dino, license="apache-2.0",
        params=params,
    )


_DINOV2_EVAL_ARCH = {"img_size": 224, **eval_cfg(input_size=(3, 224, 224))}  # timm's tag: 518 px
_DINOV2_224 = (
    "224 px as in DINOv2's linear evaluation: the 37x37 position embeddings of the 518 px weights are "
    "resampled to 16x16 as DINOv2's interpolate_pos_encoding does"
)


def _dinov2_file(size: str, registers: bool) -> str:
    stem = f"dinov2_vit{size[0]}14"
    return f"{_DINOV2_URL}{stem}/{stem}{'_reg4' if registers else ''}_pretrain.pth"


def _dinov2(name: str, size: str, params: int) -> Preset:
    return _timm_hub_preset(
        name, f"vit_{size}_patch14_dinov2.lvd142m", 14, official=_dinov2_file(size, False),
        family="JEA", method="DINOv2", paper="2304.07193", remap=remap_dinov2_family, license="apache-2.0",
        timm_kwargs=_DINOV2_EVAL_ARCH, resample_pos_embed=resample_pos_embed_dinov2, notes=_DINOV2_224,
        params=params,
    )


def _dinov2_official(name: str, size: str, params: int, *, registers: bool = False) -> Preset:
    """DINOv2 ViT-L/g and the models with registers (arXiv 2309.16588): the official files by default."""
    tag = "_reg4" if registers else ""
    notes = _DINOV2_224
    if registers:
        notes += " (antialiased, to the size 16x16: the register models' rule); 4 register tokens after [cls]"
    if size == "giant":
        notes += "; SwiGLU FFN (w12/w3 -> fc1/fc2)"
    return Preset(
        name=name, timm=f"vit_{size}_patch14{tag}_dinov2.lvd142m", family="JEA",
        method="DINOv2 + registers" if registers else "DINOv2",
        paper="2309.16588" if registers else "2304.07193",
        weights=_dinov2_file(size, registers), remap=remap_dinov2_family, license="apache-2.0", has_cls=True,
        patch=14, params=params, timm_kwargs=_DINOV2_EVAL_ARCH, notes=notes,
        resample_pos_embed=resample_pos_embed_dinov2_reg if registers else resample_pos_embed_dinov2,
    )


def _beitv2(name: str, size: str, params: int) -> Preset:
    return Preset(
        name=name, timm=f"beitv2_{size}_patch16_224", family="MIM", method="BEiT-v2", paper="2208.06366",
        weights=f"{_BEITV2_URL}beitv2_{size}_patch16_224_pt1k.pth", remap=remap_beitv2, license="mit",
        has_cls=True, patch=16, params=params, timm_kwargs={**_BEIT_PRETRAIN_ARCH, **eval_cfg()},
        notes="self-supervised pt1k weights, not timm's fine-tuned beitv2 tags",
    )


def _ibot(name: str, size: str, folder: str, params: int) -> Preset:
    return Preset(
        name=name, timm=f"vit_{size}_patch16_224", family="MIM", method="iBOT", paper="2111.07832",
        weights=f"{_IBOT_URL}{folder}/checkpoint_teacher.pth", remap=remap_ibot_family, license="apache-2.0",
        has_cls=True, patch=16, params=params, timm_kwargs=eval_cfg(),
        notes="ImageNet-1k teacher; masked image modelling with self-distillation (DINO loss on [cls])",
    )


def _mff(name: str, epochs: int, stamp: str) -> Preset:
    run = f"mff_vit-base-p16_8xb512-amp-coslr-{epochs}e_in1k"
    return Preset(
        name=name, timm="vit_base_patch16_224", family="MIM", method=f"MFF ({epochs} epochs)",
        paper="2308.00261",
        weights=f"{_MFF_URL}{run}/{run}_{stamp}.pth", remap=remap_mmpretrain_family, license="apache-2.0",
        has_cls=True, patch=16, params=85_798_656, timm_kwargs=eval_cfg(),
        notes="open-mmlab/mmpretrain configs/mff (MAE + multi-level feature fusion); the fusion layers are "
        "pretraining-only and are reported, not loaded",
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _mae("mae-b16", "base", 16, 85_798_656),
        _mae("mae-l16", "large", 16, 303_301_632),
        _mae("mae-h14", "huge", 14, 630_764_800),
        _dino("dino-s16", "small", 16, 21_665_664),
        _dino("dino-b16", "base", 16, 85_798_656),
        _dino("dino-s8", "small", 8, 21_670_272),
        _dino("dino-b8", "base", 8, 85_807_872),
        _beitv2("beitv2-b16", "base", 85_665_360),
        _beitv2("beitv2-l16", "large", 303_136_192),
        _ibot("ibot-s16", "small", "vits_16", 21_665_664),
        _ibot("ibot-b16", "base", "vitb_16", 85_798_656),
        _ibot("ibot-l16", "large", "vitl_16", 303_301_632),
        Preset(
            name="ijepa-h14", timm="vit_huge_patch14_gap_224.in1k_ijepa", family="JEA", method="I-JEPA",
            paper="2301.08243", weights=f"{_IJEPA_URL}IN1K-vit.h.14-300e.pth.tar", remap=remap_ijepa_family,
            license="cc-by-nc-4.0", has_cls=False, patch=14, params=630_762_240, timm_kwargs=eval_cfg(),
            notes="no [cls] token; loads the target encoder, which the paper evaluates "
            "(--branch encoder: the context encoder, which timm loads)",
        ),
        _dinov2("dinov2-s14", "small", 21_628_800),
        _dinov2("dinov2-b14", "base", 85_724_928),
        _dinov2_official("dinov2-l14", "large", 303_227_904),
        _dinov2_official("dinov2-g14", "giant", 1_134_769_664),
        _dinov2_official("dinov2-s14-reg", "small", 21_629_952, registers=True),
        _dinov2_official("dinov2-b14-reg", "base", 85_727_232, registers=True),
        _dinov2_official("dinov2-l14-reg", "large", 303_230_976, registers=True),
        _dinov2_official("dinov2-g14-reg", "giant", 1_134_774_272, registers=True),
        _mff("mff-b16-300e", 300, "20230801-3c1bcce4"),
        _mff("mff-b16-800e", 800, "20230801-3af7cd9d"),
        Preset(
            name="latentmim-b16", timm="vit_base_patch16_224", family="MIM", method="Latent MIM",
            paper="2407.15837", weights="https://drive.google.com/file/d/115fSOVNjprJVGEAzgIUzmMYBEdg6iL31/view",
            remap=remap_latentmim_family, license="mit", has_cls=True, patch=16, params=85_798_656,
            timm_kwargs=eval_cfg(), manual=True,
            notes="ViT-B/16 800 epochs; the weights are behind a Google Drive link (yibingwei-1/LatentMIM "
            "README): download the file and pass it with --checkpoint; online encoder by default "
            "(--branch target_encoder: the EMA encoder)",
        ),
        Preset(
            name="simmim-b16", timm="beit_base_patch16_224", family="MIM", method="SimMIM",
            paper="2111.09886",
            weights="https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw/view",
            remap=remap_simmim_family, license="mit", has_cls=True, patch=16, params=85_665_360,
            timm_kwargs={**_BEIT_PRETRAIN_ARCH, **eval_cfg()}, manual=True,
            notes="ViT-B/16 800 epochs, BEiT-style encoder with a shared relative position bias; the weights "
            "are behind a Google Drive link (microsoft/SimMIM README): download and pass with --checkpoint",
        ),
        Preset(
            name="data2vec2-b16", timm="vit_base_patch16_224", family="MIM", method="data2vec 2.0",
            paper="2212.07525", weights="https://dl.fbaipublicfiles.com/fairseq/data2vec2/base_imagenet.pt",
            remap=remap_data2vec2_family, license="cc-by-nc-4.0", has_cls=True, patch=16, params=85_797_888,
            timm_kwargs=eval_cfg(), arch="data2vec2",
            notes="post-LN blocks (vitprobe.architectures.PostNormBlock), a LayerNorm before the blocks, no "
            "final norm; student by default (--branch teacher: the EMA teacher)",
        ),
        Preset(
            name="mocov3-b16", timm="vit_base_patch16_224", family="JEA", method="MoCo v3",
            paper="2104.02057",
            weights="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
            remap=remap_mocov3_family, license="cc-by-nc-4.0", has_cls=True, patch=16, params=85_798_656,
            timm_kwargs=eval_cfg(),
            notes="ViT-B/16 300 epochs; base encoder by default (--branch momentum_encoder: the EMA encoder)",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`.

    Raises:
        ModelError: unknown name (the message suggests close names).
    """
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=3)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    import timm

    if timm.is_model(name.split(".")[0]):  # a timm name given without its prefix
        suggestion = f"did you mean {TIMM_PREFIX}{name}? "
    raise ModelError(
        f"unknown model {name!r}",
        f"{suggestion}use a preset from `vitprobe models list` or timm:NAME for any timm model",
    )


def preset_num_params(name: str) -> int:
    """Parameter count of a preset's backbone (frozen in the registry; tests check it against the model)."""
    return get_preset(name).params


def preset_rows() -> list[dict[str, Any]]:
    """One row per preset for `vitprobe models list`: name, family, architecture, params, weights, license."""
    return [
        {
            "name": p.name,
            "family": p.family,
            "method": p.method,
            "arch": p.timm,
            "params": p.params,
            "patch": p.patch,
            "has_cls": p.has_cls,
            "weights": p.weights,
            "manual_download": p.manual,
            "license": p.license,
            "paper": f"arXiv:{p.paper}",
            "notes": p.notes,
        }
        for p in PRESETS.values()
    ]
