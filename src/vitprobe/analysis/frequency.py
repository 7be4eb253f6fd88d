"""Frequency analysis: Fourier spectra of the token maps after the patch embedding and after every block.

The analysis of How Do Vision Transformers Work? (Park & Kim 2022, xxxnell/how-do-vits-work
`fourier_analysis.ipynb`), also used by cl-vs-mim and MFF: drop the prefix tokens, reshape the residual
stream to (B, D, h, w), F = log(|fft2| + ε), shift the zero frequency to the centre, average F over images
and channels, read the diagonal from the centre outwards and subtract the zero-frequency value
(Δ log amplitude). The headline per layer is Δ at the highest frequency on that diagonal. We also report a
high-frequency energy ratio. Definitions and the differences to the notebook: docs/analyses.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitprobe.errors import ModelError

EPS = 1e-6  # as in the notebook: log(|F| + eps)

DEFINITIONS: dict[str, str] = {
    "log_amplitude": "mean over images and channels of fftshift(log(|fft2(X)| + eps)), "
    "X = token map (D, h, w)",
    "diagonal": "log_amplitude[c + k, c + k] for k = 0 .. h - c - 1, c = h//2 (the notebook's diag()[h//2:])",
    "frequency": "2k/h along each axis, in units of pi (1.0 = Nyquist)",
    "delta_log_amplitude": "diagonal - diagonal[0] (relative to the zero frequency)",
    "headline": "delta_log_amplitude at the highest frequency (last diagonal entry)",
    "high_freq_energy_ratio": (
        "sum of |fft2(X)|^2 outside the central low-frequency square (|f_y| <= pi/2 and |f_x| <= pi/2) / "
        "sum of |fft2(X)|^2 over all non-zero frequencies; energies summed over images and channels"
    ),
}


@dataclass(frozen=True)
class FrequencyConfig:
    """How `vitprobe analyze frequency` runs; written into frequency.json."""

    model: str  # preset name or timm:NAME
    data: str  # dataset spec, opened with the model's eval transform
    split: str  # split of the dataset to analyse
    out: str  # output directory for frequency.json and the figures
    checkpoint: str | None = None  # weights file for the preset; None = the preset's default weights
    random_init: bool = False  # random weights: the baseline that shows what training changed
    limit: int | None = 1000  # images (evenly spaced over the split); None = all
    batch_size: int = 32  # images per forward
    num_workers: int = 4  # DataLoader workers decoding images
    device: str = "auto"  # CUDA when available
    compare: tuple[str, ...] = ()  # earlier run directories overlaid on the headline figure
    seed: int = 0  # seeds torch before building the model: random-init baselines are reproducible


# ----------------------------------------------------------------------------------------------------
# Spectra


def token_map(tokens: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Drop the prefix tokens and lay the patches out as an image: (B, T, D) -> (B, D, h, w)."""
    B, _, D = tokens.shape
    patches = tokens[:, num_prefix:]  # (B, N, D)
    return patches.reshape(B, grid[0], grid[1], D).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)


def _fft(fmap: Tensor) -> Tensor:
    # float64 (where the device has it) so that exact zeros of the spectrum stay far below eps
    dtype = torch.float32 if fmap.device.type == "mps" else torch.float64
    return torch.fft.fft2(fmap.to(dtype))  # (B, C, h, w) complex


def log_amplitude_sum(fmap: Tensor) -> Tensor:
    """Σ over images and channels of fftshift(log(|fft2| + ε)): (B, C, h, w) -> (h, w); / (B·C) = the mean."""
    log_amp = (_fft(fmap).abs() + EPS).log()  # (B, C, h, w)
    return torch.fft.fftshift(log_amp, dim=(-2, -1)).sum(dim=(0, 1))  # (h, w), zero frequency at (h//2, w//2)


def band_energy(fmap: Tensor) -> tuple[Tensor, Tensor]:
    """Energy |fft2|² summed over images and channels: (high-frequency part, all non-zero frequencies).

    Low frequencies are those with |f| ≤ π/2 along both axes (the central square of half the side of the
    shifted spectrum); everything else is high. The zero frequency (each channel's mean) is excluded
    from the denominator, so the ratio describes the spatial variation only.
    """
    h, w = fmap.shape[-2:]
    power = _fft(fmap).abs().square().sum(dim=(0, 1))  # (h, w), unshifted
    fy = torch.fft.fftfreq(h, device=power.device).abs() * 2  # (h,), |f| in units of pi
    fx = torch.fft.fftfreq(w, device=power.device).abs() * 2  # (w,)
    high = (fy[:, None] > 0.5) | (fx[None, :] > 0.5)  # (h, w)
    return power[high].sum(), power.sum() - power[0, 0]


def diagonal(spectrum: Tensor) -> Tensor:
    """The half-diagonal of a shifted square spectrum (h, h), from the zero frequency outwards: (h - h//2,).

    Exactly the notebook's `latent.diag()[int(h/2):]`: entries (c + k, c + k), c = h//2, k = 0 .. h-c-1, i.e.
    the frequency (2k/h·π, 2k/h·π). For even h the last entry is (h-2)/h·π; the Nyquist corner (π, π)
    is not on this half-diagonal (see docs/analyses.md).
    """
    h, w = spectrum.shape
    if h != w:
        raise ModelError(f"the token grid {h}x{w} is not square", "frequency analysis needs square inputs")
    c = h // 2
    k = torch.arange(h - c, device=spectrum.device)
    return spectrum[c + k, c + k]  # (h - c,)


