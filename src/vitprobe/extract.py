"""Extraction: run a backbone once over a dataset split and write its tokens into a token cache.

One pass, in eval mode under `torch.inference_mode()`; bf16 autocast, pinned memory and non-blocking copies
on CUDA; fp32 on CPU. The cache rows are a fixed plan: row r is image r // K, view r % K (K = max(views, 1)),
and shard s holds rows [s * shard_size, (s + 1) * shard_size). Every batch lies inside one shard, so a resumed
or multi-process run computes exactly the batches of a single uninterrupted run and writes the same bytes.

Under torchrun (WORLD_SIZE > 1) the shards still to write are dealt round-robin to the ranks; each rank writes
whole shards, and rank 0 records them in the manifest after every round.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    STORE_DTYPES,
    TOKEN_MODES,
    KeySpec,
    ShardInfo,
    bytes_per_sample,
    layout_from_manifest,
    lock_cache,
    read_manifest,
    remove_cache_files,
    remove_temp_files,
    shard_entries,
    shard_file,
    shard_infos,
    shard_layout,
    shard_problem,
    utc_now,
    write_final_norm,
    write_manifest,
    write_shard,
)
from vitprobe.devices import loader_workers
from vitprobe.errors import CacheError, VitprobeError
from vitprobe.progress import make_progress
from vitprobe.provenance import checkpoint_of, provenance, versions

if TYPE_CHECKING:
    from rich.console import Console

    from vitprobe.data import ImageDataset
    from vitprobe.models import Backbone

DEFAULT_SHARD_BYTES = 1_000_000_000  # about 1 GB of stored tensors per shard
SHARD_OVERHEAD_BYTES = 4096  # safetensors header and metadata, per shard (an upper bound)
VIEW_AUGMENT = {  # --views: the crop and flip of timm's training transform, without colour jitter
    "kind": "random-resized-crop+hflip", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5,
}


@dataclass(frozen=True)
class ExtractConfig:
    """How `vitprobe extract` runs; written into the cache manifest as `config`."""

    model: str  # preset name or timm:NAME: the backbone whose tokens are cached
    data: str  # dataset spec (imagefolder:DIR, imagenet:DIR, ...): the images
    split: str  # split of the dataset to extract (train, val, test, all)
    out: Path  # the cache directory (created; resumed when it holds the same extraction)
    checkpoint: str | None = None  # weights file or URL for the preset; None = the preset's own weights
    random_init: bool = False  # random weights (tests, offline demos), seeded by `seed`
    layers: tuple[int, ...] = (-1,)  # blocks whose outputs are stored (before the final norm); -1 = last
    batch_size: int = 64  # images per forward pass; batches never cross a shard boundary
    workers: int = 4  # DataLoader worker processes decoding images
    device: str = "auto"  # auto = CUDA when available (the local rank's GPU under torchrun), else CPU
    dtype: str = "auto"  # compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU
    store: str = "fp16"  # dtype of the stored tokens: fp16 halves the size of fp32 at ~1e-3 relative error
    tokens: str = "all"  # all = [cls] + registers + patches; cls = [cls] only; pooled = [cls] + patch mean
    views: int = 0  # augmented views per image (random-resized-crop + flip); 0 = the eval transform only
    seed: int = 0  # seeds random init, the --limit subset and the views (view v of image i: (seed, i, v))
    limit: int | None = None  # extract N images, class-stratified and seeded by `seed` (quick runs)
    shard_size: int | None = None  # rows per shard; None = about 1 GB of tensors per shard
    resume: bool = True  # continue an interrupted extraction in `out` from its last complete shard
    overwrite: bool = False  # replace a finished (or different) cache in `out`
    force: bool = False  # start even if the estimated size exceeds the free disk space
    img_size: int | None = None  # data-config override: input size (positions resampled); None = the model's
    mean: tuple[float, ...] | None = None  # data-config override: normalisation mean; None = the model's
    std: tuple[float, ...] | None = None  # data-config override: normalisation std; None = the model's
    crop_pct: float | None = None  # data-config override: center-crop fraction; None = the model's
    interpolation: str | None = None  # data-config override: resize interpolation; None = the model's


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction did; `vitprobe extract` prints it as its final line."""

    path: Path
    num_samples: int  # rows in the cache
    new_samples: int  # rows this run computed (all ranks)
    num_shards: int
    seconds: float  # wall time of the extraction loop
    cache_bytes: int  # size of the cache directory's files
    estimate_bytes: int  # the size estimated before starting
    skipped: bool  # the cache was already complete: nothing was computed
    is_main: bool = True  # rank 0 (the process that prints)
    world_size: int = 1

    @property
    def images_per_s(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Plan:
    """Everything decided before the loop; identical on every rank."""

    manifest: dict[str, Any]
    ranges: list[tuple[int, int]]  # (start, stop) of every shard
    done: list[ShardInfo]  # complete shards, a prefix of `ranges`
    skipped: bool = False
    estimate_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def extract(
    config: ExtractConfig, *, console: Console | None = None, backbone: Backbone | None = None
) -> ExtractResult:
    """Run `config.model` over `config.data` / `config.split` and write (or resume) the cache `config.out`.

    Under torchrun every rank calls this; the process group is created here (nccl on CUDA, gloo on CPU)
    unless one exists. Only rank 0 prints, to `console` (None: nothing is printed). `backbone`: an already
    loaded one (a study's shared load, the Python API's own model) instead of loading `config.model`.

    Raises:
        CacheError: `out` is locked, holds a different extraction, or the disk is too small.
        ModelError, CheckpointError, DatasetError: from loading the backbone or the dataset.
    """
    from rich.console import Console

    from vitprobe.data import open_dataset
    from vitprobe.devices import resolve_device, resolve_dtype

    _check_config(config)
    device = resolve_device(config.device)
    compute_dtype = resolve_dtype(config.dtype, device)
    rank, world, owns_group = _init_distributed(device)
    console = console or Console(stderr=True, quiet=True)  # None: a quiet library call
    say: Callable[[str], None] = console.print if rank == 0 else (lambda _: None)
    out = Path(config.out)
    try:
        if backbone is None:
            backbone = build_backbone(config, device=device)
        else:
            backbone.model.to(device).eval()
        layers = backbone.layer_indices(config.layers)
        if len(set(layers)) != len(layers):
            raise VitprobeError(
                f"--layers {config.layers} names a block twice ({layers})", "list each block once"
            )
        dataset = open_dataset(config.data, config.split)
        manifest = new_manifest(config, backbone, dataset, layers=layers, compute_dtype=compute_dtype,
                                device=device)
        with ExitStack() as stack:
            plan: _Plan | None = None
            error: VitprobeError | None = None
            if rank == 0:
                try:
                    stack.enter_context(lock_cache(out))
                    plan = _prepare(config, manifest, backbone)
                except VitprobeError as exc:
                    error = exc
            plan = _broadcast_plan(plan, error, world)
            for note in plan.notes:
                say(note)
            if plan.skipped:
                return ExtractResult(
                    path=out, num_samples=manifest["num_samples"], new_samples=0,
                    num_shards=len(plan.done), seconds=0.0, cache_bytes=_dir_bytes(out),
                    estimate_bytes=plan.estimate_bytes, skipped=True, is_main=rank == 0, world_size=world,
                )
            seconds, new_samples = _run(config, plan, backbone, dataset, device=device, dtype=compute_dtype,
                                        rank=rank, world=world, console=console)
        _barrier(world)
        return ExtractResult(
            path=out, num_samples=manifest["num_samples"], new_samples=new_samples,
            num_shards=len(plan.ranges), seconds=seconds, cache_bytes=_dir_bytes(out),
            estimate_bytes=plan.estimate_bytes, skipped=False, is_main=rank == 0, world_size=world,
        )
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def build_backbone(config: ExtractConfig, *, device: torch.device | str | None = None) -> Backbone:
    """The backbone `config` names, on `device`; random init is seeded by `config.seed` (same per rank)."""
    from vitprobe.models import DataOverrides, load_backbone

    torch.manual_seed(config.seed)
    data = DataOverrides(config.img_size, config.mean, config.std, config.crop_pct, config.interpolation)
    backbone = load_backbone(
        config.model, checkpoint=config.checkpoint, random_init=config.random_init, data=data
    )
    if device is not None:
        backbone.model.to(device)
    backbone.model.eval()
    return backbone


def new_manifest(
    config: ExtractConfig,
    backbone: Backbone,
    dataset: ImageDataset,
    *,
    layers: Sequence[int],
    compute_dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """The manifest of the cache `config` describes, with no shard written yet."""
    num_images = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    num_reg = backbone.num_prefix_tokens - int(backbone.has_cls)  # registers (or distillation tokens)
    layout = shard_layout(
        tokens=config.tokens, num_layers=len(layers), grid=backbone.grid, dim=backbone.dim,
        has_cls=backbone.has_cls, num_reg_tokens=num_reg, store_dtype=config.store, views=config.views,
    )
    num_samples = num_images * max(config.views, 1)
    shard_size = config.shard_size or max(1, DEFAULT_SHARD_BYTES // bytes_per_sample(layout))
    dc = backbone.data_config()
    transform = {
        "input_size": list(dc["input_size"]), "crop_pct": dc.get("crop_pct"),
        "crop_mode": dc.get("crop_mode"), "interpolation": dc.get("interpolation"),
        "mean": list(dc["mean"]), "std": list(dc["std"]),
        "train_augment": dict(VIEW_AUGMENT) if config.views else None,
    }
    report = backbone.report
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": utc_now(),
        "versions": versions(),
        "model": {"spec": report.model, "timm_name": report.timm_name, "checkpoint": report.checkpoint_id,
                  "random_init": report.random_init, "source": report.source},
        "layers": list(layers),
        "depth": backbone.depth,
        "grid": list(backbone.grid),
        "patch_size": backbone.patch_size,
        "dim": backbone.dim,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "has_cls": backbone.has_cls,
        "num_reg_tokens": num_reg,
        "tokens": config.tokens,
        "store_dtype": config.store,
        "compute_dtype": _dtype_name(compute_dtype),
        "device": device.type,
        "transform": transform,
        "views": config.views,
        "seed": config.seed,
        "dataset": {"spec": config.data, "split": dataset.split, "fingerprint": dataset.fingerprint,
                    "class_names": list(dataset.class_names), "num_classes": len(dataset.class_names),
                    "num_images": num_images, "limit": config.limit,
                    "selection": None if num_images == len(dataset) else "stratified"},
        "num_samples": num_samples,
        "shard_size": shard_size,
        "keys": {k: {"shape": ["n", *spec.shape], "dtype": _st_to_name(spec)} for k, spec in layout.items()},
        "bytes_per_sample": bytes_per_sample(layout),
        "shards": [],
        "final_norm": {"file": None, "type": None, "eps": None},
        "config": _config_dict(config),
        "complete": False,
        "provenance": provenance(device=device, checkpoint=checkpoint_of(report), dataset={
            "spec": config.data, "split": dataset.split, "fingerprint": dataset.fingerprint}),  # fmt: skip
    }


# Manifest fields that must agree for `--out` to be resumed (or reported complete) rather than refused.
IDENTITY_FIELDS: tuple[tuple[str, ...], ...] = (
    ("model", "spec"), ("model", "timm_name"), ("model", "checkpoint"), ("layers",), ("grid",), ("dim",),
    ("tokens",), ("store_dtype",), ("compute_dtype",), ("transform",), ("views",), ("seed",),
    ("dataset", "spec"), ("dataset", "split"), ("dataset", "fingerprint"), ("dataset", "selection"),
    ("num_samples",), ("shard_size",),
)


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between the extraction in a cache and the one requested."""
    diffs = []
    for path in IDENTITY_FIELDS:
        a, b = _get(old, path), _get(new, path)
        if a != b:
            diffs.append(f"{'.'.join(path)}: cache has {a!r}, this run {b!r}")
    return diffs


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) of every shard: consecutive blocks of `shard_size` rows, the last one shorter."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def view_seed(seed: int, index: int, view: int) -> int:
    """RNG seed of view `view` of dataset image `index`: a hash, independent of workers and ranks."""
    digest = hashlib.blake2b(f"{seed}:{index}:{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def view_transform(backbone: Backbone) -> Callable[[Any], torch.Tensor]:
    """The model's timm training transform cut down to random-resized-crop + flip (no colour jitter)."""
    from timm.data import create_transform

    dc = backbone.data_config()
    return create_transform(
        input_size=dc["input_size"], is_training=True, interpolation=dc["interpolation"], mean=dc["mean"],
        std=dc["std"], scale=tuple(VIEW_AUGMENT["scale"]), ratio=tuple(VIEW_AUGMENT["ratio"]),
        hflip=VIEW_AUGMENT["hflip"], color_jitter=None, auto_augment=None, re_prob=0.0,
    )


class CacheRows(torch.utils.data.Dataset):
    """Cache row r -> (image tensor, label, dataset index, view); a view is seeded by (seed, index, view)."""

    def __init__(self, dataset: ImageDataset, transform: Callable[[Any], torch.Tensor], *, views: int,
                 seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset) * max(self.views, 1)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int, int]:
        position, view = divmod(row, max(self.views, 1))
        index = self.dataset.rows[position]  # the dataset index (a --limit subset maps its rows back)
        image = self.dataset.load_image(position)
        if not self.views:
            return self.transform(image), int(self.dataset.labels[position]), index, 0
        state = random.getstate()
        try:
            seed = view_seed(self.seed, index, view)
            random.seed(seed)  # timm's RandomResizedCrop draws from `random`
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # torchvision's flip draws from torch
                pixels = self.transform(image)
        finally:
            random.setstate(state)
        return pixels, int(self.dataset.labels[position]), index, view


class ShardBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of row ids over the given shard ranges, in order; a batch never crosses a shard boundary."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.ranges = list(ranges)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(math.ceil((stop - start) / self.batch_size) for start, stop in self.ranges)


def split_tokens(
    outs: Sequence[torch.Tensor], *, num_prefix_tokens: int, has_cls: bool, tokens: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Per-layer token sequences -> the tensors a shard stores, in the store dtype.

    Args:
        outs: one (B, T, D) tensor per layer, prefix tokens first (`Backbone.intermediates`).
        num_prefix_tokens: [cls] + register tokens at the start of each sequence.
        has_cls: whether prefix token 0 is [cls].
        tokens: `all`, `cls` or `pooled` (see `shard_layout`).
        dtype: the store dtype.
    """
    x = torch.stack(list(outs), dim=1)  # (B, L, T, D)
    prefix = x[:, :, :num_prefix_tokens]  # (B, L, prefix, D)
    patches = x[:, :, num_prefix_tokens:]  # (B, L, P, D)
    parts: dict[str, torch.Tensor] = {}
    if tokens == "all":
        parts["patches"] = patches
    if has_cls:
        parts["cls"] = prefix[:, :, 0]  # (B, L, D)
    if tokens == "all" and num_prefix_tokens > int(has_cls):
        parts["reg"] = prefix[:, :, int(has_cls):]  # (B, L, R, D)
    if tokens == "pooled":
        parts["mean"] = patches.float().mean(dim=2)  # (B, L, D), averaged in fp32
    squeeze = x.shape[1] == 1
    return {k: (v.squeeze(1) if squeeze else v).to(dtype) for k, v in parts.items()}  # drop L when one layer


def estimate_cache_bytes(num_samples: int, bytes_per_row: int, shard_size: int) -> int:
    """Stored bytes of a cache: rows x bytes per row plus a header per shard."""
    return num_samples * bytes_per_row + math.ceil(num_samples / shard_size) * SHARD_OVERHEAD_BYTES


def format_bytes(n: float) -> str:
    """Decimal units, as disks are sold: 388.1 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# --- internals --------------------------------------------------------------------------------------------
def _check_config(config: ExtractConfig) -> None:
    checks = [
        (config.tokens in TOKEN_MODES, f"--tokens {config.tokens!r}", f"use one of {', '.join(TOKEN_MODES)}"),
        (config.store in STORE_DTYPES, f"--store {config.store!r}", f"use one of {', '.join(STORE_DTYPES)}"),
        (config.batch_size > 0, f"--batch-size {config.batch_size}", "use a positive batch size"),
        (config.workers >= 0, f"--workers {config.workers}", "use 0 (load in the main process) or more"),
        (config.views >= 0, f"--views {config.views}", "use 0 (eval transform) or a positive number"),
        (config.limit is None or config.limit > 0, f"--limit {config.limit}", "use a positive number"),
        (config.shard_size is None or config.shard_size > 0, f"--shard-size {config.shard_size}",
         "use a positive number of samples per shard"),
        (len(config.layers) > 0, "--layers is empty", "name at least one block, e.g. --layers -1"),
        (not (config.random_init and config.checkpoint), "--random-init with --checkpoint",
         "pass one of them"),
    ]
    for ok, what, hint in checks:
        if not ok:
            raise VitprobeError(f"invalid option {what}", hint)


def _prepare(config: ExtractConfig, manifest: dict[str, Any], backbone: Backbone) -> _Plan:
    """Rank 0, lock held: decide between a fresh cache, a resume, or nothing to do; check the disk."""
    out = Path(config.out)
    ranges = shard_ranges(manifest["num_samples"], manifest["shard_size"])
    notes = [f"removed {f.name} left by an interrupted run" for f in remove_temp_files(out)]
    done: list[ShardInfo] = []
    old = None if config.overwrite else read_manifest(out)
    if config.overwrite:
        remove_cache_files(out)
    if old is not None:
        diffs = identity_diff(old, manifest)
        if diffs:
            raise CacheError(
                f"{out} holds a cache of a different extraction ({'; '.join(diffs)})",
                "choose another --out, or pass --overwrite to replace that cache",
            )
        kept = _intact_prefix(out, shard_infos(old), ranges, manifest)
        if old["complete"] and len(kept) == len(ranges):
            return _Plan(manifest=old, ranges=ranges, done=kept, skipped=True,
                         estimate_bytes=_dir_bytes(out),
                         notes=[f"{out} is already a complete cache; pass --overwrite to extract it again"])
        if config.resume or old["complete"]:  # a complete cache with a lost shard is repaired, never wiped
            done = kept
            manifest["created"] = old.get("created", manifest["created"])
            notes.append(f"resuming {out}: {len(done)} of {len(ranges)} shards already written")
        else:
            remove_cache_files(out)
    per_row = manifest["bytes_per_sample"]
    estimate = estimate_cache_bytes(manifest["num_samples"], per_row, manifest["shard_size"])
    remaining = estimate_cache_bytes(manifest["num_samples"] - sum(s.num_samples for s in done), per_row,
                                     manifest["shard_size"])
    free = shutil.disk_usage(out).free
    notes.append(
        f"estimated cache size {format_bytes(estimate)} ({manifest['num_samples']:,} samples x "
        f"{format_bytes(per_row)} in {len(ranges)} shards; {format_bytes(remaining)} to write); "
        f"free disk at {out}: {format_bytes(free)}"
    )
    if remaining > free and not config.force:
        raise CacheError(
            f"the cache needs about {format_bytes(remaining)} more but only {format_bytes(free)} is free "
            f"at {out}",
            "free disk space, choose another --out (or --store/--tokens/--layers for a smaller cache), "
            "or pass --force",
        )
    manifest["final_norm"] = write_final_norm(out, backbone.final_norm)
    manifest["shards"] = shard_entries(done)
    write_manifest(out, manifest)
    return _Plan(manifest=manifest, ranges=ranges, done=done, estimate_bytes=estimate, notes=notes)


def _intact_prefix(
    out: Path, done: list[ShardInfo], ranges: list[tuple[int, int]], manifest: dict[str, Any]
) -> list[ShardInfo]:
    """The recorded shards up to the first one whose range is off the plan or whose file is missing or has
    an unreadable header or the wrong tensors (checked from the header; the bytes are not re-hashed)."""
    layout = layout_from_manifest(manifest)
    kept = []
    for i, info in enumerate(done):
        if i >= len(ranges) or (info.start, info.stop) != ranges[i] or info.file != shard_file(i):
            break
        if shard_problem(out, info, layout) is not None:
            break
        kept.append(info)
    return kept


def _run(
    config: ExtractConfig,
    plan: _Plan,
    backbone: Backbone,
    dataset: ImageDataset,
    *,
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    world: int,
    console: Console,
) -> tuple[float, int]:
    """The extraction loop of one rank; returns (seconds, rows computed by all ranks)."""
    from torch.utils.data import DataLoader

    out = Path(config.out)
    manifest = plan.manifest
    todo = list(range(len(plan.done), len(plan.ranges)))  # shard numbers still to write
    mine = todo[rank::world]
    rounds = math.ceil(len(todo) / world)
    layout = layout_from_manifest(manifest)
    limited = _Limit(dataset, manifest["dataset"]["num_images"], seed=config.seed)
    transform = view_transform(backbone) if config.views else backbone.transform(train=False)
    rows = CacheRows(limited, transform, views=config.views, seed=config.seed)  # type: ignore[arg-type]
    my_ranges = [plan.ranges[s] for s in mine]
    cuda = device.type == "cuda"
    loader = DataLoader(
        rows,
        batch_sampler=ShardBatches(my_ranges, config.batch_size),
        num_workers=loader_workers(config.workers),
        pin_memory=cuda,
        persistent_workers=False,
    )
    store_dtype = STORE_DTYPES[manifest["store_dtype"]][0]
    done = list(plan.done)
    total_new = sum(stop - start for start, stop in (plan.ranges[s] for s in todo))
    mine_rows = sum(stop - start for start, stop in my_ranges)
    progress = make_progress(console, rate_unit="img/s", enabled=rank == 0)
    label = "extracting" if world == 1 else f"extracting (rank 0 of {world})"
    start_time = time.perf_counter()
    with _SigintWatch(), progress:
        task = progress.add_task(label, total=mine_rows)
        batches = iter(loader)
        for j, shard in enumerate(mine):
            start, stop = plan.ranges[shard]
            buffers = _buffers(layout, stop - start, pin=cuda)
            filled = 0
            while filled < stop - start:
                images, labels, indices, views = next(batches)
                images = images.to(device, non_blocking=cuda)
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                            enabled=dtype != torch.float32):
                    outs = backbone.intermediates(images, manifest["layers"])
                parts = split_tokens(
                    outs, num_prefix_tokens=manifest["num_prefix_tokens"], has_cls=manifest["has_cls"],
                    tokens=manifest["tokens"], dtype=store_dtype,
                )
                parts.update(labels=labels, indices=indices, views=views)
                n = images.shape[0]
                for key, buf in buffers.items():
                    _fill(buf, parts[key], filled, key)
                filled += n
                progress.advance(task, n)
            if cuda:
                torch.cuda.synchronize(device)  # the non-blocking copies into `buffers` have landed
            _check_finite(buffers, out / shard_file(shard), start, stop, manifest)
            info = write_shard(out, shard, start, buffers)
            _record_round(out, manifest, done, info, world=world, rank=rank)
            if rank == 0 and not progress.console.is_terminal:
                console.print(f"wrote {info.file} (rows {start}-{stop}), round {j + 1}/{rounds}")
        for _ in range(len(mine), rounds):  # ranks with one shard fewer still take part in the last round
            _record_round(out, manifest, done, None, world=world, rank=rank)
    seconds = time.perf_counter() - start_time
    if rank == 0:
        assert [(s.start, s.stop) for s in done] == plan.ranges, "every shard of the plan is written"
        manifest["shards"] = shard_entries(done)
        manifest["complete"] = True
        write_manifest(out, manifest)
    return seconds, total_new


class _SigintWatch:
    """While extracting: note that SIGINT arrived, and report DataLoader workers killed by it as Ctrl-C.

    Ctrl-C sends SIGINT to the whole process group, so the DataLoader workers die of it too. Usually the main
    process raises KeyboardInterrupt first, but it may instead see the dead workers first (or have its
    KeyboardInterrupt swallowed while the loader cleans up), and then raises `RuntimeError: DataLoader worker
    (pid(s) N) exited unexpectedly`. After a SIGINT that error is turned into KeyboardInterrupt; without one
    (a worker that crashed) it stays an error. The handler chains to the one it replaces, which is restored
    on exit; it is only installed in the main thread over a Python-level handler (not when SIGINT is ignored).
    """

    def __init__(self) -> None:
        self.seen = False
        self._installed = False
        self._previous: Callable[[int, FrameType | None], Any] = signal.default_int_handler

    def __enter__(self) -> _SigintWatch:
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and callable(previous):
            self._previous = previous
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        self._previous(signum, frame)  # Python's default raises KeyboardInterrupt

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        if self.seen and isinstance(exc, RuntimeError) and "DataLoader worker (pid" in str(exc):
            raise KeyboardInterrupt from exc


class _Limit:
    """`n` images of a dataset for --limit, class-stratified and seeded (`vitprobe.data.stratified_subset`),
    in dataset order; `rows[i]` is the dataset index of row i (all rows when `n` covers the dataset)."""

    def __init__(self, dataset: ImageDataset, n: int, *, seed: int) -> None:
        from vitprobe.data import stratified_subset

        self.dataset = dataset
        self.rows = stratified_subset(dataset.labels, n, seed=seed)
        self.labels = [dataset.labels[i] for i in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, i: int) -> Any:
        return self.dataset.load_image(self.rows[i])


def _buffers(layout: dict[str, KeySpec], n: int, *, pin: bool) -> dict[str, torch.Tensor]:
    """One shard's tensors on the CPU, filled batch by batch (pinned on CUDA for asynchronous copies)."""
    return {key: torch.empty((n, *s.shape), dtype=s.dtype, pin_memory=pin) for key, s in layout.items()}


def _fill(buf: torch.Tensor, part: torch.Tensor, offset: int, key: str) -> None:
    if tuple(part.shape[1:]) != tuple(buf.shape[1:]):
        raise VitprobeError(
            f"the backbone produced {key} of shape {tuple(part.shape[1:])} per image, expected "
            f"{tuple(buf.shape[1:])} from its grid",
            "check that the model's input size matches its data config",
        )
    buf[offset : offset + part.shape[0]].copy_(part, non_blocking=True)  # (b, ...) rows of the shard


def _check_finite(
    buffers: dict[str, torch.Tensor], file: Path, start: int, stop: int, manifest: dict[str, Any]
) -> None:
    """Refuse to write a shard holding inf or NaN tokens (fp16 overflows above 65504; so can fp16 compute)."""
    bad = [k for k, buf in buffers.items() if buf.is_floating_point() and not bool(torch.isfinite(buf).all())]
    if bad:
        raise CacheError(
            f"the backbone's {', '.join(bad)} tokens for rows {start}-{stop} ({file.name}) are not finite "
            f"once stored as {manifest['store_dtype']} (compute {manifest['compute_dtype']}); nothing was "
            "written for them",
            "pass --store bf16 or --store fp32 (fp16 holds only |x| <= 65504) and --overwrite; if they stay "
            "non-finite, try --dtype fp32",
        )


def _record_round(
    out: Path,
    manifest: dict[str, Any],
    done: list[ShardInfo],
    info: ShardInfo | None,
    *,
    world: int,
    rank: int,
) -> None:
    """Collect the shards written this round on every rank; rank 0 appends them to the manifest."""
    if world > 1:
        import torch.distributed as dist

        gathered: list[ShardInfo | None] = [None] * world
        dist.all_gather_object(gathered, info)
        infos = [i for i in gathered if i is not None]
    else:
        infos = [info] if info is not None else []
    done.extend(sorted(infos, key=lambda s: s.start))
    if rank == 0 and infos:
        manifest["shards"] = shard_entries(done)
        write_manifest(out, manifest)


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) from torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), True


def _broadcast_plan(plan: _Plan | None, error: VitprobeError | None, world: int) -> _Plan:
    """Rank 0's plan (or its error) on every rank; every rank raises the same error."""
    if world > 1:
        import torch.distributed as dist

        payload: list[Any] = [(plan, None if error is None else (error.message, error.hint))]
        dist.broadcast_object_list(payload, src=0)
        plan, message = payload[0]
        if error is None and message is not None:
            error = CacheError(*message)
    if error is not None:
        raise error
    assert plan is not None
    return plan


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) if Path(path).is_dir() else 0


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _st_to_name(spec: KeySpec) -> str:
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "I64": "int64"}[spec.st_dtype]


def _config_dict(config: ExtractConfig) -> dict[str, Any]:
    d = asdict(config)
    d["out"] = str(config.out)
    d["layers"] = list(config.layers)
    return d
