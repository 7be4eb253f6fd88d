"""Data-config overrides: image size, mean/std, crop and interpolation, given as timm's
`resolve_data_config` arguments and set on a model's `pretrained_cfg`. Torch-free at import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vitprobe.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")  # timm's eval resize modes


@dataclass(frozen=True)
class DataOverrides:
    """Overrides of the data config, as `timm.data.resolve_data_config` arguments; None keeps the preset's
    (or timm's) value. Recorded in the load report, so caches and results say how images were prepared."""

    img_size: int | None = None  # square input in pixels; the model is built for it, positions resampled
    mean: tuple[float, ...] | None = None  # per-channel normalisation mean (one value: every channel)
    std: tuple[float, ...] | None = None  # per-channel normalisation std (one value: every channel)
    crop_pct: float | None = None  # center crop as a fraction of the resized image (1.0: no crop)
    interpolation: str | None = None  # resize interpolation, one of INTERPOLATIONS

    def given(self) -> dict[str, Any]:
        """The overrides that are set, as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}

    def check(self) -> None:
        """Refuse values timm would reject or silently misuse.

        Raises:
            ModelError: names the option and the accepted values.
        """
        if self.img_size is not None and self.img_size < 1:
            raise ModelError(f"--img-size {self.img_size} is not a positive size", "e.g. --img-size 224")
        for option, values in (("--mean", self.mean), ("--std", self.std)):
            if values is None:
                continue
            if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
                raise ModelError(
                    f"{option} {','.join(map(str, values))} is not 1 or 3 finite numbers",
                    f"e.g. {option} 0.485,0.456,0.406",
                )
        if self.std is not None and min(self.std) <= 0:
            shown = ",".join(map(str, self.std))
            raise ModelError(f"--std {shown} has a value <= 0", "e.g. --std 0.229,0.224,0.225")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ModelError(
                f"--crop-pct {self.crop_pct} is not in (0, 1]", "e.g. --crop-pct 0.875 (resize 256, crop 224)"
            )
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ModelError(
                f"--interpolation {self.interpolation!r} is not one of timm's resize modes",
                f"use one of {', '.join(INTERPOLATIONS)}",
            )

    def check_model(self, model: nn.Module) -> None:
        """An image size that is not a multiple of the model's patch size would be cropped or refused.

        Raises:
            ModelError: names both sizes and the nearest valid ones.
        """
        if self.img_size is None:
            return
        ps = model.patch_embed.patch_size
        patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        if self.img_size % patch:
            lower, upper = self.img_size // patch * patch, (self.img_size // patch + 1) * patch
            raise ModelError(
                f"--img-size {self.img_size} is not a multiple of the patch size {patch}",
                f"use --img-size {max(lower, patch)} or {upper}",
            )

    def apply(self, model: nn.Module) -> None:
        """Set the overrides on the model's `pretrained_cfg`, which `resolve_data_config` reads."""
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        channels = len(cfg.get("mean", (0.0, 0.0, 0.0)))  # one value given: repeated for every channel
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None:
                cfg[key] = tuple(values) * (channels if len(values) == 1 else 1)
        if self.crop_pct is not None:
            cfg["crop_pct"] = self.crop_pct
        if self.interpolation is not None:
            cfg["interpolation"] = self.interpolation
        model.pretrained_cfg = model.default_cfg = cfg
