"""Report figures, drawn from the report model as small SVGs (text kept as text), each naming its runs.

Every figure appears once: the cross-run curves (attention per block, frequency per layer, spectra) are
drawn here from the numbers, so the analyses' own curve figures are not embedded; the map grids and box
figures the analyses wrote are embedded once each, downscaled to at most `MAX_EMBED_PX` wide. Axes are
fixed by what the quantity can be (shares in [0, 1], entropies up to ln N, accuracy 0-100 %), with the
uniform-attention reference drawn dashed, so noise around a reference does not fill the plot as structure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitprobe.report.model import Report, RunSummary

DEPTH_FIGURE = "accuracy_vs_depth.svg"  # shown in its own section, not with the other cross-run curves
MAX_EMBED_PX = 800  # embedded PNGs wider than this are downscaled (sharp at the page's width, small)
_RC = {
    "svg.fonttype": "none",  # text stays text: small files, searchable, selectable
    "svg.hashsalt": "vitprobe-report",
    "font.size": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
ATTENTION_PANELS = (  # stat, title, y label
    ("cls_self", "[cls] self-attention A[0,0]", "share of attention"),
    ("cls_entropy", "[cls] entropy over patches", "entropy (nats)"),
    ("patch_entropy", "patch entropy (mean over patches)", "entropy (nats)"),
    ("attention_distance", "mean attention distance", "distance (pixels)"),
)


@dataclass(frozen=True)
class Figure:
    """One image of the report: bytes, a caption, the run it belongs to (None: several) and its legend."""

    name: str  # file name next to a Markdown report
    title: str  # caption; names the run(s)
    data: bytes
    mime: str = "image/svg+xml"
    run: str | None = None
    legend: tuple[str, ...] = ()  # the legend's entries (and title), each naming a run


def colours(report: Report) -> dict[str, Any]:
    """One colour per run, the same in every figure."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {r.label: palette[i % len(palette)] for i, r in enumerate(report.runs)}


def make_figures(report: Report) -> list[Figure]:
    """Every figure of the report, in page order."""
    out: list[Figure] = []
    for maker in (depth_figure, attention_figure, frequency_figure, spectrum_figure):
        fig = maker(report)
        if fig is not None:
            out.append(fig)
    for run in report.runs:
        fig = learning_curve_figure(report, run)
        if fig is not None:
            out.append(fig)
    for i, run in enumerate(report.runs):
        out += [embedded(run, rel, i) for rel in run.figure_files]
    return out


