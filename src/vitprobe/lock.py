"""The cache lock: one writer per cache directory, and a dead writer's lock taken over without a hand.

`extract.lock` holds `{"pid", "host", "started", "pid_start", "nonce"}`. It is created complete in one step
(written to a temp file, then hard-linked to its name, which fails if the name exists), so a full disk or a
kill never leaves an empty lock. A lock whose owner is provably gone (same host, and the pid is not running or
is a different process now: Linux records each process's start time) is taken over with a one-line note; a
live owner or one on another host is refused with a hint naming `--break-lock`.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitprobe.errors import CacheError
from vitprobe.files import TEMP_SUFFIX, fsync_dir, is_out_of_space

LOCK_FILE = "extract.lock"
_ATTEMPTS = 5  # take-overs raced by other runs before giving up


@contextmanager
def lock_cache(
    directory: Path, *, break_lock: bool = False, say: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold `directory/extract.lock` for the block; remove it on exit (also on an exception or a signal).

    Args:
        directory: the cache directory (created).
        break_lock: remove a lock held by another run even when it may be alive (`--break-lock`).
        say: where the one-line notes go (taking over a stale lock, breaking one).

    Raises:
        CacheError: another run holds the lock (alive, on another host, or unreadable), or the lock cannot be
            created (read-only file system, no space).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create cache directory {directory}: {exc}", "choose another --out") from exc
    lock = directory / LOCK_FILE
    owner = _owner_record()
    for _ in range(_ATTEMPTS):
        if _create(lock, owner):
            break
        found = read_owner(lock)
        if found is None and not lock.exists():
            continue  # released between our attempt and the read
        verdict = _judge(lock, found, break_lock=break_lock)
        if isinstance(verdict, CacheError):
            raise verdict
        if _remove_if_unchanged(lock, found) and say is not None:
            say(verdict)
    else:
        raise CacheError(f"could not take {lock}: other runs keep taking it", "run one extraction at a time")
    try:
        yield lock
    finally:
        if (read_owner(lock) or {}).get("nonce") == owner["nonce"]:  # never remove a lock that was broken
            lock.unlink(missing_ok=True)


def read_owner(lock: Path) -> dict[str, Any] | None:
    """The parsed lock, or None when it is missing, empty or unreadable."""
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def owner_gone(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote `owner` provably no longer runs: same host, and its pid is free or
    belongs to a process started at another time (a reused pid)."""
    if owner.get("host") != socket.gethostname():
        return False
    pid = int(owner["pid"])
    if not _pid_alive(pid):
        return True
    recorded, now = owner.get("pid_start"), _pid_start(pid)
    return recorded is not None and now is not None and recorded != now


def _owner_record() -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
            "pid_start": _pid_start(os.getpid()), "nonce": secrets.token_hex(8)}


def _create(lock: Path, owner: dict[str, Any]) -> bool:
    """Create `lock` holding `owner`, complete or not at all; False when it exists already."""
    tmp = lock.parent / f".{lock.name}.{owner['nonce']}{TEMP_SUFFIX}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        except OSError as exc:  # no hard links here (some FUSE, FAT): exclusive create, removed if unfinished
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            return _create_exclusive(lock, tmp.read_bytes())
        fsync_dir(lock.parent)
        return True
    except OSError as exc:
        if is_out_of_space(exc):
            raise CacheError(
                f"no space left to create {lock} (it needs under 1 kB; the disk or quota at {lock.parent} is "
                "full)", f"free disk space at {lock.parent} and re-run the same command",
            ) from exc
        raise CacheError(f"cannot create {lock}: {exc}", "choose a writable --out") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(lock: Path, content: bytes) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        lock.unlink(missing_ok=True)  # never leave an empty or partial lock behind
        raise
    return True


def _judge(lock: Path, owner: dict[str, Any] | None, *, break_lock: bool) -> str | CacheError:
    """The note to print before removing `lock`, or the error refusing to."""
    if owner is None:
        if break_lock:
            return f"removed the unreadable lock {lock} (--break-lock)"
        return CacheError(
            f"{lock} exists but is empty or unreadable, so vitprobe cannot tell whether its run is alive",
            "if no extraction is writing there, re-run with --break-lock",
        )
    who = f"pid {owner['pid']} on {owner.get('host', '?')} (started {owner.get('started', '?')})"
    if owner_gone(owner):
        return f"took over the stale lock {lock}: {who} is no longer running"
    if break_lock:
        return f"broke the lock {lock} of {who} (--break-lock)"
    if owner.get("host") != socket.gethostname():
        return CacheError(
            f"{lock.parent} is being written by {who}; from {socket.gethostname()} vitprobe cannot tell "
            "whether that run is alive",
            "wait for it to finish or use another --out; if it is not running, re-run with --break-lock",
        )
    return CacheError(
        f"{lock.parent} is being written by {who}",
        "wait for that run to finish or use another --out (--break-lock only if you are sure it is not "
        "writing there)",
    )


def _remove_if_unchanged(lock: Path, seen: dict[str, Any] | None) -> bool:
    """Remove `lock` if it still holds what was judged (another run may have taken it over meanwhile)."""
    aside = lock.parent / f".{lock.name}.{secrets.token_hex(8)}.stale{TEMP_SUFFIX}"
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    if read_owner(aside) == seen:
        aside.unlink(missing_ok=True)
        return True
    try:  # we moved a fresh lock of a run that took over first: give it back
        os.link(aside, lock)
    except FileExistsError:
        pass
    aside.unlink(missing_ok=True)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_start(pid: int) -> int | None:
    """A process's start time in clock ticks after boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces and ')'
    except (IndexError, ValueError):
        return None
