"""Benchmark: does the default `vitprobe probe` reach a tuned logistic regression on the same features?

For each backbone × small real dataset (benchmarks/small_real_data.py) × read-out (cls, mean): tokens are
extracted once with `vitprobe extract`, then on the same cached features, the same fit rows and the same
holdout (vitprobe's stratified holdout, seed 0: 10 %, or more where --min-holdout raises it to hold 30
images — the fraction the auto run recorded):

- reference: scikit-learn StandardScaler + LogisticRegression (lbfgs, multinomial), C swept over
  10 ** linspace(-6, 5, 23) and chosen on the holdout (ties: the smaller C), test accuracy at that C;
- vitprobe `--protocol auto` (the default) and `--protocol logreg`, through `run_probe` (the CLI's path);
  the auto run's own ridge reference (`baseline_top1`, the health check's) is a column too.

    .venv/bin/python benchmarks/probe_vs_logreg.py --work /tmp/vp-lr          # writes table.md, results.json

Backbones have random weights (no hub weights offline); the features are still informative about these
images, which is all a comparison of classifiers on the same features needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from small_real_data import build  # noqa: E402

C_GRID = tuple(10 ** (-6 + 11 * i / 22) for i in range(23))


def extract_caches(work: Path, model: str, dataset: str, folder: Path) -> dict[str, Path]:
    from vitprobe.extract import ExtractConfig, extract

    caches = {}
    for split in ("train", "test"):
        out = work / "caches" / model / f"{dataset}-{split}"
        if not (out / "manifest.json").is_file():
            extract(
                ExtractConfig(
                    model=f"timm:{model}",
                    data=f"imagefolder:{folder}",
                    split=split,
                    out=out,
                    random_init=True,
                    workers=2,
                    batch_size=64,
                )
            )
        caches[split] = out
    return caches


def features(cache: Path, pool: str) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """(n, D) features as the probe reads them (un-normed last block), labels, and the holdout groups."""
    from vitprobe.cache import open_cache
    from vitprobe.sources import CacheSource
    from vitprobe.tokens import load_whole

    c = open_cache(cache)
    src = CacheSource(c, max(c.layers))
    d = load_whole(src, ["cls", "patches"], torch.device("cpu"))
    f = d["cls"].float() if pool == "cls" else d["patches"].float().mean(dim=1)
    return f.numpy(), d["labels"].numpy(), src.labels, src.indices


def sklearn_reference(train: Path, test: Path, pool: str, fraction: float) -> dict[str, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vitprobe.probe.selection import stratified_holdout

    x, y, labels, groups = features(train, pool)
    x_te, y_te, _, _ = features(test, pool)
    fit, held = (t.numpy() for t in stratified_holdout(labels, groups, fraction, 0))
    scaler = StandardScaler().fit(x[fit])
    a, b, c = scaler.transform(x[fit]), scaler.transform(x[held]), scaler.transform(x_te)
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in C_GRID:
            m = LogisticRegression(C=C, max_iter=2000).fit(a, y[fit])
            h = m.score(b, y[held])
            if best is None or h > best["holdout"]:
                best = {"C": C, "holdout": h, "test": m.score(c, y_te)}
    return best


def vitprobe_runs(caches: dict[str, Path], out: Path) -> dict[str, dict]:
    from vitprobe.probe import ProbeConfig, run_probe

    runs = {}
    for protocol in ("auto", "logreg"):
        cfg = ProbeConfig.from_protocol(protocol, pools=("cls", "mean"))
        start = time.perf_counter()
        results = run_probe(caches["train"], caches["test"], cfg, out / protocol, overwrite=True)
        runs[protocol] = {
            "seconds": time.perf_counter() - start,
            "readouts": results["readouts"],
            "holdout_fraction": results["selection"]["holdout_fraction"],
        }
    return runs


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/vitprobe-probe-vs-logreg"))
    parser.add_argument("--models", default="test_vit,vit_tiny_patch16_224")
    parser.add_argument("--datasets", default="digits,lfw,textures")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folders = build(args.work / "data", tuple(args.datasets.split(",")))
    rows = []
    for model in args.models.split(","):
        for name, folder in folders.items():
            caches = extract_caches(args.work, model, name, folder)
            runs = vitprobe_runs(caches, args.work / "runs" / model / name)
            for pool in ("cls", "mean"):
                fraction = runs["auto"]["holdout_fraction"]
                ref = sklearn_reference(caches["train"], caches["test"], pool, fraction)
                auto, lr = runs["auto"]["readouts"][pool], runs["logreg"]["readouts"][pool]
                rows.append(
                    {
                        "model": model,
                        "dataset": name,
                        "pool": pool,
                        "holdout_fraction": fraction,
                        "sklearn": ref,
                        "auto": {
                            "top1": auto["top1"],
                            "blr": auto["blr"],
                            "weight_decay": auto.get("weight_decay"),
                            "epoch": auto["epoch"],
                            "verdict": auto["verdict"],
                            "health": [c["code"] for c in auto["health"]],
                            "seconds": runs["auto"]["seconds"],
                            "ridge": auto.get("baseline_top1"),  # the run's own ridge reference
                        },
                        "logreg": {
                            "top1": lr["top1"],
                            "C": lr["C"],
                            "verdict": lr["verdict"],
                            "health": [c["code"] for c in lr["health"]],
                            "seconds": runs["logreg"]["seconds"],
                        },
                    }
                )
                r = rows[-1]
                print(
                    f"{model:22s} {name:9s} {pool:5s} sklearn {100 * ref['test']:6.2f} (C={ref['C']:.3g})  "
                    f"auto {100 * auto['top1']:6.2f} ({100 * (auto['top1'] - ref['test']):+.2f}) "
                    f"{r['auto']['health']}  logreg {100 * lr['top1']:6.2f} "
                    f"({100 * (lr['top1'] - ref['test']):+.2f})",
                    flush=True,
                )
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| backbone (random init) | dataset | read-out | scikit-learn LR (C) | `probe` default (auto) | Δ | "
        "`--protocol logreg` | Δ | ridge reference | auto health |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["sklearn"]["test"]
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['pool']} | {100 * s:.2f} ({r['sklearn']['C']:.2g}) | "
            f"{100 * r['auto']['top1']:.2f} | {100 * (r['auto']['top1'] - s):+.2f} | "
            f"{100 * r['logreg']['top1']:.2f} | "
            f"{100 * (r['logreg']['top1'] - s):+.2f} | {_pct(r['auto']['ridge'])} | "
            f"{', '.join(r['auto']['health']) or 'ok'} |"
        )
    deltas = [100 * (r["auto"]["top1"] - r["sklearn"]["test"]) for r in rows]
    lines.append(
        f"\nauto − sklearn: mean {np.mean(deltas):+.2f}, min {min(deltas):+.2f}, "
        f"max {max(deltas):+.2f} points"
    )
    (args.work / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