def _svg(fig: Any) -> bytes:
    from matplotlib import rc_context

    buf = io.BytesIO()
    with rc_context(_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib import rc_context
    from matplotlib.figure import Figure as MplFigure

    with rc_context(_RC):
        fig = MplFigure(figsize=(width, height), dpi=100)
        axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


def _block_axis(ax: Any, labels: Sequence[str], xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def attention_figure(report: Report) -> Figure | None:
    """Per-block attention statistics of every run, one panel per statistic, uniform references dashed."""
    runs = [r for r in report.runs if r.attention is not None]
    if not runs:
        return None
    panels = [p for p in ATTENTION_PANELS if any(p[0] in r.attention.series for r in runs)]  # type: ignore[union-attr]
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = _figure(4.2 * cols, 2.6 * rows + 0.5, rows, cols)
    colour = colours(report)
    for ax, (stat, title, ylabel) in zip(axes, panels, strict=False):
        top = 0.0
        for run in runs:
            curves = run.attention
            assert curves is not None
            if stat not in curves.series:
                continue
            ys = curves.series[stat]
            ax.plot(curves.blocks, ys, marker="o", markersize=2.5, color=colour[run.label], label=run.label)
            ref = curves.references.get(stat)
            if ref is not None:
                ax.axhline(ref, color=colour[run.label], linestyle=":", linewidth=1)
            top = max(top, *ys, ref or 0.0)
        ax.set_title(title, fontsize=8)
        ax.set_ylabel(ylabel)
        _block_axis(ax, [], "block (0-based)")
        ax.set_ylim(0.0, 1.0 if stat == "cls_self" else top * 1.08 or 1.0)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    legend = [r.label for r in runs]
    _run_legend(fig, axes[0], legend, note="dotted: uniform attention (1/T, ln N, mean patch distance)")
    names = ", ".join(legend)
    return Figure("attention_per_block.svg", f"Attention per block: {names}", _svg(fig), legend=tuple(legend))


def _run_legend(fig: Any, ax: Any, labels: Sequence[str], *, note: str | None = None) -> None:
    """One legend under the panels: a line per run (and a note on the reference lines)."""
    handles, names = ax.get_legend_handles_labels()
    seen = dict(zip(names, handles, strict=True))
    entries = [(seen[n], n) for n in labels if n in seen]
    if note:
        from matplotlib.lines import Line2D

        entries.append((Line2D([], [], color="grey", linestyle=":"), note))
    fig.legend(
        [h for h, _ in entries],
        [n for _, n in entries],
        loc="lower center",
        frameon=False,
        ncol=min(len(entries), 3),
        fontsize=7,
        title="run",
        title_fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(entries) - 1) // 3), 1, 1))


def frequency_figure(report: Report) -> Figure | None:
    """High-frequency energy ratio and Δ log amplitude at the highest frequency, per layer, every run."""
    runs = [r for r in report.runs if r.frequency is not None]
    if not runs:
        return None
    fig, (ratio_ax, head_ax) = _figure(8.4, 3.1, 1, 2)
    colour = colours(report)
    low = high = 0.0
    for run in runs:
        curves = run.frequency
        assert curves is not None
        xs = list(range(len(curves.labels)))
        kw = {"marker": "o", "markersize": 2.5, "color": colour[run.label], "label": run.label}
        ratio_ax.plot(xs, curves.series["high_freq_energy_ratio"], **kw)
        head_ax.plot(xs, curves.series["headline"], **kw)
        low, high = min(low, *curves.series["headline"]), max(high, *curves.series["headline"])
    labels = runs[0].frequency.labels  # type: ignore[union-attr]
    for ax in (ratio_ax, head_ax):
        step = max(1, len(labels) // 10)
        ax.set_xticks(list(range(0, len(labels), step)), labels[::step])
        ax.set_xlabel("layer (embed = patch embedding, then block, 0-based)")
    ratio_ax.set_title("high-frequency energy ratio", fontsize=8)
    ratio_ax.set_ylim(0.0, 1.0)
    head_ax.set_title("Δ log amplitude at the highest frequency", fontsize=8)
    head_ax.axhline(0.0, color="grey", linewidth=0.8)
    pad = 0.08 * max(high - low, 1e-6)
    head_ax.set_ylim(low - pad, high + pad)
    legend = [r.label for r in runs]
    _run_legend(fig, ratio_ax, legend)
    names = ", ".join(legend)
    return Figure("frequency_per_layer.svg", f"Frequency per layer: {names}", _svg(fig), legend=tuple(legend))


def spectrum_figure(report: Report) -> Figure | None:
    """Δ log amplitude vs frequency per layer (colour = depth), one panel per run, shared y axis."""
    from matplotlib import colormaps

    runs = [r for r in report.runs if r.spectrum is not None]
    if not runs:
        return None
    fig, axes = _figure(3.2 * len(runs), 2.8, 1, len(runs))
    low = min(min(map(min, r.spectrum.delta_log_amplitude)) for r in runs)  # type: ignore[union-attr]
    for ax, run in zip(axes, runs, strict=True):
        s = run.spectrum
        assert s is not None
        cmap = colormaps["plasma"]
        for i, (layer, ys) in enumerate(zip(s.layers, s.delta_log_amplitude, strict=True)):
            ax.plot(
                s.frequencies[: len(ys)],
                ys,
                color=cmap(i / max(len(s.layers) - 1, 1)),
                linewidth=1,
                label=layer if i in (0, len(s.layers) - 1) else None,
            )
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(min(low * 1.08, -0.05), 0.05 * abs(low) + 0.01)
        ax.set_title(run.label, fontsize=8)
        ax.set_xlabel("frequency (π)")
        ax.legend(fontsize=6, title=run.label, title_fontsize=6, loc="lower left")
    axes[0].set_ylabel("Δ log amplitude")
    fig.tight_layout()
    legend = [r.label for r in runs]
    return Figure(
        "frequency_spectra.svg",
        "Δ log amplitude vs frequency per layer (colour: depth): " + ", ".join(legend),
        _svg(fig),
        legend=tuple(legend),
    )


def depth_figure(report: Report) -> Figure | None:
    """Per-layer sweeps: test top-1 per block, a panel per read-out (95 % intervals shaded, a hollow marker
    where the block's read-out has a health warning), then the [cls] self-attention and high-frequency
    energy of the same blocks where those runs have the analyses. One colour per run."""
    runs = [r for r in report.runs if r.depth]
    if not runs:
        return None
    pools = list(dict.fromkeys(c.pool for r in runs for c in r.depth))
    swept = {b for r in runs for c in r.depth for b in c.blocks}
    extra = [
        (name, title, ylabel)
        for name, title, ylabel, present in (
            ("cls_self", "[cls] self-attention A[0,0]", "share of attention",
             any(r.attention and "cls_self" in r.attention.series for r in runs)),
            ("high_freq_energy_ratio", "high-frequency energy ratio", "ratio",
             any(r.frequency for r in runs)),
        )
        if present
    ]  # fmt: skip
    panels = len(pools) + len(extra)
    cols = min(panels, 3)
    rows = (panels + cols - 1) // cols
    fig, axes = _figure(3.2 * cols, 2.5 * rows + 0.5, rows, cols)
    colour = colours(report)
    for ax, pool in zip(axes, pools, strict=False):
        for run in runs:
            curve = next((c for c in run.depth if c.pool == pool), None)
            if curve is None:
                continue
            c = colour[run.label]
            ax.fill_between(curve.blocks, [lo for lo, _ in curve.ci], [hi for _, hi in curve.ci], color=c,
                            alpha=0.15, linewidth=0)  # fmt: skip
            ax.plot(curve.blocks, curve.top1, marker="o", markersize=3, color=c, label=run.label)
            bad = [(b, t) for b, t, f in zip(curve.blocks, curve.top1, curve.flagged, strict=True) if f]
            if bad:
                ax.plot(*zip(*bad, strict=True), "o", markersize=6, markerfacecolor="white", color=c)
        ax.set_title(f"{pool}: test top-1", fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0.0, 100.0)
    for ax, (name, title, ylabel) in zip(axes[len(pools) :], extra, strict=False):
        for run in runs:
            curves = run.attention if name == "cls_self" else run.frequency
            if curves is None or name not in curves.series:
                continue
            points = [(b, y) for b, y in zip(curves.blocks, curves.series[name], strict=True) if b in swept]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, color=colour[run.label],
                        label=run.label)  # fmt: skip
        ax.set_title(title, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0.0, 1.0)
    for ax in axes[:panels]:
        ax.set_xlim(min(swept) - 0.5, max(swept) + 0.5)
        _block_axis(ax, [], "block (0-based)")
    for ax in axes[panels:]:
        ax.set_visible(False)
    legend = [r.label for r in runs]
    _run_legend(fig, axes[0], legend)
    names = ", ".join(legend)
    return Figure(DEPTH_FIGURE, f"Accuracy vs depth: {names}", _svg(fig), legend=tuple(legend))


def learning_curve_figure(report: Report, run: RunSummary) -> Figure | None:
    """Selection-split (solid) and test (dashed) top-1 per epoch of each read-out at its chosen lr."""
    if not run.learning_curves:
        return None
    from matplotlib import colormaps

    fig, (ax,) = _figure(5.0, 2.9)
    palette = colormaps["tab10"].colors
    for i, c in enumerate(run.learning_curves):
        colour = palette[i % len(palette)]
        nan = float("nan")
        ax.plot(
            c.epoch,
            [nan if v is None else v for v in c.selection],
            color=colour,
            linewidth=1.2,
            label=f"{c.readout} ({c.selection_split}, blr {c.blr:g})",
        )
        if c.selection_split != "test":
            ax.plot(
                c.epoch,
                [nan if v is None else v for v in c.test],
                color=colour,
                linestyle="--",
                linewidth=1,
                label=f"{c.readout} (test)",
            )
    if run.num_classes:
        ax.axhline(100.0 / run.num_classes, color="grey", linestyle=":", linewidth=1, label="chance (1/C)")
    ax.set_ylim(0.0, 100.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=6, title=run.label, title_fontsize=7, loc="best")
    fig.tight_layout()
    slug = _slug(run.label)
    return Figure(
        f"learning_curves_{slug}.svg",
        f"{run.label}: learning curves at the chosen learning rate",
        _svg(fig),
        run=run.label,
        legend=(run.label,),
    )


def embedded(run: RunSummary, rel: str, index: int) -> Figure:
    """A figure file an analysis wrote, embedded once (PNGs downscaled to MAX_EMBED_PX wide)."""
    path = Path(run.path) / rel
    data = path.read_bytes()
    mime = "image/svg+xml" if path.suffix.lower() == ".svg" else "image/png"
    if mime == "image/png":
        data = downscale_png(data, MAX_EMBED_PX)
    title = f"{run.label}: {path.stem.replace('_', ' ')}"
    return Figure(f"run{index}_{path.name}", title, data, mime=mime, run=run.label, legend=(run.label,))


def downscale_png(data: bytes, max_width: int) -> bytes:
    """The PNG at most `max_width` pixels wide (Lanczos) with an adaptive 256-colour palette, or the
    original bytes when that is not smaller (plots and heat-map overlays lose nothing visible)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    if rgb.width > max_width:
        rgb = rgb.resize((max_width, round(rgb.height * max_width / rgb.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue() if buf.tell() < len(data) else data


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "run"
