"""Attention statistics: per block × head statistics of explicitly computed attention, averaged over images.

timm's attention uses fused SDPA, which never materialises the attention probabilities. During this pass
only, the hooks of `vitprobe.analysis.passes.attention_hooks` recompute them explicitly from each module's
own weights (exact for timm's ViT `Attention` and BEiT's `Attention` with its relative position bias) and
hand them, with the block input and the attention-branch output, to an accumulator of sums. Blocks are
numbered from 0, as in timm and the token caches.

Definitions (the Beyond-[cls] reference code, gmum/beyond_cls `models_vit.py` + `main_attention_stats.py`):
A is the post-softmax attention (B, H, T, T), token 0 = [cls], "patches" are the grid tokens only
(register tokens are neither queries nor keys of the patch statistics), ε = 1e-6, natural log.
See `DEFINITIONS` and docs/analyses.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vitprobe.analysis.passes import TokenLayout, attention_hooks, forward_pass
from vitprobe.analysis.runs import PassConfig
from vitprobe.errors import ModelError

if TYPE_CHECKING:
    from vitprobe.models import Backbone

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


def stat_names(layout: TokenLayout) -> tuple[str, ...]:
    """The per-head statistics a token layout supports (no [cls] → no [cls] statistics)."""
    names = (CLS_STATS if layout.has_cls else ()) + PATCH_STATS
    if layout.num_reg:
        names += (CLS_REG_STATS if layout.has_cls else ()) + REG_STATS
    return names


def magnitude_names(layout: TokenLayout) -> tuple[str, ...]:
    """The per-block magnitude statistics a token layout supports."""
    return MAGNITUDE_STATS if layout.has_cls else MAGNITUDE_STATS[1:]


@dataclass(frozen=True)
class AttentionConfig(PassConfig):
    """How `vitprobe analyze attention` runs; written into attention.json."""

    rollout: bool = False  # also compute attention rollout maps (Abnar & Zuidema 2020)
    n_maps: int = 8  # images whose [cls]→patch maps are kept for the map grid
    compare: tuple[str, ...] = ()  # earlier run directories overlaid on the curves


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
        {name: (B, H)} for `stat_names(layout)`.
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
    return {name: stats[name] for name in stat_names(layout)}


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
    return {name: stats[name] for name in magnitude_names(layout)}


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
        self.sums = {name: torch.zeros(depth, num_heads, dtype=torch.float64) for name in stat_names(layout)}
        self.magnitude_sums = {
            name: torch.zeros(depth, dtype=torch.float64) for name in magnitude_names(layout)
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
    layout = TokenLayout.of(backbone)
    num_heads = int(backbone.model.blocks[0].attn.num_heads)
    acc = AttentionAccumulator(layout, backbone.depth, num_heads, rollout=rollout, n_maps=n_maps)
    with attention_hooks(backbone.model, acc.on_block):
        forward_pass(backbone, loader, device, on_images=on_images, description="attention")
    return acc


def run_attention(config: AttentionConfig, *, backbone: Backbone | None = None) -> AttentionRun:
    """`vitprobe analyze attention`: load, stream the subset, write attention.json, the maps, the figures.

    An earlier attention.json in `config.out` is refused unless `config.overwrite`; every file is written
    atomically, attention.json last (it names the maps file's sha256, so a reader can tell that they belong
    together).
    """
    from safetensors.torch import save_file

    from vitprobe.analysis import plots
    from vitprobe.analysis.runs import backbone_info, open_pass, result_header
    from vitprobe.files import atomic_path, sha256_file, write_json
    from vitprobe.results import validate

    run = open_pass(config, "attention.json", backbone=backbone)  # backbone: already loaded, or None
    backbone = run.backbone
    thumbs = _Thumbnails(backbone.data_config(), config.n_maps if backbone.has_cls else 0)
    acc = analyze_attention(
        backbone, run.loader, run.device, rollout=config.rollout, n_maps=config.n_maps, on_images=thumbs.add
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    maps = acc.maps()
    maps_info = None
    if maps:
        maps["images"] = thumbs.tensor()  # (K, 3, H, W) uint8, the images under the maps
        maps_path = out / "attention_maps.safetensors"
        with atomic_path(maps_path) as tmp:
            save_file({k: v.contiguous() for k, v in maps.items()}, str(tmp))
        maps_info = {
            "file": maps_path.name,
            "sha256": sha256_file(maps_path),
            "keys": sorted(maps),
            "grid": list(backbone.grid),
            "block": backbone.depth - 1,  # the [cls] maps are the last block's
            "n_images": len(acc.cls_maps),
        }
    notes = []
    if config.rollout and not backbone.has_cls:
        notes.append("rollout skipped: the model has no [cls] token")
    result = {
        **result_header(
            "attention",
            config,
            run.inputs,
            model=backbone.report.to_dict(),
            backbone=backbone_info(backbone),
            data=run.data_info,
            device=str(run.device),
            dtype="float32",
        ),
        "definitions": {
            "eps": EPS,
            "log": "natural",
            "tokens": _token_note(TokenLayout.of(backbone)),
            "blocks": "0-based block indices, as timm's model.blocks[i] and the token caches' layers",
            **DEFINITIONS,
        },
        "n_images": acc.n_images,
        "blocks": list(range(backbone.depth)),
        "stats": acc.result()["stats"],
        "maps": maps_info,
        "notes": notes,
    }
    figures = plots.attention_figures([result, *run.compared], out, maps=maps or None)
    result["figures"] = [str(p.relative_to(out)) for p in figures]
    json_path = out / "attention.json"
    write_json(json_path, validate("attention", result))
    return AttentionRun(
        json_path=json_path,
        maps_path=None if maps_info is None else out / maps_info["file"],
        figures=figures,
        result=result,
    )


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
