"""Predictions of a saved head on a token cache: metrics, per-row predictions, and attention maps."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import vitprobe.results as R
from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec
from vitprobe.probe.protocols import ProbeConfig
from vitprobe.probe.runs import needed_keys, resolve_specs
from vitprobe.probe.saved import check_head_matches_cache, head_blocks, load_head
from vitprobe.sources import CacheSource, cache_token_keys
from vitprobe.tokens import Split, final_norm_state, iter_batches, to_tokens


@dataclass(frozen=True)
class PredictConfig:
    """How a saved head is evaluated on a cache."""

    batch_size: int = 1024  # rows per forward pass
    device: str = "auto"  # auto = CUDA when available
    shuffle_shards: int = 4  # unused order-wise (no shuffle); bounds how many shards are read at once


@torch.no_grad()
def predict(
    head_path: str | Path,
    cache_path: str | Path,
    *,
    cfg: PredictConfig = PredictConfig(),
    out_dir: str | Path | None = None,
    export_maps: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a saved head on a cache: metrics, per-row predictions, and for attention read-outs the maps.

    Args:
        head_path: heads/<pool>.safetensors (its JSON beside it).
        cache_path: a token cache from the same backbone, checkpoint, layer and class set.
        cfg: batch size and device.
        out_dir: where predictions.json goes (metrics + per-row index, label, prediction); None = not written.
        export_maps: a .safetensors file for per-patch attention maps "maps" (n, h, w) float32 and "indices"
            (n,) int64 (abmilp: the softmax scores over patches; attentive: their mean over queries).

    Returns:
        The predictions dict (also written when out_dir is given).
    """
    from vitprobe.cache import open_cache
    from vitprobe.devices import resolve_device
    from vitprobe.files import atomic_path, write_json
    from vitprobe.provenance import checkpoint_from_manifest, provenance

    head, meta = load_head(head_path)
    cache = open_cache(cache_path)
    check_head_matches_cache(meta, cache)
    spec = HeadSpec(**meta["spec"])
    if export_maps is not None and spec.pool not in ("abmilp", "attentive"):
        raise ProbeError(
            f"--export-maps needs an attention read-out, and this head is {spec.pool!r}",
            "pass a heads/abmilp.safetensors or heads/attentive.safetensors",
        )
    available = frozenset(cache_token_keys(cache))
    resolve_specs(
        replace(
            ProbeConfig(),
            pools=(spec.pool,),
            final_norm=bool(meta["final_norm"]),
            abmilp_content=spec.abmilp_content,
        ),
        available,
        explicit=True,
        where=f"cache {cache.path} (--tokens {cache.tokens})",
        fix="evaluate the head on a cache extracted with --tokens all",
    )
    keys = needed_keys([spec], available, bool(meta["final_norm"]))
    device = resolve_device(cfg.device)
    head = head.to(device)
    norm = final_norm_state(cache, device) if meta["final_norm"] else None
    blocks = head_blocks(meta)
    source = CacheSource(cache, blocks if meta.get("blocks") else blocks[0])
    split = Split("cache", source, torch.arange(source.num_rows))
    positions = split.epoch_rows(None)
    num_classes = int(meta["num_classes"])
    preds, labels_all, maps = [], [], []
    for batch in iter_batches(split, keys, cfg.batch_size, shuffle_shards=cfg.shuffle_shards):
        tokens = to_tokens(batch, device, norm)
        logits, scores = head.forward_with_scores(tokens)
        preds.append(logits.topk(min(5, num_classes), dim=1).indices.cpu())  # (B, k)
        labels_all.append(batch["labels"].long())
        if export_maps is not None:
            scores = scores.mean(dim=1) if scores.ndim == 3 else scores  # (B, Q, N) -> (B, N)
            maps.append(scores.float().cpu().reshape(len(scores), *source.grid))  # (B, h, w)
    top = torch.cat(preds)  # (n, k)
    labels = torch.cat(labels_all)
    indices = source.indices[positions]
    hit1 = top[:, 0] == labels
    counts = torch.bincount(labels, minlength=num_classes).float()
    per_class = torch.bincount(labels[hit1], minlength=num_classes).float() / counts.clamp(min=1)
    result = {
        **R.header("predictions"),
        "head": str(head_path),
        "cache": str(cache.path),
        "pool": spec.pool,
        "layer": meta["layer"],
        "blocks": meta.get("blocks"),
        "num_samples": len(labels),
        "top1": float(hit1.float().mean()),
        "top5": float((top == labels[:, None]).any(dim=1).float().mean()),
        "per_class": {
            name: (float(acc) if counts[c] > 0 else None)
            for c, (name, acc) in enumerate(zip(meta["class_names"], per_class.tolist(), strict=True))
        },
        "predictions": [
            {"index": int(i), "label": int(y), "pred": int(p[0]), "top5": p.tolist()}
            for i, y, p in zip(indices, labels, top, strict=True)
        ],
        "provenance": provenance(device=device, checkpoint=checkpoint_from_manifest(cache.manifest),
                                 dataset=cache.manifest["dataset"]),  # fmt: skip
    }
    if export_maps is not None:
        from safetensors.torch import save_file

        tensors = {"maps": torch.cat(maps).contiguous(), "indices": indices.contiguous()}
        with atomic_path(export_maps) as tmp:
            save_file(
                tensors, str(tmp), metadata={"pool": spec.pool, "grid": f"{source.grid[0]}x{source.grid[1]}"}
            )
        result["maps"] = str(export_maps)
    result = R.validate("predictions", result)
    if out_dir is not None:
        write_json(Path(out_dir) / "predictions.json", result)
    return result
