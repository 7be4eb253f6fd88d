"""Benchmark: extract once + probe from the cache vs an online MAE-style loop, for E = 5, 20, 90 epochs.

Both arms train the same head (vitprobe's `cls` read-out: BatchNorm1d(affine=False) → Linear, MAE's linear
probe), with the same optimiser (the `mae` protocol's LARS, one base lr, vitprobe's batched optimiser), the
same batch size, warm-up + cosine schedule and number of steps, on the same images through the same ViT-Tiny
(random init, seed 0, eval transform), and evaluate on the test images after every epoch:

- cached: `vitprobe.extract.extract` of the train and test images (tokens of the last block, fp16), then
  `vitprobe.probe.run_probe` with `ProbeConfig.from_protocol("mae", epochs=E, min_steps=0, ...)`;
- online, in the style of MAE's main_linprobe.py: a DataLoader decodes and transforms the images every
  epoch and the frozen backbone runs on every batch (no_grad), the head trains on its [cls] token; each
  epoch ends with an evaluation pass (backbone on every test image).

Every online epoch does the same work, so the online arm runs `--online-epochs` epochs (default 2) and its
time for E epochs is extrapolated linearly (set-up + E × the measured epoch), which the table says; the
cached arm always runs in full. Arms are interleaved per repeat; median and min–max are reported.

    .venv/bin/python benchmarks/cached_vs_online.py                # 256 train / 128 test digits images
    .venv/bin/python benchmarks/cached_vs_online.py --online-epochs 5 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODEL = "timm:vit_tiny_patch16_224"
EPOCHS = (5, 20, 90)
BLR = 0.1


def digits_folder(root: Path, train: int, test: int) -> str:
    """scikit-learn's digits as 64×64 PNGs in DIR/{train,val}/<digit>/; returns the dataset spec."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for split, rows in (("train", range(train)), ("val", range(train, train + test))):
        for i in rows:
            folder = root / split / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((64, 64), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
    return f"imagefolder:{root}"


def probe_config(epochs: int, batch: int):  # noqa: ANN201
    from vitprobe.probe import ProbeConfig

    return ProbeConfig.from_protocol(
        "mae", pools=("cls",), epochs=epochs, min_steps=0, lr_grid=(BLR,), batch_size=batch,
        warmup_epochs=1.0, eval_every=1, select_on="test", device="cpu",
    )


def extract_both(spec: str, root: Path, workers: int) -> tuple[Path, Path, float]:
    from vitprobe.extract import ExtractConfig, extract

    start = time.perf_counter()
    paths = []
    for split in ("train", "val"):
        cfg = ExtractConfig(
            model=MODEL, data=spec, split=split, out=root / f"cache-{split}", random_init=True, seed=0,
            batch_size=64, workers=workers, device="cpu", overwrite=True,
        )
        paths.append(extract(cfg).path)
    return paths[0], paths[1], time.perf_counter() - start


def cached_probe(train: Path, test: Path, out: Path, epochs: int, batch: int) -> tuple[float, float]:
    """(seconds, test top-1) of one `run_probe`."""
    from vitprobe.probe import run_probe

    start = time.perf_counter()
    results = run_probe(train, test, probe_config(epochs, batch), out, overwrite=True)
    return time.perf_counter() - start, float(results["readouts"]["cls"]["top1"])


def online(spec: str, epochs: int, stop_after: int, batch: int, workers: int) -> tuple[float, float, float]:
    """An MAE-style online linear probe: (set-up seconds, seconds per epoch, test top-1 when it stopped).

    Runs `stop_after` of the `epochs` epochs of the schedule (the lr schedule is the full run's)."""
    import torch.nn.functional as F

    from vitprobe.data import open_dataset
    from vitprobe.extract import ExtractConfig, build_backbone
    from vitprobe.probe.engine import make_run
    from vitprobe.probe.protocols import lr_factor, plan_schedule
    from vitprobe.tokens import Tokens

    start = time.perf_counter()
    backbone = build_backbone(
        ExtractConfig(model=MODEL, data=spec, split="train", out=Path("."), random_init=True, seed=0)
    )
    transform = backbone.transform(train=False)
    train_set = open_dataset(spec, "train", transform=transform)
    test_set = open_dataset(spec, "val", transform=transform)
    cfg = probe_config(epochs, batch)
    schedule = plan_schedule(cfg, len(train_set))
    spec_ = cfg.head_spec("cls")
    num_classes = len(train_set.class_names)
    run = make_run(
        spec_, (BLR,), (cfg.lr(BLR, schedule.batch_size),), dim=backbone.dim, num_classes=num_classes,
        seed=cfg.seed, optimizer=cfg.optimizer_spec, stop_epoch=schedule.epochs, device=torch.device("cpu"),
    )
    loader_args = {
        "batch_size": schedule.batch_size, "num_workers": workers, "persistent_workers": workers > 0
    }
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **loader_args)
    test_loader = torch.utils.data.DataLoader(test_set, shuffle=False, **loader_args)
    torch.manual_seed(cfg.seed)  # the loader's shuffle

    def tokens_of(images: torch.Tensor) -> Tokens:
        with torch.no_grad():
            t = backbone.intermediates(images, [-1])[0]  # (B, T, D), before the final norm
        return Tokens(cls=t[:, 0], patches=t[:, 1:])

    setup = time.perf_counter() - start
    step, top1 = 0, 0.0
    epoch_start = time.perf_counter()
    for _ in range(stop_after):
        run.bank.train()
        for images, labels, _ in train_loader:
            logits = run.bank(tokens_of(images))  # (K, B, C)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(run.num_heads))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step(lr_factor(step, schedule))
            step += 1
        run.bank.eval()
        hits = 0
        with torch.no_grad():
            for images, labels, _ in test_loader:
                hits += int((run.bank(tokens_of(images))[0].argmax(dim=1) == labels).sum())
        top1 = hits / len(test_set)
    per_epoch = (time.perf_counter() - epoch_start) / stop_after
    return setup, per_epoch, top1


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=256, help="train images")
    parser.add_argument("--test", type=int, default=128, help="test images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--online-epochs", type=int, default=2, help="online epochs run (more: extrapolated)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="vitprobe-cvo-") as tmp:
        root = Path(tmp)
        spec = digits_folder(root / "images", args.train, args.test)
        cached: dict[int, list[float]] = {e: [] for e in EPOCHS}
        online_time: dict[int, list[float]] = {e: [] for e in EPOCHS}
        extract_s, per_epoch_s, top1 = [], [], {"cached": {}, "online": 0.0}
        for rep in range(args.repeats):
            for arm in ("online", "cached") if rep % 2 == 0 else ("cached", "online"):
                if arm == "online":
                    setup, per_epoch, top1["online"] = online(
                        spec, max(EPOCHS), args.online_epochs, args.batch_size, args.workers
                    )
                    per_epoch_s.append(per_epoch)
                    for e in EPOCHS:
                        online_time[e].append(setup + e * per_epoch)
                else:
                    train, test, seconds = extract_both(spec, root, args.workers)
                    extract_s.append(seconds)
                    for e in EPOCHS:
                        probe_s, top1["cached"][e] = cached_probe(
                            train, test, root / f"run-{e}", e, args.batch_size
                        )
                        cached[e].append(seconds + probe_s)
        print(
            f"{MODEL} (random init), {args.train} train / {args.test} test digits images, batch "
            f"{args.batch_size}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores, {args.workers} loader workers, {args.repeats} interleaved repeats"
        )
        print(
            f"extraction (train + test): {summary(extract_s)} s; online epoch (train + test pass): "
            f"{summary(per_epoch_s)} s, measured over {args.online_epochs} epochs"
        )
        print("| E | cached: extract + probe (s) | online (s) | ratio online / cached | target 0.5 × E |")
        print("|---|---|---|---|---|")
        for e in EPOCHS:
            ratios = [o / c for o, c in zip(online_time[e], cached[e], strict=True)]
            how = "measured" if e <= args.online_epochs else f"extrapolated from {args.online_epochs} epochs"
            print(
                f"| {e} | {summary(cached[e])} | {summary(online_time[e])} ({how}) | "
                f"**{statistics.median(ratios):.1f}×** ({min(ratios):.1f}–{max(ratios):.1f}) | "
                f"{0.5 * e:.1f}× |"
            )
        shown = ", ".join(f"E={e}: {100 * v:.1f} %" for e, v in top1["cached"].items())
        print(
            f"test top-1, cached: {shown}; online after {args.online_epochs} of {max(EPOCHS)} epochs: "
            f"{100 * top1['online']:.1f} %"
        )


if __name__ == "__main__":
    main()
