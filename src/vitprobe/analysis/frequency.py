"""Frequency analysis: Fourier spectra of the token maps after the patch embedding and after every block.

The analysis of How Do Vision Transformers Work? (Park & Kim 2022, xxxnell/how-do-vits-work
`fourier_analysis.ipynb`), also used by cl-vs-mim and MFF: drop the prefix tokens, reshape the residual
stream to (B, D, h, w), F = log(|fft2| + ε), shift the zero frequency to the centre, average F over images
and channels, read the diagonal from the centre outwards and subtract the zero-frequency value
(Δ log amplitude). The headline per layer is Δ at the highest frequency on that diagonal. We also report a
high-frequency energy ratio. Definitions and the differences to the notebook: docs/analyses.md.

The token maps come from a pass of the backbone (the patch-embedding output and every block's output), or,
with a token cache that holds the blocks' patch tokens (`extract --layers 0,1,...`), from the cache without
running the backbone. Blocks are numbered from 0, as in timm and the token caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vitprobe.analysis.passes import block_output_hooks, forward_pass, select_indices
from vitprobe.analysis.runs import PassConfig, PassInputs
from vitprobe.errors import ModelError, VitprobeError
from vitprobe.progress import progress_bar

if TYPE_CHECKING:
    from vitprobe.cache import TokenCache
    from vitprobe.models import Backbone

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


SOURCES = ("auto", "cache", "backbone")  # where the token maps come from (FrequencyConfig.source)


@dataclass(frozen=True)
class FrequencyConfig(PassConfig):
    """How `vitprobe analyze frequency` runs; written into frequency.json."""

    compare: tuple[str, ...] = ()  # earlier run directories overlaid on the headline figure
    blocks: tuple[int, ...] | None = None  # blocks to analyse (0-based, negative from the end); None = all
    source: str = "auto"  # auto: the --cache's tokens when it holds the blocks, else the backbone


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
    """Sums over a pass of the shifted log-amplitude spectra and band energies of some layers; bounded memory.

    Args:
        num_prefix: prefix tokens ([cls], registers) before the patches in the token rows fed in.
        grid: (h, w) patch grid.
        blocks: the block each layer position is, in order; None = the patch-embedding output (the input of
            block 0, position embeddings added). A block's layer is its output (residual stream, before the
            final norm).
    """

    def __init__(self, num_prefix: int, grid: tuple[int, int], blocks: Sequence[int | None]) -> None:
        self.num_prefix, self.grid, self.blocks = num_prefix, grid, list(blocks)
        n = len(self.blocks)
        self.log_amp = torch.zeros(n, *grid, dtype=torch.float64)  # (n, h, w) sums
        self.high = torch.zeros(n, dtype=torch.float64)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)  # images x channels per layer
        self.n_images = 0

    @property
    def layers(self) -> list[str]:
        """Layer names: "patch_embed" and "block{b}" (0-based)."""
        return ["patch_embed" if b is None else f"block{b}" for b in self.blocks]

    def on_layer(self, position: int, tokens: Tensor) -> None:
        """Add the tokens (B, T, D) of the layer at `position` for one batch; images count at position 0."""
        fmap = token_map(tokens, self.num_prefix, self.grid)  # (B, D, h, w)
        self.log_amp[position] += log_amplitude_sum(fmap).cpu()
        high, total = band_energy(fmap)
        self.high[position] += high.cpu()
        self.total[position] += total.cpu()
        self.count[position] += fmap.shape[0] * fmap.shape[1]
        if position == 0:
            self.n_images += fmap.shape[0]

    def result(self) -> dict[str, Any]:
        """Per layer: the mean 2-D log-amplitude spectrum, its diagonal, Δ, headline and energy ratio."""
        if self.n_images == 0:
            raise ModelError("no images went through the model", "check --data, --split and --limit")
        spectra = self.log_amp / self.count[:, None, None]  # (n, h, w)
        diag = torch.stack([diagonal(s) for s in spectra])  # (n, K)
        delta = diag - diag[:, :1]  # (n, K)
        return {
            "n_images": self.n_images,
            "layers": self.layers,
            "blocks": list(self.blocks),
            "frequency": diagonal_frequencies(self.grid[0]),
            "log_amplitude": diag.tolist(),
            "delta_log_amplitude": delta.tolist(),
            "headline": delta[:, -1].tolist(),
            "high_freq_energy_ratio": (self.high / self.total.clamp_min(1e-300)).tolist(),
            "log_amplitude_2d": spectra.tolist(),
        }


def resolve_blocks(blocks: Sequence[int] | None, depth: int) -> list[int]:
    """0-based block indices: all of them for None, negative ones counted from the end (-1 = last)."""
    if blocks is None:
        return list(range(depth))
    out = []
    for b in blocks:
        if not -depth <= b < depth:
            raise VitprobeError(
                f"--blocks {b}: the model has {depth} blocks (0..{depth - 1})", "e.g. --blocks 0,5,-1"
            )
        out.append(b % depth)
    return sorted(set(out))


def _square(grid: tuple[int, int]) -> None:
    if grid[0] != grid[1]:
        raise ModelError(
            f"the token grid {grid[0]}x{grid[1]} is not square", "frequency analysis needs square inputs"
        )


def analyze_frequency(
    backbone: Any, loader: Any, device: torch.device, *, blocks: Sequence[int] | None = None
) -> FrequencyAccumulator:
    """Stream `loader` through `backbone` with block hooks; return the filled accumulator.

    Args:
        backbone: a `vitprobe.models.Backbone` on `device`, in eval mode.
        loader: yields (images (B, 3, H, W), labels, indices) at the model's input size.
        device: where the forward runs (fp32).
        blocks: 0-based blocks to keep besides the patch embedding; None = every block.
    """
    _square(backbone.grid)
    wanted = resolve_blocks(blocks, backbone.depth)
    acc = FrequencyAccumulator(backbone.num_prefix_tokens, backbone.grid, [None, *wanted])
    position = {b: i + 1 for i, b in enumerate(wanted)}

    def on_output(block: int, tokens: Tensor) -> None:
        if block in position:
            acc.on_layer(position[block], tokens)

    with block_output_hooks(backbone.model, on_output, on_embedding=lambda t: acc.on_layer(0, t)):
        forward_pass(backbone, loader, device, description="frequency")
    return acc


def cache_rows(cache: TokenCache, limit: int | None) -> list[int]:
    """Cache rows of `limit` evenly spaced images (view 0 rows only), in cache order."""
    views = cache.view_ids()  # (N,)
    rows = torch.nonzero(views == 0).flatten().tolist()
    return [rows[i] for i in select_indices(len(rows), limit)]


def frequency_from_cache(
    cache: TokenCache, blocks: Sequence[int], rows: Sequence[int], *, batch_size: int, device: torch.device
) -> FrequencyAccumulator:
    """The spectra of `blocks` from the patch tokens a cache stores, for the cache rows `rows`.

    Each shard read is checked against its sha256 first (`TokenCache.verify_shard`), as probing does.
    """
    _square(cache.grid)
    layer_pos = [cache.layers.index(b) for b in blocks]
    multi = len(cache.layers) > 1
    acc = FrequencyAccumulator(0, cache.grid, list(blocks))
    keep = torch.zeros(cache.num_samples, dtype=torch.bool)
    keep[list(rows)] = True
    with progress_bar(len(rows), "frequency (cache)") as advance:
        for i, shard in enumerate(cache.shards):
            mine = keep[shard.start : shard.stop]  # (n,)
            if not mine.any():
                continue
            cache.verify_shard(i)
            for a in range(0, len(mine), batch_size):
                pick = mine[a : a + batch_size]
                if not pick.any():
                    continue
                patches = cache.read_shard(i, ["patches"], rows=slice(a, a + len(pick)))["patches"][pick]
                patches = patches.to(device)  # (b, L, P, D) or (b, P, D)
                for j, lp in enumerate(layer_pos):
                    acc.on_layer(j, patches[:, lp] if multi else patches)  # (b, P, D)
                advance(int(pick.sum()))
    return acc


def choose_source(config: FrequencyConfig, inputs: PassInputs) -> tuple[str, str | None]:
    """("cache" or "backbone", a note saying why) for `config.source` and what the cache holds."""
    if config.source not in SOURCES:
        raise VitprobeError(f"--source {config.source!r}", f"use one of {', '.join(SOURCES)}")
    cache = inputs.cache
    if cache is None:
        if config.source == "cache":
            raise VitprobeError("--source cache needs --cache DIR", "pass the token cache, or --source auto")
        return "backbone", None
    if config.source == "backbone":
        return "backbone", "ran the backbone (--source backbone), on the cache's images"
    depth = int(cache.manifest["depth"])
    wanted = resolve_blocks(config.blocks, depth)
    missing = [b for b in wanted if b not in cache.layers]
    every = f"--layers {','.join(map(str, wanted))} --tokens all"
    if cache.tokens != "all":
        problem = f"the cache {cache.path} holds {cache.tokens} tokens, not the patch tokens"
    elif missing:
        problem = f"the cache {cache.path} holds blocks {cache.layers}, not {missing}"
    else:
        return "cache", (
            f"token maps read from the cache (stored as {cache.store_dtype}, computed in "
            f"{cache.manifest.get('compute_dtype')}); the patch embedding is not cached, so its layer is "
            "left out (--source backbone adds it)"
        )
    if config.source == "cache":
        raise VitprobeError(f"--source cache: {problem}", f"extract it with {every}, or use --source auto")
    return "backbone", f"ran the backbone: {problem} (a cache extracted with {every} is read instead)"


@dataclass
class FrequencyRun:
    """What `run_frequency` wrote."""

    json_path: Path
    figures: list[Path]
    result: dict[str, Any]


def run_frequency(config: FrequencyConfig, *, backbone: Backbone | None = None) -> FrequencyRun:
    """`vitprobe analyze frequency`: spectra from the cache or a backbone pass; frequency.json and figures.

    An earlier frequency.json in `config.out` is refused unless `config.overwrite`; files are written
    atomically, frequency.json last.
    """
    from vitprobe.analysis import plots
    from vitprobe.analysis.runs import (
        backbone_info,
        cache_backbone_info,
        check_out,
        manifest_model,
        open_pass,
        read_results,
        resolve_inputs,
        result_header,
    )
    from vitprobe.devices import resolve_device
    from vitprobe.files import write_json
    from vitprobe.results import validate

    out = check_out(config.out, "frequency.json", overwrite=config.overwrite)
    compared = read_results(config.compare, "frequency.json")
    inputs = resolve_inputs(config)
    source, note = choose_source(config, inputs)
    if source == "cache":
        cache = inputs.cache
        assert cache is not None
        device = resolve_device(config.device)
        rows = cache_rows(cache, config.limit)
        blocks = resolve_blocks(config.blocks, int(cache.manifest["depth"]))
        acc = frequency_from_cache(cache, blocks, rows, batch_size=config.batch_size, device=device)
        made = cache.manifest["dataset"]
        header = result_header(
            "frequency",
            config,
            inputs,
            model=manifest_model(cache),
            backbone=cache_backbone_info(cache),
            data={
                "spec": made["spec"],
                "split": made["split"],
                "fingerprint": made.get("fingerprint"),
                "size": None,  # the split is not opened: the cache's tokens are read
                "n_images": len(rows),
                "selection": f"{len(rows)} evenly spaced of the cache's {made.get('num_images')} images",
            },
            device=str(device),
            dtype=f"tokens stored as {cache.store_dtype}, float64 FFT",
        )
    else:
        run = open_pass(config, "frequency.json", inputs=inputs, compared=compared, backbone=backbone)
        acc = analyze_frequency(run.backbone, run.loader, run.device, blocks=config.blocks)
        header = result_header(
            "frequency",
            config,
            inputs,
            model=run.backbone.report.to_dict(),
            backbone=backbone_info(run.backbone),
            data=run.data_info,
            device=str(run.device),
            dtype="float32 model, float64 FFT",
        )
    result = {
        **header,
        "definitions": {
            "eps": EPS,
            "log": "natural",
            "blocks": "0-based block indices (timm's model.blocks[i], the caches' layers); "
            "null = the patch embedding",
            **DEFINITIONS,
        },
        "source": source,
        **acc.result(),
        "notes": [note] if note else [],
    }
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.frequency_figures([result, *compared], out)
    result["figures"] = [str(p.relative_to(out)) for p in figures]
    json_path = out / "frequency.json"
    result = validate("frequency", result)
    write_json(json_path, result)
    return FrequencyRun(json_path=json_path, figures=figures, result=result)
