"""The manifest of a token cache (manifest.json): its versions and required fields, checking, reading and
writing it atomically. Nothing here opens a shard; vitprobe.cache is the cache as a whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitprobe.errors import CacheError
from vitprobe.files import atomic_path, disk_errors, read_json
from vitprobe.shards import FORMAT_NAME, RESUME, ShardInfo

MANIFEST_FILE = "manifest.json"

MANIFEST_VERSIONS = {1: "format_version", 2: "version"}  # version -> the key that holds it (1: before the
# common header of result files; 2: `format`, `version`, `kind` as every result file)

REQUIRED_FIELDS = (
    "format", "model", "layers", "grid", "dim", "num_prefix_tokens", "has_cls",
    "num_reg_tokens", "tokens", "store_dtype", "views", "dataset", "num_samples", "shard_size", "shards",
    "final_norm", "complete",
)
SHARD_FIELDS = {"file": str, "start": int, "stop": int, "sha256": str}


class ManifestUnreadable(CacheError):
    """manifest.json exists but cannot be parsed (empty after a power loss, truncated, overwritten)."""


def manifest_version(manifest: dict[str, Any]) -> Any:
    """A manifest's format version: `version` (2, the common header) or `format_version` (version 1)."""
    return manifest.get("version", manifest.get("format_version"))


def check_manifest(manifest: Any, *, where: Path | str) -> None:
    """Raise CacheError unless `manifest` is a manifest of a version this vitprobe reads (MANIFEST_VERSIONS)
    whose shard ranges are consistent."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(
            f"{where} is not a vitprobe token-cache manifest", "point at a `vitprobe extract --out` directory"
        )
    version = manifest_version(manifest)
    spelt = MANIFEST_VERSIONS.get(version) if isinstance(version, int) else None
    if spelt is None or spelt not in manifest or (version > 1 and manifest.get("kind") != "cache"):
        newer = isinstance(version, int) and version > max(MANIFEST_VERSIONS)
        known = ", ".join(f"{v} (`{key}`)" for v, key in MANIFEST_VERSIONS.items())
        raise CacheError(
            f"{where} has cache format version {version!r}; this vitprobe reads versions {known}",
            "upgrade vitprobe" if newer else "re-extract the cache with this vitprobe (--overwrite)",
        )
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise CacheError(f"{where} lacks fields {', '.join(missing)}", "re-extract the cache (--overwrite)")
    if not isinstance(manifest["shards"], list):
        raise ManifestUnreadable(
            f"{where}: `shards` is not a list", "re-run the `vitprobe extract` command that wrote it: it "
            "rebuilds the manifest from the intact shards",
        )
    expected_start = 0
    for n, s in enumerate(manifest["shards"]):
        bad = [k for k, kind in SHARD_FIELDS.items()
               if not isinstance(s, dict) or not isinstance(s.get(k), kind)]
        if bad:
            raise ManifestUnreadable(
                f"{where}: shard entry {n} lacks a valid {', '.join(bad)} (each entry is "
                "{file, start, stop, sha256})",
                "re-run the `vitprobe extract` command that wrote it: it rebuilds the manifest from the "
                "shards (or pass --overwrite)",
            )
        if s["start"] != expected_start or s["stop"] <= s["start"]:
            raise CacheError(
                f"{where}: shard {s['file']} covers rows [{s['start']}, {s['stop']}) but rows start at "
                f"{expected_start}", "re-extract the cache (--overwrite)",
            )
        expected_start = s["stop"]
    if manifest["complete"] and expected_start != manifest["num_samples"]:
        raise CacheError(
            f"{where} is marked complete but its shards hold {expected_start} of "
            f"{manifest['num_samples']} rows",
            "re-extract the cache (--overwrite)",
        )


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Replace manifest.json atomically and durably (readers see the old or the new one, never a mix)."""
    text = json.dumps({**manifest, "updated": utc_now()}, indent=2) + "\n"
    path = Path(directory) / MANIFEST_FILE
    with disk_errors(path, len(text.encode()), error=CacheError, then=RESUME):
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(text, encoding="utf-8")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest of `directory`, or None when there is none.

    Raises:
        CacheError: it is empty, not JSON, or not a valid manifest (`ManifestUnreadable` when it cannot be
            parsed at all, which `vitprobe extract` answers by rebuilding it from the shards).
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        what = "is empty" if path.stat().st_size == 0 else f"is not valid JSON ({exc})"
        raise ManifestUnreadable(
            f"{path} {what}", "re-run the `vitprobe extract` command that wrote it: it rebuilds the manifest "
            "from the intact shards",
        ) from exc
    check_manifest(manifest, where=path)
    return manifest


def shard_infos(manifest: dict[str, Any]) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["shards"]]


def shard_entries(shards: Sequence[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
