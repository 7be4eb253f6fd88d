"""Backbones: presets (name → timm architecture, weights source, remap) and `load_backbone()`.

A backbone is a timm ViT built with `num_classes=0` and its final norm kept, loaded *strictly*: the remapped
state dict must match the architecture key for key and shape for shape, or `KeyMismatchError` lists what
differs and why. timm's own pretrained loading (which turns `strict` off when `num_classes` differs) is
never used; weights files are fetched and read by `vitprobe.checkpoints`, renamed by `vitprobe.remap`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from vitprobe.errors import CheckpointError, KeyMismatchError, ModelError
from vitprobe.remap import (
    LAYOUT_TITLES,
    Remapped,
    remap_any,
    remap_beitv2,
    remap_dino,
    remap_dinov2_family,
    remap_ibot_family,
    remap_ijepa_family,
    remap_mae,
    resample_pos_embed_dinov2,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Preset:
    """One supported self-supervised backbone: where its architecture and weights come from."""

    name: str
    timm: str  # timm architecture, with its pretrained tag where timm has one (sets the data config)
    family: str  # "MIM" (masked image modelling) or "JEA" (joint-embedding architecture)
    method: str  # the paper's method name
    weights: str  # default weights: "hf-hub:REPO" (timm's converted copy) or the official URL
    remap: Callable[..., Remapped]  # reads the official layouts of this method (and timm's layout)
    license: str  # license of the weights
    has_cls: bool  # whether the token sequence starts with a [cls] token
    patch: int  # patch size in pixels
    paper: str  # arXiv id of the method's paper
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra create_model arguments
    notes: str = ""
    # how the method's own model adapts `pos_embed` to another patch grid at run time (DINOv2); None: a
    # file with another grid fails strict loading
    resample_pos_embed: Callable[[torch.Tensor, tuple[int, int], int], torch.Tensor] | None = None


EVAL_CROP_PCT = 224 / 256  # resize 256, center crop 224


def _eval_cfg(**overlay: Any) -> dict[str, Any]:
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


_BEITV2_PRETRAIN_ARCH = {
    "use_shared_rel_pos_bias": True,  # BEiT-v2 pretraining: one relative position bias shared by all blocks
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


def _timm_hub_preset(name: str, timm: str, patch: int, *, official: str, **fields: Any) -> Preset:
    """A preset whose default weights are timm's hub copy of the official file named in its notes."""
    notes = fields.pop("notes", "")
    timm_kwargs = fields.pop("timm_kwargs", _eval_cfg())
    return Preset(
        name=name, timm=timm, weights=f"hf-hub:timm/{timm}", has_cls=True, patch=patch,
        timm_kwargs=timm_kwargs, notes=f"{notes}{'; ' if notes else ''}official file: {official}", **fields,
    )


def _mae(name: str, size: str, patch: int) -> Preset:
    return _timm_hub_preset(
        name, f"vit_{size}_patch{patch}_224.mae", patch, official=f"{_MAE_URL}mae_pretrain_vit_{size}.pth",
        family="MIM", method="MAE", paper="2111.06377", remap=remap_mae, license="cc-by-nc-4.0",
    )


def _dino(name: str, size: str, patch: int) -> Preset:
    file = f"dino_{'deitsmall' if size == 'small' else 'vitbase'}{patch}_pretrain"
    return _timm_hub_preset(
        name, f"vit_{size}_patch{patch}_224.dino", patch, official=f"{_DINO_URL}{file}/{file}.pth",
        family="JEA", method="DINO", paper="2104.14294", remap=remap_dino, license="apache-2.0",
    )


_DINOV2_EVAL_ARCH = {"img_size": 224, **_eval_cfg(input_size=(3, 224, 224))}  # timm's tag: 518 px


def _dinov2(name: str, size: str) -> Preset:
    file = f"dinov2_vit{size[0]}14"
    return _timm_hub_preset(
        name, f"vit_{size}_patch14_dinov2.lvd142m", 14, official=f"{_DINOV2_URL}{file}/{file}_pretrain.pth",
        family="JEA", method="DINOv2", paper="2304.07193", remap=remap_dinov2_family, license="apache-2.0",
        timm_kwargs=_DINOV2_EVAL_ARCH, resample_pos_embed=resample_pos_embed_dinov2,
        notes="224 px as in DINOv2's linear evaluation: the 37x37 position embeddings of the 518 px weights "
        "are resampled to 16x16 as DINOv2's interpolate_pos_encoding does",
    )


