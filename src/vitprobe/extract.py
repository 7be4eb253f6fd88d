"""Extraction: run a backbone once over a dataset split and write its tokens into a token cache.

One pass, in eval mode under `torch.inference_mode()`; bf16 autocast, pinned memory and non-blocking copies
on CUDA; fp32 on CPU. The cache rows are a fixed plan (vitprobe.rows): row r is image r // K, view r % K
(K = max(views, 1)), and shard s holds rows [s * shard_size, (s + 1) * shard_size). Every batch lies inside
one shard, so a resumed or multi-process run computes exactly the batches of a single uninterrupted run and
writes the same bytes. A shard is computed by vitprobe.shardfill and written by a background thread
(vitprobe.shardwriter) while the next one is computed.

Under torchrun (WORLD_SIZE > 1) the shards still to write are dealt round-robin to the ranks; each rank writes
whole shards, and rank 0 records them in the manifest after every round. Every round is also where the ranks
share their errors (vitprobe.ranks), so any rank's error stops all of them and is printed once.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.cache import (
    STORE_DTYPES,
    TOKEN_MODES,
    ShardInfo,
    layout_from_manifest,
    lock_cache,
    shard_entries,
    write_manifest,
    write_shard,
)
from vitprobe.devices import loader_workers
from vitprobe.errors import VitprobeError
from vitprobe.files import format_bytes
from vitprobe.loaders import close as close_loader
from vitprobe.loaders import guarded_loader
from vitprobe.plan import Plan, dir_bytes, estimate_cache_bytes, new_manifest, prepare
from vitprobe.progress import make_progress
from vitprobe.ranks import broadcast, exchange, init_distributed
from vitprobe.resume import extraction_id, identity_diff
from vitprobe.rows import (
    Limit,
    ShardBatches,
    shard_ranges,
    view_seed,
    view_transform,
)
from vitprobe.shardfill import fill_shard, make_forward
from vitprobe.shardwriter import ShardBuffers, ShardWriter
from vitprobe.signals import StopOnSignals

if TYPE_CHECKING:
    from rich.console import Console

    from vitprobe.data import ImageDataset
    from vitprobe.models import Backbone

__all__ = [
    "ExtractConfig", "ExtractResult", "build_backbone", "estimate_cache_bytes", "extract", "format_bytes",
    "identity_diff", "new_manifest", "shard_ranges", "view_seed", "view_transform",
]
DECODERS = ("cpu", "gpu")


@dataclass(frozen=True)
class ExtractConfig:
    """How `vitprobe extract` runs; written into the cache manifest as `config`."""

    model: str  # preset name or timm:NAME: the backbone whose tokens are cached
    data: str  # dataset spec (imagefolder:DIR, imagenet:DIR, ...): the images
    split: str  # split of the dataset to extract (train, val, test, all)
    out: Path  # the cache directory (created; resumed when it holds the same extraction)
    checkpoint: str | None = None  # weights file or URL for the preset; None = the preset's own weights
    random_init: bool = False  # random weights (tests, offline demos), seeded by `seed`
    layers: tuple[int, ...] | str = (-1,)  # blocks stored (before the final norm); -1 = last; "all" = every
    batch_size: int = 64  # images per forward pass; batches never cross a shard boundary
    workers: int = 4  # DataLoader worker processes decoding (or, with decode=gpu, reading) images
    device: str = "auto"  # auto = CUDA when available (the local rank's GPU under torchrun), else CPU
    dtype: str = "auto"  # compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU
    store: str = "fp16"  # stored tokens: fp16 (~1e-3 rel. error), bf16, fp32; fp8 / int8 halve fp16's size
    tokens: str = "all"  # all = [cls] + registers + patches; cls = [cls] only; pooled = [cls] + patch mean
    views: int = 0  # augmented views per image (random-resized-crop + flip); 0 = the eval transform only
    seed: int = 0  # seeds random init, the --limit subset and the views (view v of image i: (seed, i, v))
    limit: int | None = None  # extract N images, class-stratified and seeded by `seed` (quick runs)
    shard_size: int | None = None  # rows per shard; None = about 1 GB of tensors per shard
    resume: bool = True  # continue an interrupted extraction in `out` from its last complete shard
    overwrite: bool = False  # replace a finished (or different) cache in `out`
    force: bool = False  # start even if the estimated size exceeds the free disk space
    decode: str = "cpu"  # cpu = PIL + timm transform in the workers; gpu = batched decode_jpeg on the device
    compile: bool = False  # torch.compile the forward pass (pays off on a GPU over many batches)
    compile_backend: str = "inductor"  # torch.compile backend: inductor generates kernels; eager only traces
    break_lock: bool = False  # remove another run's extract.lock even if that run may be alive
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
    write_wait_seconds: float = 0.0  # of `seconds`, how long this rank's model waited for the shard writer
    first_batch_seconds: float = 0.0  # of `seconds`, until this rank's first batch was done (compilation)
    first_batch_size: int = 0

    @property
    def steady_images_per_s(self) -> float:
        """This rank's images/s after its first batch (what a long run sees once torch.compile is done)."""
        rows = self.new_samples // self.world_size - self.first_batch_size
        seconds = self.seconds - self.first_batch_seconds
        return rows / seconds if rows > 0 and seconds > 0 else self.images_per_s

    @property
    def images_per_s(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else 0.0


def extract(
    config: ExtractConfig, *, console: Console | None = None, backbone: Backbone | None = None
) -> ExtractResult:
    """Run `config.model` over `config.data` / `config.split` and write (or resume) the cache `config.out`.

    Under torchrun every rank calls this; the process group is created here (nccl on CUDA, gloo on CPU)
    unless one exists. Only rank 0 prints, to `console` (None: nothing is printed). SIGTERM stops it like
    Ctrl-C: `Terminated` (a KeyboardInterrupt) is raised once the lock is released. `backbone`: an already
    loaded one (a study's shared load, the Python API's own model) instead of loading `config.model`.

    Raises:
        CacheError: `out` is locked, holds a different extraction, or the disk is too small or full.
        ModelError, CheckpointError, DatasetError: from loading the backbone or the dataset, or an image.
    """
    from rich.console import Console

    from vitprobe.devices import resolve_device, resolve_dtype

    _check_config(config)
    device = resolve_device(config.device)
    compute_dtype = resolve_dtype(config.dtype, device)
    rank, world, owns_group = init_distributed(device)
    console = console or Console(stderr=True, quiet=True)  # None: a quiet library call
    def say(text: str) -> None:  # one line each, never hard-wrapped (logs are grepped)
        if rank == 0:
            console.print(text, soft_wrap=True, highlight=False, markup=False)

    out = Path(config.out)
    try:
        with StopOnSignals(), ExitStack() as stack:
            backbone, dataset, manifest = _setup(config, device, compute_dtype, rank=rank, world=world,
                                                 backbone=backbone)
            plan: Plan | None = None
            error: VitprobeError | None = None
            if rank == 0:
                try:
                    stack.enter_context(lock_cache(out, break_lock=config.break_lock, say=say))
                    plan = prepare(config, manifest, backbone)
                except VitprobeError as exc:
                    error = exc
            exchange(None, error, rank=rank, world=world, name_ranks=False)
            plan = broadcast(plan, world=world)
            assert plan is not None
            for note in plan.notes:
                say(note)
            if plan.skipped:
                return ExtractResult(
                    path=out, num_samples=manifest["num_samples"], new_samples=0,
                    num_shards=len(plan.done), seconds=0.0, cache_bytes=dir_bytes(out),
                    estimate_bytes=plan.estimate_bytes, skipped=True, is_main=rank == 0, world_size=world,
                )
            seconds, new_samples, timing = _run(config, plan, backbone, dataset, device=device,
                                                dtype=compute_dtype, rank=rank, world=world, console=console)
        return ExtractResult(
            path=out, num_samples=manifest["num_samples"], new_samples=new_samples,
            num_shards=len(plan.ranges), seconds=seconds, cache_bytes=dir_bytes(out),
            estimate_bytes=plan.estimate_bytes, skipped=False, is_main=rank == 0, world_size=world,
            **timing,
        )
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _setup(
    config: ExtractConfig, device: torch.device, compute_dtype: torch.dtype, *, rank: int, world: int,
    backbone: Backbone | None = None,
) -> tuple[Backbone, ImageDataset, dict[str, Any]]:
    """The backbone (`backbone`, moved to `device`, or loaded), the dataset and the new manifest, on every
    rank; any rank's error stops all of them."""
    from vitprobe.data import open_dataset

    error: VitprobeError | None = None
    result: Any = None
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
        result = (backbone, dataset, manifest)
    except VitprobeError as exc:
        error = exc
    exchange(None, error, rank=rank, world=world)
    return result


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
        (config.decode in DECODERS, f"--decode {config.decode!r}", f"use one of {', '.join(DECODERS)}"),
        (not (config.decode == "gpu" and config.views), "--decode gpu with --views",
         "augmented views are decoded on the CPU: drop --decode gpu (or --views)"),
    ]
    for ok, what, hint in checks:
        if not ok:
            raise VitprobeError(f"invalid option {what}", hint)


