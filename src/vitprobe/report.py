"""Reports: run directories' result JSONs → one HTML / Markdown / JSON / CI-summary report; never recomputes.

A run directory holds any of `results.json` (probing), `knn.json`, `attention.json`, `frequency.json` and
`localization.json`, plus the figures those commands wrote. `collect_report()` reads them into one
machine-readable dict (documented in docs/report-format.md); the `render_*` functions turn it into text.
Missing files are skipped with a note; unknown keys are ignored, so the report keeps working as the result
schemas grow. Figures are drawn with matplotlib's object API (no pyplot state) from the numbers in the JSONs,
and figure files the commands already wrote are embedded as they are.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vitprobe import __version__
from vitprobe.errors import VitprobeError
from vitprobe.files import atomic_write, read_json

REPORT_FORMAT = "vitprobe-report"
REPORT_VERSION = 1  # bump when a key of the report JSON changes meaning
RESULT_FILES = ("results.json", "knn.json", "attention.json", "frequency.json", "localization.json")
FORMATS = ("html", "md", "json", "github")
RANDOM_INIT_WARNING = (
    "RANDOM WEIGHTS: at least one backbone in this report was built with --random-init. Its numbers say "
    "nothing about any pretrained model; they only show that the pipeline runs."
)
WEAKEST_CLASSES = 5  # per read-out, in the weakest-classes table
MAX_RUN_FIGURES = 12  # figure files embedded per run
PRINT_DPI = 200  # drawn figures: 1200 px wide, shown at 520 px in the HTML, sharp when printed


class ReportError(VitprobeError):
    """Run directories that hold nothing to report, or an output that cannot be written."""


@dataclass(frozen=True)
class ReportConfig:
    """How `vitprobe report` runs."""

    runs: tuple[str, ...]  # run directories (or result JSON files) to read, one model per run usually
    out: str | None = (
        None  # output file; None: report.<ext> in the working directory (github: stdout/summary)
    )
    format: str = "html"  # html (self-contained), md (figures next to it), json, github (CI job summary)
    title: str = "vitprobe report"  # the page title


# ------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Figure:
    """One image for the report: PNG/SVG bytes, a title and the run it belongs to (None: cross-model)."""

    name: str  # file name to use when written next to a Markdown report
    title: str
    data: bytes
    mime: str = "image/png"
    run: str | None = None


@dataclass
class _Run:
    name: str
    path: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _read_run(path: Path) -> _Run:
    if path.is_file():  # a single result file
        run = _Run(name=path.parent.name or str(path), path=path.parent)
        candidates = [path]
    elif path.is_dir():
        run = _Run(name=path.name or str(path), path=path)
        candidates = [path / f for f in RESULT_FILES]
    else:
        raise ReportError(
            f"{path}: no such run directory", "pass the --out directory of a probe or analyze run"
        )
    for file in candidates:
        if not file.is_file():
            run.notes.append(f"{file.name} not found: skipped")
            continue
        try:
            data = read_json(file)
        except (OSError, ValueError) as exc:
            run.notes.append(f"{file.name} could not be read ({exc}): skipped")
            continue
        if not isinstance(data, dict):
            run.notes.append(f"{file.name} is not a JSON object: skipped")
            continue
        run.files[file.name] = data
    if not run.files:
        unreadable = [n for n in run.notes if not n.endswith("not found: skipped")]
        if unreadable:  # the files are there but broken: say which and why, not "none found"
            why = "; ".join(n.removesuffix(": skipped") for n in unreadable)
            raise ReportError(
                f"{path}: nothing readable to report: {why}",
                "re-run the command that wrote that file (it may have been cut off or edited by hand)",
            )
        raise ReportError(
            f"{path}: none of {', '.join(RESULT_FILES)} found",
            "run `vitprobe probe --out DIR` or `vitprobe analyze ... --out DIR` first, then report DIR",
        )
    return run


def _find(obj: Any, *keys: str, depth: int = 4) -> Any:
    """The value of the first of `keys` found in `obj`, breadth-first down to `depth` levels of dicts."""
    level = [obj]
    for _ in range(depth):
        nxt = []
        for d in level:
            if not isinstance(d, Mapping):
                continue
            for k in keys:
                if k in d and d[k] is not None:
                    return d[k]
            nxt.extend(v for v in d.values() if isinstance(v, Mapping))
        level = nxt
    return None


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def _pct(x: Any) -> float | None:
    """Accuracies in percent: values in [0, 1] are taken as fractions."""
    v = _num(x)
    if v is None:
        return None
    return 100.0 * v if 0.0 <= v <= 1.0 else v


def _is_random(*docs: Any) -> bool:
    for d in docs:
        if _find(d, "random_init") is True:
            return True
        for key in ("checkpoint_id", "checkpoint_sha256", "checkpoint", "source", "sha256"):
            if _find(d, key) == "random-init":
                return True
    return False


# ------------------------------------------------------------------------------------------------------------
# Normalising each result file


def _readouts(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Per read-out result dicts from results.json, whatever the container key."""
    for key in ("readouts", "pools", "results", "heads"):
        v = results.get(key)
        if isinstance(v, Mapping) and v and all(isinstance(x, Mapping) for x in v.values()):
            return dict(v)
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            return {str(x.get("pool") or x.get("readout") or x.get("name") or i): x for i, x in enumerate(v)}
    return {}


