"""Planning an extraction: its manifest, and what to do with `--out` (start, resume, repair, rebuild a lost
manifest, or nothing), after checking the disk. Runs on rank 0 with the lock held; nothing here runs a model.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.cache import (
    KeySpec,
    ManifestUnreadable,
    ShardInfo,
    bytes_per_sample,
    layout_from_manifest,
    read_manifest,
    remove_cache_files,
    remove_temp_files,
    shard_entries,
    shard_infos,
    shard_layout,
    utc_now,
    write_final_norm,
    write_manifest,
)
from vitprobe.errors import CacheError
from vitprobe.files import format_bytes
from vitprobe.provenance import checkpoint_of, provenance, versions
from vitprobe.results import header
from vitprobe.resume import (
    Adopted,
    adopt_written,
    extraction_id,
    foreign_shards,
    identity_diff,
    intact_prefix,
)
from vitprobe.rows import VIEW_AUGMENT, shard_ranges

if TYPE_CHECKING:
    from vitprobe.data import ImageDataset
    from vitprobe.extract import ExtractConfig
    from vitprobe.models import Backbone

DEFAULT_SHARD_BYTES = 1_000_000_000  # about 1 GB of stored tensors per shard
SHARD_OVERHEAD_BYTES = 4096  # safetensors header and metadata, per shard (an upper bound)


@dataclass
class Plan:
    """Everything decided before the loop; identical on every rank."""

    manifest: dict[str, Any]
    ranges: list[tuple[int, int]]  # (start, stop) of every shard
    done: list[ShardInfo]  # complete shards, a prefix of `ranges`
    skipped: bool = False
    estimate_bytes: int = 0
    notes: list[str] = field(default_factory=list)


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
    if config.decode != "cpu":  # tensor resize on the device: close to, but not the bytes of, PIL's
        transform["decode"] = config.decode
    report = backbone.report
    return {
        **header("cache"),
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
        "keys": {k: _key_entry(spec) for k, spec in layout.items()},
        "bytes_per_sample": bytes_per_sample(layout),
        "shards": [],
        "final_norm": {"file": None, "type": None, "eps": None},
        "config": _config_dict(config),
        "complete": False,
        "provenance": provenance(device=device, checkpoint=checkpoint_of(report), dataset={
            "spec": config.data, "split": dataset.split, "fingerprint": dataset.fingerprint}),  # fmt: skip
    }


def estimate_cache_bytes(num_samples: int, bytes_per_row: int, shard_size: int) -> int:
    """Stored bytes of a cache: rows x bytes per row plus a header per shard."""
    return num_samples * bytes_per_row + math.ceil(num_samples / shard_size) * SHARD_OVERHEAD_BYTES


def prepare(config: ExtractConfig, manifest: dict[str, Any], backbone: Backbone) -> Plan:
    """Rank 0, lock held: decide between a fresh cache, a resume, or nothing to do; check the disk.

    A manifest that is missing or unreadable (empty after a power loss) is rebuilt from the shards on disk
    that belong to this extraction (vitprobe.resume); shards of another extraction are never overwritten
    without --overwrite.
    """
    out = Path(config.out)
    ranges = shard_ranges(manifest["num_samples"], manifest["shard_size"])
    layout = layout_from_manifest(manifest)
    ident = extraction_id(manifest)
    notes = [f"removed {f.name} left by an interrupted run" for f in remove_temp_files(out)]
    old, lost = None, None
    if not config.overwrite:
        try:
            old = read_manifest(out)
        except ManifestUnreadable as exc:
            lost = exc.message
    kept: list[ShardInfo] = []
    restart = config.overwrite
    if old is not None:
        diffs = identity_diff(old, manifest)
        if diffs:
            raise CacheError(
                f"{out} holds a cache of a different extraction ({'; '.join(diffs)})",
                "choose another --out, or pass --overwrite to replace that cache",
            )
        kept = intact_prefix(out, shard_infos(old), ranges, layout)
        if old["complete"] and len(kept) == len(ranges):
            return Plan(manifest=old, ranges=ranges, done=kept, skipped=True,
                         estimate_bytes=dir_bytes(out),
                         notes=[f"{out} is already a complete cache; pass --overwrite to extract it again"])
        if config.resume or old["complete"]:  # a complete cache with a lost shard is repaired, never wiped
            manifest["created"] = old.get("created", manifest["created"])
        else:
            restart, kept = True, []  # --no-resume: an interrupted cache starts again
    if restart:
        remove_cache_files(out)
        found = Adopted()
    elif config.resume or kept:
        found = adopt_written(out, kept, ranges, layout, ident)
    else:  # --no-resume without a manifest adopts nothing (and overwrites only this extraction's shards)
        found = Adopted(foreign=foreign_shards(out, ident))
    if old is None and not config.overwrite and found.foreign:
        raise CacheError(
            f"{out} has {lost or 'no manifest.json'}, and its shard files ({', '.join(found.foreign[:3])}"
            f"{', ...' if len(found.foreign) > 3 else ''}) are not this extraction's (another model, dataset "
            "or options, or written by an older vitprobe)",
            "choose another --out, or pass --overwrite to replace them",
        )
    done = kept + found.shards
    notes += found.notes
    if lost is not None:
        notes.append(f"{lost}: rebuilt it from the {len(done)} intact shards on disk")
    if done:
        notes.append(f"resuming {out}: {len(done)} of {len(ranges)} shards already written")
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
    manifest["complete"] = len(done) == len(ranges)
    write_manifest(out, manifest)
    return Plan(manifest=manifest, ranges=ranges, done=done, estimate_bytes=estimate, notes=notes)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) if Path(path).is_dir() else 0


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


_ST_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "I64": "int64",
             "F8_E4M3": "float8_e4m3fn", "I8": "int8"}


def _key_entry(spec: KeySpec) -> dict[str, Any]:
    """A manifest `keys` entry: shape and dtype, and for quantised codes the key of their scales."""
    entry: dict[str, Any] = {"shape": ["n", *spec.shape], "dtype": _ST_NAMES[spec.st_dtype]}
    if spec.scale is not None:
        entry["scale"] = spec.scale
    return entry


def _config_dict(config: ExtractConfig) -> dict[str, Any]:
    d = asdict(config)
    d["out"] = str(config.out)
    d["layers"] = config.layers if isinstance(config.layers, str) else list(config.layers)
    return d
