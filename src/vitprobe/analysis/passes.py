"""Analysis passes: a backbone streams a fixed subset of images once, under hooks that see what its fused
forward hides. Nothing here computes a statistic.

The hooks give the explicit post-softmax attention of every block (timm's attention calls fused
`scaled_dot_product_attention`, which never materialises the probabilities; `explicit_attention` recomputes
them from the module's own weights, exactly for timm's ViT `Attention` and BEiT's `Attention` with its
relative position bias), the block inputs and outputs (the residual stream), and the patch-embedding output.
They exist only while a pass runs. Blocks are numbered from 0, as timm's `blocks[i]` and the token caches'
`layers` are. Shared by the attention, frequency and localisation analyses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprobe.errors import ModelError, VitprobeError
from vitprobe.progress import progress_bar

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from vitprobe.models import Backbone


# ----------------------------------------------------------------------------------------------------
# Tokens


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


# ----------------------------------------------------------------------------------------------------
# Images


def select_indices(total: int, limit: int | None) -> list[int]:
    """Evenly spaced, positions in `range(total)`; all of them when `limit` is None, 0 or >= total.

    Evenly spaced rather than the first `limit`: class-sorted datasets (ImageFolder, CUB) would otherwise
    contribute only their first few classes.
    """
    if total <= 0:
        raise VitprobeError("the dataset split has no images", "check --data and --split")
    if not limit or limit >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(limit - 1, 1)) for i in range(limit)})


def open_subset(
    spec: str,
    split: str,
    backbone: Backbone,
    limit: int | None,
    *,
    among: Sequence[int] | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """Open `spec`/`split` with the backbone's eval transform and keep `limit` evenly spaced images.

    Args:
        spec, split: the dataset and its split.
        backbone: gives the eval transform.
        limit: images to keep (None: all).
        among: dataset indices to choose from (a token cache's images); None: the whole split.

    Returns:
        The subset (a torch Dataset of (image, label, index)) and the data provenance for the results JSON.
    """
    from torch.utils.data import Subset

    from vitprobe.data import open_dataset

    dataset = open_dataset(spec, split, transform=backbone.transform())
    pool = list(range(len(dataset))) if among is None else [int(i) for i in among]
    indices = [pool[i] for i in select_indices(len(pool), limit)]
    return Subset(dataset, indices), subset_info(dataset, indices, among=among)


def subset_info(
    dataset: Any, indices: Sequence[int], *, among: Sequence[int] | None = None
) -> dict[str, Any]:
    """The data provenance of a subset: spec, split, fingerprint, split size, images analysed, how chosen."""
    pool = len(dataset) if among is None else len(among)
    if len(indices) == pool:
        selection = "all" if among is None else f"all {pool} images of the cache"
    else:
        of = "images" if among is None else "cache images"
        selection = f"{len(indices)} evenly spaced of {pool} {of}"
    fingerprint = getattr(dataset, "fingerprint", None)
    return {
        "spec": dataset.spec,
        "split": dataset.split,
        "fingerprint": fingerprint() if callable(fingerprint) else fingerprint,
        "size": len(dataset),
        "n_images": len(indices),
        "selection": selection,
    }


def make_loader(dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device) -> Any:
    """A sequential (deterministic order) DataLoader over the subset.

    An image that cannot be read in a worker process stops the pass with the worker's one-line
    `DatasetError` (see `vitprobe.errors`), as with `num_workers=0`.
    """
    from torch.utils.data import DataLoader

    from vitprobe.devices import loader_workers

    if batch_size < 1:
        raise VitprobeError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. --batch-size 32")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(num_workers),
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def forward_pass(
    backbone: Backbone,
    loader: Any,
    device: torch.device,
    *,
    on_images: Callable[[Tensor], None] | None = None,
    description: str = "analysing",
) -> int:
    """Run every batch of `loader` through the backbone (fp32, no grad); the caller's hooks do the work.

    Args:
        backbone: the model, already on `device`.
        loader: yields (images (B, 3, H, W), labels, indices).
        device: where the batches go.
        on_images: called with each batch of (transformed) images before the forward, e.g. to keep thumbnails.
        description: progress-bar label.

    Returns:
        The number of images seen.
    """
    seen = 0
    with progress_bar(len(loader.dataset), description) as advance, torch.inference_mode():
        for batch in loader:
            images = batch[0].to(device, dtype=torch.float32, non_blocking=True)  # (B, 3, H, W)
            if on_images is not None:
                on_images(images)
            backbone.model.forward_features(images)
            seen += images.shape[0]
            advance(images.shape[0])
    return seen


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


@contextmanager
def block_output_hooks(
    model: nn.Module,
    on_output: Callable[[int, Tensor], None],
    *,
    on_embedding: Callable[[Tensor], None] | None = None,
) -> Iterator[None]:
    """While active, a forward calls `on_embedding(input of block 0)` and `on_output(b, output of block b)`.

    The input of block 0 is the patch embedding with position embeddings and prefix tokens (B, T, D); block
    outputs are the residual stream (B, T, D) before the final norm, what the token caches store.
    """
    blocks = list(model.blocks)
    handles = []
    if on_embedding is not None:

        def embed(module: nn.Module, args: tuple, kwargs: dict) -> None:
            on_embedding(args[0] if args else kwargs["x"])

        handles.append(blocks[0].register_forward_pre_hook(embed, with_kwargs=True))
    for index, blk in enumerate(blocks):

        def block_out(module: nn.Module, args: tuple, output: Tensor, index: int = index) -> None:
            on_output(index, output)

        handles.append(blk.register_forward_hook(block_out))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
