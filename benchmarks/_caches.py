"""Synthetic token caches for the benchmarks: class-structured random tokens written in the cache format.

Each class has a random mean token; a row is its class mean plus Gaussian noise, so probes and k-NN have
something to find. The cache is written with vitprobe.cache's writers (real manifest, sha256 per shard).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitprobe.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    shard_entries,
    write_final_norm,
    write_manifest,
    write_shard,
)


def write_cache(
    path: Path,
    *,
    rows: int,
    shard_rows: int,
    tokens: str = "all",
    dim: int = 192,
    grid: tuple[int, int] = (14, 14),
    classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Write a cache of `rows` rows (tokens "all": [cls] + grid patches; "cls": [cls] only), fp16.

    The class means come from a fixed seed (shared by the train and test caches); the noise from `seed`.
    """
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    patches = grid[0] * grid[1]
    shards = []
    for i, s in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - s)
        labels = torch.randint(0, classes, (n,), generator=g)
        cls = means[labels] + noise * torch.randn(n, dim, generator=g)  # (n, D)
        tensors = {"cls": cls.half()}
        if tokens == "all":
            tensors["patches"] = (
                cls[:, None] + noise * torch.randn(n, patches, dim, generator=g)
            ).half()  # (n, P, D)
        tensors["labels"] = labels
        tensors["indices"] = torch.arange(s, s + n)
        shards.append(write_shard(path, i, s, tensors))
    write_manifest(
        path,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": {
                "spec": "synthetic-tokens",
                "timm_name": "synthetic-tokens",
                "checkpoint": "class-means",
                "random_init": False,
                "source": "benchmarks/_caches.py",
            },
            "layers": [0],
            "grid": list(grid),
            "dim": dim,
            "num_prefix_tokens": 1,
            "has_cls": True,
            "num_reg_tokens": 0,
            "tokens": tokens,
            "store_dtype": "fp16",
            "views": 0,
            "seed": 0,
            "dataset": {
                "spec": "synthetic:class-means",
                "split": split,
                "fingerprint": f"synthetic-{split}-{seed}",
                "class_names": [f"c{i}" for i in range(classes)],
                "num_classes": classes,
            },
            "num_samples": rows,
            "shard_size": shard_rows,
            "shards": shard_entries(shards),
            "final_norm": write_final_norm(path, torch.nn.LayerNorm(dim, eps=1e-6)),
            "complete": True,
        },
    )
    return path
