"""Architecture pieces timm lacks, plugged into timm's `VisionTransformer` through its `block_fn` and
`embed_layer` arguments: data2vec 2.0's post-LN block and a patch embedding that keeps its bias.

timm's ViT blocks are pre-LN (`x + f(norm(x))`); timm's `ResPostBlock` normalises the branch output before
the residual add (`x + norm(f(x))`, Swin-V2 style). data2vec 2.0 images use neither: its `AltBlock` with
`layer_norm_first=False` (facebookresearch/fairseq examples/data2vec/models/modalities/modules.py) is the
classic post-LN block `norm(x + f(x))`, so it needs its own module. It reuses timm's `Attention` and `Mlp`
(the same computation as data2vec's `AltAttention` and timm `Mlp`) under timm's key names, so remapped
files load strictly, `forward_intermediates` works, and the attention analysis hooks `block.attn` as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention, DropPath, Mlp, PatchEmbed
from torch import nn


class PostNormBlock(nn.Module):
    """Post-LN transformer block: `x = norm1(x + attn(x)); x = norm2(x + mlp(x))` (data2vec 2.0 `AltBlock`).

    Takes the keyword arguments timm's `VisionTransformer` passes to `block_fn`; the ones a post-LN block
    has no use for (layer scale, q/k norm, device, ...) must be left at their defaults.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        init_values: float | None = None,
        qk_norm: bool = False,
        **unused: Any,
    ) -> None:
        super().__init__()
        if init_values or qk_norm:
            raise ValueError("PostNormBlock has no layer scale or q/k norm (data2vec 2.0 uses neither)")
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.norm1 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = mlp_layer(in_features=dim, hidden_features=hidden, act_layer=act_layer, drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        y = self.attn(x) if attn_mask is None else self.attn(x, attn_mask=attn_mask)  # (B, T, D)
        x = self.norm1(x + self.drop_path(y))  # (B, T, D)
        return self.norm2(x + self.drop_path(self.mlp(x)))  # (B, T, D)


class BiasedPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` that keeps its bias: timm drops it whenever `pre_norm=True` (right for CLIP), but
    data2vec 2.0 has both a LayerNorm before the blocks and a patch-embedding bias."""

    def __init__(self, *args: Any, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, bias=True, **kwargs)


# create_model arguments of data2vec 2.0's image encoder on a timm `vit_*` architecture (see the module doc
# and docs/models.md): sin-cos `pos_embed` for the patches only and a [cls] without position
# (`no_embed_class`), `context_encoder.norm` before the blocks (`pre_norm`), post-LN blocks, no final norm.
DATA2VEC2_ARCH: dict[str, Any] = {
    "no_embed_class": True,
    "pre_norm": True,
    "final_norm": False,
    "global_pool": "token",
    "block_fn": PostNormBlock,
    "embed_layer": BiasedPatchEmbed,
}

# Architectures a preset can name (`Preset.arch`), each as extra `timm.create_model` arguments.
ARCHITECTURES: dict[str, dict[str, Any]] = {"data2vec2": DATA2VEC2_ARCH}
