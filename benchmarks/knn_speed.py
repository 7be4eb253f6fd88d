"""Benchmark: `vitprobe knn` vs scikit-learn's KNeighborsClassifier(algorithm="brute"), side by side.

Synthetic [cls]-only caches (20,000 train / 5,000 test rows, D = 384, 100 classes, fp16) are written once.
Both arms compute DINO's weighted k-NN (cosine similarity, weights exp(sim / T), T = 0.07) for k = 10, 20,
100, 200 and report top-1 / top-5. Arms, interleaved in each repeat (the machine is shared and noisy: median
and min–max are reported):

- in-process: features already in memory (torch tensors / numpy arrays); `vitprobe.knn.knn_evaluate`
  vs one `KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights=exp((1 - d) / T))`
  fit + predict_proba per k, the way one writes DINO's k-NN with scikit-learn;
- commands: `vitprobe knn --train ... --test ... --out ...` (start-up, opening and verifying the caches,
  reading, the search, knn.json) vs a Python script that reads the same shards with `safetensors.numpy`
  and runs the scikit-learn arm (this file run with `--sklearn-script`).

    .venv/bin/python benchmarks/knn_speed.py                   # about two minutes on 2 cores
    .venv/bin/python benchmarks/knn_speed.py --repeats 5
    git show main:src/vitprobe/knn.py > /tmp/knn_main.py       # an earlier knn.py as a third arm:
    .venv/bin/python benchmarks/knn_speed.py --baseline /tmp/knn_main.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KS = (10, 20, 100, 200)
T = 0.07


def sklearn_knn(x_train, y_train, x_test, y_test, ks=KS):  # noqa: ANN001, ANN201 (numpy only, no torch)
    """Top-1 / top-5 per k with scikit-learn's brute-force KNeighborsClassifier, DINO's weights."""
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    for k in ks:
        clf = KNeighborsClassifier(
            n_neighbors=k, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1 - d) / T)
        )
        proba = clf.fit(x_train, y_train).predict_proba(x_test)  # (n, C), summed weights normalised
        order = clf.classes_[np.argsort(-proba, axis=1)[:, :5]]
        out[k] = {
            "top1": float((order[:, 0] == y_test).mean()),
            "top5": float((order == y_test[:, None]).any(axis=1).mean()),
        }
    return out


def read_cls(cache: Path):  # noqa: ANN201
    """The [cls] features and labels of a cache, read with safetensors.numpy (what a script would do)."""
    import numpy as np
    from safetensors.numpy import load_file

    shards = [load_file(f) for f in sorted(cache.glob("shard-*.safetensors"))]
    x = np.concatenate([s["cls"] for s in shards]).astype(np.float32)
    y = np.concatenate([s["labels"] for s in shards])
    return x, y


def sklearn_script(train: Path, test: Path) -> None:
    x_train, y_train = read_cls(train)
    x_test, y_test = read_cls(test)
    print(json.dumps({str(k): v for k, v in sklearn_knn(x_train, y_train, x_test, y_test).items()}))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--test-rows", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another knn.py (e.g. main's) timed in-process too")
    parser.add_argument("--sklearn-script", nargs=2, type=Path, help=argparse.SUPPRESS)  # TRAIN TEST
    args = parser.parse_args()
    if args.sklearn_script:
        sklearn_script(*args.sklearn_script)
        return

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _caches import write_cache

    from vitprobe.knn import knn_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = {"tokens": "cls", "dim": args.dim, "classes": args.classes, "noise": 5.0, "shard_rows": 8192}
        train = write_cache(root / "train", rows=args.train_rows, seed=1, split="train", **common)
        test = write_cache(root / "test", rows=args.test_rows, seed=2, split="val", **common)
        x_train, y_train = read_cls(train)
        x_test, y_test = read_cls(test)
        t_train, t_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
        l_train, l_test = torch.from_numpy(y_train).long(), torch.from_numpy(y_test).long()

        def ours(evaluate=knn_evaluate) -> dict:  # noqa: ANN001
            return evaluate(t_train, l_train, t_test, l_test, num_classes=args.classes, ks=KS, temperature=T)

        baseline = None
        if args.baseline:
            import importlib.util

            spec = importlib.util.spec_from_file_location("knn_baseline", args.baseline)
            baseline = importlib.util.module_from_spec(spec)
            sys.modules["knn_baseline"] = baseline  # (dataclasses look their module up)
            spec.loader.exec_module(baseline)

        vitprobe_cmd = [
            sys.executable, "-m", "vitprobe", "knn", "--train", str(train), "--test", str(test),
            "--k", ",".join(map(str, KS)), "--out", str(root / "run"), "--overwrite",
        ]
        sklearn_cmd = [sys.executable, __file__, "--sklearn-script", str(train), str(test)]
        accuracy = {"vitprobe": ours(), "scikit-learn": sklearn_knn(x_train, y_train, x_test, y_test)}
        if baseline is not None:
            accuracy["baseline"] = ours(baseline.knn_evaluate)
            assert accuracy["baseline"] == accuracy["vitprobe"], "the baseline's results differ"
        names = ("vitprobe", "scikit-learn", "vitprobe knn", "script") + (("baseline",) if baseline else ())
        times: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(args.repeats):
            arms = {
                "vitprobe": lambda: ours(),
                "scikit-learn": lambda: sklearn_knn(x_train, y_train, x_test, y_test),
                "vitprobe knn": lambda: subprocess.run(vitprobe_cmd, check=True, capture_output=True),
                "script": lambda: subprocess.run(sklearn_cmd, check=True, capture_output=True),
            }
            if baseline is not None:
                arms["baseline"] = lambda: ours(baseline.knn_evaluate)
            names = list(arms) if rep % 2 == 0 else list(reversed(arms))
            for name in names:
                start = time.perf_counter()
                arms[name]()
                times[name].append(time.perf_counter() - start)
        print(
            f"{args.train_rows} train / {args.test_rows} test × D={args.dim}, {args.classes} classes, k = "
            f"{', '.join(map(str, KS))}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores, {args.repeats} interleaved repeats"
        )
        print("| what | vitprobe (s) | scikit-learn (s) | ratio sklearn / vitprobe |")
        print("|---|---|---|---|")
        pairs = (("in-process", "vitprobe", "scikit-learn"), ("whole commands", "vitprobe knn", "script"))
        if baseline is not None:
            pairs += ((f"in-process, {args.baseline.name} instead of scikit-learn", "vitprobe", "baseline"),)
        for label, a, b in pairs:
            ratios = [s / v for s, v in zip(times[b], times[a], strict=True)]
            print(f"| {label} | {summary(times[a])} | {summary(times[b])} | **{summary(ratios)}×** |")
        print("| k | vitprobe top-1 / top-5 (%) | scikit-learn top-1 / top-5 (%) |")
        print("|---|---|---|")
        for k in KS:
            v, s = accuracy["vitprobe"][k], accuracy["scikit-learn"][k]
            print(
                f"| {k} | {100 * v['top1']:.2f} / {100 * v['top5']:.2f} | "
                f"{100 * s['top1']:.2f} / {100 * s['top5']:.2f} |"
            )


if __name__ == "__main__":
    main()
