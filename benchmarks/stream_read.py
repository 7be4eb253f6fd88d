"""Benchmark: the streamed token feed (`probe --load stream`) vs a raw read of the same shard files.

A synthetic cache with ViT-Tiny's shape ([cls] + 196 patch tokens, D = 192, fp16, 75 kB a row) is written
in shards; the page cache holds it, so both arms read from memory at the speed of one copy per byte. Arms,
interleaved in each repeat (the machine is shared and noisy: median and min–max are reported):

- raw: every shard file read start to end into one reused 64 MiB buffer (`readinto`), the fastest plain read;
- feed: one shuffled training epoch of `iter_batches` over every row (batch 256), as `vitprobe probe --load
  stream` trains: window order and rows shuffled, batches gathered into reused buffers;
- feed, reopened: the same on a freshly opened cache whose shard hashes are on record (verified.json, written
  while the shards were written, as `vitprobe extract` does): no shard is hashed again;
- feed, first read (sha256): the same on a freshly opened cache with verified.json removed, so each shard's
  sha256 is computed on the way (what the first probe of a cache copied from elsewhere pays, once);
- probe epoch: what one epoch of `probe --load stream` with its default holdout reads — a shuffled pass over
  the 90 % fit rows plus an evaluation pass over the 10 % holdout (kept in memory from its second pass on);
- feed + to_tokens: the feed plus the fp16 → fp32 conversion on the CPU (the device here), into the
  stream's reused fp32 buffers, holding the previous batch's tokens meanwhile as a training step does;
- feed + fp32 in fresh memory: the same conversion by `.float()`, into fresh memory for every batch (what
  `to_tokens` did before the reused buffers), side by side.

Throughput is token bytes delivered per second (labels excluded); ratios are to the raw read of the same
repeat. With `--memory`, the peak RSS of whole `vitprobe probe --load stream` commands (one epoch, `mean`
read-out, so every patch token is streamed) on train caches of N and 2N rows, with 1 GB and 128 MB shards,
against one test cache: the feed's memory should not grow with the cache or the shard size. One command
each, about a minute and a few minutes:

    .venv/bin/python benchmarks/stream_read.py                 # 8,000 rows (600 MB), 128 MB shards
    .venv/bin/python benchmarks/stream_read.py --rows 20000 --repeats 7
    .venv/bin/python benchmarks/stream_read.py --memory        # 10,000 and 20,000 rows (0.76 / 1.5 GB)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _caches import write_cache  # noqa: E402

from vitprobe.buffers import release  # noqa: E402
from vitprobe.cache import open_cache  # noqa: E402
from vitprobe.probe.selection import stratified_holdout  # noqa: E402
from vitprobe.sources import CacheSource  # noqa: E402
from vitprobe.tokens import Split, iter_batches, to_tokens  # noqa: E402
from vitprobe.verified import VERIFIED_FILE  # noqa: E402

KEYS = ("cls", "patches")
CPU = torch.device("cpu")


def raw_read(path: Path) -> int:
    """Read every shard file into one reused buffer; returns the bytes read."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total = 0
    for file in sorted(path.glob("shard-*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def feed(split: Split, epoch: int, *, convert: str | None = None) -> int:
    """One shuffled epoch of batches; returns the token bytes delivered. Each batch is handed back as
    `to_tokens` does once it copied the batch out (to a GPU, where the conversion runs). With `convert`,
    the batch is converted to fp32 on the CPU while the previous batch's tokens are still held (as a
    training step holds them): "to_tokens" by `to_tokens` (into the stream's reused buffers), "fresh" by
    `.float()` into fresh memory (what `to_tokens` did before it had them)."""
    g = torch.Generator().manual_seed(epoch)
    total = 0
    held = None
    for batch in iter_batches(split, KEYS, 256, epoch=epoch, generator=g, drop_last=True):
        total += sum(batch[k].numel() * batch[k].element_size() for k in KEYS)
        if convert == "to_tokens":
            held = to_tokens(batch, CPU, None)
        elif convert == "fresh":
            held = {k: batch[k].float() for k in KEYS}
            release(batch, CPU)
        else:
            release(batch, CPU)
    del held
    return total


def evaluate(split: Split) -> int:
    """One evaluation pass (in order, batch 1024); returns the token bytes delivered."""
    total = 0
    for batch in iter_batches(split, KEYS, 1024):
        total += sum(batch[k].numel() * batch[k].element_size() for k in KEYS)
        release(batch, CPU)
    return total


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start) / 1e9


PEAK = """
import sys
from vitprobe.cli import main
try:
    main()
finally:  # the peak of this process's own memory (VmHWM starts afresh at exec; ru_maxrss would not)
    status = open("/proc/self/status").read()
    print("VmHWM", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
"""


def peak_rss(args: list[str]) -> int:
    """Peak resident set size (bytes) of one vitprobe command, read by the command itself from /proc."""
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-2000:]}")
    return int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) * 1024  # kB