def _run(
    config: ExtractConfig,
    plan: Plan,
    backbone: Backbone,
    dataset: ImageDataset,
    *,
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    world: int,
    console: Console,
) -> tuple[float, int, dict[str, Any]]:
    """The extraction loop of one rank; returns (seconds, rows computed by all ranks, the timing fields of
    ExtractResult).

    Round j: fill shard j's buffers, hand them to the writer thread, collect the shard written in round
    j - 1 and share it (and any error) with the other ranks; rank 0 records the shards of a round in the
    manifest at the start of the next one, so that its own write errors are shared too.
    """
    from vitprobe.gpudecode import make_inputs

    out = Path(config.out)
    manifest = plan.manifest
    todo = list(range(len(plan.done), len(plan.ranges)))  # shard numbers still to write
    mine = todo[rank::world]
    rounds = math.ceil(len(todo) / world)
    layout = layout_from_manifest(manifest)
    limited = Limit(dataset, manifest["dataset"]["num_images"], seed=config.seed)
    my_ranges = [plan.ranges[s] for s in mine]
    cuda = device.type == "cuda"
    inputs = make_inputs(config, backbone, limited, device=device)
    loader = guarded_loader(
        inputs.rows,
        batch_sampler=ShardBatches(my_ranges, config.batch_size),
        num_workers=loader_workers(config.workers),
        pin_memory=cuda,
        persistent_workers=False,
        collate_fn=inputs.collate,
    )
    forward = make_forward(
        backbone, backend=config.compile_backend if config.compile else None, batch_size=config.batch_size
    )
    ident = extraction_id(manifest)
    pool = ShardBuffers(layout, max((b - a for a, b in my_ranges), default=0), pin=cuda)
    writer = ShardWriter(lambda index, start, tensors: write_shard(out, index, start, tensors,
                                                                   extraction=ident))
    done = list(plan.done)
    total_new = sum(stop - start for start, stop in (plan.ranges[s] for s in todo))
    progress = make_progress(console, rate_unit="img/s", enabled=rank == 0)
    label = "extracting" if world == 1 else f"extracting (rank 0 of {world})"
    start_time = time.perf_counter()
    first = [0.0, 0]  # seconds until the first batch was done, its size

    def advance(n: int) -> None:
        if not first[1]:
            if cuda:
                torch.cuda.synchronize(device)
            first[:] = [time.perf_counter() - start_time, n]
        progress.advance(task, n)

    to_record: list[ShardInfo] = []
    batches = iter(loader)
    try:
        with progress:
            task = progress.add_task(label, total=sum(b - a for a, b in my_ranges))
            for j in range(rounds + 1):  # the extra round collects the last writes
                error: BaseException | None = None
                finished: list[ShardInfo] = []
                try:
                    if rank == 0:
                        _record(out, manifest, done, to_record, rounds=len(plan.ranges), console=console,
                                quiet=progress.console.is_terminal)
                    to_record = []
                    if j < len(mine):
                        start, stop = plan.ranges[mine[j]]
                        buffers = pool.take(stop - start)
                        fill_shard(buffers, batches, inputs, forward, manifest, device=device, dtype=dtype,
                                    start=start, stop=stop, advance=advance)
                        writer.submit(mine[j], start, buffers)
                    finished = writer.collect(keep=1 if j < rounds else 0)
                except Exception as exc:  # shared with every rank below, then raised
                    error = exc
                gathered = exchange(finished, error, rank=rank, world=world)
                to_record = sorted((i for part in gathered for i in part), key=lambda s: s.start)
    except BaseException:
        close_loader(batches)
        writer.close()  # the shard being written is finished: an interrupted run keeps it
        if world == 1:  # (under torchrun the next run adopts it from its header and hash record)
            with contextlib.suppress(Exception):
                _record(out, manifest, done, to_record + writer.collect(), rounds=len(plan.ranges),
                        console=console, quiet=True)
        raise
    writer.close()
    seconds = time.perf_counter() - start_time
    error = None
    if rank == 0:
        try:
            _record(out, manifest, done, to_record, rounds=len(plan.ranges), console=console,
                    quiet=progress.console.is_terminal)
            assert [(s.start, s.stop) for s in done] == plan.ranges, "every shard of the plan is written"
            manifest["shards"] = shard_entries(done)
            manifest["complete"] = True
            write_manifest(out, manifest)
        except VitprobeError as exc:
            error = exc
    exchange(None, error, rank=rank, world=world, name_ranks=False)
    timing = {"write_wait_seconds": writer.waited, "first_batch_seconds": first[0],
              "first_batch_size": first[1]}
    return seconds, total_new, timing


def _record(
    out: Path,
    manifest: dict[str, Any],
    done: list[ShardInfo],
    infos: list[ShardInfo],
    *,
    rounds: int,
    console: Console,
    quiet: bool,
) -> None:
    """Rank 0: append the shards written in the last round to the manifest (those not yet in `done`: a
    recording interrupted by a signal is repeated on the way out)."""
    end = done[-1].stop if done else 0
    infos = [i for i in infos if i.start >= end]
    if not infos:
        return
    done.extend(infos)
    manifest["shards"] = shard_entries(done)
    write_manifest(out, manifest)
    if not quiet:
        for info in infos:
            console.print(f"wrote {info.file} (rows {info.start}-{info.stop}), {len(done)}/{rounds} shards")