def _beitv2(name: str, size: str) -> Preset:
    return Preset(
        name=name, timm=f"beitv2_{size}_patch16_224", family="MIM", method="BEiT-v2", paper="2208.06366",
        weights=f"{_BEITV2_URL}beitv2_{size}_patch16_224_pt1k.pth", remap=remap_beitv2, license="mit",
        has_cls=True, patch=16, timm_kwargs={**_BEITV2_PRETRAIN_ARCH, **_eval_cfg()},
        notes="self-supervised pt1k weights, not timm's fine-tuned beitv2 tags",
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _mae("mae-b16", "base", 16),
        _mae("mae-l16", "large", 16),
        _mae("mae-h14", "huge", 14),
        _dino("dino-s16", "small", 16),
        _dino("dino-b16", "base", 16),
        _dino("dino-s8", "small", 8),
        _dino("dino-b8", "base", 8),
        _beitv2("beitv2-b16", "base"),
        _beitv2("beitv2-l16", "large"),
        Preset(
            name="ibot-b16", timm="vit_base_patch16_224", family="MIM", method="iBOT", paper="2111.07832",
            weights=f"{_IBOT_URL}vitb_16/checkpoint_teacher.pth", remap=remap_ibot_family,
            license="apache-2.0", has_cls=True, patch=16, timm_kwargs=_eval_cfg(),
            notes="ImageNet-1k teacher; masked image modelling with self-distillation (DINO loss on [cls])",
        ),
        Preset(
            name="ijepa-h14", timm="vit_huge_patch14_gap_224.in1k_ijepa", family="JEA", method="I-JEPA",
            paper="2301.08243", weights=f"{_IJEPA_URL}IN1K-vit.h.14-300e.pth.tar", remap=remap_ijepa_family,
            license="cc-by-nc-4.0", has_cls=False, patch=14, timm_kwargs=_eval_cfg(),
            notes="no [cls] token; loads the target encoder, which the paper evaluates "
            "(--branch encoder: the context encoder, which timm loads)",
        ),
        _dinov2("dinov2-s14", "small"),
        _dinov2("dinov2-b14", "base"),
    )
}


@dataclass
class LoadReport:
    """What was loaded and how; written into caches and results so every run records its backbone."""

    model: str  # the spec the user gave: preset name or timm:NAME
    timm_name: str
    source: str  # "random-init", a file path, a URL or "hf-hub:REPO"
    sha256: str | None  # of the checkpoint file; None for random-init
    random_init: bool
    remapped: int = 0  # number of keys renamed by the remap
    dropped: list[str] = field(default_factory=list)  # keys the remap dropped (decoder, heads, ...)
    num_params: int = 0
    notes: list[str] = field(default_factory=list)
    layout: str | None = None  # the official layout the file had (a key of vitprobe.remap.LAYOUTS)
    branch: str | None = None  # sub-network taken from a multi-network file (teacher, target_encoder)
    arch_overrides: dict[str, Any] = field(
        default_factory=dict
    )  # create_model arguments changed by the caller

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checkpoint_id": self.checkpoint_id}

    @property
    def checkpoint_id(self) -> str:
        """sha256 of the weights file, or "random-init"."""
        return "random-init" if self.random_init else (self.sha256 or self.source)


