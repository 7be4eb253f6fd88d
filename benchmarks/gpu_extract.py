"""The GPU extraction path in one short run: ViT-B/16 images/s end to end and the model-only ceiling.

Run by hand on a GPU machine (no network, no weights: random init); it also runs unchanged on a CPU:

    .venv/bin/python benchmarks/gpu_extract.py --json gpu_extract.json            # ~5 min on one GPU
    .venv/bin/python benchmarks/gpu_extract.py --quick --model timm:test_vit      # seconds, CPU (the test)

Arms, each timed after a warm-up (compilation excluded), in one process:

- `model` / `model+compile`: the forward pass alone on pre-decoded tensors already on the device, bf16
  autocast on CUDA (fp32 on CPU), without and with `torch.compile`: the ceiling for the rest.
- `extract cpu-decode` / `extract gpu-decode` (each also `+compile`): `vitprobe.extract` end to end over a
  generated folder of JPEGs (ImageNet-like 500x375), JPEG decoding by PIL in DataLoader workers or batched
  by `torchvision.io.decode_jpeg(device=...)` (nvJPEG on CUDA), the cache (fp16) written by the background
  writer; `write_wait_s` says how long the model waited for the disk.

A global time budget (`--budget-s`) skips the arms that no longer fit and says so; everything goes to stdout
as JSON (and to `--json FILE`). Ratios: each end-to-end arm over the model-only ceiling, gpu-decode over
cpu-decode, compiled over eager.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> Path:
    """`n` JPEGs of smooth random content (compressible like photos) in 4 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def time_model(model_name: str, *, batch_size: int, batches: int, compile_backend: str | None,
               device: Any) -> dict[str, Any]:
    """images/s of `Backbone.intermediates` on random pre-normalised tensors already on `device`."""
    import torch

    from vitprobe.devices import resolve_dtype
    from vitprobe.models import load_backbone

    backbone = load_backbone(model_name, random_init=True)
    backbone.model.to(device).eval()
    dtype = resolve_dtype("auto", device)
    _, h, w = backbone.data_config()["input_size"]
    x = torch.randn(batch_size, 3, h, w, device=device)
    forward = backbone.intermediates
    if compile_backend:
        forward = torch.compile(forward, backend=compile_backend, dynamic=False)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            forward(x, [-1])

    started = time.perf_counter()
    for _ in range(2):  # warm-up, and compilation
        step()
    sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": batch_size * batches / seconds, "seconds": seconds,
            "images": batch_size * batches, "warmup_s": warm, "dtype": str(dtype).removeprefix("torch.")}


def time_extract(model_name: str, root: Path, out: Path, *, decode: str, compile_backend: str | None,
                 batch_size: int, workers: int, device: str) -> dict[str, Any]:
    """`vitprobe.extract` end to end; `images_per_s` after the first batch (which includes compilation),
    `overall_images_per_s` with it."""
    from vitprobe.extract import ExtractConfig, extract

    config = ExtractConfig(
        model=model_name, data=f"imagefolder:{root}", split="all", out=out, random_init=True,
        batch_size=batch_size, workers=workers, device=device, store="fp16", decode=decode,
        compile=compile_backend is not None, compile_backend=compile_backend or "inductor",
    )
    result = extract(config)
    shutil.rmtree(out, ignore_errors=True)
    return {"images_per_s": result.steady_images_per_s, "overall_images_per_s": result.images_per_s,
            "seconds": result.seconds, "images": result.new_samples,
            "first_batch_s": result.first_batch_seconds,
            "write_wait_s": result.write_wait_seconds, "cache_bytes": result.cache_bytes}


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_base_patch16_224")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every arm runs")
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the end-to-end arms")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores, <=8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (+compile arms)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip the arms that would exceed it")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from vitprobe.devices import resolve_device

    device = resolve_device(args.device)
    quick = args.quick
    images = args.images or (16 if quick else 4096)
    batch_size = args.batch_size or (8 if quick else 256)
    workers = args.workers if args.workers is not None else min(8, len(os.sched_getaffinity(0)))
    size = (96, 72) if quick else (500, 375)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "model": args.model, "device": str(device), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": len(os.sched_getaffinity(0)), "workers": workers, "batch_size": batch_size, "images": images,
        "jpeg_size": list(size), "budget_s": args.budget_s, "date": time.strftime("%Y-%m-%d"), "arms": {},
        "skipped": [], "errors": {},
    }
    arms: list[tuple[str, Any]] = [
        ("model", lambda: time_model(args.model, batch_size=batch_size, batches=2 if quick else 20,
                                     compile_backend=None, device=device)),
        ("model+compile", lambda: time_model(args.model, batch_size=batch_size, batches=2 if quick else 20,
                                             compile_backend=args.compile_backend, device=device)),
    ]
    with tempfile.TemporaryDirectory(prefix="vitprobe-gpu-bench-") as tmp:
        root = make_jpegs(Path(tmp) / "images", images, size)
        for decode in ("cpu", "gpu"):
            for backend in (None, args.compile_backend):
                name = f"extract {decode}-decode" + ("+compile" if backend else "")
                arms.append((name, lambda d=decode, b=backend, n=name: time_extract(
                    args.model, root, Path(tmp) / n.replace(" ", "_"), decode=d, compile_backend=b,
                    batch_size=batch_size, workers=workers, device=args.device)))
        durations: list[float] = []
        for name, run in arms:
            spent = time.perf_counter() - started
            guess = max(durations) if durations else 0.0
            if spent + guess > args.budget_s:
                report["skipped"].append(f"{name}: {spent:.0f} s spent of the {args.budget_s:.0f} s budget")
                continue
            t0 = time.perf_counter()
            try:
                report["arms"][name] = run()
            except Exception as exc:  # one arm failing (e.g. no nvJPEG) must not lose the others' figures
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
            durations.append(time.perf_counter() - t0)
    report["ratios"] = _ratios(report["arms"])
    report["elapsed_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def _ratios(arms: dict[str, dict[str, Any]]) -> dict[str, float]:
    rate = {name: arm["images_per_s"] for name, arm in arms.items()}
    pairs = [  # (a, b): a / b
        ("extract gpu-decode", "extract cpu-decode"),
        ("extract gpu-decode+compile", "extract cpu-decode+compile"),
        ("model+compile", "model"),
        ("extract cpu-decode+compile", "extract cpu-decode"),
        ("extract gpu-decode+compile", "extract gpu-decode"),
        ("extract cpu-decode", "model"),
        ("extract gpu-decode", "model"),
        ("extract gpu-decode+compile", "model+compile"),
    ]
    return {f"{a} / {b}": rate[a] / rate[b] for a, b in pairs if a in rate and b in rate and rate[b] > 0}


if __name__ == "__main__":
    main()
