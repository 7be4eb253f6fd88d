"""Frequency analysis: hand-built maps give the expected spectra; a model pass equals the notebook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitprobe.analysis.frequency import (
    EPS,
    FrequencyAccumulator,
    analyze_frequency,
    band_energy,
    diagonal,
    diagonal_frequencies,
    log_amplitude_sum,
    token_map,
)
from vitprobe.errors import ModelError
from vitprobe.models import load_backbone

H = 8  # side of the hand-built maps


def grid_ij() -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(H), np.arange(H), indexing="ij")  # (H, H) each


def mean_log_amplitude(fmap: np.ndarray) -> torch.Tensor:
    """The library's mean shifted log-amplitude spectrum of (B, C, H, H) maps."""
    t = torch.from_numpy(fmap)
    return log_amplitude_sum(t) / (t.shape[0] * t.shape[1])  # (H, H)


def test_constant_map_has_only_the_zero_frequency() -> None:
    a = np.array([1.0, 2.0, 0.5])  # per-channel constants
    fmap = np.broadcast_to(a[None, :, None, None], (2, 3, H, H)).copy()  # (B, C, H, H)
    spectrum = mean_log_amplitude(fmap)
    dc = np.mean(np.log(H * H * a + EPS))  # |fft2| at zero frequency = H·H·a_c
    expected = np.full((H, H), math.log(EPS))
    expected[H // 2, H // 2] = dc  # fftshift puts the zero frequency in the centre
    np.testing.assert_allclose(spectrum.numpy(), expected, atol=1e-9)
    delta = diagonal(spectrum) - diagonal(spectrum)[0]
    np.testing.assert_allclose(delta.numpy(), [0.0] + [math.log(EPS) - dc] * (H // 2 - 1), atol=1e-9)


def test_cosine_at_the_highest_diagonal_frequency() -> None:
    """a + b·cos(2π k0 (i + j) / H), k0 = H/2 - 1: energy at DC and at ±(k0, k0) only."""
    k0 = H // 2 - 1
    i, j = grid_ij()
    a, b = 3.0, 2.0
    fmap = (a + b * np.cos(2 * np.pi * k0 * (i + j) / H))[None, None]  # (1, 1, H, H)
    diag = diagonal(mean_log_amplitude(fmap)).numpy()
    expected = np.full(H // 2, math.log(EPS))
    expected[0] = math.log(H * H * a + EPS)
    expected[k0] = math.log(H * H * b / 2 + EPS)  # the cosine splits its amplitude over ±(k0, k0)
    np.testing.assert_allclose(diag, expected, atol=1e-9)
    headline = (diag - diag[0])[-1]
    assert headline == pytest.approx(math.log(H * H * b / 2 + EPS) - math.log(H * H * a + EPS), abs=1e-9)
    assert diagonal_frequencies(H)[-1] == pytest.approx(2 * k0 / H)  # (H-2)/H π = 0.75π for H = 8


def test_nyquist_checkerboard_is_all_high_frequency_energy() -> None:
    """(-1)^(i+j) is the (π, π) Nyquist frequency: ratio 1; a slow cosine: 0; a mix: the energy share."""
    i, j = grid_ij()
    checker = (-1.0) ** (i + j)  # |fft2| = H·H at (H/2, H/2), a single (real) bin
    slow = np.cos(2 * np.pi * i / H)  # H·H/2 at (±1, 0)
    high, total = band_energy(torch.from_numpy(checker[None, None] + 5.0))  # + a constant: DC is excluded
    assert high.item() == pytest.approx(total.item()) and total.item() == pytest.approx((H * H) ** 2)
    high, total = band_energy(torch.from_numpy(slow[None, None]))
    assert high.item() == pytest.approx(0.0, abs=1e-12)
    b1, b2 = 1.0, 0.5
    high, total = band_energy(torch.from_numpy((b1 * slow + b2 * checker)[None, None]))
    assert (high / total).item() == pytest.approx(b2**2 / (b2**2 + b1**2 / 2))
    # the Nyquist corner is not on the notebook's half-diagonal: only zero frequency and eps there
    diag = diagonal(mean_log_amplitude(checker[None, None])).numpy()
    np.testing.assert_allclose(diag, math.log(EPS), atol=1e-9)


def test_band_edge_is_half_pi() -> None:
    """|f| = π/2 along an axis is still low; the next bin is high."""
    i, _ = grid_ij()
    at_edge = np.cos(2 * np.pi * (H // 4) * i / H)  # f = π/2
    above = np.cos(2 * np.pi * (H // 4 + 1) * i / H)
    assert band_energy(torch.from_numpy(at_edge[None, None]))[0].item() == pytest.approx(0.0, abs=1e-9)
    high, total = band_energy(torch.from_numpy(above[None, None]))
    assert high.item() == pytest.approx(total.item())


def test_token_map_drops_prefix_and_is_row_major() -> None:
    B, P, h, w, D = 2, 2, 3, 4, 5
    tokens = torch.arange(B * (P + h * w) * D, dtype=torch.float64).reshape(B, P + h * w, D)  # (B, T, D)
    fmap = token_map(tokens, P, (h, w))
    assert fmap.shape == (B, D, h, w)
    for r in range(h):
        for c in range(w):
            torch.testing.assert_close(fmap[:, :, r, c], tokens[:, P + r * w + c, :])


def test_non_square_grid_is_rejected() -> None:
    with pytest.raises(ModelError, match="not square"):
        diagonal(torch.zeros(4, 6))


def notebook_curve(latent: torch.Tensor) -> torch.Tensor:
    """xxxnell/how-do-vits-work fourier_analysis.ipynb, verbatim up to names: (B, N, C) tokens -> Δ curve."""
    b, n, c = latent.shape
    h = w = int(math.sqrt(n))
    latent = latent.reshape(b, h, w, c).permute(0, 3, 1, 2)  # "b (h w) c -> b c h w"
    f = (torch.fft.fft2(latent.double()).abs() + 1e-6).log()
    f = torch.roll(f, shifts=(int(h / 2), int(w / 2)), dims=(2, 3)).mean(dim=(0, 1))
    f = f.diag()[int(h / 2) :]
    return f - f[0]


@pytest.mark.parametrize("overrides", [dict(), dict(class_token=False, reg_tokens=1, global_pool="avg")])
def test_model_pass_equals_the_notebook(overrides: dict) -> None:
    backbone = load_backbone(
        "timm:vit_tiny_patch16_224",
        random_init=True,
        arch_overrides=dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, **overrides),
    )
    model = backbone.model.eval()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)
    loader = DataLoader(TensorDataset(x, torch.zeros(5), torch.arange(5)), batch_size=2)
    result = analyze_frequency(backbone, loader, torch.device("cpu")).result()
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # (B, T, D): block 1's input
        layers = [tokens]
        for blk in model.blocks:
            layers.append(blk(layers[-1]))
    P = backbone.num_prefix_tokens
    expected = torch.stack([notebook_curve(t[:, P:]) for t in layers])  # (L+1, K) with the prefix dropped
    assert result["n_images"] == 5
    np.testing.assert_allclose(result["delta_log_amplitude"], expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result["headline"], expected[:, -1].numpy(), rtol=1e-6, atol=1e-6)
    assert result["frequency"] == [0.0, 0.25, 0.5, 0.75]  # 8x8 grid
    ratio = np.asarray(result["high_freq_energy_ratio"])
    assert ratio.shape == (3,) and ((ratio > 0) & (ratio < 1)).all()


def test_accumulator_averages_over_batches() -> None:
    """Two batches accumulate to the spectrum of their concatenation (means, not per-batch averages)."""
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(3, 1 + 16, 4)))  # (B, T, D), one prefix token, 4x4 grid
    b = torch.from_numpy(rng.normal(size=(1, 1 + 16, 4)))
    acc = FrequencyAccumulator(num_prefix=1, grid=(4, 4), blocks=[None])
    acc.on_layer(0, a)
    acc.on_layer(0, b)
    both = FrequencyAccumulator(num_prefix=1, grid=(4, 4), blocks=[None])
    both.on_layer(0, torch.cat([a, b]))
    for key in ("log_amplitude_2d", "delta_log_amplitude", "high_freq_energy_ratio"):
        np.testing.assert_allclose(acc.result()[key], both.result()[key], atol=1e-12)
    assert acc.result()["n_images"] == 4
