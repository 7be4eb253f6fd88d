"""Weighted k-NN classification of cached features, as in DINO (Caron et al., 2021, §4.1 / `eval_knn.py`).

Features are read once and L2-normalised on the device; each test sample takes its k most cosine-similar
train samples (a chunked matmul and top-k, one search for every k), weights each by exp(sim / T), and sums
the weights per class with a scatter-add; the top-scoring classes, ranked as DINO ranks them, are its top-1
/ top-5. Test rows go in batches sized so that batch × chunk similarities fit in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitprobe.errors import CacheError, ProbeError

KNN_POOLS = ("cls", "mean")


FEATURE_BATCH_BYTES = 64 << 20  # stored tokens converted at once when reading features (patches: few rows)
SIMILARITY_BYTES = 256 << 20  # test batch × train chunk similarities at once (CPU; GPUs: 1/8 of free)


@dataclass(frozen=True)
class KnnConfig:
    """How a k-NN evaluation is made; written whole into knn.json."""

    ks: tuple[int, ...] = (10, 20, 100, 200)  # DINO reports k = 20 and scans 10, 20, 100, 200
    temperature: float = 0.07  # DINO's T for the exp(sim / T) vote weights
    pool: str = "cls"  # feature per image: the [cls] token or the mean of patch tokens
    layer: int | None = None  # block to use when the cache holds several; None = the deepest stored
    final_norm: bool = False  # apply the backbone's final LayerNorm to tokens first (DINO uses normed [cls])
    batch_size: int = 0  # test rows per similarity batch; 0 = as many as SIMILARITY_BYTES allows
    train_chunk: int = 65536  # train rows per similarity chunk (memory = batch_size × train_chunk floats)
    device: str = "auto"  # auto = CUDA when available

    def __post_init__(self) -> None:
        if self.pool not in KNN_POOLS:
            raise ProbeError(f"unknown k-NN --pool {self.pool!r}", "use cls or mean")
        if not self.ks or min(self.ks) < 1:
            raise ProbeError(f"--k {self.ks} must be positive integers", "use e.g. --k 10,20,100,200")
        if self.temperature <= 0:
            raise ProbeError(f"--temperature {self.temperature} must be > 0", "use e.g. 0.07")
        if self.batch_size < 0:
            raise ProbeError(f"--batch-size {self.batch_size} must be >= 0", "use 0 (sized to memory)")


def top_k(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sims.topk(k, dim=1)` (values sorted high to low, and their columns) for a contiguous (B, n) block,
    selecting from about 2·sqrt(k·n) candidates per row instead of n.

    The n columns are dealt into G ≈ sqrt(k·n) groups (column w·G + g is element w of group g); the k
    groups with the largest maxima hold every one of the row's k largest values: a value outside them is
    at most its group's maximum, which is at most the k-th largest group maximum, and the k selected
    maxima are k distinct values at least that large. So the values equal topk's exactly; only columns of
    equal similarity (duplicate rows) may be ordered differently, as topk's own order of ties is not
    specified and differs between devices. Columns past the last whole group are always candidates.
    Used on the CPU, where it was measured faster (docs/benchmarks.md); on a GPU this is `topk` itself.
    """
    rows, n = sims.shape
    groups = math.isqrt(k * n)
    width = n // max(groups, 1)
    if groups <= k or width < 2 or sims.device.type != "cpu":  # nothing to skip, or not measured
        return sims.topk(k, dim=1)
    grouped = sims[:, : width * groups].view(rows, width, groups)  # (B, width, G)
    best = grouped.amax(dim=1).topk(k, dim=1, sorted=False).indices  # (B, k) groups with the largest maxima
    steps = groups * torch.arange(width, device=sims.device)  # (width,) column offsets inside a group
    cols = (best[:, :, None] + steps).view(rows, k * width)  # (B, k·width) the candidates' columns
    if width * groups < n:
        tail = torch.arange(width * groups, n, device=sims.device).expand(rows, -1)  # (B, n - width·G)
        cols = torch.cat([cols, tail], dim=1)
    sim, order = sims.gather(1, cols).topk(k, dim=1)  # (B, k)
    return sim, cols.gather(1, order)


