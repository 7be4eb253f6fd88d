"""`vitprobe extract` command: parse options, build an ExtractConfig, call `vitprobe.extract`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprobe.choices import DECODE, DTYPE, STORE, TOKENS
from vitprobe.commands.options import (
    CheckpointOpt,
    CropPctOpt,
    DataOpt,
    DeviceOpt,
    ImgSizeOpt,
    InterpolationOpt,
    MeanOpt,
    ModelOpt,
    OutputFormat,
    OutputFormatOpt,
    RandomInitOpt,
    SplitOpt,
    StdOpt,
    data_overrides,
    output,
    parse_number_list,
)
from vitprobe.errors import VitprobeError

Dtype = DTYPE.enum("Dtype")
Store = STORE.enum("Store")
Decode = DECODE.enum("Decode")
Tokens = TOKENS.enum("Tokens")


class Interrupted(VitprobeError):
    """Ctrl-C (SIGINT) or SIGTERM during an extraction; exit code 130 or 143, as a shell reports a process
    stopped by those signals."""

    exit_code = 130

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = 130) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def _progress(out: Path) -> str:
    """`12 of 63 shards written`, from the cache's manifest (rank 0 records shards as they land)."""
    from vitprobe.cache import read_manifest
    from vitprobe.extract import shard_ranges

    try:
        manifest = read_manifest(out)
    except VitprobeError:
        manifest = None
    if manifest is None:
        return "no shard written yet"
    total = len(shard_ranges(manifest["num_samples"], manifest["shard_size"]))
    return f"{len(manifest['shards'])} of {total} shards written"


def parse_layers(text: str) -> tuple[int, ...] | str:
    """`-1,-4` -> (-1, -4); `all` -> "all" (every block of the model)."""
    if text.strip() == "all":
        return "all"
    return parse_number_list(text, "--layers", kind=int, example="-1 or --layers=-1,-4,6 or all")


def extract(
    model: ModelOpt,
    data: DataOpt,
    split: SplitOpt,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Cache directory (created; resumed if interrupted).", file_okay=False)],
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    layers: Annotated[str, typer.Option(
        "--layers", help="Blocks to store, comma-separated; negative counts from the end (-1 = last); all = "
        "every block (for per-layer probing: probe --layer all).")
    ] = "-1",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")] = 4,
    device: DeviceOpt = "auto",
    dtype: Annotated[Dtype, typer.Option(
        "--dtype", help="Compute dtype; auto = bf16 autocast on CUDA, fp32 on CPU.")] = Dtype.auto,
    store: Annotated[Store, typer.Option(
        "--store", help="Stored tokens: fp16, bf16, fp32; fp8 / int8 = half of fp16, one fp32 scale per "
        "token (read back as floats).")] = Store.fp16,
    tokens: Annotated[Tokens, typer.Option(
        "--tokens", help="all = [cls] + registers + patches; cls = [cls] only; pooled = [cls] + patch mean.")
    ] = Tokens.all,
    views: Annotated[int, typer.Option(
        "--views", min=0, help="Augmented views per image (random-resized-crop + flip); 0 = eval transform.")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of random init and of the views.")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only N images, class-stratified (seeded by --seed).")
    ] = None,
    shard_size: Annotated[int | None, typer.Option(
        "--shard-size", min=1, help="Samples per shard (default: about 1 GB per shard).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue an interrupted cache from its last complete shard.")] = True,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a finished or different cache.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start even if the disk looks too small.")] = False,
    decode: Annotated[Decode, typer.Option(
        "--decode", help="cpu = PIL + timm transform in the workers; gpu = batched JPEG decoding and the "
        "same resize/crop on the device (close to, not bit-equal with, cpu).")] = Decode.cpu,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the forward pass (pays off on a GPU for long runs).")] = False,
    break_lock: Annotated[bool, typer.Option(
        "--break-lock", help="Remove another run's extract.lock even if it may be alive (a dead run's lock "
        "on this host is taken over without it).")] = False,
    img_size: ImgSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    fmt: OutputFormatOpt = OutputFormat("human"),  # type: ignore[assignment]
) -> None:
    """Run a backbone once over a dataset split and write [cls] + patch tokens into a token cache.

    Tokens are the outputs of the chosen blocks **before** the final norm; the norm's parameters are saved
    too. Works under `torchrun --nproc_per_node N -m vitprobe extract ...` (one cache, split by rank).
    Ctrl-C, SIGTERM and kills keep every complete shard: re-running the same command resumes, taking over
    the lock of a run that is gone.
    """
    from dataclasses import asdict

    from vitprobe.extract import ExtractConfig, format_bytes
    from vitprobe.extract import extract as run_extract

    config = ExtractConfig(
        model=model, data=data, split=split, out=out, checkpoint=checkpoint, random_init=random_init,
        layers=parse_layers(layers), batch_size=batch_size, workers=workers, device=device, dtype=dtype.value,
        store=store.value, tokens=tokens.value, views=views, seed=seed, limit=limit, shard_size=shard_size,
        resume=resume, overwrite=overwrite, force=force, decode=decode.value, compile=compile_model,
        break_lock=break_lock, **data_overrides(img_size, mean, std, crop_pct, interpolation),
    )
    out_ = output(fmt)
    console = out_.err  # progress and notes: stderr, in both formats
    try:
        result = run_extract(config, console=console)
    except KeyboardInterrupt as exc:
        from vitprobe.signals import exit_code, signal_name

        raise Interrupted(
            f"extraction into {out} interrupted ({_progress(out)}) by {signal_name(exc)}; the shards written "
            "so far are kept and the lock is released",
            "re-run the same command to resume from the last complete shard",
            exit_code=exit_code(exc),
        ) from None
    if not result.is_main:
        return
    payload = {**asdict(result), "path": str(result.path), "images_per_s": result.images_per_s}
    del payload["is_main"]
    if result.skipped:
        text = (
            f"[green]cache complete[/]: {result.num_samples:,} samples in {result.num_shards} shards, "
            f"{format_bytes(result.cache_bytes)} at {result.path}"
        )
    else:
        ranks = f" on {result.world_size} processes" if result.world_size > 1 else ""
        text = (
            f"[green]done[/]: {result.new_samples:,} samples extracted in {result.seconds:.1f} s{ranks} "
            f"({result.images_per_s:,.1f} images/s); cache {result.num_samples:,} samples, "
            f"{result.num_shards} shards, {format_bytes(result.cache_bytes)} at {result.path}"
        )
    console.print(text)  # the summary line is a diagnostic: stderr, in both formats
    out_.result(payload)