def diagonal_frequencies(h: int) -> list[float]:
    """Frequency of each half-diagonal entry along each axis, in units of π: 2k/h, k = 0 .. h - h//2 - 1."""
    return [2 * k / h for k in range(h - h // 2)]


# ----------------------------------------------------------------------------------------------------
# The pass


class FrequencyAccumulator:
    """Sums over a pass of the shifted log-amplitude spectra and band energies of every layer; bounded memory.

    Layer 0 is the patch-embedding output (the input of block 1, position embeddings added); layer l is the
    output of block l (residual stream, before the final norm).
    """

    def __init__(self, num_prefix: int, grid: tuple[int, int], depth: int) -> None:
        self.num_prefix, self.grid, self.depth = num_prefix, grid, depth
        self.log_amp = torch.zeros(depth + 1, *grid, dtype=torch.float64)  # (L+1, h, w) sums
        self.high = torch.zeros(depth + 1, dtype=torch.float64)
        self.total = torch.zeros(depth + 1, dtype=torch.float64)
        self.count = torch.zeros(depth + 1, dtype=torch.float64)  # images x channels per layer
        self.n_images = 0

    def on_layer(self, layer: int, tokens: Tensor) -> None:
        """Add one layer's tokens (B, T, D) for one batch."""
        fmap = token_map(tokens, self.num_prefix, self.grid)  # (B, D, h, w)
        self.log_amp[layer] += log_amplitude_sum(fmap).cpu()
        high, total = band_energy(fmap)
        self.high[layer] += high.cpu()
        self.total[layer] += total.cpu()
        self.count[layer] += fmap.shape[0] * fmap.shape[1]
        if layer == 0:
            self.n_images += fmap.shape[0]

    def result(self) -> dict[str, Any]:
        """Per layer: the mean 2-D log-amplitude spectrum, its diagonal, Δ, headline and energy ratio."""
        if self.n_images == 0:
            raise ModelError("no images went through the model", "check --data, --split and --limit")
        spectra = self.log_amp / self.count[:, None, None]  # (L+1, h, w)
        diag = torch.stack([diagonal(s) for s in spectra])  # (L+1, K)
        delta = diag - diag[:, :1]  # (L+1, K)
        return {
            "n_images": self.n_images,
            "frequency": diagonal_frequencies(self.grid[0]),
            "log_amplitude": diag.tolist(),
            "delta_log_amplitude": delta.tolist(),
            "headline": delta[:, -1].tolist(),
            "high_freq_energy_ratio": (self.high / self.total.clamp_min(1e-300)).tolist(),
            "log_amplitude_2d": spectra.tolist(),
        }


@contextmanager
def layer_hooks(model: nn.Module, on_layer: Callable[[int, Tensor], None]) -> Iterator[None]:
    """While active, a forward calls `on_layer(0, input of block 1)` and `on_layer(l, output of block l)`."""
    blocks = list(model.blocks)

    def embed(module: nn.Module, args: tuple, kwargs: dict) -> None:
        on_layer(0, args[0] if args else kwargs["x"])

    handles = [blocks[0].register_forward_pre_hook(embed, with_kwargs=True)]
    for index, blk in enumerate(blocks, start=1):

        def block_out(module: nn.Module, args: tuple, output: Tensor, index: int = index) -> None:
            on_layer(index, output)

        handles.append(blk.register_forward_hook(block_out))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def analyze_frequency(backbone: Any, loader: Any, device: torch.device) -> FrequencyAccumulator:
    """Stream `loader` through `backbone` with layer hooks; return the filled accumulator.

    Args:
        backbone: a `vitprobe.models.Backbone` on `device`, in eval mode.
        loader: yields (images (B, 3, H, W), labels, indices) at the model's input size.
        device: where the forward runs (fp32).
    """
    from vitprobe.analysis import forward_pass

    h, w = backbone.grid
    if h != w:
        raise ModelError(f"the token grid {h}x{w} is not square", "frequency analysis needs square inputs")
    acc = FrequencyAccumulator(backbone.num_prefix_tokens, backbone.grid, backbone.depth)
    with layer_hooks(backbone.model, acc.on_layer):
        forward_pass(backbone, loader, device, description="frequency")
    return acc


@dataclass
class FrequencyRun:
    """What `run_frequency` wrote."""

    json_path: Path
    figures: list[Path]
    result: dict[str, Any]


def run_frequency(config: FrequencyConfig, *, backbone: Any = None) -> FrequencyRun:
    """`vitprobe analyze frequency`: load, stream the subset, write frequency.json and the figures.

    `backbone`: an already loaded `Backbone` that `config` describes (else `config.model` is loaded)."""
    from vitprobe.analysis import open_pass, plots, result_header
    from vitprobe.files import write_json

    run = open_pass(config, "frequency.json", backbone)
    backbone = run.backbone
    acc = analyze_frequency(backbone, run.loader, run.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        **result_header("frequency", run, config, dtype="float32 model, float64 FFT"),
        "definitions": {"eps": EPS, "log": "natural", **DEFINITIONS},
        "layers": ["patch_embed"] + [f"block{i}" for i in range(1, backbone.depth + 1)],
        "depth": list(range(backbone.depth + 1)),
        **acc.result(),
    }
    figures = plots.frequency_figures([result, *run.compared], out)
    result["figures"] = [str(p.relative_to(out)) for p in figures]
    json_path = out / "frequency.json"
    write_json(json_path, result)
    return FrequencyRun(json_path=json_path, figures=figures, result=result)