@dataclass
class Backbone:
    """A timm ViT in eval mode plus what probing needs to know about its tokens.

    Tokens are (B, T, D) with T = num_prefix_tokens + grid[0] * grid[1]; prefix tokens come first
    ([cls] at index 0 when `has_cls`, then register tokens).
    """

    model: nn.Module
    report: LoadReport

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1 if self.has_cls else 0))

    @property
    def has_cls(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def num_reg_tokens(self) -> int:
        return int(getattr(self.model, "num_reg_tokens", 0))

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def patch_size(self) -> int:
        ps = self.model.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    @property
    def grid(self) -> tuple[int, int]:
        gs = self.model.patch_embed.grid_size
        return int(gs[0]), int(gs[1])

    @property
    def final_norm(self) -> nn.Module:
        """The final LayerNorm (never BEiT's pooled `fc_norm`); probes may apply it to cached tokens."""
        return self.model.norm

    def data_config(self) -> dict[str, Any]:
        """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
        from timm.data import resolve_data_config

        return resolve_data_config({}, model=self.model)

    def transform(self, *, train: bool = False) -> Any:
        """timm's eval (resize + center crop) or training (random-resized-crop + flip) transform."""
        from timm.data import create_transform

        return create_transform(**self.data_config(), is_training=train)

    def layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Resolve negative block indices (-1 = last block) and check the range."""
        out = []
        for layer in layers:
            idx = layer + self.depth if layer < 0 else layer
            if not 0 <= idx < self.depth:
                raise ModelError(
                    f"layer {layer} is out of range for a {self.depth}-block model",
                    f"use a block index in [-{self.depth}, {self.depth - 1}]",
                )
            out.append(idx)
        return out

    def intermediates(self, images: torch.Tensor, layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """Token sequences (B, T, D) at the output of the given blocks, before the final norm."""
        idx = self.layer_indices(layers)
        outs = self.model.forward_intermediates(
            images,
            indices=sorted(set(idx)),
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
            stop_early=True,  # blocks after the last requested one are not run
        )
        by_block = {}
        for block, out in zip(sorted(set(idx)), outs, strict=True):
            if isinstance(out, tuple):  # (patches (B, N, D), prefix (B, P, D))
                patches, prefix = out
                out = torch_cat([prefix, patches], dim=1)  # (B, P + N, D)
            by_block[block] = out
        return [by_block[i] for i in idx]


def torch_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    import torch

    return torch.cat(tensors, dim=dim)


@dataclass(frozen=True)
class LoadConfig:
    """How to load a backbone; embedded in the configs of the commands that run one."""

    model: str  # preset name (`vitprobe models list`) or timm:NAME
    checkpoint: str | None = (
        None  # official file, URL or hf-hub:REPO; None loads the preset's default weights
    )
    random_init: bool = False  # random weights, for tests and the offline demo; every output says so
    branch: str | None = (
        None  # teacher/student (DINO, iBOT) or target_encoder/encoder (I-JEPA); None = default
    )
    device: str | None = None  # where the model ends up; None keeps it on the CPU


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


def create_timm_backbone(timm_name: str, *, device: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a timm architecture without weights, with no head and the final norm kept.

    Args:
        timm_name: a timm model name, optionally with a pretrained tag (which sets the data config only).
        device: "meta" builds without allocating memory (parameter counts, shapes); anything else builds on
            the CPU.
        **kwargs: extra `timm.create_model` arguments (architecture overrides such as `img_size`).
    """
    import timm
    import torch

    try:
        with torch.device("meta" if device == "meta" else "cpu"):
            model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ModelError(f"cannot build timm model {timm_name!r}: {exc}", _timm_name_hint(timm_name)) from exc
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ModelError(
            f"{timm_name!r} is not a plain ViT", "vitprobe probes ViT-style models (blocks + patch_embed)"
        )
    img_size = tuple(int(s) for s in model.patch_embed.img_size)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if (
        tuple(cfg.get("input_size", (3, *img_size))[1:]) != img_size
    ):  # an img_size override: keep transforms in step
        model.pretrained_cfg = model.default_cfg = {**cfg, "input_size": (3, *img_size)}
    return model.eval()


def _timm_name_hint(timm_name: str) -> str:
    """Suggest close timm names (`timm:vit_base_patch16_224` for `timm:vit_base_patch16_22`)."""
    import timm

    arch, _, tag = timm_name.partition(".")
    if timm.is_model(arch) and not tag:  # the architecture exists: the failure is elsewhere
        return "check the architecture arguments (arch_overrides)"
    names = timm.list_pretrained(f"{arch}.*") if timm.is_model(arch) else timm.list_models()
    close = difflib.get_close_matches(timm_name, names, n=3, cutoff=0.8)
    suggestion = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
    return f"{suggestion}timm.list_models('*vit*') lists timm's ViT names; presets: `vitprobe models list`"


@cache
def preset_num_params(name: str) -> int:
    """Parameter count of a preset's backbone, built on the meta device (no memory is allocated)."""
    preset = get_preset(name)
    model = create_timm_backbone(preset.timm, device="meta", **preset.timm_kwargs)
    return sum(p.numel() for p in model.parameters())


def preset_rows() -> list[dict[str, Any]]:
    """One row per preset for `vitprobe models list`: name, family, architecture, params, weights, license."""
    return [
        {
            "name": p.name,
            "family": p.family,
            "method": p.method,
            "arch": p.timm,
            "params": preset_num_params(p.name),
            "patch": p.patch,
            "has_cls": p.has_cls,
            "weights": p.weights,
            "license": p.license,
            "paper": f"arXiv:{p.paper}",
            "notes": p.notes,
        }
        for p in PRESETS.values()
    ]


def load_backbone(
    name: str,
    *,
    checkpoint: str | None = None,
    random_init: bool = False,
    device: str | None = None,
    branch: str | None = None,
    arch_overrides: Mapping[str, Any] | None = None,
) -> Backbone:
    """Build `name` (a preset or `timm:NAME`) and load its weights strictly.

    Args:
        name: preset name (`mae-b16`, ...) or `timm:NAME`.
        checkpoint: weights file, http(s) URL or `hf-hub:REPO[:FILE]` in an official layout of the preset's
            method or in timm's layout; None loads the default weights (the preset's source, or timm's hub
            copy for `timm:NAME`).
        random_init: build with random weights instead (the report says so).
        device: where the model ends up ("cpu", "cuda:0", "auto" = CUDA when available; "meta" only with
            `random_init`); None keeps it on the CPU.
        branch: which network of a multi-network file: teacher/student (DINO, iBOT full checkpoints) or
            target_encoder/encoder (I-JEPA); None takes the one the method evaluates.
        arch_overrides: extra `timm.create_model` arguments (e.g. a tiny `embed_dim`/`depth` in tests);
            recorded in the report.

    Raises:
        ModelError: unknown name, or contradictory options.
        CheckpointError: unreadable, unsafe or unrecognised file; KeyMismatchError when it does not fit.
        WeightsUnavailableError: offline (HF_HUB_OFFLINE=1) and the default weights are not cached.
    """
    if random_init and checkpoint is not None:
        raise ModelError("--random-init and --checkpoint were both given", "use one of them")
    if random_init and branch is not None:
        raise ModelError(
            f"--branch {branch} picks a network from a weights file, but --random-init loads none",
            "leave out --branch, or load a checkpoint",
        )
    device = None if device is None else str(device)
    if device == "auto":
        from vitprobe.devices import resolve_device

        device = str(resolve_device("auto"))
    if device == "meta" and not random_init:
        raise ModelError("the meta device holds no weights", "use device='meta' only with random_init=True")
    overrides = dict(arch_overrides or {})
    resample = None
    if name.startswith(TIMM_PREFIX):
        timm_name, kwargs, remap, default_weights = name.removeprefix(TIMM_PREFIX), {}, remap_any, None
    else:
        preset = get_preset(name)
        timm_name, kwargs, remap = preset.timm, dict(preset.timm_kwargs), preset.remap
        default_weights, resample = preset.weights, preset.resample_pos_embed
    report = LoadReport(
        model=name, timm_name=timm_name, source="random-init", sha256=None, random_init=True,
        arch_overrides=overrides,
    )
    if overrides:
        report.notes.append(f"architecture overridden: {overrides}")
    weights = None
    if random_init:
        report.notes.append("random weights: NOT a pretrained model")
    else:  # read the file before building: offline, unsafe or foreign files fail fast
        source = checkpoint or default_weights or _timm_default_weights(timm_name)
        weights = _read_weights(source, remap, branch, report)
    build_on = "meta" if device == "meta" else None
    model = create_timm_backbone(timm_name, device=build_on, **{**kwargs, **overrides})
    if weights is not None:
        if resample is not None:
            weights = _fit_pos_embed(weights, model, resample, report)
        what = f"{report.source} ({LAYOUT_TITLES[weights.layout]})"
        load_state_dict_strict(model, weights.state_dict, what=what, model_name=name)
    if device not in (None, "meta"):
        model = model.to(device)
    report.num_params = sum(p.numel() for p in model.parameters())
    if _pools_before_norm(model):
        report.notes.append("this architecture normalises after pooling (fc_norm): tokens are un-normalised")
    return Backbone(model=model, report=report)


def load_backbone_from_config(config: LoadConfig, **kwargs: Any) -> Backbone:
    """`load_backbone` with the options of a `LoadConfig` (kwargs: e.g. `arch_overrides`)."""
    return load_backbone(
        config.model,
        checkpoint=config.checkpoint,
        random_init=config.random_init,
        device=config.device,
        branch=config.branch,
        **kwargs,
    )


def _fit_pos_embed(
    weights: Remapped,
    model: nn.Module,
    resample: Callable[[torch.Tensor, tuple[int, int], int], torch.Tensor],
    report: LoadReport,
) -> Remapped:
    """Resample the file's `pos_embed` to the model's patch grid when only the number of positions differs."""
    have, want = weights.state_dict.get("pos_embed"), model.state_dict().get("pos_embed")
    if have is None or want is None or have.shape == want.shape or have.shape[-1] != want.shape[-1]:
        return weights  # nothing to do, or a mismatch strict loading explains better
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    side = round((have.shape[1] - prefix) ** 0.5)
    state_dict = {**weights.state_dict, "pos_embed": resample(have, grid, prefix)}
    report.notes.append(
        f"pos_embed resampled from {side}x{side} to {grid[0]}x{grid[1]} patches, as the method's own model "
        "does for this image size"
    )
    return dataclasses.replace(weights, state_dict=state_dict)


def _pools_before_norm(model: nn.Module) -> bool:
    """True when `norm` is an Identity and `fc_norm` a real norm (timm's avg-pool ViTs and BEiTs)."""
    from torch import nn

    fc_norm = getattr(model, "fc_norm", None)
    has_fc_norm = isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity)
    return isinstance(getattr(model, "norm", None), nn.Identity) and has_fc_norm


