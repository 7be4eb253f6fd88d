"""Backbones: presets (name → timm architecture, weights source, remap) and `load_backbone()`.

OWNER NOTE (skeleton): the `Backbone` class below is the interface the rest of vitprobe uses
(extract, analysis). Presets, checkpoint loading and the load report are filled in by the models work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vitprobe.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
            images, indices=sorted(set(idx)), norm=False, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=True,
        )
        by_block = {}
        for block, out in zip(sorted(set(idx)), outs):
            if isinstance(out, tuple):  # (patches (B, N, D), prefix (B, P, D))
                patches, prefix = out
                out = torch_cat([prefix, patches], dim=1)  # (B, P + N, D)
            by_block[block] = out
        return [by_block[i] for i in idx]


def torch_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    import torch

    return torch.cat(tensors, dim=dim)


def create_timm_backbone(timm_name: str, **kwargs: Any) -> nn.Module:
    """Build a timm architecture without weights, with no head and the final norm kept."""
    import timm

    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ModelError(f"unknown timm model {timm_name!r}", "see timm.list_models() for names") from exc
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ModelError(f"{timm_name!r} is not a plain ViT", "vitprobe probes ViT-style models (blocks + patch_embed)")
    return model.eval()


def load_backbone(
    name: str, *, checkpoint: str | None = None, random_init: bool = False, device: str | None = None
) -> Backbone:
    """Build `name` (preset or `timm:NAME`) and load its weights. SKELETON: only random init of timm: names."""
    if not random_init or checkpoint is not None:
        raise NotImplementedError("skeleton: weights loading is filled in by the models work")
    timm_name = name.removeprefix("timm:")
    model = create_timm_backbone(timm_name)
    if device is not None:
        model = model.to(device)
    report = LoadReport(
        model=name, timm_name=timm_name, source="random-init", sha256=None, random_init=True,
        num_params=sum(p.numel() for p in model.parameters()),
    )
    return Backbone(model=model, report=report)
