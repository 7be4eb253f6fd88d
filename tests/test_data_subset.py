"""`stratified_subset`: class-stratified, seeded, deterministic subsets (extract --limit, the analyses)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vitprobe.data import open_dataset, stratified_subset
from vitprobe.errors import DatasetError


def _key(seed: int, tag: str, i: int) -> bytes:
    """The documented hash key, written out: blake2b-64 of "seed:tag:index", then the index (8 bytes)."""
    return hashlib.blake2b(f"{seed}:{tag}:{i}".encode(), digest_size=8).digest() + i.to_bytes(8, "big")


def test_quotas_follow_the_definition() -> None:
    labels = [0] * 6 + [1] * 3 + [2] * 1
    # n = 5 >= K = 3: one each, then the 2 spare shared over the remaining (5, 2, 0) images: exact shares
    # 10/7 and 4/7 -> floors (1, 0, 0), one left, largest remainder 4/7 -> class 1. Quotas (2, 2, 1).
    chosen = stratified_subset(labels, 5, seed=0)
    assert Counter(labels[i] for i in chosen) == {0: 2, 1: 2, 2: 1}
    for label, quota in ((0, 2), (1, 2), (2, 1)):
        members = [i for i, y in enumerate(labels) if y == label]
        expected = sorted(sorted(members, key=lambda i: _key(0, "image", i))[:quota])
        assert [i for i in chosen if labels[i] == label] == expected
    assert chosen == sorted(chosen)


def test_a_class_sorted_dataset_gets_every_class_not_the_first_one() -> None:
    labels = [k for k in range(10) for _ in range(100)]  # class-sorted, as image folders and CUB are
    chosen = stratified_subset(labels, 50, seed=0)
    assert len(chosen) == 50 and Counter(labels[i] for i in chosen) == {k: 5 for k in range(10)}
    assert Counter(labels[:50]) == {0: 50}  # what "the first N" gave


def test_fewer_images_than_classes_takes_one_each_from_the_classes_with_the_smallest_keys() -> None:
    labels = [k for k in range(8) for _ in range(3)]
    chosen = stratified_subset(labels, 3, seed=4)
    classes = sorted(range(8), key=lambda c: _key(4, "class", c))[:3]
    assert sorted(labels[i] for i in chosen) == sorted(classes) and len(chosen) == 3


def test_deterministic_seeded_nested_and_whole() -> None:
    labels = [i % 4 for i in range(400)]
    first = stratified_subset(labels, 40, seed=1)
    assert first == stratified_subset(labels, 40, seed=1)
    other = stratified_subset(labels, 40, seed=2)
    assert other != first and Counter(labels[i] for i in other) == Counter(labels[i] for i in first)
    assert set(first) <= set(stratified_subset(labels, 80, seed=1))  # balanced: per-class quotas only grow
    assert stratified_subset(labels, 400, seed=3) == list(range(400)) == stratified_subset(labels, 10**6)
    with pytest.raises(DatasetError, match="a subset of 0 images"):
        stratified_subset(labels, 0)


def test_takes_a_dataset(tmp_path: Path) -> None:
    for k in range(3):
        for j in range(4):
            (tmp_path / f"c{k}").mkdir(exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / f"c{k}" / f"{j}.png")
    dataset = open_dataset(f"imagefolder:{tmp_path}", "all")
    chosen = stratified_subset(dataset, 6, seed=0)
    assert chosen == stratified_subset(dataset.labels, 6, seed=0)
    assert Counter(dataset.labels[i] for i in chosen) == {0: 2, 1: 2, 2: 2}


def test_extract_limit_is_stratified_and_stores_dataset_indices(tmp_path: Path) -> None:
    """`extract --limit 8` on a class-sorted folder: 2 images of each of 4 classes, rows = those images."""
    import json
    from dataclasses import replace

    import numpy as np
    import torch

    from vitprobe.cache import MANIFEST_FILE, open_cache
    from vitprobe.errors import CacheError
    from vitprobe.extract import ExtractConfig, extract

    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / "data" / f"c{k}").mkdir(parents=True)
        for j in range(5):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / f"c{k}" / f"{j}.png")
    spec = f"imagefolder:{tmp_path / 'data'}"
    config = ExtractConfig(model="timm:test_vit", data=spec, split="all", out=tmp_path / "limited",
                           random_init=True, workers=0, batch_size=4, shard_size=4, store="fp32",
                           limit=8)  # fmt: skip
    extract(config)
    labels = open_dataset(spec, "all").labels
    rows = stratified_subset(labels, 8, seed=0)
    limited = open_cache(config.out)
    assert limited.indices().tolist() == rows and limited.labels().tolist() == [labels[i] for i in rows]
    assert Counter(limited.labels().tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert limited.manifest["dataset"]["selection"] == "stratified"
    full = open_cache(extract(replace(config, out=tmp_path / "full", limit=None)).path)
    assert full.manifest["dataset"]["selection"] is None
    every = torch.cat([s["patches"] for s in full.iter_shards(["patches"])])  # (20, P, D)
    chosen = torch.cat([s["patches"] for s in limited.iter_shards(["patches"])])  # (8, P, D)
    torch.testing.assert_close(chosen, every[rows], rtol=1e-5, atol=1e-5)  # row r holds image rows[r]
    manifest = json.loads((config.out / MANIFEST_FILE).read_text())  # a cache from before: first-N
    del manifest["dataset"]["selection"]
    (config.out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="dataset.selection: cache has None, this run 'stratified'"):
        extract(config)
