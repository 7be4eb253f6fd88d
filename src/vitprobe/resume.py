"""Resuming an extraction: which shards on disk are intact and belong to it, also without a manifest.

The manifest lists the complete shards; it can lag behind the files (a kill between a shard's rename and the
manifest update) or be lost (an empty manifest.json after a power loss on a file system that did not honour
fsync, a deleted one). Every shard records its row range and the id of its extraction in its safetensors
header, and verified.json records its sha256, so the shards a run finds past the manifest's list are adopted
when they are this extraction's rows and their bytes check out; the others are written again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitprobe.cache import (
    KeySpec,
    ShardInfo,
    read_shard_metadata,
    shard_file,
    shard_problem,
)
from vitprobe.files import sha256_file
from vitprobe.verified import HashRecord

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


def extraction_id(manifest: dict[str, Any]) -> str:
    """A hash of the identity fields: two runs write interchangeable shards exactly when their ids agree."""
    fields = {".".join(path): _get(manifest, path) for path in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def intact_prefix(
    out: Path, recorded: list[ShardInfo], ranges: list[tuple[int, int]], layout: dict[str, KeySpec]
) -> list[ShardInfo]:
    """The recorded shards up to the first one whose range is off the plan or whose file is missing or has
    an unreadable header or the wrong tensors (checked from the header; the bytes are not re-hashed)."""
    kept = []
    for i, info in enumerate(recorded):
        if i >= len(ranges) or (info.start, info.stop) != ranges[i] or info.file != shard_file(i):
            break
        if shard_problem(out, info, layout) is not None:
            break
        kept.append(info)
    return kept


@dataclass
class Adopted:
    """Shards found on disk past the manifest's list, and what was found out about the rest."""

    shards: list[ShardInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # shard files of another extraction or an older vitprobe


def adopt_written(
    out: Path, kept: list[ShardInfo], ranges: list[tuple[int, int]], layout: dict[str, KeySpec], ident: str
) -> Adopted:
    """The shards after `kept` whose files hold this extraction's rows (header range and id) and whose bytes
    match their recorded sha256 (verified.json; when a shard has no record, as after a power loss right after
    its rename, its header and tensor sizes are checked: it was fsynced before it got its name)."""
    found = Adopted(foreign=foreign_shards(out, ident))
    record = HashRecord.load(out)
    for i in range(len(kept), len(ranges)):
        file = Path(out) / shard_file(i)
        meta = read_shard_metadata(file) if file.is_file() else None
        if meta is None or meta.get("extraction") != ident:
            break
        if (meta.get("start"), meta.get("stop")) != ranges[i]:
            break
        entry = record.entries.get(file.name)
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(expected, str) and record.matches(file, expected):
            digest, how = expected, "recorded hash"
        else:
            digest = sha256_file(file)
            if expected is not None and digest != expected:
                found.notes.append(f"{file.name} differs from its recorded sha256: it is written again")
                break
            how = "hash checked" if expected is not None else "no recorded hash; header and sizes checked"
            record.add(file, digest)
        info = ShardInfo(file=file.name, start=ranges[i][0], stop=ranges[i][1], sha256=digest)
        problem = shard_problem(out, info, layout)
        if problem is not None:
            found.notes.append(f"{problem}: it is written again")
            break
        found.shards.append(info)
        if how != "recorded hash":
            found.notes.append(f"adopted {file.name} ({how})")
    record.save(quiet=True)
    return found


def foreign_shards(out: Path, ident: str) -> list[str]:
    """Shard files in `out` whose header names another extraction (or none: an older vitprobe's)."""
    return [file.name for file in sorted(Path(out).glob("shard-*.safetensors"))
            if (read_shard_metadata(file) or {}).get("extraction") != ident]


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d