def _metric(d: Mapping[str, Any], *names: str) -> float | None:
    for n in names:
        v = _find(d, n, depth=2)
        if isinstance(v, Mapping):
            v = _find(v, "test", "value", depth=1)
        if _pct(v) is not None:
            return _pct(v)
    return None


def _top1(d: Mapping[str, Any]) -> float | None:
    return _metric(d, "top1", "top-1", "acc1", "test_top1", "accuracy")


def _top5(d: Mapping[str, Any]) -> float | None:
    return _metric(d, "top5", "top-5", "acc5", "test_top5")


def _curve(d: Mapping[str, Any]) -> dict[str, Any]:
    """A learning curve {"epoch": [...] | None, "series": {name: accuracy % per point}} (top-1 series only).

    Accepts results.json's `curves` ({blr: {"epoch": [...], "<split>_top1": [...], ...}}, the chosen blr is
    used), a dict of lists, or a list of per-epoch dicts.
    """
    raw = _find(d, "curves", "curve", "learning_curve", "history", depth=1)
    if isinstance(raw, Mapping) and raw and all(isinstance(v, Mapping) for v in raw.values()):
        chosen = [v for v in raw.values() if d.get("blr") is not None and v.get("blr") == d.get("blr")]
        raw = chosen[0] if chosen else next(iter(raw.values()))
    if isinstance(raw, list) and raw and all(isinstance(r, Mapping) for r in raw):
        raw = {k: [r.get(k) for r in raw] for k in raw[0]}
    if not isinstance(raw, Mapping):
        return {}
    series = {}
    for k, v in raw.items():
        if isinstance(v, list) and ("top1" in k or "acc" in k) and "loss" not in k:
            vals = [_pct(x) for x in v]
            if any(x is not None for x in vals):
                series[str(k)] = vals
    epochs = raw.get("epoch") or raw.get("epochs")
    epochs = (
        [float(e) for e in epochs]
        if isinstance(epochs, list) and all(_num(e) is not None for e in epochs)
        else None
    )
    return {"epoch": epochs, "series": series} if series else {}


def _per_class(d: Mapping[str, Any], class_names: Sequence[str] | None) -> list[tuple[str, float]]:
    raw = _find(d, "per_class", "per_class_accuracy", "class_accuracy", depth=2)
    if isinstance(raw, Mapping):
        if "accuracy" in raw and isinstance(raw["accuracy"], list):
            names = raw.get("names") or raw.get("classes") or class_names
            raw = raw["accuracy"]
            class_names = names
        else:
            return [(str(k), _pct(v)) for k, v in raw.items() if _pct(v) is not None]
    if isinstance(raw, list):
        out = []
        for i, v in enumerate(raw):
            name = class_names[i] if class_names and i < len(class_names) else str(i)
            if isinstance(v, Mapping):
                name, v = str(v.get("name", v.get("class", name))), v.get("accuracy", v.get("top1"))
            if _pct(v) is not None:
                out.append((str(name), _pct(v)))
        return out
    return []


def _provenance(run: _Run) -> dict[str, Any]:
    res = run.files.get("results.json", {})
    tested = _find(res, "test_cache", depth=1)  # the evaluated split's cache describes the dataset best
    docs = ([tested] if isinstance(tested, Mapping) else []) + list(run.files.values())

    def first(*keys: str) -> Any:
        for d in docs:
            v = _find(d, *keys)
            if v is not None:
                return v
        return None

    model = first("preset", "model_name", "label")
    model_obj = first("model", "backbone")
    if isinstance(model_obj, Mapping):
        model = model_obj.get("model") or model_obj.get("preset") or model_obj.get("name") or model
    elif isinstance(model_obj, str):
        model = model_obj
    random_init = _is_random(*docs)
    sha = next(
        (
            v
            for d in docs
            for k in ("checkpoint_sha256", "checkpoint_id", "checkpoint", "sha256")
            if isinstance(v := _find(d, k), str)
        ),
        None,
    )
    data = first("dataset", "data")
    spec = split = fingerprint = None
    if isinstance(data, Mapping):
        spec, split, fingerprint = data.get("spec"), data.get("split"), data.get("fingerprint")
    elif isinstance(data, str):
        spec = data
    spec = spec or first("dataset_spec", "spec")
    split = split or first("split")
    fingerprint = fingerprint or first("dataset_fingerprint", "fingerprint")
    versions = first("versions")
    protocol = {}
    for key in (
        "optimizer",
        "epochs",
        "batch_size",
        "blr",
        "lr_grid",
        "final_norm",
        "layers",
        "layer",
        "seed",
    ):
        v = _find(res, key)
        if v is not None and not isinstance(v, Mapping):
            protocol[key] = v
    if protocol.get("lr_grid"):  # the grid replaces --blr: showing both would suggest blr was used
        protocol.pop("blr", None)
    selection = _find(res, "selection", "select_on", "selection_rule")
    optimistic = selection == "test"
    if isinstance(selection, Mapping):
        optimistic = bool(selection.get("optimistic")) or selection.get("split") == "test"
        selection = selection.get("rule") or selection.get("split") or str(selection)
    return {
        "model": str(model) if model is not None else run.name,
        "timm_name": first("timm_name"),
        "checkpoint": "random-init" if random_init else (str(sha) if sha else None),
        "random_init": random_init,
        "dataset": spec,
        "split": split,
        "fingerprint": fingerprint,
        "versions": versions if isinstance(versions, Mapping) else None,
        "protocol": protocol,
        "selection": selection,
        "optimistic": optimistic,
    }


