"""The model of knn.json (`vitprobe knn`): per-k accuracies of a weighted k-NN, its config and timing."""

from __future__ import annotations

from dataclasses import dataclass

from vitprobe.results.common import CacheRef, Provenance
from vitprobe.results.schema import Model, Versioned, opt

model = dataclass(frozen=True, kw_only=True)


@model
class KnnEntry(Model):
    top1: float
    top5: float
    k_used: int


@model
class KnnConfigRecord(Model):
    ks: list[int]
    temperature: float
    pool: str
    layer: int | None
    final_norm: bool
    batch_size: int
    train_chunk: int
    device: str


@model
class KnnTiming(Model):
    read_seconds: float  # reading (and pooling) the features of both caches
    search_seconds: float  # the similarity search and the vote
    device: str
    batch_size: int  # test rows per similarity batch actually used


@model
class KnnResults(Versioned):
    """RUN_DIR/knn.json (`vitprobe knn`)."""

    FORMAT = "vitprobe-knn-results"
    KIND = "knn"
    FILE = "knn.json"

    created: str
    versions: dict[str, str]
    random_init: bool
    warnings: list[str]
    layer: int  # 0-based block index
    pool: str
    num_train: int
    num_test: int
    knn: dict[str, KnnEntry]  # keyed by the k asked for
    config: KnnConfigRecord
    train_cache: CacheRef
    test_cache: CacheRef
    timing: KnnTiming | None = opt()  # absent in knn.json written before the memory-mapped feed
    provenance: Provenance | None = opt()


__all__ = ["KnnConfigRecord", "KnnEntry", "KnnResults", "KnnTiming"]
