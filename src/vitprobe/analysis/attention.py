"""Attention statistics: per block × head statistics of explicitly computed attention, averaged over images.

timm's attention uses fused SDPA, which never materialises the attention probabilities. During this pass
only, a forward hook on every `block.attn` recomputes them explicitly from the module's own weights
(`explicit_attention`, exact for timm's ViT `Attention` and BEiT's `Attention` with its relative position
bias) and hands them, with the block input and the attention-branch output, to an accumulator of sums.
The hooks are removed when the pass ends.

Definitions (the Beyond-[cls] reference code, gmum/beyond_cls `models_vit.py` + `main_attention_stats.py`):
A is the post-softmax attention (B, H, T, T), token 0 = [cls], "patches" are the grid tokens only
(register tokens are neither queries nor keys of the patch statistics), ε = 1e-6, natural log.
See `DEFINITIONS` and docs/analyses.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprobe.errors import ModelError

EPS = 1e-6  # as in the reference code: guards the renormalisation and the log

DEFINITIONS: dict[str, str] = {
    "cls_self": "A[0,0]",
    "patch_self": "mean_{i in patches} A[i,i]",
    "cls_self_adj": "A[0,0] / (sum_{j in patches} A[0,j] + eps)",
    "patch_self_adj": "mean_{i in patches} A[i,i] / (sum_{j in patches} A[i,j] + eps)",
    "cls_to_patch": "mean_{j in patches} A[0,j]",
    "patch_to_cls": "mean_{i in patches} A[i,0]",
    "cls_entropy": "H_0, H_i = -sum_{j in patches} p_ij log(p_ij + eps), "
    "p_ij = A[i,j] / (sum_{k in patches} A[i,k] + eps)",
    "patch_entropy": "mean_{i in patches} H_i",
    "attention_distance": "mean_{i in patches} sum_{j in patches} p_ij d_ij, "
    "d_ij = |centre_i - centre_j|_2 in pixels",
    "cls_to_reg": "sum_{r in registers} A[0,r] (models with register tokens)",
    "patch_to_reg": "mean_{i in patches} sum_{r in registers} A[i,r] (models with register tokens)",
    "magnitude_cls": "|y_0|_2 / (|x_0|_2 + eps), x = block input, "
    "y = attention branch after proj, before layer-scale",
    "magnitude_patch": "mean_{i in patches} |y_i|_2 / (|x_i|_2 + eps)",
    "rollout": "R = prod_l rownorm(0.5 mean_h A_l + 0.5 I) (last block leftmost); map = R[0, patches]",
}
CLS_STATS = ("cls_self", "cls_self_adj", "cls_to_patch", "patch_to_cls", "cls_entropy")
PATCH_STATS = ("patch_self", "patch_self_adj", "patch_entropy", "attention_distance")
REG_STATS = ("patch_to_reg",)
CLS_REG_STATS = ("cls_to_reg",)
MAGNITUDE_STATS = ("magnitude_cls", "magnitude_patch")  # per block only: heads share the residual stream
STATS_CHUNK_ELEMENTS = 1 << 25  # attention entries per statistics chunk: ~256 MB per float64 temporary


@dataclass(frozen=True)
class TokenLayout:
    """Where [cls], registers and patches sit in a (B, T, D) sequence: prefix tokens first, then the grid."""

    num_prefix: int  # P: [cls] (when present) then the register tokens
    has_cls: bool  # token 0 is [cls]; without it token 0.. P-1 are registers
    grid: tuple[int, int]  # (h, w) patches, flattened row-major after the prefix
    patch_size: int  # pixels per patch side; converts token distances to pixels

    @classmethod
    def of(cls, backbone: Any) -> TokenLayout:
        """The layout of a `vitprobe.models.Backbone`."""
        return cls(backbone.num_prefix_tokens, backbone.has_cls, backbone.grid, backbone.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_reg(self) -> int:
        return self.num_prefix - int(self.has_cls)

    @property
    def reg(self) -> slice:
        return slice(int(self.has_cls), self.num_prefix)

    @property
    def patches(self) -> slice:
        return slice(self.num_prefix, None)

    def stat_names(self) -> tuple[str, ...]:
        """The statistics this layout supports (no [cls] → no [cls] statistics)."""
        names = (CLS_STATS if self.has_cls else ()) + PATCH_STATS
        if self.num_reg:
            names += (CLS_REG_STATS if self.has_cls else ()) + REG_STATS
        return names

    def magnitude_names(self) -> tuple[str, ...]:
        return MAGNITUDE_STATS if self.has_cls else MAGNITUDE_STATS[1:]


@dataclass(frozen=True)
class AttentionConfig:
    """How `vitprobe analyze attention` runs; written into attention.json."""

    model: str  # preset name or timm:NAME
    data: str  # dataset spec, opened with the model's eval transform
    split: str  # split of the dataset to analyse
    out: str  # output directory for attention.json, the maps file and the figures
    checkpoint: str | None = None  # weights file for the preset; None = the preset's default weights
    random_init: bool = False  # random weights: the baseline that shows what training changed
    limit: int | None = 1000  # images (evenly spaced over the split); 1000 gives stable means, None = all
    batch_size: int = 32  # images per forward; attention is (B, H, T, T) fp32 per block
    num_workers: int = 4  # DataLoader workers decoding images
    device: str = "auto"  # CUDA when available
    rollout: bool = False  # also compute attention rollout maps (Abnar & Zuidema 2020)
    n_maps: int = 8  # images whose [cls]→patch maps are kept for the map grid
    compare: tuple[str, ...] = ()  # earlier run directories overlaid on the curves
    seed: int = 0  # seeds torch before building the model: random-init baselines are reproducible


# ----------------------------------------------------------------------------------------------------
# Explicit attention


def explicit_attention(
    attn: nn.Module,
    x: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    shared_rel_pos_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Recompute a timm attention module's forward with the softmax written out.

    Args:
        attn: `timm.layers.Attention` (ViT, DeiT, DINOv2, ...) or `timm.models.beit.Attention`.
        x: the module input, the normalised residual stream (B, T, D).
        attn_mask, is_causal: as passed to timm's ViT attention (None / False in a plain forward).
        shared_rel_pos_bias: BEiT's shared relative position bias (1, H, T, T), as passed by `Beit`.

    Returns:
        The post-softmax attention (B, H, T, T) and the module output (B, T, D) (after `proj`), which equals
        the module's own (fused) forward up to float rounding.
    """
    from timm.layers import Attention as VitAttention
    from timm.models.beit import Attention as BeitAttention

    if isinstance(attn, BeitAttention):
        return _beit_attention(attn, x, shared_rel_pos_bias)
    if isinstance(attn, VitAttention):
        return _vit_attention(attn, x, attn_mask, is_causal)
    raise ModelError(
        f"cannot compute attention explicitly for {type(attn).__module__}.{type(attn).__name__}",
        "attention analysis supports timm's ViT Attention and BEiT Attention modules",
    )


