"""Weighted k-NN classification of cached features, as in DINO (Caron et al., 2021, §4.1 / `eval_knn.py`).

Features are L2-normalised; each test sample takes its k most cosine-similar train samples, weights each by
exp(sim / T), and sums the weights per class; the top-scoring classes are its top-1 / top-5. Test rows are
processed in batches and the train bank in chunks, so memory stays at batch × chunk similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitprobe.errors import ProbeError

KNN_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class KnnConfig:
    """How a k-NN evaluation is made; written whole into knn.json."""

    ks: tuple[int, ...] = (10, 20, 100, 200)  # DINO reports k = 20 and scans 10, 20, 100, 200
    temperature: float = 0.07  # DINO's T for the exp(sim / T) vote weights
    pool: str = "cls"  # feature per image: the [cls] token or the mean of patch tokens
    layer: int | None = None  # block to use when the cache holds several; None = the deepest stored
    final_norm: bool = False  # apply the backbone's final LayerNorm to tokens first (DINO uses normed [cls])
    batch_size: int = 256  # test rows per similarity batch
    train_chunk: int = 65536  # train rows per similarity chunk (memory = batch_size × train_chunk floats)
    device: str = "auto"  # auto = CUDA when available

    def __post_init__(self) -> None:
        if self.pool not in KNN_POOLS:
            raise ProbeError(f"unknown k-NN --pool {self.pool!r}", "use cls or mean")
        if not self.ks or min(self.ks) < 1:
            raise ProbeError(f"--k {self.ks} must be positive integers", "use e.g. --k 10,20,100,200")
        if self.temperature <= 0:
            raise ProbeError(f"--temperature {self.temperature} must be > 0", "use e.g. 0.07")


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    train_chunk: int = 65536,
) -> dict[int, torch.Tensor]:
    """Class scores (B, C) of a batch of test features for each k.

    Args:
        train_feats: (N, D) L2-normalised train features.
        train_labels: (N,) int64 train labels.
        test_feats: (B, D) L2-normalised test features.
        num_classes: C.
        ks: neighbour counts (each clipped to N).
        temperature: T in exp(sim / T).
        train_chunk: train rows compared at once; the top-k is merged across chunks.
    """
    k_max = min(max(ks), len(train_feats))
    best_sim, best_idx = None, None
    for start in range(0, len(train_feats), train_chunk):
        sims = test_feats @ train_feats[start : start + train_chunk].T  # (B, n_chunk)
        sim, idx = sims.topk(min(k_max, sims.shape[1]), dim=1)  # (B, k')
        idx = idx + start
        if best_sim is not None:
            sim, idx = torch.cat([best_sim, sim], dim=1), torch.cat([best_idx, idx], dim=1)  # (B, 2k)
            sim, order = sim.topk(min(k_max, sim.shape[1]), dim=1)  # (B, k)
            idx = idx.gather(1, order)
        best_sim, best_idx = sim, idx
    weights = (best_sim / temperature).exp()  # (B, k), sorted by similarity
    votes = F.one_hot(train_labels[best_idx], num_classes).to(weights.dtype)  # (B, k, C)
    scores = {}
    for k in ks:
        kk = min(k, k_max)
        scores[k] = (votes[:, :kk] * weights[:, :kk, None]).sum(dim=1)  # (B, C)
    return scores


@torch.no_grad()
def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    batch_size: int = 256,
    train_chunk: int = 65536,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (in [0, 1]) per k, and `k_used`: k clipped to the train rows (a k beyond
    them votes with every train sample); features are L2-normalised here."""
    device = train_feats.device
    train_feats = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(device).long()
    k5 = min(5, num_classes)
    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    for start in range(0, len(test_feats), batch_size):
        feats = F.normalize(test_feats[start : start + batch_size].to(device).float(), dim=1)  # (B, D)
        labels = test_labels[start : start + batch_size].to(device).long()
        scores = knn_scores(
            train_feats,
            train_labels,
            feats,
            num_classes=num_classes,
            ks=ks,
            temperature=temperature,
            train_chunk=train_chunk,
        )
        for k, s in scores.items():
            pred = s.topk(k5, dim=1).indices  # (B, k5)
            top1[k] += int((pred[:, 0] == labels).sum())
            top5[k] += int((pred == labels[:, None]).any(dim=1).sum())
    n = max(len(test_feats), 1)
    used = {k: min(k, len(train_feats)) for k in ks}
    return {k: {"top1": top1[k] / n, "top5": top5[k] / n, "k_used": used[k]} for k in ks}


