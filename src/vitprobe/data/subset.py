"""Class-stratified, seeded subsets of a dataset (`extract --limit`, the analyses' `--limit`, Caltech-101).

Which images a subset holds depends only on the labels, `n` and the seed, through a hash of (seed, index):
no random-number stream whose algorithm could change between numpy versions, and a larger subset with the
same per-class quotas contains the smaller one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from vitprobe.errors import DatasetError


class _Labelled(Protocol):
    labels: Sequence[int]


def hash_key(seed: int, tag: str, index: int) -> bytes:
    """The order key of item `index` under `seed`: blake2b-64 of `"{seed}:{tag}:{index}"`, then the index."""
    return hashlib.blake2b(f"{seed}:{tag}:{index}".encode(), digest_size=8).digest() + index.to_bytes(
        8, "big"
    )


def stratified_subset(dataset: Sequence[int] | _Labelled, n: int, *, seed: int = 0) -> list[int]:
    """`n` dataset indices, stratified by class, in ascending order (all indices when `n` >= the dataset).

    Quotas: when `n` is at least the number of classes K, every class first gets one image and the other
    `n - K` are shared in proportion to each class's remaining images (largest remainder; ties go to the
    class with the smaller hash key); when `n` < K, the `n` classes with the smallest hash keys get one
    each. Within a class, the images with the smallest hash keys (`hash_key(seed, "image", index)`) are
    taken. Class keys are `hash_key(seed, "class", label)`.

    Args:
        dataset: an `ImageDataset` (or anything with `.labels`), or the labels themselves.
        n: the number of images to keep (positive).
        seed: another seed gives another subset with the same per-class counts.

    Raises:
        DatasetError: `n` is not positive.
    """
    labels = [int(v) for v in (dataset.labels if hasattr(dataset, "labels") else dataset)]  # type: ignore[union-attr]
    if n <= 0:
        raise DatasetError(
            f"a subset of {n} images was asked for", "use a positive number, e.g. --limit 1000"
        )
    if n >= len(labels):
        return list(range(len(labels)))
    members: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        members[label].append(index)
    quotas = _quotas({c: len(m) for c, m in members.items()}, n, seed)
    chosen: list[int] = []
    for label, quota in quotas.items():
        chosen.extend(sorted(members[label], key=lambda i: hash_key(seed, "image", i))[:quota])
    return sorted(chosen)


def _quotas(counts: dict[int, int], n: int, seed: int) -> dict[int, int]:
    """Images per class (see `stratified_subset`); they sum to `n` < sum(counts)."""
    by_key = sorted(counts, key=lambda c: hash_key(seed, "class", c))
    if n < len(counts):
        return {c: 1 for c in by_key[:n]}
    rest = {c: counts[c] - 1 for c in counts}  # one each is given first
    spare = n - len(counts)
    total = sum(rest.values())
    share = {c: divmod(spare * rest[c], total) for c in counts}  # exact integer arithmetic; total > 0
    quotas = {c: 1 + share[c][0] for c in counts}
    left = n - sum(quotas.values())
    by_remainder = sorted(by_key, key=lambda c: -share[c][1])  # stable: hash-key order breaks ties
    for c in by_remainder[:left]:
        quotas[c] += 1
    return quotas
