"""A shard's compute: its batches through the backbone into the shard's buffers, non-finite tokens caught.

The forward is the backbone's `intermediates`, eager or one torch.compile'd graph (a short last batch padded
to the full batch). NaN / inf are flagged on the device and read once per shard, and the error says whether
they came from the forward pass itself or only from the store dtype. Nothing here plans, writes or records a
shard: that is vitprobe.extract and vitprobe.shardwriter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.cache import STORE_DTYPES, shard_file
from vitprobe.errors import CacheError, VitprobeError
from vitprobe.loaders import checked
from vitprobe.quant import QUANTS
from vitprobe.rows import split_tokens, to_store
from vitprobe.tokens import non_finite

if TYPE_CHECKING:
    from vitprobe.models import Backbone


def fill_shard(
    buffers: dict[str, torch.Tensor],
    batches: Iterator[Any],
    inputs: Any,
    forward: Forward,
    manifest: dict[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    start: int,
    stop: int,
    advance: Callable[[int], None],
) -> None:
    """Run the batches of rows [start, stop) and copy their tensors into `buffers`.

    Non-finite values are caught on the device (one flag per shard, read once at its end): in the forward
    pass itself (NaN / inf weights or images) or only once cast to the store dtype (fp16 overflow).
    """
    store = manifest["store_dtype"]
    cast = torch.float32 if store in QUANTS else STORE_DTYPES[store][0]
    bad_compute = torch.zeros((), dtype=torch.bool, device=device)
    bad_store = torch.zeros((), dtype=torch.bool, device=device)
    filled = 0
    while filled < stop - start:
        images, labels, indices, views = inputs.prepare(checked(next(batches)))
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            outs = forward(images, manifest["layers"])
        bad_compute |= torch.stack([non_finite(o) for o in outs]).any()
        parts = split_tokens(
            outs,
            num_prefix_tokens=manifest["num_prefix_tokens"],
            has_cls=manifest["has_cls"],
            tokens=manifest["tokens"],
            dtype=cast,
        )
        bad_store |= torch.stack([non_finite(p) for p in parts.values()]).any()
        parts = to_store(parts, store)
        parts.update(labels=labels, indices=indices, views=views)
        n = images.shape[0]
        for key, buf in buffers.items():
            _fill(buf, parts[key], filled, key)
        filled += n
        advance(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the non-blocking copies into `buffers` have landed
    if bool(bad_compute) or bool(bad_store):
        raise _not_finite(manifest, start, stop, in_compute=bool(bad_compute))


Forward = Callable[[torch.Tensor, list[int]], list[torch.Tensor]]  # (images, blocks) -> (B, T, D) per block


def make_forward(backbone: Backbone, *, backend: str | None, batch_size: int) -> Forward:
    """`backbone.intermediates`, or with `backend` its torch.compile'd graph for batches of `batch_size`:
    a shorter batch (the last of a shard) is padded with zero images to that size and its outputs cut
    back, so the one graph serves every batch (each batch shape would be a compilation of its own: tens
    of seconds on a CPU, the cost of many batches). The model sees each image on its own, so padding
    changes no real image's tokens."""
    if backend is None:
        return backbone.intermediates
    compiled = torch.compile(backbone.intermediates, backend=backend, dynamic=False)

    def run(images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        n = images.shape[0]
        if n >= batch_size:
            return compiled(images, layers)
        padded = images.new_zeros((batch_size, *images.shape[1:]))  # (batch_size, C, H, W)
        padded[:n] = images
        return [o[:n] for o in compiled(padded, layers)]  # (n, T, D) per block

    return run


def _fill(buf: torch.Tensor, part: torch.Tensor, offset: int, key: str) -> None:
    if tuple(part.shape[1:]) != tuple(buf.shape[1:]):
        raise VitprobeError(
            f"the backbone produced {key} of shape {tuple(part.shape[1:])} per image, expected "
            f"{tuple(buf.shape[1:])} from its grid",
            "check that the model's input size matches its data config",
        )
    buf[offset : offset + part.shape[0]].copy_(part, non_blocking=True)  # (b, ...) rows of the shard


def _not_finite(manifest: dict[str, Any], start: int, stop: int, *, in_compute: bool) -> CacheError:
    """Why tokens are NaN / inf: in the forward pass itself, or only once stored (fp16 overflows > 65504)."""
    store, compute = manifest["store_dtype"], manifest["compute_dtype"]
    file = shard_file(start // manifest["shard_size"])
    where = f"for rows {start}-{stop} ({file}); nothing was written for them"
    if in_compute:
        low = compute != "fp32"
        cause = "an overflow of the reduced-precision compute, or " if low else ""
        return CacheError(
            f"the backbone's tokens are NaN or inf already in its {compute} forward pass, before they are "
            f"stored as {store} {where}: {cause}NaN / inf in the model's weights or the images, not an "
            "overflow of the store dtype",
            ("try --dtype fp32 and --overwrite; if the tokens stay non-finite, " if low else "")
            + "check the checkpoint's weights (`vitprobe models show` with the same --model / --checkpoint)",
        )
    return CacheError(
        f"the backbone's tokens are finite in its {compute} forward pass but not once stored as {store} "
        f"{where}",
        "pass --store bf16 or --store fp32 (fp16 holds only |x| <= 65504), or --store int8 / fp8 (scaled per "
        "token), and --overwrite",
    )
