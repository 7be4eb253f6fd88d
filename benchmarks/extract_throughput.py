"""Extraction throughput: `vitprobe extract` side by side with a plain timm + ImageFolder + DataLoader loop.

Run by hand (no network, no weights needed):

    .venv/bin/python benchmarks/extract_throughput.py [--images 128] [--repeats 5] [--model timm:NAME]

Both arms run the same random-init backbone over the same generated folder of 256x320 JPEGs with the same
batch size, DataLoader workers and torch threads, and store the same tokens (all tokens of the last block,
fp16) on disk: the plain loop as one safetensors file, `vitprobe extract` as a cache (shards, manifest,
hashes, fsync). Repeats are interleaved (ABBA...) so a shared, noisy machine slows both alike; the script
prints each arm's images/s (median, min-max) and the per-repeat speed ratio vitprobe / plain, and with
`--json` writes them to a file. Model loading is excluded from both arms' times.

With `--compile`, a third arm runs `vitprobe extract --compile` (torch.compile, inductor): its first batch
includes the compilation, so the script also reports every arm's steady rate (images after the first
batch / the time after it) and the compilation's one-time cost, measured cold in the warm-up run (an
empty inductor cache, `TORCHINDUCTOR_CACHE_DIR` pointed at a fresh folder) and warm in the repeats (the
cache a second run on the same machine finds); from those, the number of images after which `--compile`
has paid for itself:

    .venv/bin/python benchmarks/extract_throughput.py --compile --images 256 --repeats 5
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


Timing = tuple[float, float, int]  # (seconds in all, seconds until the first batch was done, its images)


def plain_loop(model_name: str, root: Path, out: Path, *, batch_size: int, workers: int) -> Timing:
    """What one writes without vitprobe: ImageFolder + timm's eval transform + DataLoader, the last block's
    tokens before the norm in fp16, one safetensors file. Times the loop and the save."""
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
    first = (0.0, 0)
    parts, labels = [], []
    with torch.inference_mode():
        for images, y in loader:
            [(patches, prefix)] = model.forward_intermediates(
                images, indices=[len(model.blocks) - 1], norm=False, output_fmt="NLC",
                intermediates_only=True, return_prefix_tokens=True, stop_early=True)
            parts.append(torch.cat([prefix, patches], dim=1).half())  # (B, T, D)
            labels.append(y)
            if not first[1]:
                first = (time.perf_counter() - started, len(y))
    save_file({"tokens": torch.cat(parts), "labels": torch.cat(labels)}, str(out))
    return time.perf_counter() - started, *first


def vitprobe_extract(
    model_name: str, root: Path, out: Path, *, batch_size: int, workers: int, compile: bool = False
) -> Timing:
    from vitprobe.extract import ExtractConfig, extract

    config = ExtractConfig(model=model_name, data=f"imagefolder:{root}", split="all", out=out,
                           random_init=True, batch_size=batch_size, workers=workers, store="fp16",
                           compile=compile)
    result = extract(config)
    return result.seconds, result.first_batch_seconds, result.first_batch_size


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--compile", action="store_true", help="add a `vitprobe extract --compile` arm")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    arms = {"plain": plain_loop, "vitprobe": vitprobe_extract}
    if args.compile:
        arms["vitprobe --compile"] = lambda *a, **k: vitprobe_extract(*a, **k, compile=True)
    timings: dict[str, list[Timing]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="vitprobe-bench-") as tmp:
        root = make_images(Path(tmp) / "images", args.images)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # cold for the warm-up run
        cold = {}
        for name, arm in arms.items():  # warm-up: page cache, imports, first-call allocations, compiling
            cold[name] = arm(args.model, root, Path(tmp) / f"warm-{name}", batch_size=args.batch_size,
                             workers=args.workers)
        for r in range(args.repeats):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                out = Path(tmp) / f"{name}-{r}".replace(" ", "")
                timings[name].append(arms[name](args.model, root, out, batch_size=args.batch_size,
                                                workers=args.workers))
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    rates = {name: [args.images / t[0] for t in values] for name, values in timings.items()}
    steady = {name: [(args.images - t[2]) / (t[0] - t[1]) for t in v] for name, v in timings.items()}
    ratios = [p[0] / v[0] for p, v in zip(timings["plain"], timings["vitprobe"], strict=True)]
    result = {
        "model": args.model, "images": args.images, "repeats": args.repeats, "batch_size": args.batch_size,
        "workers": args.workers, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0)),
        "images_per_s": {name: _summary(v) for name, v in rates.items()},
        "steady_images_per_s": {name: _summary(v) for name, v in steady.items()},
        "ratio_vitprobe_over_plain": {**_summary(ratios), "per_repeat": ratios},
    }
    for name, v in result["images_per_s"].items():
        w = result["steady_images_per_s"][name]
        print(f"{name:19s}{v['median']:8.1f} images/s (min {v['min']:.1f}, max {v['max']:.1f}); after the "
              f"first batch {w['median']:.1f} ({w['min']:.1f}-{w['max']:.1f})")
    r = result["ratio_vitprobe_over_plain"]
    print(f"vitprobe / plain: {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}) over "
          f"{args.repeats} interleaved repeats")
    if args.compile:
        name = "vitprobe --compile"
        pairs = zip(timings["plain"], timings[name], strict=True)
        steady_ratio = [((args.images - c[2]) / (c[0] - c[1])) / ((args.images - p[2]) / (p[0] - p[1]))
                        for p, c in pairs]
        per_image = {n: statistics.median((t[0] - t[1]) / (args.images - t[2]) for t in timings[n])
                     for n in ("plain", name)}
        gain = per_image["plain"] - per_image[name]  # seconds saved per image once compiled
        compile_cold = cold[name][1] - per_image[name] * cold[name][2]
        compile_warm = statistics.median(t[1] - per_image[name] * t[2] for t in timings[name])
        result["compile"] = {
            "steady_ratio_over_plain": {**_summary(steady_ratio), "per_repeat": steady_ratio},
            "compile_seconds_cold": compile_cold, "compile_seconds_warm": compile_warm,
            "break_even_images_cold": compile_cold / gain if gain > 0 else None,
            "break_even_images_warm": compile_warm / gain if gain > 0 else None,
        }
        c, s = result["compile"], result["compile"]["steady_ratio_over_plain"]
        print(f"--compile after the first batch / plain after its first: {s['median']:.2f}x "
              f"(min {s['min']:.2f}, max {s['max']:.2f}); "
              f"compilation {compile_cold:.1f} s cold, {compile_warm:.1f} s with the inductor cache warm")
        if gain > 0:
            print(f"--compile pays for itself after ~{c['break_even_images_cold']:.0f} images cold, "
                  f"~{c['break_even_images_warm']:.0f} warm")
        else:
            print("--compile was not faster per image here: it never pays for itself")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
