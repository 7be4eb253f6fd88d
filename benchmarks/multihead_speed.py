"""Benchmark: K probe heads trained in one pass over a token cache vs K separate runs, side by side.

The cache is built from scikit-learn's digits (real 8×8 images, upsampled to 16×16 and cut into a 4×4 grid of
4×4-pixel patches, each projected to D channels by a fixed random matrix plus a fixed position code; the
[cls] token is a random projection of the whole image), written with vitprobe's cache writer and read back
shard by shard (`--load stream`, the large-cache path) or whole (`--load memory`). Both arms run the same
heads with the same seed and data order, so they end with identical weights; only the reading differs.

    .venv/bin/python benchmarks/multihead_speed.py                      # stream, 9 heads
    .venv/bin/python benchmarks/multihead_speed.py --load memory --repeat 4

Prints the wall time of each arm, the ratio, and the test accuracy of every read-out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def digits_cache(root: Path, split: str, *, dim: int, repeat: int, shard_size: int) -> Path:
    """Write a token cache of digits patches (train split tiled `repeat` times for timing)."""
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
    if split == "train":
        x, y = x.repeat(repeat, 0), y.repeat(repeat, 0)
    g = torch.Generator().manual_seed(0)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)  # (n, 1, 16, 16)
    patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # (n, 16, 16): 4×4 grid of 4×4 px
    project = torch.randn(16, dim, generator=g) / 4
    position = torch.randn(16, dim, generator=g) * 0.1
    tokens = patches @ project + position  # (n, 16, D)
    cls = images.flatten(1) @ (torch.randn(256, dim, generator=g) / 16)  # (n, D)
    n = len(y)
    rows = {
        "patches": tokens.half(),
        "cls": cls.half(),
        "labels": torch.tensor(y).long(),
        "indices": torch.arange(n).long(),
    }
    path = root / split
    shards = [
        write_shard(path, i, s, {k: v[s : s + shard_size] for k, v in rows.items()})
        for i, s in enumerate(range(0, n, shard_size))
    ]
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
            "grid": [4, 4],
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
                "fingerprint": "digits",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", default="cls,mean,abmilp")
    parser.add_argument("--lr-grid", default="1,3,10")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--repeat", type=int, default=4, help="tile the train split this many times")
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--load", choices=("stream", "memory"), default="stream")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vitprobe.cache import open_cache
    from vitprobe.devices import resolve_device
    from vitprobe.train import CacheSource, ProbeConfig, needed_keys, train_probes

    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = CacheSource(
            open_cache(
                digits_cache(root, "train", dim=args.dim, repeat=args.repeat, shard_size=args.shard_size)
            ),
            0,
        )
        test = CacheSource(
            open_cache(digits_cache(root, "test", dim=args.dim, repeat=1, shard_size=args.shard_size)), 0
        )
        cfg = ProbeConfig(
            pools=tuple(args.pools.split(",")),
            epochs=args.epochs,
            batch_size=args.batch_size,
            warmup_epochs=max(1, args.epochs // 10),
            lr_grid=tuple(map(float, args.lr_grid.split(","))),
            load=args.load,
            eval_every=1,
        )
        specs = [cfg.head_spec(p) for p in cfg.pools]
        keys = needed_keys(specs, train.keys, False)
        k = len(specs) * len(cfg.base_lrs)
        print(
            f"device {device}, {train.num_rows} train rows × {train.grid[0] * train.grid[1]} patches × "
            f"D={train.dim} (fp16, {args.load}), {test.num_rows} test rows, {args.epochs} epochs, K={k} heads"
        )

        # Warm-up (imports, allocator) so that neither arm pays one-time costs.
        warm = replace(cfg, pools=cfg.pools[:1], lr_grid=cfg.base_lrs[:1], epochs=1)
        train_probes(train, test, warm, specs[:1], keys=keys, device=device)

        start, cpu = time.perf_counter(), time.process_time()
        together = train_probes(train, test, cfg, specs, keys=keys, device=device)
        one_pass, one_pass_cpu = time.perf_counter() - start, time.process_time() - cpu

        start, cpu = time.perf_counter(), time.process_time()
        separate = {}
        for spec in specs:
            for blr in cfg.base_lrs:
                alone = replace(cfg, pools=(spec.pool,), lr_grid=(blr,))
                out = train_probes(
                    train, test, alone, [spec], keys=needed_keys([spec], train.keys, False), device=device
                )
                separate[(spec.pool, blr)] = out["readouts"][spec.pool]["run"]
        apart, apart_cpu = time.perf_counter() - start, time.process_time() - cpu

    # Same seed and data order: every head's per-epoch curves must match its separate twin exactly.
    same = all(
        r.curves == separate[(r.spec.pool, r.blr)].curves
        for v in together["readouts"].values()
        for r in v["runs"]
    )
    print(f"one pass, K={k} heads: {one_pass:7.2f} s wall, {one_pass_cpu:7.2f} s CPU")
    print(f"K separate runs:      {apart:7.2f} s wall, {apart_cpu:7.2f} s CPU")
    print(
        f"speed-up (separate / one pass): {apart / one_pass:.2f}x wall, {apart_cpu / one_pass_cpu:.2f}x CPU; "
        f"identical curves: {same}"
    )
    print("read-out   blr  epoch  holdout top-1  test top-1  test top-5")
    for name, r in together["readouts"].items():
        run, test_m = r["run"], r["test"]
        print(
            f"{name:9s} {run.blr:4g}  {run.best_epoch:5d}  {100 * run.best_score:12.2f}  "
            f"{100 * test_m.top1:10.2f}  {100 * test_m.top5:10.2f}"
        )


if __name__ == "__main__":
    main()
