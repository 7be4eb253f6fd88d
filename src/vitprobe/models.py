"""Backbones: `load_backbone()` builds a preset or `timm:NAME` and loads its weights strictly; the data
config (image size, mean/std, crop, interpolation) can be overridden as timm's `resolve_data_config` does.

A backbone is a timm ViT built with `num_classes=0` and its final norm kept, loaded *strictly*: the remapped
state dict must match the architecture key for key and shape for shape, or `KeyMismatchError` lists what
differs and why (`vitprobe.mismatch`). timm's own pretrained loading (which turns `strict` off when
`num_classes` differs) is never used; weights files are fetched and read by `vitprobe.checkpoints`, renamed
by `vitprobe.remap`. The presets themselves are data, in `vitprobe.presets`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vitprobe.dataconfig import INTERPOLATIONS, DataOverrides
from vitprobe.errors import CheckpointError, ModelError, WeightsUnavailableError
from vitprobe.mismatch import likely_cause, load_state_dict_strict
from vitprobe.posembed import fit_positions
from vitprobe.presets import (
    EVAL_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    TIMM_PREFIX,
    Preset,
    get_preset,
    preset_num_params,
    preset_rows,
)
from vitprobe.remap import LAYOUT_TITLES, Remapped, remap_any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "EVAL_CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "PRESETS",
    "TIMM_PREFIX",
    "Backbone",
    "DataOverrides",
    "LoadConfig",
    "LoadReport",
    "Preset",
    "build_preset",
    "create_timm_backbone",
    "describe_backbone",
    "get_preset",
    "inspect_model",
    "likely_cause",
    "load_backbone",
    "load_backbone_from_config",
    "load_state_dict_strict",
    "preset_num_params",
    "preset_rows",
]

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
    arch_overrides: dict[str, Any] = field(default_factory=dict)  # create_model arguments the caller changed
    data_overrides: dict[str, Any] = field(default_factory=dict)  # DataOverrides.given(): image size, mean..

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
        """The final LayerNorm (never BEiT's pooled `fc_norm`); probes may apply it to cached tokens.

        An `Identity` for post-LN backbones (data2vec 2.0), whose block outputs are already normalised.
        """
        return self.model.norm

    def data_config(self) -> dict[str, Any]:
        """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode), with the
        `DataOverrides` the backbone was loaded with (they are set on the model's `pretrained_cfg`)."""
        from timm.data import resolve_data_config

        return resolve_data_config({}, model=self.model)

    def transform(self, *, train: bool = False) -> Any:
        """timm's eval (resize + center crop) or training (random-resized-crop + flip) transform."""
        from timm.data import create_transform

        return create_transform(**self.data_config(), is_training=train)

    def layer_indices(self, layers: Sequence[int] | str) -> list[int]:
        """Resolve negative block indices (-1 = last block) and check the range; "all" = every block."""
        if layers == "all":
            return list(range(self.depth))
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
    checkpoint: str | None = None  # official file, URL or hf-hub:REPO; None: the preset's default weights
    random_init: bool = False  # random weights, for tests and the offline demo; every output says so
    branch: str | None = None  # teacher/student, target_encoder/encoder, ...; None: what the method evaluates
    device: str | None = None  # where the model ends up; None keeps it on the CPU
    img_size: int | None = None  # DataOverrides: another input size (positions resampled)
    mean: tuple[float, ...] | None = None  # DataOverrides: normalisation mean
    std: tuple[float, ...] | None = None  # DataOverrides: normalisation std
    crop_pct: float | None = None  # DataOverrides: center-crop fraction
    interpolation: str | None = None  # DataOverrides: resize interpolation

    @property
    def data(self) -> DataOverrides:
        return DataOverrides(self.img_size, self.mean, self.std, self.crop_pct, self.interpolation)


def create_timm_backbone(
    timm_name: str, *, device: str | None = None, arch: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build a timm architecture without weights, with no head and the final norm kept.

    Args:
        timm_name: a timm model name, optionally with a pretrained tag (which sets the data config only).
        device: "meta" builds without allocating memory (parameter counts, shapes); anything else builds on
            the CPU.
        arch: a key of `vitprobe.architectures.ARCHITECTURES` whose create_model arguments are added
            (data2vec 2.0's post-LN blocks); None builds timm's own architecture.
        **kwargs: extra `timm.create_model` arguments (architecture overrides such as `img_size`).
    """
    import timm
    import torch

    if arch is not None:
        from vitprobe.architectures import ARCHITECTURES

        kwargs = {**ARCHITECTURES[arch], **kwargs}
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
    if tuple(cfg.get("input_size", (3, *img_size))[1:]) != img_size:  # img_size override: transforms follow
        model.pretrained_cfg = model.default_cfg = {**cfg, "input_size": (3, *img_size)}
    return model.eval()


def build_preset(name: str, *, device: str | None = None, **overrides: Any) -> nn.Module:
    """A preset's architecture without weights (`create_timm_backbone` with the preset's arguments)."""
    preset = get_preset(name)
    kwargs = {**preset.timm_kwargs, **overrides}
    return create_timm_backbone(preset.timm, device=device, arch=preset.arch, **kwargs)


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


def load_backbone(
    name: str,
    *,
    checkpoint: str | None = None,
    random_init: bool = False,
    device: str | None = None,
    branch: str | None = None,
    arch_overrides: Mapping[str, Any] | None = None,
    data: DataOverrides | None = None,
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
        branch: which network of a multi-network file: teacher/student (DINO, iBOT, data2vec 2.0),
            target_encoder/encoder (I-JEPA, Latent MIM), base_encoder/momentum_encoder (MoCo v3); None takes
            the one the method evaluates.
        arch_overrides: extra `timm.create_model` arguments (e.g. a tiny `embed_dim`/`depth` in tests);
            recorded in the report. Position embeddings are not resampled for them (except DINOv2's rule).
        data: data-config overrides (image size, mean/std, crop, interpolation); a new image size builds
            the model for it and resamples the file's position embeddings (the report says how).

    Raises:
        ModelError: unknown name, contradictory options or bad data overrides.
        CheckpointError: unreadable, unsafe or unrecognised file; KeyMismatchError when it does not fit.
        WeightsUnavailableError: offline (HF_HUB_OFFLINE=1) and the default weights are not cached, or the
            preset's weights need a manual download.
    """
    data = data or DataOverrides()
    data.check()
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
    resample, arch, preset = None, None, None
    if name.startswith(TIMM_PREFIX):
        timm_name, kwargs, remap, default_weights = name.removeprefix(TIMM_PREFIX), {}, remap_any, None
    else:
        preset = get_preset(name)
        timm_name, kwargs, remap = preset.timm, dict(preset.timm_kwargs), preset.remap
        default_weights, resample, arch = preset.weights, preset.resample_pos_embed, preset.arch
    report = LoadReport(
        model=name, timm_name=timm_name, source="random-init", sha256=None, random_init=True,
        arch_overrides=overrides, data_overrides=data.given(),
    )
    if overrides:
        report.notes.append(f"architecture overridden: {overrides}")
    if data.given():
        report.notes.append(f"data config overridden: {data.given()}")
    weights = None
    if random_init:
        report.notes.append("random weights: NOT a pretrained model")
    else:  # read the file before building: offline, unsafe or foreign files fail fast
        if checkpoint is None and preset is not None and preset.manual:
            raise WeightsUnavailableError(
                f"{name}'s weights are behind a link vitprobe cannot download ({preset.weights})",
                "download the file from that page and pass it with --checkpoint /path/to/FILE",
            )
        source = checkpoint or default_weights or _timm_default_weights(timm_name)
        weights = _read_weights(source, remap, branch, report)
    if data.img_size is not None:  # the data config's input_size follows (create_timm_backbone)
        kwargs["img_size"] = data.img_size
        overlay = kwargs.get("pretrained_cfg_overlay", {})
        if "input_size" in overlay:
            kwargs["pretrained_cfg_overlay"] = {**overlay, "input_size": (3, data.img_size, data.img_size)}
    build_on = "meta" if device == "meta" else None
    model = create_timm_backbone(timm_name, device=build_on, arch=arch, **{**kwargs, **overrides})
    data.check_model(model)
    data.apply(model)
    if weights is not None:
        resample_any = data.img_size is not None
        state_dict, notes = fit_positions(weights.state_dict, model, resample, resample_any=resample_any)
        weights = dataclasses.replace(weights, state_dict=state_dict)
        report.notes.extend(notes)
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
        data=config.data,
        **kwargs,
    )


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
