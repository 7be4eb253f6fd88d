"""Extraction throughput: `vitprobe extract` side by side with a plain timm + ImageFolder + DataLoader loop.

Run by hand (no network, no weights needed):

    .venv/bin/python benchmarks/extract_throughput.py [--images 128] [--repeats 5] [--model timm:NAME]

Both arms run the same random-init backbone over the same generated folder of 256x320 JPEGs with the same
batch size, DataLoader workers and torch threads, and store the same tokens (all tokens of the last block,
fp16) on disk: the plain loop as one safetensors file, `vitprobe extract` as a cache (shards, manifest,
hashes, fsync). Repeats are interleaved (ABBA...) so a shared, noisy machine slows both alike; the script
prints each arm's images/s (median, min-max) and the per-repeat speed ratio vitprobe / plain, and with
`--json` writes them to a file. Model loading is excluded from both arms' times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

IMAGENET_TRAIN = 1_281_167


def make_images(root: Path, n: int) -> Path:
    """`n` random 256x320 JPEGs in 4 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def plain_loop(model_name: str, root: Path, out: Path, *, batch_size: int, workers: int) -> float:
    """What one writes without vitprobe: ImageFolder + timm's eval transform + DataLoader, the last block's
    tokens before the norm in fp16, one safetensors file. Returns the seconds of the loop and the save."""
    import timm
    import torch
    from safetensors.torch import save_file
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    model = timm.create_model(model_name.removeprefix("timm:"), pretrained=False).eval()
    config = timm.data.resolve_data_config({}, model=model)
    dataset = ImageFolder(str(root), transform=timm.data.create_transform(**config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    started = time.perf_counter()
    parts, labels = [], []
    with torch.inference_mode():
        for images, y in loader:
            [(patches, prefix)] = model.forward_intermediates(
                images, indices=[len(model.blocks) - 1], norm=False, output_fmt="NLC",
                intermediates_only=True, return_prefix_tokens=True, stop_early=True)
            parts.append(torch.cat([prefix, patches], dim=1).half())  # (B, T, D)
            labels.append(y)
    save_file({"tokens": torch.cat(parts), "labels": torch.cat(labels)}, str(out))
    return time.perf_counter() - started


def vitprobe_extract(model_name: str, root: Path, out: Path, *, batch_size: int, workers: int) -> float:
    from vitprobe.extract import ExtractConfig, extract

    config = ExtractConfig(model=model_name, data=f"imagefolder:{root}", split="all", out=out,
                           random_init=True, batch_size=batch_size, workers=workers, store="fp16")
    return extract(config).seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    arms = {"plain": plain_loop, "vitprobe": vitprobe_extract}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="vitprobe-bench-") as tmp:
        root = make_images(Path(tmp) / "images", args.images)
        for name, arm in arms.items():  # warm-up: page cache, imports, first-call allocations
            arm(args.model, root, Path(tmp) / f"warm-{name}", batch_size=args.batch_size,
                workers=args.workers)
        for r in range(args.repeats):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                seconds[name].append(arms[name](args.model, root, out, batch_size=args.batch_size,
                                                workers=args.workers))
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    rates = {name: [args.images / s for s in values] for name, values in seconds.items()}
    ratios = [p / v for p, v in zip(seconds["plain"], seconds["vitprobe"], strict=True)]
    result = {
        "model": args.model, "images": args.images, "repeats": args.repeats, "batch_size": args.batch_size,
        "workers": args.workers, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0)),
        "images_per_s": {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                         for name, v in rates.items()},
        "ratio_vitprobe_over_plain": {"median": statistics.median(ratios), "min": min(ratios),
                                      "max": max(ratios), "per_repeat": ratios},
    }
    for name, v in result["images_per_s"].items():
        print(f"{name:9s}{v['median']:8.1f} images/s (min {v['min']:.1f}, max {v['max']:.1f})")
    r = result["ratio_vitprobe_over_plain"]
    print(f"vitprobe / plain: {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}) over "
          f"{args.repeats} interleaved repeats")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
