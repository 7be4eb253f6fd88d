"""A probe run's files in RUN_DIR: results.json and heads/ swapped in together, checked, repaired.

results.json records `heads_sha256`, a digest of every file in heads/. A run writes its heads into a staging
folder, moves the old heads/ aside, moves the new one in, then replaces results.json (atomically); a kill
between two of these steps leaves a state `recover` repairs on the next run (rolling back to the old pair
or finishing the new one), and `verify_heads` makes every reader refuse a heads/ that does not belong to
the results.json beside it. Other files in RUN_DIR (attention.json, ...) are never touched.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from vitprobe.errors import ProbeError
from vitprobe.files import read_json, sha256_file, write_json

HEADS = "heads"
RESULTS = "results.json"
STAGING_PREFIX = ".heads-new-"
RETIRED_PREFIX = ".heads-old-"


def heads_digest(folder: Path) -> str:
    """sha256 over the sorted (name, sha256) of every file in a heads folder."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()


def _recorded(out_dir: Path) -> str | None:
    try:
        return read_json(out_dir / RESULTS).get("heads_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def recover(out_dir: Path) -> list[str]:
    """Repair what an interrupted run left in `out_dir`; returns one line per repair (empty if none)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    notes = []
    recorded = _recorded(out_dir)
    heads = out_dir / HEADS
    retired = sorted(out_dir.glob(f"{RETIRED_PREFIX}*"))
    if recorded is not None and (not heads.is_dir() or heads_digest(heads) != recorded):
        match = next((r for r in retired if r.is_dir() and heads_digest(r) == recorded), None)
        if match is not None:  # killed mid-swap: put back the heads results.json describes
            if heads.exists():
                shutil.rmtree(heads)
            match.rename(heads)
            retired.remove(match)
            notes.append(f"restored {heads} of the results.json beside it (an earlier run was interrupted)")
    for debris in [*retired, *out_dir.glob(f"{STAGING_PREFIX}*")]:
        shutil.rmtree(debris, ignore_errors=True)
        notes.append(f"removed {debris.name} left by an interrupted run")
    return notes


def commit(out_dir: Path, staging: Path, results: dict[str, Any]) -> None:
    """Swap the staged heads in and write results.json (with their digest) as one unit."""
    results["heads_sha256"] = heads_digest(staging)
    heads = out_dir / HEADS
    retired = out_dir / f"{RETIRED_PREFIX}{staging.name[len(STAGING_PREFIX) :]}"
    if heads.exists():
        heads.rename(retired)
    staging.chmod(0o755)
    staging.rename(heads)
    write_json(out_dir / RESULTS, results)
    shutil.rmtree(retired, ignore_errors=True)


def verify_heads(out_dir: Path) -> None:
    """Refuse a RUN_DIR whose heads/ is not the one its results.json was written with."""
    recorded = _recorded(Path(out_dir))
    heads = Path(out_dir) / HEADS
    if recorded is None or not heads.is_dir():
        return
    if heads_digest(heads) != recorded:
        raise ProbeError(
            f"{heads} does not belong to {Path(out_dir) / RESULTS} (a probe run was interrupted while "
            "replacing them, or the files were edited)",
            "re-run the `vitprobe probe` command with --overwrite (it repairs or replaces the pair)",
        )