@torch.inference_mode()
def neighbours(
    train_feats: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    *,
    train_chunk: int = 65536,
    buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar train rows of each test row: similarities (B, k), sorted high to low, and their
    train indices (B, k). One matmul and top-k (`top_k`) per train chunk; chunks are merged by another
    top-k.

    `buffer` (at least B × min(N, train_chunk) floats) takes the similarities, so a search over many test
    batches does not page in fresh memory for each one."""
    k = min(k, len(train_feats))
    best_sim, best_idx = None, None
    for start in range(0, len(train_feats), train_chunk):
        chunk = train_feats[start : start + train_chunk]
        out = None if buffer is None else buffer.view(-1)[: len(test_feats) * len(chunk)]
        if out is None:
            sims = test_feats @ chunk.T  # (B, n_chunk)
        else:
            sims = torch.mm(test_feats, chunk.T, out=out.view(len(test_feats), len(chunk)))
        sim, idx = top_k(sims, min(k, sims.shape[1]))  # (B, k')
        idx += start
        if best_sim is not None:
            sim, idx = torch.cat([best_sim, sim], dim=1), torch.cat([best_idx, idx], dim=1)  # (B, 2k)
            sim, order = sim.topk(min(k, sim.shape[1]), dim=1)  # (B, k)
            idx = idx.gather(1, order)
        best_sim, best_idx = sim, idx
    assert best_sim is not None and best_idx is not None
    return best_sim, best_idx


@torch.inference_mode()
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
    """Class scores (B, C) of a batch of test features for each k: the summed exp(sim / T) weights of the
    k nearest train rows per class, all k from one top-max(k) search and one scatter-add vote.

    Args:
        train_feats: (N, D) L2-normalised train features.
        train_labels: (N,) int64 train labels.
        test_feats: (B, D) L2-normalised test features.
        num_classes: C.
        ks: neighbour counts (each clipped to N).
        temperature: T in exp(sim / T).
        train_chunk: train rows compared at once; the top-k is merged across chunks.
    """
    return dict(_votes(train_feats, train_labels, test_feats, num_classes, ks, temperature, train_chunk))


def _votes(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    train_chunk: int,
    buffer: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(k, scores (B, C)) for each k in `ks`, summing the neighbours' weights in rank order as DINO does."""
    sims, idx = neighbours(train_feats, test_feats, max(ks), train_chunk=train_chunk, buffer=buffer)
    weights = sims.div(temperature).exp()  # (B, k), DINO's distances.div_(T).exp_()
    voters = train_labels[idx]  # (B, k)
    scores = torch.zeros(len(test_feats), num_classes, dtype=weights.dtype, device=weights.device)
    done, out = 0, {}
    for k in sorted({min(k, len(train_feats)) for k in ks}):
        scores.scatter_add_(1, voters[:, done:k], weights[:, done:k])  # (B, C) += the next ranks' votes
        done = k
        out[k] = scores.clone()
    for k in ks:
        yield k, out[min(k, len(train_feats))]


def ranked(scores: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` classes of `scores.sort(dim=1, descending=True)` (DINO's order) (B, width), from a
    top-(width + 1) where its values are strictly decreasing (then both orders are the one order of those
    classes) and from the sort itself in the rows with a tie among them (e.g. classes no neighbour voted for).
    """
    top = scores.topk(min(width + 1, scores.shape[1]), dim=1)  # (B, width + 1)
    predictions = top.indices[:, :width]  # (B, width)
    tied = (top.values[:, 1:] == top.values[:, :-1]).any(dim=1)  # (B,)
    if bool(tied.any()):
        predictions = predictions.clone()
        predictions[tied] = scores[tied].sort(dim=1, descending=True).indices[:, :width]
    return predictions


def batch_rows(num_train: int, train_chunk: int, device: torch.device) -> int:
    """Test rows per batch so that batch × chunk fp32 similarities fit the similarity budget."""
    budget = SIMILARITY_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(budget, free // 8)
    return max(1, budget // (4 * max(1, min(num_train, train_chunk))))


@torch.inference_mode()
def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    batch_size: int = 0,
    train_chunk: int = 65536,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (in [0, 1]) per k, exactly as DINO's `knn_classifier` counts them, and
    `k_used`: k clipped to the train rows (a k beyond them votes with every train sample).

    Features are L2-normalised here, once, on their device. Predictions are the classes in the order
    `torch.sort(scores, descending=True)` gives, as in DINO, so classes with equal scores (those no
    neighbour voted for) are ranked the same way DINO ranks them; top-5 counts the first min(5, k) of them.
    """
    device = train_feats.device
    train_feats = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    batch_size = batch_size or batch_rows(len(train_feats), train_chunk, device)
    chunk_rows = min(len(train_feats), train_chunk)
    buffer = torch.empty(min(batch_size, len(test_feats)) * chunk_rows, device=device)  # similarities
    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    for start in range(0, len(test_feats), batch_size):
        feats = F.normalize(test_feats[start : start + batch_size].to(device).float(), dim=1)  # (B, D)
        labels = test_labels[start : start + batch_size]
        votes = _votes(train_feats, train_labels, feats, num_classes, ks, temperature, train_chunk, buffer)
        for k, s in votes:
            width = min(5, k, num_classes)
            predictions = ranked(s, width)  # (B, width), DINO's order
            correct = predictions == labels[:, None]
            top1[k] += int(correct[:, 0].sum())
            top5[k] += int(correct.any(dim=1).sum())
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
    from vitprobe.sources import CacheSource, cache_token_keys
    from vitprobe.tokens import Split, Tokens, final_norm_state, iter_batches, to_tokens

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
    rows = Split("knn", source, torch.arange(source.num_rows)).epoch_rows(None)
    split = Split("knn", source, rows)
    feats = torch.empty(len(rows), source.dim, device=device)  # (n, D), filled batch by batch
    done = 0
    batch_rows_ = max(1, min(4096, FEATURE_BATCH_BYTES // source.row_bytes([key])))
    for batch in iter_batches(split, [key], batch_rows_):
        tokens: Tokens = to_tokens(batch, device, norm)
        f = tokens.cls if pool == "cls" else tokens.patch_mean()  # (B, D)
        feats[done : done + len(f)] = f
        done += len(f)
    check_finite(feats, rows, source.indices, where=f"cache {cache.path} (block {layer}, --pool {pool})")
    return feats, source.labels[rows].to(device)


def check_finite(feats: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, *, where: str) -> None:
    """Refuse features with NaN or Inf, naming the cache rows (and dataset indices) that hold them: one such
    row would silently take part in every neighbour search."""
    from vitprobe.tokens import non_finite_rows

    bad = non_finite_rows(feats).nonzero().flatten().cpu()
    if len(bad) == 0:
        return
    shown = bad[:10]
    more = f" and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    raise CacheError(
        f"{where}: {len(bad)} of {len(feats)} feature rows are not finite (NaN or Inf): cache rows "
        f"{rows[shown].tolist()}{more} (dataset indices {indices[rows[shown]].tolist()})",
        "re-extract those images (an fp16 overflow becomes Inf: try `vitprobe extract --store bf16` or "
        "fp32), or drop them from the dataset",
    )


def run_knn(
    train_path: str | Path,
    test_path: str | Path,
    cfg: KnnConfig,
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`vitprobe knn`: weighted k-NN of a test cache against a train cache; writes knn.json in out_dir.

    An earlier knn.json in `out_dir` is refused before any work unless `overwrite` (as probe and analyze).

    Returns:
        A dict with per-k top-1/top-5 (in [0, 1]), the config and both caches' provenance.
    """
    from vitprobe.cache import open_cache
    from vitprobe.devices import resolve_device
    from vitprobe.errors import VitprobeError
    from vitprobe.files import write_json
    from vitprobe.pairing import (
        backbone_identity,
        check_pair,
        pair_warnings,
        resolve_layer,
        unseen_class_warnings,
    )
    from vitprobe.provenance import checkpoint_from_manifest, provenance, versions
    from vitprobe.results import validate

    if out_dir is not None and (Path(out_dir) / "knn.json").exists() and not overwrite:
        raise VitprobeError(
            f"{out_dir} already holds knn.json of an earlier `vitprobe knn` run",
            "pass --overwrite to replace it, or choose another --out",
        )
    train_cache, test_cache = open_cache(train_path), open_cache(test_path)
    layer = resolve_layer(train_cache, cfg.layer)
    check_pair(train_cache, test_cache, layer)
    device = resolve_device(cfg.device)
    common = {"pool": cfg.pool, "layer": layer, "final_norm": cfg.final_norm, "device": device}
    start = time.perf_counter()
    train_feats, train_labels = cache_features(train_cache, **common)
    test_feats, test_labels = cache_features(test_cache, **common)
    read = time.perf_counter() - start
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
        "warnings": pair_warnings(train_cache, test_cache)
        + unseen_class_warnings(train_labels.tolist(), test_labels.tolist(), train_cache.class_names)
        + clipped_k_warnings(cfg.ks, len(train_labels)),
        "layer": layer,
        "pool": cfg.pool,
        "num_train": len(train_labels),
        "num_test": len(test_labels),
        "knn": {str(k): v for k, v in metrics.items()},
        "config": asdict(cfg),
        "train_cache": {"path": str(train_cache.path), "provenance": train_cache.provenance()},
        "test_cache": {"path": str(test_cache.path), "provenance": test_cache.provenance()},
        "timing": {
            "read_seconds": read,
            "search_seconds": time.perf_counter() - start - read,
            "device": str(device),
            "batch_size": cfg.batch_size or batch_rows(len(train_feats), cfg.train_chunk, device),
        },
        "provenance": provenance(device=device, checkpoint=checkpoint_from_manifest(train_cache.manifest),
                                 dataset=test_cache.manifest["dataset"]),  # fmt: skip
    }
    results = validate("knn", results)
    if out_dir is not None:
        write_json(Path(out_dir) / "knn.json", results)
    return results