def _timm_default_weights(timm_name: str) -> str:
    """timm's default pretrained weights for `timm_name`: its hub copy (`hf-hub:REPO[:FILE]`) or its URL."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)  # the registry expands "timm/" to "timm/ARCH.TAG"
    if cfg is not None and cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}" + (f":{cfg.hf_hub_filename}" if cfg.hf_hub_filename else "")
    if cfg is not None and cfg.url:
        return cfg.url
    raise CheckpointError(
        f"timm has no pretrained weights for {timm_name!r}",
        "pass a weights file with --checkpoint, or --random-init",
    )


def _read_weights(
    source: str, remap: Callable[..., Remapped], branch: str | None, report: LoadReport
) -> Remapped:
    """Fetch `source`, read it safely and remap it; record source, sha256, layout and dropped keys."""
    from vitprobe.checkpoints import fetch_checkpoint, read_checkpoint, sha256_file

    path = fetch_checkpoint(source)
    try:
        remapped = remap(read_checkpoint(path), branch=branch)
    except CheckpointError as exc:
        if str(path) in exc.message:
            raise
        raise type(exc)(f"{path}: {exc.message}", exc.hint) from exc
    report.source = source if "://" in source or source.startswith("hf-hub:") else str(path.resolve())
    report.sha256 = sha256_file(path)
    report.random_init = False
    report.layout = remapped.layout
    report.branch = remapped.branch
    report.remapped = remapped.renamed
    report.dropped = list(remapped.dropped)
    report.notes.extend(remapped.notes)
    return remapped


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
    """(dim, depth, patch) of every preset, read from its architecture built on the meta device."""
    return {
        name: _arch_of_state_dict(create_timm_backbone(p.timm, device="meta", **p.timm_kwargs).state_dict())
        for name, p in PRESETS.items()
    }


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
            f"{tuple(expected['pos_embed'].shape)} in the model: another image size, or with/without [cls]"
        )
    if "register_tokens" in unexpected:
        return (
            "a DINOv2 checkpoint with register tokens (…_reg4_pretrain.pth), but this model has none; "
            "load it with timm:vit_{small,base}_patch14_reg4_dinov2.lvd142m and timm's hub weights"
        )
    if any(k.endswith(".ls1.gamma") for k in missing) or any(k.endswith(".ls1.gamma") for k in unexpected):
        return "layer scale (ls1/ls2.gamma) present in only one of file and model"
    return f"the file was saved from a different architecture than {name}"


def describe_backbone(backbone: Backbone) -> dict[str, Any]:
    """Everything `vitprobe models show` prints: the load report plus tokens, sizes and preprocessing."""
    cfg = backbone.data_config()
    return {
        **backbone.report.to_dict(),
        "image_size": list(cfg["input_size"][1:]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"],
        "patch_size": backbone.patch_size,
        "grid": list(backbone.grid),
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "has_cls": backbone.has_cls,
        "num_reg_tokens": backbone.num_reg_tokens,
        "depth": backbone.depth,
        "dim": backbone.dim,
        "final_norm": type(backbone.final_norm).__name__,
    }


def inspect_model(config: LoadConfig) -> dict[str, Any]:
    """`vitprobe models show`: load the backbone as configured and describe it."""
    return describe_backbone(load_backbone_from_config(config))