def clipped_k_warnings(ks: Sequence[int], num_train: int) -> list[str]:
    """One warning per k larger than the train cache, which `knn_scores` clips to the train rows."""
    return [
        f"--k {k} is more than the {num_train} train rows: k = {num_train} was used "
        "(every train sample votes)"
        for k in ks
        if k > num_train
    ]


def cache_features(
    cache: Any, *, pool: str, layer: int, final_norm: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One feature per image (view 0) from a token cache: (n, D) features and (n,) labels, on `device`."""
    from vitprobe.tokens import (
        CacheSource,
        Split,
        Tokens,
        cache_token_keys,
        final_norm_state,
        iter_batches,
        to_tokens,
    )

    available = cache_token_keys(cache)
    if pool == "cls" and "cls" not in available:
        raise ProbeError(f"cache {cache.path} has no [cls] token", "use --pool mean")
    key = "cls" if pool == "cls" else ("patches" if "patches" in available or final_norm else "mean")
    if key not in available:
        raise ProbeError(
            f"cache {cache.path} holds {sorted(available)}, not what --pool {pool} needs"
            + (" with --final-norm" if final_norm else ""),
            "extract the cache with --tokens all",
        )
    norm = final_norm_state(cache, device) if final_norm else None
    source = CacheSource(cache, layer)
    split = Split("knn", source, torch.arange(source.num_rows))
    feats, labels = [], []
    for batch in iter_batches(split, [key], 4096):
        tokens: Tokens = to_tokens(batch, device, norm)
        feats.append(tokens.cls if pool == "cls" else tokens.patch_mean())  # (B, D)
        labels.append(batch["labels"].long())
    return torch.cat(feats), torch.cat(labels).to(device)


def run_knn(
    train_path: str | Path, test_path: str | Path, cfg: KnnConfig, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """`vitprobe knn`: weighted k-NN of a test cache against a train cache; writes knn.json in out_dir.

    Returns:
        A dict with per-k top-1/top-5 (in [0, 1]), the config and both caches' provenance.
    """
    from vitprobe.cache import open_cache
    from vitprobe.devices import resolve_device
    from vitprobe.files import write_json
    from vitprobe.pairing import backbone_identity, check_pair, pair_warnings, resolve_layer
    from vitprobe.provenance import checkpoint_from_manifest, provenance, versions
    from vitprobe.results import validate

    train_cache, test_cache = open_cache(train_path), open_cache(test_path)
    layer = resolve_layer(train_cache, cfg.layer)
    check_pair(train_cache, test_cache, layer)
    device = resolve_device(cfg.device)
    common = {"pool": cfg.pool, "layer": layer, "final_norm": cfg.final_norm, "device": device}
    train_feats, train_labels = cache_features(train_cache, **common)
    test_feats, test_labels = cache_features(test_cache, **common)
    metrics = knn_evaluate(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        num_classes=train_cache.num_classes,
        ks=cfg.ks,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        train_chunk=cfg.train_chunk,
    )
    identity = backbone_identity(train_cache.manifest)
    results = {
        "format": "vitprobe-knn-results",
        "version": 1,
        "kind": "knn",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "random_init": identity["random_init"],
        "warnings": pair_warnings(train_cache, test_cache) + clipped_k_warnings(cfg.ks, len(train_labels)),
        "layer": layer,
        "pool": cfg.pool,
        "num_train": len(train_labels),
        "num_test": len(test_labels),
        "knn": {str(k): v for k, v in metrics.items()},
        "config": asdict(cfg),
        "train_cache": {"path": str(train_cache.path), "provenance": train_cache.provenance()},
        "test_cache": {"path": str(test_cache.path), "provenance": test_cache.provenance()},
        "provenance": provenance(device=device, checkpoint=checkpoint_from_manifest(train_cache.manifest),
                                 dataset=test_cache.manifest["dataset"]),  # fmt: skip
    }
    results = validate("knn", results)
    if out_dir is not None:
        write_json(Path(out_dir) / "knn.json", results)
    return results
