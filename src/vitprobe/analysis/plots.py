"""Analysis figures: draw attention and frequency results (the JSON dicts, never a model) as PNG + SVG.

Everything here reads what `vitprobe analyze` wrote (attention.json, attention_maps.safetensors,
frequency.json), so the report can redraw figures without recomputing. No pyplot state: each function
builds a `matplotlib.figure.Figure` (Agg canvas), and `save_figure` writes it atomically. No torch.
Blocks are numbered from 0 (the results' `blocks`); the patch-embedding layer of frequency.json is drawn at
x = -1, labelled "emb".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, MaxNLocator

from vitprobe.files import atomic_path

FORMATS = ("png", "svg")
_RC = {
    "svg.hashsalt": "vitprobe",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}  # deterministic SVG ids
_COLORS = colormaps["tab10"].colors

# (panel title, y label, [(stat, line style, legend suffix)])
ATTENTION_PANELS: tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...] = (
    ("[cls] self-attention A[0,0]", "attention share", (("cls_self", "-", ""),)),
    (
        "Attention entropy over patch keys",
        "entropy (nats)",
        (("cls_entropy", "-", " [cls]"), ("patch_entropy", "--", " patches")),
    ),
    ("Mean attention distance", "distance (pixels)", (("attention_distance", "-", ""),)),
)


def save_figure(fig: Figure, stem: Path, formats: Sequence[str] = FORMATS, *, dpi: int = 200) -> list[Path]:
    """Write `fig` to `stem.png` and `stem.svg` (atomically, reproducible bytes for SVG); return the paths."""
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with rc_context(_RC), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=_metadata(fmt))
        paths.append(path)
    return paths


def _metadata(fmt: str) -> dict[str, Any]:
    return {"Date": None} if fmt == "svg" else {}


def _title(results: Sequence[Mapping[str, Any]], what: str) -> str:
    if len(results) == 1:
        return f"{what}: {results[0]['label']}"
    return f"{what}: " + " vs ".join(r["label"] for r in results)


def _subtitle(results: Sequence[Mapping[str, Any]]) -> str:
    data = results[0]["data"]
    return f"{data['spec']} [{data['split']}], n = {results[0]['n_images']} images"


# ----------------------------------------------------------------------------------------------------
# Attention


def attention_curves(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Per-block curves (head means) of [cls] self-attention, entropies and attention distance, per model.

    Per-head values of the attention distance are drawn as faint dots. Models without [cls] leave the
    [cls] curves out.
    """
    with rc_context(_RC):
        fig = Figure(figsize=(11, 3.4), layout="constrained")
        axes = fig.subplots(1, len(ATTENTION_PANELS))
        for ax, (title, ylabel, lines) in zip(axes, ATTENTION_PANELS, strict=False):
            for color, result in zip(_COLORS, results, strict=False):
                blocks = np.asarray(result["blocks"])
                for stat, style, suffix in lines:
                    if stat not in result["stats"]:
                        continue
                    entry = result["stats"][stat]
                    label = (
                        f"{result['label']}{suffix}"
                        if len(results) > 1
                        else suffix.strip() or result["label"]
                    )
                    ax.plot(blocks, entry["mean"], style, color=color, marker="o", ms=3, label=label)
                    if stat == "attention_distance" and entry["per_head"] is not None:
                        per_head = np.asarray(entry["per_head"])  # (L, H)
                        xs = np.repeat(blocks, per_head.shape[1])  # (L*H,)
                        ax.scatter(xs, per_head.reshape(-1), s=6, color=color, alpha=0.35, linewidths=0)
            ax.set_title(title)
            ax.set_xlabel("block (from 0)")
            ax.set_ylabel(ylabel)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.ticklabel_format(axis="y", useOffset=False)
            if len(ax.lines) > 1:  # one line: the title names the model
                ax.legend(fontsize=7)
        fig.suptitle(f"{_title(results, 'Attention')}\n{_subtitle(results)}", fontsize=10)
    return fig


def attention_maps_grid(maps: Mapping[str, Any], *, title: str) -> Figure:
    """Images with their last-block [cls]→patch attention (heads averaged) and, when present, rollout maps.

    Args:
        maps: arrays from attention_maps.safetensors: "images" (K, 3, H, W) uint8, "cls_attention_last"
            (K, h, w) and optionally "rollout" (K, h, w).
        title: figure title (say "random weights" for random-init runs).
    """
    images = np.asarray(maps["images"])  # (K, 3, H, W)
    rows = [("image", None), ("[cls]→patch, last block", "cls_attention_last")]
    if "rollout" in maps:
        rows.append(("[cls]→patch, rollout", "rollout"))
    k = images.shape[0]
    with rc_context({**_RC, "axes.grid": False}):
        fig = Figure(figsize=(1.6 * k + 0.8, 1.7 * len(rows)), layout="constrained")
        axes = np.asarray(fig.subplots(len(rows), k, squeeze=False))
        for col in range(k):
            image = images[col].transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
            height, width = image.shape[:2]
            for row, (label, key) in enumerate(rows):
                ax = axes[row, col]
                ax.imshow(image, alpha=1.0 if key is None else 0.45)
                if key is not None:
                    attn = np.asarray(maps[key][col], dtype=np.float64)  # (h, w)
                    ax.imshow(
                        attn,
                        cmap="inferno",
                        alpha=0.7,
                        extent=(0, width, height, 0),
                        interpolation="nearest",
                        vmin=attn.min(),
                        vmax=attn.max(),
                    )
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(label, fontsize=7)
        fig.colorbar(
            ScalarMappable(Normalize(0, 1), "inferno"),
            ax=axes[1:, :].ravel().tolist(),
            shrink=0.8,
            label="attention (per-image min–max)",
        )
        fig.suptitle(title, fontsize=10)
    return fig


