"""Shard hash records: verified.json remembers which shard files were hashed, so each is read only once.

Hashing a shard costs as much as reading it; a token feed that re-hashed every shard in the first epoch of
every probe would read the cache twice. A file is hashed once (while the extraction writes it, or on its first
read) and then trusted while its size, mtime, ctime and inode are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitprobe.files import atomic_path, read_json

VERIFIED_FILE = "verified.json"
RECORD_FORMAT = "vitprobe-shard-hashes"


class HashRecord:
    """verified.json: per shard file, the sha256 it was found to have and its size, mtime, ctime, inode then.

    A file is trusted without re-hashing while those four are unchanged and its mtime / ctime are older than
    the record itself (as git does for its index: a change within the clock tick of the record's own write
    would otherwise go unseen). The record is local state, not part of the cache's contents.
    """

    def __init__(self, directory: Path, entries: dict[str, dict[str, Any]], written_ns: int) -> None:
        self.directory, self.entries, self.written_ns = Path(directory), entries, written_ns

    @classmethod
    def load(cls, directory: Path) -> HashRecord:
        path = Path(directory) / VERIFIED_FILE
        try:
            written_ns = path.stat().st_mtime_ns
            data = read_json(path)
            entries = data["shards"] if data.get("format") == RECORD_FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(directory, {}, 0)
        return cls(directory, entries if isinstance(entries, dict) else {}, written_ns)

    @staticmethod
    def _state(file: Path) -> dict[str, int]:
        st = file.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "inode": st.st_ino}

    def matches(self, file: Path, sha256: str) -> bool:
        entry = self.entries.get(file.name)
        try:
            state = self._state(file)
        except OSError:
            return False
        return (
            isinstance(entry, dict) and entry.get("sha256") == sha256
            and all(entry.get(k) == v for k, v in state.items())
            and max(state["mtime_ns"], state["ctime_ns"]) < self.written_ns
        )

    @classmethod
    def update(cls, directory: Path, file: Path, sha256: str) -> None:
        """Record one file in `directory/verified.json` (read, add, write, under a lock on the directory so
        that torchrun ranks writing shards side by side keep each other's entries); never raises."""
        with contextlib.suppress(OSError), _locked(Path(directory)):
            record = cls.load(directory)
            record.add(file, sha256)
            record.save(quiet=True)

    def add(self, file: Path, sha256: str) -> None:
        self.entries[file.name] = {"sha256": sha256, **self._state(file)}

    def save(self, *, quiet: bool = False) -> None:
        """Write the record atomically; with `quiet`, a read-only or full disk skips it (re-hash later)."""
        text = json.dumps({"format": RECORD_FORMAT, "version": 1,
                           "shards": dict(sorted(self.entries.items()))}, indent=1) + "\n"
        try:
            with atomic_path(self.directory / VERIFIED_FILE, durable=True) as tmp:
                tmp.write_text(text, encoding="utf-8")
            self.written_ns = (self.directory / VERIFIED_FILE).stat().st_mtime_ns
        except OSError:
            if not quiet:
                raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the directory itself (Linux, macOS); a no-op where that is not possible."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
