"""Extraction throughput: images/s and cache size for a tiny ViT and ViT-B/16 (random init) in one run.

Run by hand (no network, no weights needed):

    .venv/bin/python benchmarks/extract_throughput.py [--images 64] [--device auto] [--threads N]

It generates an image folder of random 256x320 JPEGs, runs `vitprobe.extract.extract` once per model into a
temporary cache (fp16 store, all tokens, last block) and prints, per model, the measured images/s of the
extraction loop (model load excluded), the cache size, the bytes per image and what that implies for
ImageNet-1k train (1,281,167 images).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

MODELS = ("timm:vit_tiny_patch16_224", "timm:vit_base_patch16_224")
IMAGENET_TRAIN = 1_281_167


def make_images(root: Path, n: int) -> str:
    """`n` random JPEGs in 4 class folders; returns the dataset spec."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return f"imagefolder:{root}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from rich.console import Console
    from rich.table import Table

    from vitprobe.cache import open_cache
    from vitprobe.extract import ExtractConfig, extract, format_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    table = Table(title=f"vitprobe extract throughput ({args.images} images, torch threads "
                        f"{torch.get_num_threads()}, batch {args.batch_size}, workers {args.workers})")
    for column in ("model", "device", "images/s", "seconds", "cache", "per image", "ImageNet train"):
        table.add_column(column, justify="left" if column in ("model", "device") else "right")
    with tempfile.TemporaryDirectory(prefix="vitprobe-bench-") as tmp:
        spec = make_images(Path(tmp) / "images", args.images)
        for model in MODELS:
            config = ExtractConfig(
                model=model, data=spec, split="all", out=Path(tmp) / model.replace(":", "_"),
                random_init=True, batch_size=args.batch_size, workers=args.workers, device=args.device,
                store="fp16",
            )
            started = time.perf_counter()
            result = extract(config, console=console)
            total = time.perf_counter() - started
            per_image = result.cache_bytes / result.num_samples
            manifest = open_cache(result.path).manifest
            table.add_row(
                model, f"{manifest['device']} {manifest['compute_dtype']}", f"{result.images_per_s:,.1f}",
                f"{result.seconds:.1f} ({total:.1f} with loading)", format_bytes(result.cache_bytes),
                format_bytes(per_image), format_bytes(per_image * IMAGENET_TRAIN),
            )
    Console(width=max(Console().width, 130)).print(table)


if __name__ == "__main__":
    main()
