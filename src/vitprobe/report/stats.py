"""Numbers the report derives from stored results: confidence intervals, uniform-attention references."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 %


def wilson_interval(top1: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of an accuracy `top1` (a fraction) measured on `n` test images.

    Wilson (1927): (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), with p = k/n and k the correct
    images (`round(top1 · n)`). Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at
    p = 0 or 1. Returns fractions.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = round(top1 * n) / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def uniform_entropy(num_patches: int) -> float:
    """Entropy (nats) of attention spread evenly over N patch keys: ln N (the ceiling of the entropies)."""
    return math.log(num_patches)


def uniform_self_share(num_tokens: int) -> float:
    """A[0,0] of attention spread evenly over all T tokens: 1/T."""
    return 1.0 / num_tokens


def uniform_distance(grid: tuple[int, int] | list[int], patch_size: int) -> float:
    """Attention distance (pixels) of uniform attention over patches: the mean distance between patch
    centres, over all ordered pairs including a patch with itself (what `attention_distance` averages)."""
    import numpy as np

    rows, cols = np.meshgrid(np.arange(int(grid[0])), np.arange(int(grid[1])), indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1) * float(patch_size)  # (N, 2)
    distances = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))  # (N, N)
    return float(distances.mean())