def _vit_attention(attn: Any, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor]:
    """timm.layers.Attention.forward (non-fused branch), softmax kept."""
    B, T, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
    q, k, v = qkv.unbind(0)  # (B, H, T, Dh) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    if is_causal:
        scores = scores + scores.new_full((T, T), float("-inf")).triu_(1)
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(
                ~attn_mask, float("-inf")
            )
        scores = scores + attn_mask
    probs = scores.softmax(dim=-1)  # (B, H, T, T)
    out = (probs @ v).transpose(1, 2).reshape(B, T, H * Dh)  # (B, H, T, Dh) -> (B, T, H*Dh)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return probs, attn.proj(out)


def _beit_attention(attn: Any, x: Tensor, shared_rel_pos_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """timm.models.beit.Attention.forward (non-fused branch), softmax kept: q/k/v biases + rel-pos bias."""
    B, T, _ = x.shape
    if attn.q_bias is None:
        qkv = attn.qkv(x)  # (B, T, 3*H*Dh)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))  # k has no learned bias: zeros
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    qkv = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
    q, k, v = qkv.unbind(0)  # (B, H, T, Dh) each
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    if attn.relative_position_bias_table is not None:
        scores = scores + beit_relative_position_bias(attn)
    if shared_rel_pos_bias is not None:
        scores = scores + shared_rel_pos_bias
    probs = scores.softmax(dim=-1)  # (B, H, T, T)
    out = (probs @ v).transpose(1, 2).reshape(B, T, -1)  # (B, H, T, Dh) -> (B, T, H*Dh)
    return probs, attn.proj(out)


def beit_relative_position_bias(attn: Any) -> Tensor:
    """A BEiT block's own relative position bias (1, H, T, T), gathered from its table as timm does."""
    index = attn.relative_position_index  # (T, T) indices into the table
    bias = attn.relative_position_bias_table[index.view(-1)]  # (T*T, H)
    bias = bias.view(index.shape[0], index.shape[1], -1).permute(2, 0, 1)  # (H, T, T)
    return bias.unsqueeze(0)  # (1, H, T, T)


BlockCallback = Callable[[int, Tensor, Tensor, Tensor], None]


@contextmanager
def attention_hooks(model: nn.Module, on_block: BlockCallback) -> Iterator[None]:
    """While active, every forward calls `on_block(l, x, A, y)` for each block l in order.

    x is the block input (residual stream, B×T×D), A the explicit post-softmax attention (B×H×T×T) and y
    the attention branch output after `proj`, before layer-scale (B×T×D). The model's own output is not
    changed. The hooks are removed on exit, so the fused path is untouched outside this pass.
    """
    blocks = list(model.blocks)
    for blk in blocks:
        explicit_attention_supported(blk)
    inputs: dict[int, Tensor] = {}
    handles = []
    for index, blk in enumerate(blocks):

        def keep_input(module: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
            inputs[index] = args[0] if args else kwargs["x"]

        def on_attention(
            module: nn.Module, args: tuple, kwargs: dict, output: Tensor, index: int = index
        ) -> None:
            x_norm = args[0] if args else kwargs["x"]
            probs, _ = explicit_attention(
                module,
                x_norm,
                attn_mask=kwargs.get("attn_mask"),
                is_causal=bool(kwargs.get("is_causal", False)),
                shared_rel_pos_bias=kwargs.get("shared_rel_pos_bias"),
            )
            on_block(index, inputs.pop(index), probs, output)

        handles.append(blk.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(blk.attn.register_forward_hook(on_attention, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def explicit_attention_supported(block: nn.Module) -> None:
    """Raise `ModelError` unless the block has an attention module `explicit_attention` can reproduce."""
    from timm.layers import Attention as VitAttention
    from timm.models.beit import Attention as BeitAttention

    attn = getattr(block, "attn", None)
    if not isinstance(attn, (VitAttention, BeitAttention)):
        raise ModelError(
            f"block {type(block).__name__} has attention {type(attn).__name__}, "
            "which vitprobe cannot recompute",
            "attention analysis supports timm ViT (Attention) and BEiT blocks",
        )


# ----------------------------------------------------------------------------------------------------
# Statistics


def patch_distances(grid: tuple[int, int], patch_size: int) -> Tensor:
    """Euclidean distances in pixels between patch centres (N, N), patches flattened row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")  # (h, w) each
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size  # (N, 2)
    return torch.cdist(centres, centres)  # (N, N)


def attention_statistics(
    attn: Tensor, layout: TokenLayout, distances: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-image, per-head statistics of one block's attention.

    Args:
        attn: post-softmax attention (B, H, T, T).
        layout: where [cls], registers and patches are.
        distances: `patch_distances(layout.grid, layout.patch_size)` (N, N); computed when None.

    Returns:
        {name: (B, H)} for `layout.stat_names()`.
    """
    P = layout.num_prefix
    A = attn.double()  # (B, H, T, T); float64 so eps-sized terms are not lost
    to_patches = A[..., P:]  # (B, H, T, N): attention from every query to the patch keys
    mass = to_patches.sum(-1)  # (B, H, T)
    p = to_patches / (mass[..., None] + EPS)  # (B, H, T, N), renormalised over patch keys
    entropy = -(p * (p + EPS).log()).sum(-1)  # (B, H, T)
    diag = A.diagonal(dim1=-2, dim2=-1)  # (B, H, T)
    if distances is None:
        distances = patch_distances(layout.grid, layout.patch_size)
    distances = distances.to(A.device, A.dtype)
    stats = {
        "patch_self": diag[..., P:].mean(-1),
        "patch_self_adj": (diag / (mass + EPS))[..., P:].mean(-1),
        "patch_entropy": entropy[..., P:].mean(-1),
        "attention_distance": (p[..., P:, :] * distances).sum(-1).mean(-1),
    }
    if layout.has_cls:
        stats |= {
            "cls_self": A[..., 0, 0],
            "cls_self_adj": A[..., 0, 0] / (mass[..., 0] + EPS),
            "cls_to_patch": A[..., 0, P:].mean(-1),
            "patch_to_cls": A[..., P:, 0].mean(-1),
            "cls_entropy": entropy[..., 0],
        }
    if layout.num_reg:
        to_reg = A[..., layout.reg].sum(-1)  # (B, H, T)
        stats["patch_to_reg"] = to_reg[..., P:].mean(-1)
        if layout.has_cls:
            stats["cls_to_reg"] = to_reg[..., 0]
    return {name: stats[name] for name in layout.stat_names()}


def magnitude_statistics(x: Tensor, y: Tensor, layout: TokenLayout) -> dict[str, Tensor]:
    """Per-image ratio of the attention-branch norm to the residual-stream norm.

    Args:
        x: block input (B, T, D).
        y: attention branch output after the projection, before layer-scale (B, T, D).

    Returns:
        {"magnitude_cls": (B,), "magnitude_patch": (B,)} ([cls] only when the model has one).
    """
    ratio = y.double().norm(dim=-1) / (x.double().norm(dim=-1) + EPS)  # (B, T)
    stats = {"magnitude_patch": ratio[:, layout.num_prefix :].mean(-1)}
    if layout.has_cls:
        stats["magnitude_cls"] = ratio[:, 0]
    return {name: stats[name] for name in layout.magnitude_names()}


def rollout_step(rollout: Tensor | None, attn: Tensor) -> Tensor:
    """One block of attention rollout: R ← rownorm(0.5·mean_h A + 0.5·I) @ R (Abnar & Zuidema, 2020).

    Args:
        rollout: R after the previous blocks (B, T, T), or None before the first block.
        attn: this block's attention (B, H, T, T).
    """
    mixed = 0.5 * attn.double().mean(1) + 0.5 * torch.eye(
        attn.shape[-1], dtype=torch.float64, device=attn.device
    )
    mixed = mixed / mixed.sum(-1, keepdim=True)  # (B, T, T), rows sum to 1
    return mixed if rollout is None else mixed @ rollout


class AttentionAccumulator:
    """Sums of per-image statistics over a pass; bounded memory (nothing per image except the kept maps).

    Args:
        layout: token layout of the backbone.
        depth: number of blocks.
        num_heads: heads per block.
        rollout: also accumulate attention rollout maps (needs [cls]).
        n_maps: number of leading images whose [cls]→patch maps (and rollout maps) are kept.
    """

    def __init__(
        self, layout: TokenLayout, depth: int, num_heads: int, *, rollout: bool = False, n_maps: int = 8
    ):
        self.layout, self.depth, self.num_heads = layout, depth, num_heads
        self.rollout = rollout and layout.has_cls
        self.n_maps = n_maps if layout.has_cls else 0
        self.n_images = 0
        self.sums = {name: torch.zeros(depth, num_heads, dtype=torch.float64) for name in layout.stat_names()}
        self.magnitude_sums = {
            name: torch.zeros(depth, dtype=torch.float64) for name in layout.magnitude_names()
        }
        self.cls_map_sum = torch.zeros(layout.grid, dtype=torch.float64)  # (h, w)
        self.rollout_sum = torch.zeros(layout.grid, dtype=torch.float64)  # (h, w)
        self.cls_maps: list[Tensor] = []  # (h, w) each, first n_maps images
        self.rollout_maps: list[Tensor] = []
        self._distances = patch_distances(layout.grid, layout.patch_size)
        self._rollout: Tensor | None = None
        self._next_block = 0

    def on_block(self, block: int, x: Tensor, attn: Tensor, y: Tensor) -> None:
        """Add one block's statistics for one batch (the `attention_hooks` callback)."""
        assert block == self._next_block, f"blocks arrived out of order: {block} after {self._next_block - 1}"
        B, H, T, _ = attn.shape
        if T != self.layout.num_prefix + self.layout.num_patches:
            raise ModelError(
                f"block {block} sees {T} tokens, expected {self.layout.num_prefix} prefix + "
                f"{self.layout.num_patches} patches (grid {self.layout.grid})",
                "feed images at the model's input size (the eval transform does this)",
            )
        self._distances = self._distances.to(attn.device)
        for chunk in attn.split(max(1, STATS_CHUNK_ELEMENTS // (H * T * T))):  # bounded float64 temporaries
            for name, value in attention_statistics(chunk, self.layout, self._distances).items():
                self.sums[name][block] += value.sum(0).cpu()  # (H,)
        for name, value in magnitude_statistics(x, y, self.layout).items():
            self.magnitude_sums[name][block] += value.sum().cpu()
        if self.rollout:
            self._rollout = rollout_step(self._rollout, attn)
        self._next_block = block + 1
        if block == self.depth - 1:
            self._end_batch(attn, B)

    def _end_batch(self, last_attn: Tensor, batch: int) -> None:
        h, w = self.layout.grid
        P = self.layout.num_prefix
        if self.layout.has_cls:
            cls_map = (
                last_attn[:, :, 0, P:].double().mean(1).reshape(batch, h, w).cpu()
            )  # (B, N) -> (B, h, w)
            self.cls_map_sum += cls_map.sum(0)
            self.cls_maps.extend(cls_map[: max(self.n_maps - len(self.cls_maps), 0)])
        if self.rollout:
            roll = self._rollout[:, 0, P:].reshape(batch, h, w).cpu()  # (B, N) -> (B, h, w)
            self.rollout_sum += roll.sum(0)
            self.rollout_maps.extend(roll[: max(self.n_maps - len(self.rollout_maps), 0)])
        self._rollout = None
        self._next_block = 0
        self.n_images += batch

    def result(self) -> dict[str, Any]:
        """Means over images: {"stats": {name: {"per_head": L×H, "mean": L}}, "maps": {...} or None}."""
        if self.n_images == 0:
            raise ModelError("no images went through the model", "check --data, --split and --limit")
        n = self.n_images
        stats: dict[str, Any] = {}
        for name, total in self.sums.items():
            per_head = total / n  # (L, H)
            stats[name] = {"per_head": per_head.tolist(), "mean": per_head.mean(1).tolist()}
        for name, total in self.magnitude_sums.items():
            stats[name] = {"per_head": None, "mean": (total / n).tolist()}
        return {"n_images": n, "stats": stats}

    def maps(self) -> dict[str, Tensor]:
        """The [cls]→patch maps to save: per kept image and averaged over all images (float32)."""
        out: dict[str, Tensor] = {}
        if self.cls_maps:
            out["cls_attention_last"] = torch.stack(self.cls_maps).float()  # (K, h, w)
            out["cls_attention_last_mean"] = (self.cls_map_sum / self.n_images).float()  # (h, w)
        if self.rollout_maps:
            out["rollout"] = torch.stack(self.rollout_maps).float()  # (K, h, w)
            out["rollout_mean"] = (self.rollout_sum / self.n_images).float()  # (h, w)
        return out


# ----------------------------------------------------------------------------------------------------
# The command


@dataclass
class AttentionRun:
    """What `run_attention` wrote."""

    json_path: Path
    maps_path: Path | None
    figures: list[Path]
    result: dict[str, Any]


def analyze_attention(
    backbone: Any,
    loader: Any,
    device: torch.device,
    *,
    rollout: bool = False,
    n_maps: int = 8,
    on_images: Callable[[Tensor], None] | None = None,
) -> AttentionAccumulator:
    """Stream `loader` through `backbone` with explicit-attention hooks; return the filled accumulator.

    Args:
        backbone: a `vitprobe.models.Backbone` on `device`, in eval mode.
        loader: yields (images (B, 3, H, W), labels, indices) at the model's input size.
        device: where the forward runs (fp32).
        rollout: also accumulate attention rollout.
        n_maps: leading images whose [cls]→patch maps are kept.
        on_images: called with each image batch (e.g. to keep thumbnails of the first images).
    """
    from vitprobe.analysis import forward_pass

    layout = TokenLayout.of(backbone)
    num_heads = int(backbone.model.blocks[0].attn.num_heads)
    acc = AttentionAccumulator(layout, backbone.depth, num_heads, rollout=rollout, n_maps=n_maps)
    with attention_hooks(backbone.model, acc.on_block):
        forward_pass(backbone, loader, device, on_images=on_images, description="attention")
    return acc


def run_attention(config: AttentionConfig, *, backbone: Any = None) -> AttentionRun:
    """`vitprobe analyze attention`: load, stream the subset, write attention.json, the maps, the figures.

    `backbone`: an already loaded `Backbone` that `config` describes (else `config.model` is loaded)."""
    from safetensors.torch import save_file

    from vitprobe.analysis import open_pass, plots, result_header
    from vitprobe.files import atomic_path, write_json

    run = open_pass(config, "attention.json", backbone)
    backbone = run.backbone
    thumbs = _Thumbnails(backbone.data_config(), config.n_maps if backbone.has_cls else 0)
    acc = analyze_attention(
        backbone, run.loader, run.device, rollout=config.rollout, n_maps=config.n_maps, on_images=thumbs.add
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    maps = acc.maps()
    maps_path = None
    if maps:
        maps["images"] = thumbs.tensor()  # (K, 3, H, W) uint8, the images under the maps
        maps_path = out / "attention_maps.safetensors"
        with atomic_path(maps_path) as tmp:
            save_file({k: v.contiguous() for k, v in maps.items()}, str(tmp))
    if config.rollout and not backbone.has_cls:
        notes = ["rollout skipped: the model has no [cls] token"]
    else:
        notes = []
    result = {
        **result_header("attention", run, config, dtype="float32"),
        "definitions": {
            "eps": EPS,
            "log": "natural",
            "tokens": _token_note(TokenLayout.of(backbone)),
            **DEFINITIONS,
        },
        "n_images": acc.n_images,
        "blocks": list(range(1, backbone.depth + 1)),
        "stats": acc.result()["stats"],
        "maps": None
        if maps_path is None
        else {
            "file": maps_path.name,
            "keys": sorted(maps),
            "grid": list(backbone.grid),
            "n_images": len(acc.cls_maps),
        },
        "notes": notes,
    }
    figures = plots.attention_figures([result, *run.compared], out, maps=maps or None)
    result["figures"] = [str(p.relative_to(out)) for p in figures]
    json_path = out / "attention.json"
    write_json(json_path, result)
    return AttentionRun(json_path=json_path, maps_path=maps_path, figures=figures, result=result)


class _Thumbnails:
    """The first `n` transformed images, un-normalised back to uint8 for the map grid."""

    def __init__(self, data_config: dict[str, Any], n: int) -> None:
        self.mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
        self.n = n
        self.kept: list[Tensor] = []

    def add(self, images: Tensor) -> None:
        need = self.n - sum(t.shape[0] for t in self.kept)
        if need > 0:
            pixels = images[:need].float().cpu() * self.std + self.mean  # (k, 3, H, W) in [0, 1]
            self.kept.append((pixels.clamp(0, 1) * 255).round().to(torch.uint8))

    def tensor(self) -> Tensor:
        return torch.cat(self.kept) if self.kept else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def _token_note(layout: TokenLayout) -> str:
    cls = "token 0 = [cls]" if layout.has_cls else "no [cls] token: [cls] statistics omitted"
    return (
        f"{cls}; {layout.num_reg} register token(s) excluded from patch queries and keys; "
        f"patches = the {layout.grid[0]}x{layout.grid[1]} grid tokens {layout.num_prefix}..T-1"
    )