def _class_names(run: _Run) -> list[str] | None:
    v = _find(run.files.get("results.json", {}), "class_names", "classes")
    return [str(x) for x in v] if isinstance(v, list) else None


def _num_classes(run: _Run) -> int | None:
    """Classes of the probed dataset, from results.json (`num_classes` or the class names) or knn.json."""
    for doc in (run.files.get("results.json"), run.files.get("knn.json")):
        if not doc:
            continue
        n = _num(_find(doc, "num_classes", depth=2))
        if n is not None:
            return int(n)
        names = _find(doc, "class_names", depth=2)
        if isinstance(names, list) and names:
            return len(names)
    return None


def _top5_is_trivial(run: _Run) -> bool:
    """With 5 classes or fewer every prediction's top-5 holds the label: top-5 is 100 % and says nothing."""
    n = _num_classes(run)
    return n is not None and n <= 5


def _accuracy_rows(run: _Run, prov: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Accuracy rows; top-5 is None (not shown) when the dataset has 5 classes or fewer."""
    rows: list[dict[str, Any]] = []
    top5 = (lambda d: None) if _top5_is_trivial(run) else _top5
    res = run.files.get("results.json")
    if res:
        readouts = _readouts(res)
        cls_top1 = _top1(readouts["cls"]) if "cls" in readouts else None
        for name, d in readouts.items():
            top1 = _top1(d)
            rows.append(
                {
                    "model": prov["model"],
                    "dataset": prov["dataset"],
                    "readout": name,
                    "top1": top1,
                    "top5": top5(d),
                    "delta_top1_vs_cls": None if top1 is None or cls_top1 is None else top1 - cls_top1,
                    "lr": _num(_find(d, "lr", "chosen_lr", "best_lr", depth=2)),
                    "epoch": _find(d, "epoch", "chosen_epoch", "best_epoch", depth=2),
                }
            )
    knn = run.files.get("knn.json")
    if knn:
        for key, d in _knn_entries(knn):
            rows.append(
                {
                    "model": prov["model"],
                    "dataset": prov["dataset"],
                    "readout": key,
                    "top1": _top1(d),
                    "top5": top5(d),
                    "delta_top1_vs_cls": None,
                    "lr": None,
                    "epoch": None,
                }
            )
    return rows


def _k_label(k: Any, entry: Mapping[str, Any]) -> str:
    """"500 (used 200)" when the train cache had fewer rows than the k asked for (knn.json's `k_used`)."""
    used = entry.get("k_used")
    return f"{k} (used {used})" if used is not None and str(used) != str(k) else str(k)


def _knn_entries(knn: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    pool = knn.get("pool") or _find(knn, "pool") or "cls"
    for key in ("knn", "results", "k", "per_k", "by_k"):
        v = knn.get(key)
        if isinstance(v, Mapping):
            return [(f"k-NN {pool} k={_k_label(k, d)}", d) for k, d in v.items() if isinstance(d, Mapping)]
        if isinstance(v, list) and all(isinstance(d, Mapping) for d in v):
            return [(f"k-NN {pool} k={d.get('k', i)}", d) for i, d in enumerate(v)]
    return [(f"k-NN {pool}", knn)] if _top1(knn) is not None else []


def _series_by_block(doc: Mapping[str, Any] | None, name: str) -> list[float] | None:
    """A per-block curve (heads averaged) of statistic `name` from attention.json."""
    if not doc:
        return None
    stats = doc.get("stats") or {}
    v = stats.get(name) if isinstance(stats, Mapping) else None
    if isinstance(v, Mapping):
        v = v.get("mean")
    if isinstance(v, list) and v and all(_num(x) is not None for x in v):
        return [float(x) for x in v]
    return None


def _frequency(doc: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Frequency curves {layer label: Δ log amplitude}, headline per layer, high-frequency ratio per layer."""
    if not doc:
        return None
    layers = doc.get("layers") if isinstance(doc.get("layers"), list) else None
    curves_raw = _find(doc, "delta_log_amplitude", "curves", "spectrum", depth=2)
    curves: dict[str, list[float]] = {}
    if isinstance(curves_raw, list):
        for i, c in enumerate(curves_raw):
            label = (
                str(layers[i])
                if layers and i < len(layers) and not isinstance(layers[i], Mapping)
                else str(i)
            )
            if isinstance(c, list) and all(_num(x) is not None for x in c):
                curves[label] = [float(x) for x in c]
    elif isinstance(curves_raw, Mapping):
        curves = {
            str(k): [float(x) for x in v]
            for k, v in curves_raw.items()
            if isinstance(v, list) and all(_num(x) is not None for x in v)
        }

    def per_layer(*keys: str) -> list[float] | None:
        v = _find(doc, *keys, depth=2)
        if isinstance(v, list) and v and all(_num(x) is not None for x in v):
            return [float(x) for x in v]
        return None

    headline = per_layer("headline", "high_frequency", "delta_at_highest", "headline_per_layer")
    hf_ratio = per_layer("high_freq_energy_ratio", "high_frequency_ratio", "hf_ratio")
    freqs = per_layer("frequencies", "frequency", "freqs")
    if not curves and headline is None and hf_ratio is None:
        return None
    return {"curves": curves, "frequencies": freqs, "headline": headline, "high_frequency_ratio": hf_ratio}


def _localization(doc: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not doc:
        return None
    maps = doc.get("maps") if isinstance(doc.get("maps"), Mapping) else {}
    out = {}
    for name, d in maps.items():
        if isinstance(d, Mapping) and _num(d.get("max_box_acc_v2")) is not None:
            out[name] = {
                "max_box_acc_v2": float(d["max_box_acc_v2"]),
                "max_box_acc": {str(k): _num(v) for k, v in (d.get("max_box_acc") or {}).items()},
                "num_images": d.get("num_images"),
            }
    return out or None


# ------------------------------------------------------------------------------------------------------------
# Collecting


def collect_report(
    paths: Sequence[str | os.PathLike[str]], *, title: str = "vitprobe report"
) -> dict[str, Any]:
    """Read every run and build the machine-readable report (see docs/report-format.md).

    Args:
        paths: run directories (or single result JSON files).
        title: the report title.

    Raises:
        ReportError: no paths, or a path with nothing to report.
    """
    if not paths:
        raise ReportError("no run directories given", "vitprobe report RUN_DIR [RUN_DIR ...]")
    runs = [_read_run(Path(p)) for p in paths]
    _unique_names(runs)
    out_runs = []
    for run in runs:
        prov = _provenance(run)
        res = run.files.get("results.json", {})
        readouts = _readouts(res)
        names = _class_names(run)
        att = run.files.get("attention.json")
        attention = {}
        for stat in (
            "cls_self",
            "cls_entropy",
            "patch_entropy",
            "attention_distance",
            "cls_to_patch",
            "patch_self",
            "magnitude_cls",
            "magnitude_patch",
        ):
            s = _series_by_block(att, stat)
            if s is not None:
                attention[stat] = s
        weakest = {}
        for name, d in readouts.items():
            pcs = sorted(_per_class(d, names), key=lambda t: t[1])[:WEAKEST_CLASSES]
            if pcs:
                weakest[name] = [{"class": c, "accuracy": a} for c, a in pcs]
        out_runs.append(
            {
                "name": run.name,
                "path": str(run.path),
                "files": sorted(run.files),
                "provenance": prov,
                "accuracy": _accuracy_rows(run, prov),
                "learning_curves": {n: c for n, d in readouts.items() if (c := _curve(d))},
                "weakest_classes": weakest,
                "attention": attention or None,
                "frequency": _frequency(run.files.get("frequency.json")),
                "localization": _localization(run.files.get("localization.json")),
                "figure_files": _listed_figures(run),
                "notes": run.notes + _run_notes(run) + _top5_note(run),
            }
        )
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vitprobe": __version__,
        "random_init": any(r["provenance"]["random_init"] for r in out_runs),
        "runs": out_runs,
        "why_cls_loses": _why_cls_loses(out_runs),
    }


def _run_notes(run: _Run) -> list[str]:
    """The warnings and notes the result files carry, each once, in file order."""
    out: list[str] = []
    for d in run.files.values():
        for key in ("warnings", "notes"):
            items = d.get(key)
            if isinstance(items, list):
                out.extend(str(n) for n in items if str(n) not in out)
    return out


def _top5_note(run: _Run) -> list[str]:
    if not _top5_is_trivial(run):
        return []
    return [f"top-5 not shown: with {_num_classes(run)} classes (5 or fewer) top-5 accuracy is always 100 %"]


def _unique_names(runs: list[_Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name} ({seen[run.name]})"
        else:
            seen[run.name] = 1


def _why_cls_loses(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: AbMILP − [cls] top-1 beside last-block cls_self, cls_entropy and the HF ratio."""
    rows = []
    for r in runs:
        acc = {a["readout"]: a["top1"] for a in r["accuracy"]}
        gain = None
        if acc.get("abmilp") is not None and acc.get("cls") is not None:
            gain = acc["abmilp"] - acc["cls"]
        att = r["attention"] or {}
        freq = r["frequency"] or {}
        loc = r["localization"] or {}
        row = {
            "model": r["provenance"]["model"],
            "run": r["name"],
            "random_init": r["provenance"]["random_init"],
            "cls_top1": acc.get("cls"),
            "abmilp_top1": acc.get("abmilp"),
            "abmilp_gain": gain,
            "cls_self_last": att["cls_self"][-1] if att.get("cls_self") else None,
            "cls_entropy_last": att["cls_entropy"][-1] if att.get("cls_entropy") else None,
            "high_frequency_ratio_last": (freq.get("high_frequency_ratio") or [None])[-1],
            "maxboxaccv2_cls": (loc.get("cls_attention") or {}).get("max_box_acc_v2"),
            "maxboxaccv2_abmilp": (loc.get("abmilp") or {}).get("max_box_acc_v2"),
        }
        if any(v is not None for k, v in row.items() if k not in ("model", "run", "random_init")):
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Figures


def make_figures(report: Mapping[str, Any]) -> list[Figure]:
    """Figures drawn from the report's numbers plus the PNG/SVG files the runs already wrote."""
    figs: list[Figure] = []
    runs = report["runs"]
    for stat, label in (
        ("cls_self", "[cls] self-attention A[0,0]"),
        ("cls_entropy", "[cls] entropy (nats)"),
        ("patch_entropy", "patch entropy (nats)"),
        ("attention_distance", "attention distance (px)"),
    ):
        series = {
            _run_label(r): r["attention"][stat] for r in runs if r["attention"] and stat in r["attention"]
        }
        if series:
            figs.append(
                Figure(
                    f"attention_{stat}.png",
                    f"{label} per block",
                    _line_plot(series, xlabel="block", ylabel=label, x0=1),
                )
            )
    for key, name, title, ylabel in (
        ("headline", "frequency_headline.png", "Δ log amplitude at the highest frequency, per layer",
         "Δ log amplitude"),
        ("high_frequency_ratio", "frequency_hf_ratio.png", "High-frequency energy ratio per layer", "ratio"),
    ):  # fmt: skip
        per_model = {_run_label(r): r["frequency"][key] for r in runs if (r["frequency"] or {}).get(key)}
        if per_model:
            plot = _line_plot(per_model, xlabel="layer (0 = patch embedding)", ylabel=ylabel)
            figs.append(Figure(name, title, plot))
    for i, r in enumerate(runs):
        slug = f"run{i}"
        if r["learning_curves"]:
            series, xs = {}, None
            for readout, curve in r["learning_curves"].items():
                for key, vals in curve["series"].items():
                    series[f"{readout} {key}"] = vals
                    xs = curve["epoch"] if curve["epoch"] and len(curve["epoch"]) == len(vals) else xs
            figs.append(
                Figure(
                    f"{slug}_learning_curves.png",
                    f"{_run_label(r)}: learning curves (chosen learning rate)",
                    _line_plot(
                        series,
                        xlabel="epoch",
                        ylabel="top-1 (%)",
                        x0=1,
                        x=xs,
                        title=f"{_run_label(r)}: learning curves at the chosen learning rate",
                        pair_by_readout=True,
                    ),
                    run=r["name"],
                )
            )
        f = r["frequency"]
        own_spectrum = any("frequency" in Path(p).name for p in r["figure_files"])
        if f and f.get("curves") and not own_spectrum:  # the analysis's own spectrum figure wins
            figs.append(
                Figure(
                    f"{slug}_frequency.png",
                    f"{_run_label(r)}: Δ log amplitude vs frequency",
                    _line_plot(
                        f["curves"],
                        xlabel="normalised frequency (π)",
                        ylabel="Δ log amplitude",
                        x=f.get("frequencies"),
                        unit_x=True,
                    ),
                    run=r["name"],
                )
            )
        figs.extend(_run_figure_files(r, slug))
    return figs


def _run_label(run: Mapping[str, Any]) -> str:
    label = run["provenance"]["model"]
    if run["provenance"]["random_init"]:
        label += " (random weights)"
    return label if label == run["name"] or run["name"] in label else f"{label} [{run['name']}]"


def _line_plot(series: Mapping[str, Sequence[float | None]], **options: Any) -> bytes:
    """PNG bytes of `_line_figure(series, **options)`, at 200 dpi like the analyses' own figures."""
    fig = _line_figure(series, **options)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PRINT_DPI)
    return buf.getvalue()


def _line_figure(
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    ylabel: str,
    x0: int = 0,
    x: Sequence[float] | None = None,
    unit_x: bool = False,
    title: str | None = None,
    pair_by_readout: bool = False,
) -> Any:
    """One line per series against the block / layer / epoch index (from `x0`), `x`, or 0…1 (`unit_x`).

    With `pair_by_readout`, series named "<read-out> <split>_top1" share one colour per read-out, and the
    test-split series is dashed, so each read-out's selection and test curves read as a pair.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    colours: dict[str, Any] = {}
    for name, ys in series.items():
        style: dict[str, Any] = {}
        if pair_by_readout:
            readout, _, split = str(name).rpartition(" ")
            palette = colormaps["tab10"].colors
            style["color"] = colours.setdefault(readout, palette[len(colours) % len(palette)])
            style["linestyle"] = "--" if split.startswith("test") else "-"
        n = len(ys)
        if x is not None and len(x) == n:
            xs = list(x)
        elif unit_x:
            xs = [i / max(n - 1, 1) for i in range(n)]
        else:
            xs = list(range(x0, x0 + n))
        ax.plot(
            xs,
            [float("nan") if y is None else y for y in ys],
            marker="o" if n <= 30 else None,
            markersize=3,
            label=str(name),
            **style,
        )
    if not unit_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks, layers and epochs are whole numbers
    # plain tick values: with an offset, nearly flat curves (random weights) read "+4.604" off the axis
    ax.ticklabel_format(axis="y", useOffset=False)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _listed_figures(run: _Run) -> list[str]:
    """Figure files the run's commands wrote (listed under "figures" in their JSONs), relative to the run."""
    listed: list[str] = []
    for doc in run.files.values():
        figs = doc.get("figures")
        if isinstance(figs, Mapping):
            figs = list(figs.values())
        if isinstance(figs, list):
            for f in figs:
                if isinstance(f, str) and f not in listed and Path(f).suffix.lower() in (".png", ".svg"):
                    if (run.path / f).is_file():
                        listed.append(f)
    pngs = {Path(f).with_suffix("") for f in listed if f.lower().endswith(".png")}
    listed = [f for f in listed if f.lower().endswith(".png") or Path(f).with_suffix("") not in pngs]
    return listed[:MAX_RUN_FIGURES]  # one copy per figure: the PNG when both PNG and SVG were written


def _run_figure_files(run: Mapping[str, Any], slug: str) -> list[Figure]:
    """The run's own figure files, embedded as they are."""
    out = []
    for rel in run["figure_files"]:
        p = Path(run["path"]) / rel
        mime = "image/svg+xml" if p.suffix.lower() == ".svg" else "image/png"
        out.append(
            Figure(
                f"{slug}_{p.name}",
                f"{_run_label(run)}: {p.stem.replace('_', ' ')}",
                p.read_bytes(),
                mime=mime,
                run=run["name"],
            )
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# Rendering


def _fmt(v: Any, digits: int = 1, signed: bool = False) -> str:
    n = _num(v)
    if n is None:
        return "—" if v is None else str(v)
    return f"{n:+.{digits}f}" if signed else f"{n:.{digits}f}"


ACC_HEADER = ("model", "dataset", "read-out", "top-1", "top-5", "Δ top-1 vs [cls]")
WHY_HEADER = (
    "model",
    "[cls] top-1",
    "AbMILP top-1",
    "AbMILP − [cls]",
    "cls_self (last)",
    "cls_entropy (last)",
    "HF ratio (last)",
    "MaxBoxAccV2 [cls] / AbMILP",
)


def accuracy_table(report: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the accuracy table (read-out × dataset), as strings."""
    rows = []
    for r in report["runs"]:
        for a in r["accuracy"]:
            model = a["model"] + (" ⚠ random weights" if r["provenance"]["random_init"] else "")
            rows.append(
                [
                    model,
                    str(a["dataset"] or "—"),
                    a["readout"],
                    _fmt(a["top1"]),
                    _fmt(a["top5"]),
                    _fmt(a["delta_top1_vs_cls"], signed=True) if a["readout"] != "cls" else "—",
                ]
            )
    return rows


def why_table(report: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the cross-model "why [cls] loses" table, as strings."""
    rows = []
    for w in report["why_cls_loses"]:
        loc = "—"
        if w["maxboxaccv2_cls"] is not None or w["maxboxaccv2_abmilp"] is not None:
            loc = f"{_fmt(w['maxboxaccv2_cls'])} / {_fmt(w['maxboxaccv2_abmilp'])}"
        model = w["model"] + (" ⚠ random weights" if w["random_init"] else "")
        rows.append(
            [
                model,
                _fmt(w["cls_top1"]),
                _fmt(w["abmilp_top1"]),
                _fmt(w["abmilp_gain"], signed=True),
                _fmt(w["cls_self_last"], 3),
                _fmt(w["cls_entropy_last"], 2),
                _fmt(w["high_frequency_ratio_last"], 3),
                loc,
            ]
        )
    return rows


def _provenance_rows(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    p = run["provenance"]
    ckpt = p["checkpoint"] or "unknown"
    if p["random_init"]:
        ckpt = "random-init — RANDOM WEIGHTS, not a pretrained model"
    versions = ", ".join(f"{k} {v}" for k, v in (p["versions"] or {}).items()) or "—"
    protocol = ", ".join(f"{k}={v}" for k, v in p["protocol"].items()) or "—"
    selection = str(p["selection"] or "—")
    if p["optimistic"]:
        selection += " (selected on the test set: optimistic)"
    data = " / ".join(str(x) for x in (p["dataset"], p["split"]) if x) or "—"
    return [
        ("model", f"{p['model']}" + (f" (timm {p['timm_name']})" if p["timm_name"] else "")),
        ("checkpoint", ckpt),
        ("dataset", data),
        ("dataset fingerprint", str(p["fingerprint"] or "—")),
        ("versions", versions),
        ("protocol", protocol),
        ("selection", selection),
        ("files", ", ".join(run["files"])),
    ]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff1e5;border:2px solid #d1242f;color:#8c1d18;padding:.8rem 1rem;font-weight:600;
margin:1rem 0}
figure{display:inline-block;margin:.5rem;vertical-align:top}figure img{max-width:520px;border:1px solid #eee}
figcaption{font-size:.85rem;color:#57606a;max-width:520px}.note{color:#57606a;font-size:.9rem}
figure.wide{display:block}figure.wide img{max-width:100%}figure.wide figcaption{max-width:none}
"""


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, table_id: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{e(c)}</td>' if _looks_numeric(c) else f"<td>{e(c)}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _looks_numeric(s: str) -> bool:
    return s.replace(".", "", 1).replace("+", "", 1).replace("-", "", 1).isdigit()


WIDE_ASPECT = 2.0  # PNGs wider than this (multi-panel curves, map grids) get the page width, not 520 px


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk; None for anything else (SVG)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _img_tag(fig: Figure) -> str:
    data = base64.b64encode(fig.data).decode("ascii")
    e = html.escape
    size = _png_size(fig.data)
    wide = size is not None and size[1] > 0 and size[0] / size[1] > WIDE_ASPECT
    css = ' class="wide"' if wide else ""
    return (
        f"<figure{css}>"
        f'<img src="data:{fig.mime};base64,{data}" alt="{e(fig.title)}">'
        f"<figcaption>{e(fig.title)}</figcaption></figure>"
    )


def render_html(report: Mapping[str, Any], figures: Sequence[Figure]) -> str:
    """One self-contained HTML page: every figure embedded as a data: URI, all text escaped."""
    e = html.escape
    warn = (
        f'<div class="warn" id="random-init-warning">⚠ {e(RANDOM_INIT_WARNING)}</div>'
        if report["random_init"]
        else ""
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(report['title'])}</h1>",
        warn,
        f'<p class="note">vitprobe {e(report["vitprobe"])} · created {e(report["created"])} · '
        f"{len(report['runs'])} run(s). Numbers are read from the runs' JSON files; "
        "nothing is recomputed.</p>",
        "<h2>Accuracy</h2>",
    ]
    acc_rows = accuracy_table(report)
    parts.append(
        _html_table(ACC_HEADER, acc_rows, table_id="accuracy")
        if acc_rows
        else '<p class="note" id="accuracy">No probing results (results.json / knn.json) in these runs.</p>'
    )
    if report["why_cls_loses"]:
        parts += [
            "<h2>Why [cls] loses</h2>",
            '<p class="note">AbMILP − [cls] top-1 gain beside the last block\'s [cls] self-attention and '
            "entropy (attention.json) and the last layer's high-frequency energy ratio (frequency.json).</p>",
            _html_table(WHY_HEADER, why_table(report), table_id="why-cls-loses"),
        ]
    cross = [f for f in figures if f.run is None]
    if cross:
        parts.append("<h2>Attention and frequency across models</h2>")
        parts += [_img_tag(f) for f in cross]
    for run in report["runs"]:
        parts.append(f"<h2>Run: {e(run['name'])}</h2>")
        if run["provenance"]["random_init"]:
            parts.append(
                f'<div class="warn">⚠ {e(run["provenance"]["model"])} has RANDOM WEIGHTS '
                "(--random-init): these numbers do not describe a pretrained model.</div>"
            )
        parts.append(
            "<h3>Provenance</h3><table>"
            + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _provenance_rows(run))
            + "</table>"
        )
        if run["localization"]:
            parts.append("<h3>Localisation (MaxBoxAccV2, %)</h3>")
            parts.append(
                _html_table(
                    ("map", "MaxBoxAccV2", "δ=30", "δ=50", "δ=70", "images"),
                    [
                        [
                            name,
                            _fmt(d["max_box_acc_v2"]),
                            *(_fmt(d["max_box_acc"].get(k)) for k in ("30", "50", "70")),
                            str(d.get("num_images") or "—"),
                        ]
                        for name, d in run["localization"].items()
                    ],
                    table_id=f"localization-{_slug(run['name'])}",
                )
            )
        if run["weakest_classes"]:
            parts.append(f"<h3>Weakest classes (lowest {WEAKEST_CLASSES} per read-out)</h3>")
            rows = [
                [ro, w["class"], _fmt(w["accuracy"])] for ro, ws in run["weakest_classes"].items() for w in ws
            ]
            parts.append(
                _html_table(("read-out", "class", "top-1"), rows, table_id=f"weakest-{_slug(run['name'])}")
            )
        own = [f for f in figures if f.run == run["name"]]
        if own:
            parts.append("<h3>Figures</h3>")
            parts += [_img_tag(f) for f in own]
        if run["notes"]:
            parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{e(n)}</li>" for n in run["notes"]) + "</ul>")
    if report["random_init"]:
        parts.append(warn.replace('id="random-init-warning"', ""))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower() or "run"


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    report: Mapping[str, Any], figure_paths: Mapping[str, str], titles: Mapping[str, str] | None = None
) -> str:
    """Markdown with figures referenced by relative path (`figure_paths`: figure name → path), each captioned
    with its title (`titles`: figure name → title, as the HTML report's captions; default the name)."""
    titles = titles or {}

    def figure(name: str, path: str) -> str:
        return f"![{name}]({path})\n\n*{_md_escape(titles.get(name, name))}*\n"

    out = [f"# {report['title']}", ""]
    if report["random_init"]:
        out += [f"> **⚠ {RANDOM_INIT_WARNING}**", ""]
    out += [
        f"vitprobe {report['vitprobe']} · created {report['created']} · {len(report['runs'])} run(s). "
        "Numbers are read from the runs' JSON files; nothing is recomputed.",
        "",
        "## Accuracy",
        "",
    ]
    rows = accuracy_table(report)
    out += [_md_table(ACC_HEADER, rows) if rows else "_No probing results in these runs._", ""]
    if report["why_cls_loses"]:
        out += ["## Why [cls] loses", "", _md_table(WHY_HEADER, why_table(report)), ""]
    cross = [(n, p) for n, p in figure_paths.items() if not n.startswith("run")]
    if cross:
        out += ["## Attention and frequency across models", ""]
        out += [figure(n, p) for n, p in cross]
    for i, run in enumerate(report["runs"]):
        out += [f"## Run: {run['name']}", ""]
        if run["provenance"]["random_init"]:
            out += [f"> **⚠ {run['provenance']['model']} has RANDOM WEIGHTS (--random-init).**", ""]
        out += [_md_table(("", ""), [list(r) for r in _provenance_rows(run)]), ""]
        if run["localization"]:
            out += [
                "### Localisation (MaxBoxAccV2, %)",
                "",
                _md_table(
                    ("map", "MaxBoxAccV2", "δ=30", "δ=50", "δ=70"),
                    [
                        [
                            n,
                            _fmt(d["max_box_acc_v2"]),
                            *(_fmt(d["max_box_acc"].get(k)) for k in ("30", "50", "70")),
                        ]
                        for n, d in run["localization"].items()
                    ],
                ),
                "",
            ]
        if run["weakest_classes"]:
            out += [
                f"### Weakest classes (lowest {WEAKEST_CLASSES} per read-out)",
                "",
                _md_table(
                    ("read-out", "class", "top-1"),
                    [
                        [ro, w["class"], _fmt(w["accuracy"])]
                        for ro, ws in run["weakest_classes"].items()
                        for w in ws
                    ],
                ),
                "",
            ]
        own = [(n, p) for n, p in figure_paths.items() if n.startswith(f"run{i}_")]
        if own:
            out += ["### Figures", ""] + [figure(n, p) for n, p in own]
        if run["notes"]:
            out += ["### Notes", ""] + [f"- {n}" for n in run["notes"]] + [""]
    return "\n".join(out) + "\n"


def render_github(report: Mapping[str, Any]) -> str:
    """A compact Markdown summary for a CI job summary (`$GITHUB_STEP_SUMMARY`): warning, two tables."""
    out = [f"### {report['title']}", ""]
    if report["random_init"]:
        out += [f"> [!WARNING]\n> {RANDOM_INIT_WARNING}", ""]
    rows = accuracy_table(report)
    out += [_md_table(ACC_HEADER, rows) if rows else "_No probing results._", ""]
    if report["why_cls_loses"]:
        out += ["**Why [cls] loses**", "", _md_table(WHY_HEADER, why_table(report)), ""]
    notes = sum(len(r["notes"]) for r in report["runs"])
    out.append(f"<sub>vitprobe {report['vitprobe']} · {len(report['runs'])} run(s) · {notes} note(s)</sub>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------
# The command


@dataclass
class ReportOutput:
    """What `write_report` wrote."""

    path: Path | None  # None: printed (github format without --out and without $GITHUB_STEP_SUMMARY)
    text: str  # the rendered report (for JSON: the JSON text)
    report: dict[str, Any]
    figure_files: list[Path] = field(default_factory=list)


def default_out(fmt: str) -> str | None:
    """report.html / report.md / report.json; github: $GITHUB_STEP_SUMMARY when set, else stdout (None)."""
    if fmt == "github":
        return os.environ.get("GITHUB_STEP_SUMMARY") or None
    return f"report.{fmt}"


def write_report(config: ReportConfig, *, on_progress: Callable[[str], None] | None = None) -> ReportOutput:
    """`vitprobe report`: read the runs, render in `config.format`, write atomically.

    The GitHub summary is appended (that file collects every step's summary); other formats replace `out`.
    """
    import json

    if config.format not in FORMATS:
        raise ReportError(f"unknown report format {config.format!r}", f"use one of {', '.join(FORMATS)}")
    say = on_progress or (lambda _msg: None)
    report = collect_report(config.runs, title=config.title)
    say(f"read {len(report['runs'])} run(s)")
    out = config.out if config.out is not None else default_out(config.format)
    path = Path(out) if out else None
    if config.format == "json":
        text = json.dumps(report, indent=2) + "\n"
        _write(path, text)
        return ReportOutput(path, text, report)
    if config.format == "github":
        text = render_github(report)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:  # the job summary accumulates steps
                f.write(text)
        return ReportOutput(path, text, report)
    figures = make_figures(report)
    say(f"drew {len(figures)} figure(s)")
    if config.format == "html":
        text = render_html(report, figures)
        _write(path, text)
        return ReportOutput(path, text, report)
    # Markdown: figures next to it, in <stem>_figures/
    assert path is not None
    fig_dir = path.parent / f"{path.stem}_figures"
    written, rel = [], {}
    for f in figures:
        target = fig_dir / f.name
        atomic_write(target, lambda tmp, data=f.data: tmp.write_bytes(data))
        written.append(target)
        rel[f.name] = f"{fig_dir.name}/{f.name}"
    text = render_markdown(report, rel, {f.name: f.title for f in figures})
    _write(path, text)
    return ReportOutput(path, text, report, written)


def _write(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror}", "choose a writable --out path") from exc