def memory(args: argparse.Namespace, root: Path) -> None:
    """Peak RSS of `vitprobe probe --load stream` on caches of N and 2N rows, two shard sizes."""
    test = write_cache(root / "test", rows=1000, shard_rows=1700, seed=9, split="val")
    caches = {
        (rows, shard): write_cache(root / f"train-{rows}-{shard}", rows=rows, shard_rows=shard, seed=rows)
        for rows in (args.memory_rows, 2 * args.memory_rows)
        for shard in (13_000, 1_700)  # about 1 GB (the extract default) and 128 MB
    }
    peaks: dict[tuple[int, int], list[int]] = {key: [] for key in caches}
    for rep in range(args.repeats):
        for key in list(caches) if rep % 2 == 0 else list(reversed(caches)):
            command = [
                "probe", "--train", str(caches[key]), "--test", str(test),
                "--out", str(root / "run"), "--overwrite", "--load", "stream", "--pool", "mean",
                "--protocol", "mae", "--epochs", "1", "--batch-size", "256", "--lr-grid", "0.1",
            ]
            peaks[key].append(peak_rss(command))
    print(
        f"peak RSS of `vitprobe probe --load stream --pool mean --protocol mae --epochs 1 --batch-size 256` "
        f"(75.6 kB rows, 1,000-row test cache), {os.cpu_count()} cores, {args.repeats} interleaved repeats"
    )
    print("| train rows | cache | shards | peak RSS MB, median (min–max) | vs N rows, same shards |")
    print("|---|---|---|---|---|")
    for (rows, shard), values in peaks.items():
        base = statistics.median(peaks[(args.memory_rows, shard)])
        size = sum(f.stat().st_size for f in caches[(rows, shard)].glob("shard-*.safetensors"))
        mb = [v / 2**20 for v in values]
        print(
            f"| {rows:,} | {size / 1e9:.2f} GB | {shard:,} rows ({shard * 75.6e3 / 1e9:.2f} GB) | "
            f"{statistics.median(mb):.0f} ({min(mb):.0f}–{max(mb):.0f}) | "
            f"{statistics.median(values) / base:.2f}× |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--shard-rows", type=int, default=1700, help="rows per shard (1,700 = 128 MB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the cache (default: temp)")
    parser.add_argument("--memory", action="store_true", help="peak RSS of probe --load stream instead")
    parser.add_argument("--memory-rows", type=int, default=10_000, help="N of --memory (and 2N)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.memory:
            memory(args, Path(tmp))
            return
        path = write_cache(Path(tmp) / "train", rows=args.rows, shard_rows=args.shard_rows)
        size = sum(f.stat().st_size for f in path.glob("shard-*.safetensors"))
        cache = open_cache(path)
        source = CacheSource(cache, 0)
        everything = Split("train", source, torch.arange(source.num_rows))
        fit_rows, held_rows = stratified_holdout(source.labels, source.indices, 0.1, 0)
        fit, held = Split("train", source, fit_rows), Split("holdout", source, held_rows)
        raw_read(path)
        feed(everything, 0)  # warm: page cache, verification, allocator
        evaluate(held)

        def reopened() -> int:
            return feed(Split("train", CacheSource(open_cache(path), 0), torch.arange(source.num_rows)), 0)

        def first_read() -> int:
            (path / VERIFIED_FILE).unlink()  # forget the recorded hashes: every shard is hashed again
            return reopened()

        arms: dict[str, Callable[[], int]] = {
            "raw read": lambda: raw_read(path),
            "feed": lambda: feed(everything, 1),
            "feed, reopened (hashes on record)": reopened,
            "feed, first read (sha256)": first_read,
            "probe epoch (fit + holdout)": lambda: feed(fit, 1) + evaluate(held),
            "feed + to_tokens (fp32, CPU)": lambda: feed(everything, 1, convert="to_tokens"),
            "feed + fp32 in fresh memory (CPU)": lambda: feed(everything, 1, convert="fresh"),
        }
        speeds: dict[str, list[float]] = {name: [] for name in arms}
        for rep in range(args.repeats):
            names = list(arms) if rep % 2 == 0 else list(reversed(arms))
            for name in names:
                speeds[name].append(timed(arms[name]))
        print(
            f"{args.rows} rows × (1 + 196) tokens × D=192 fp16 ({size / 1e9:.2f} GB in "
            f"{len(cache.shards)} shards, page cache), batch 256, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, {args.repeats} interleaved repeats"
        )
        print("| arm | GB/s median (min–max) | ratio to raw read, median (min–max) |")
        print("|---|---|---|")
        raw = speeds["raw read"]
        for name, values in speeds.items():
            ratios = [v / r for v, r in zip(values, raw, strict=True)]
            print(
                f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f}) | "
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |"
            )


if __name__ == "__main__":
    main()
