"""Benchmark: K probe heads in one pass over a streamed token cache vs K separate runs, side by side.

K = 3 read-outs (cls, mean, abmilp) × L learning rates, for L = 1, 3, 9 (K = 3, 9, 27). The caches have
ViT-Tiny's shape — 196 patch tokens + [cls], D = 192, fp16, in shards read one at a time (`--load stream`) —
and real content: scikit-learn's digits upsampled to 224×224, cut into 16×16-pixel patches and projected
to D channels by a fixed random matrix (plus a position code); [cls] is a projection of the whole image.

Arms, interleaved per repeat (the machine is shared and noisy; median and min–max are reported):
- one pass: one `run_probe` with every read-out and the whole lr grid (one bank per read-out);
- separate: K `run_probe` calls, one (read-out, lr) each;
- with `--commands`, the same as whole `vitprobe probe` commands (start-up, cache opening and writing
  included).

    .venv/bin/python benchmarks/multihead_speed.py                       # in-process, K = 3, 9, 27
    .venv/bin/python benchmarks/multihead_speed.py --commands --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Every lr trains each read-out on its own on these caches: a separate run whose only lr diverges fails (base
# lr 20 and 50 do for `mean`, 50 for `abmilp`), so the K = 27 grid is the default grid's 0.02 ... 10.
LR_GRIDS = {3: (1.0,), 9: (0.3, 1.0, 3.0), 27: (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)}
POOLS = ("cls", "mean", "abmilp")


def digits_cache(root: Path, split: str, *, dim: int, shard_size: int) -> Path:
    """Write a token cache of digits as 14×14 grids of D-dimensional patch tokens."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from vitprobe.cache import (
        FORMAT_NAME,
        FORMAT_VERSION,
        shard_entries,
        write_final_norm,
        write_manifest,
        write_shard,
    )

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    g = torch.Generator().manual_seed(0)
    project = torch.randn(256, dim, generator=g) / 16
    position = torch.randn(196, dim, generator=g) * 0.1
    cls_project = torch.randn(64, dim, generator=g) / 8
    path = root / split
    shards, n = [], len(y)
    for i, s in enumerate(range(0, n, shard_size)):
        images = torch.tensor(x[s : s + shard_size], dtype=torch.float32).view(-1, 1, 8, 8) / 16
        big = F.interpolate(images, size=224, mode="bilinear", align_corners=False)  # (b, 1, 224, 224)
        patches = F.unfold(big, kernel_size=16, stride=16).transpose(1, 2)  # (b, 196, 256)
        rows = {
            "patches": (patches @ project + position).half(),  # (b, 196, D)
            "cls": (images.flatten(1) @ cls_project).half(),  # (b, D)
            "labels": torch.tensor(y[s : s + shard_size]).long(),
            "indices": torch.arange(s, min(s + shard_size, n)).long(),
        }
        shards.append(write_shard(path, i, s, rows))
    write_manifest(
        path,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": {
                "spec": "digits-patches",
                "timm_name": "digits-patches",
                "checkpoint": "fixed-projection",
                "random_init": False,
                "source": "sklearn.datasets.load_digits",
            },
            "layers": [0],
            "grid": [14, 14],
            "dim": dim,
            "num_prefix_tokens": 1,
            "has_cls": True,
            "num_reg_tokens": 0,
            "tokens": "all",
            "store_dtype": "fp16",
            "views": 0,
            "seed": 0,
            "dataset": {
                "spec": "sklearn:digits",
                "split": split,
                "fingerprint": f"digits-{split}",
                "class_names": [str(i) for i in range(10)],
                "num_classes": 10,
            },
            "num_samples": n,
            "shard_size": shard_size,
            "shards": shard_entries(shards),
            "final_norm": write_final_norm(path, torch.nn.LayerNorm(dim, eps=1e-6)),
            "complete": True,
        },
    )
    return path


def probe_options(epochs: int, batch: int) -> dict[str, object]:
    return {"epochs": epochs, "min_steps": 0, "batch_size": batch, "load": "stream", "eval_every": 1}


def in_process(
    train: Path,
    test: Path,
    out: Path,
    pools: tuple[str, ...],
    grid: tuple[float, ...],
    opts: dict[str, object],
) -> float:
    from vitprobe.probe import ProbeConfig, run_probe

    start = time.perf_counter()
    run_probe(
        train, test, ProbeConfig.from_protocol("auto", pools=pools, lr_grid=grid, **opts), out, overwrite=True
    )
    return time.perf_counter() - start


def command(
    train: Path,
    test: Path,
    out: Path,
    pools: tuple[str, ...],
    grid: tuple[float, ...],
    opts: dict[str, object],
) -> float:
    args = [
        sys.executable,
        "-m",
        "vitprobe",
        "probe",
        "--train",
        str(train),
        "--test",
        str(test),
        "--out",
        str(out),
        "--overwrite",
        "--lr-grid",
        ",".join(f"{v:g}" for v in grid),
    ]
    for pool in pools:
        args += ["--pool", pool]
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default="3,9,27")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", action="store_true", help="time whole `vitprobe probe` commands")
    args = parser.parse_args()
    run = command if args.commands else in_process
    opts = probe_options(args.epochs, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = digits_cache(root, "train", dim=args.dim, shard_size=args.shard_size)
        test = digits_cache(root, "test", dim=args.dim, shard_size=args.shard_size)
        in_process(train, test, root / "warm", ("cls",), (1.0,), {**opts, "epochs": 1})  # imports, allocator
        print(
            f"{'commands' if args.commands else 'in-process'}: 1257 train / 540 test rows × 196 patches × "
            f"D={args.dim} (fp16, streamed, {args.shard_size}-row shards), {args.epochs} epochs, batch "
            f"{args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats"
        )
        print("| K | one pass (s) | K separate runs (s) | ratio separate / one pass | target 0.6 × K |")
        print("|---|---|---|---|---|")
        for k in map(int, args.ks.split(",")):
            grid = LR_GRIDS[k]
            ones, apart = [], []
            for rep in range(args.repeats):
                arms = ["one", "separate"] if rep % 2 == 0 else ["separate", "one"]
                for arm in arms:
                    if arm == "one":
                        ones.append(run(train, test, root / "one", POOLS, grid, opts))
                    else:
                        apart.append(
                            sum(
                                run(train, test, root / f"sep-{pool}-{lr:g}", (pool,), (lr,), opts)
                                for pool in POOLS
                                for lr in grid
                            )
                        )
            ratios = [a / o for a, o in zip(apart, ones, strict=True)]
            print(
                f"| {k} | {statistics.median(ones):.2f} ({min(ones):.2f}–{max(ones):.2f}) | "
                f"{statistics.median(apart):.2f} ({min(apart):.2f}–{max(apart):.2f}) | "
                f"**{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) | "
                f"{0.6 * k:.1f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