def attention_figures(
    results: Sequence[Mapping[str, Any]], out: Path, *, maps: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write attention_curves.{png,svg} (all results overlaid) and attention_maps.{png,svg} (the first)."""
    paths = save_figure(attention_curves(results), out / "attention_curves")
    if maps is not None and "cls_attention_last" in maps:
        title = f"[cls] attention maps: {results[0]['label']}"
        paths += save_figure(attention_maps_grid(maps, title=title), out / "attention_maps", dpi=150)
    return paths


def load_maps(path: str | Path) -> dict[str, np.ndarray]:
    """Read attention_maps.safetensors into numpy arrays (no torch needed)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------------
# Frequency


_LAYER_FORMAT = FuncFormatter(lambda v, _: "emb" if round(v) == -1 else f"{v:g}")


def layer_positions(result: Mapping[str, Any]) -> np.ndarray:
    """x of each layer of a frequency result: its block index (from 0), -1 for the patch embedding (null)."""
    return np.asarray([-1 if b is None else b for b in result["blocks"]], dtype=np.float64)


def _block_axis(results: Sequence[Mapping[str, Any]]) -> str:
    with_embedding = any(b is None for r in results for b in r["blocks"])
    return "block (from 0; emb = patch embedding)" if with_embedding else "block (from 0)"


def frequency_spectrum(result: Mapping[str, Any]) -> Figure:
    """Δ log amplitude vs normalised frequency (0…π), one line per layer coloured by depth."""
    delta = np.asarray(result["delta_log_amplitude"])  # (n_layers, K)
    freq = np.asarray(result["frequency"])  # (K,)
    xs = layer_positions(result)  # (n_layers,)
    lo, hi = float(xs.min()), float(max(xs.max(), xs.min() + 1))
    cmap = colormaps["plasma"]
    with rc_context(_RC):
        fig = Figure(figsize=(4.6, 3.8), layout="constrained")
        ax = fig.subplots()
        for layer in range(len(delta) - 1, -1, -1):  # shallow layers drawn last, on top
            ax.plot(freq, delta[layer], color=cmap((xs[layer] - lo) / (hi - lo)), lw=1.4)
        ax.set_xlim(0, 1)
        ax.set_xlabel("normalised frequency (diagonal)")
        ax.set_ylabel("Δ log amplitude (nats, vs zero frequency)")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.1fπ"))
        label = _block_axis([result])
        bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap), ax=ax, label=label)
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar.ax.yaxis.set_major_formatter(_LAYER_FORMAT)
        fig.suptitle(f"{_title([result], 'Fourier spectrum')}\n{_subtitle([result])}", fontsize=9)
    return fig


def frequency_headline(results: Sequence[Mapping[str, Any]]) -> Figure:
    """Headline (Δ log amplitude at the highest frequency) and high-frequency energy ratio vs depth."""
    with rc_context(_RC):
        fig = Figure(figsize=(8.5, 3.4), layout="constrained")
        ax_head, ax_ratio = fig.subplots(1, 2)
        for color, result in zip(_COLORS, results, strict=False):
            xs = layer_positions(result)
            ax_head.plot(xs, result["headline"], "-o", ms=3, color=color, label=result["label"])
            ratio = result["high_freq_energy_ratio"]
            ax_ratio.plot(xs, ratio, "-o", ms=3, color=color, label=result["label"])
        ax_head.set_title("High-frequency log amplitude")
        highest = {round(r["frequency"][-1], 4) for r in results}
        at = f"{highest.pop():.2f}π" if len(highest) == 1 else "the highest frequency"
        ax_head.set_ylabel(f"Δ log amplitude at {at} (nats)")
        ax_ratio.set_title("High-frequency energy ratio")
        ax_ratio.set_ylabel("energy above π/2 / non-DC energy")
        for ax in (ax_head, ax_ratio):
            ax.set_xlabel(_block_axis(results))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_formatter(_LAYER_FORMAT)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.legend(fontsize=7)
        fig.suptitle(f"{_title(results, 'Frequency')}\n{_subtitle(results)}", fontsize=10)
    return fig


def frequency_figures(results: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """Write frequency_spectrum.{png,svg} (the first result) and frequency_headline.{png,svg} (all)."""
    paths = save_figure(frequency_spectrum(results[0]), out / "frequency_spectrum")
    paths += save_figure(frequency_headline(results), out / "frequency_headline")
    return paths
