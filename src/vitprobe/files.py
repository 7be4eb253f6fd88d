"""Files on disk: atomic (and durable) writes, hashes, JSON and safetensors, shared by every writer."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vitprobe.errors import VitprobeError

TEMP_SUFFIX = ".tmp"  # atomic_path's temp files are `.{name}.XXXXXXXX.tmp` beside their target
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota exceeded, `ulimit -f` reached


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the earlier file untouched. The temp file is
    `.{name}.XXXXXXXX.tmp` in the same directory, so a writer that was killed leaves only names its next run
    can recognise and remove.

    Args:
        path: the file to (re)place.
        durable: fsync the file before the rename and the directory after it, so that once the block has
            returned the new file survives a power loss (and never appears empty or half-written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        if durable:
            fsync_file(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to the device (any descriptor flushes the file's dirty pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new file in it) to the device; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether an error says the disk, the quota or the file-size limit is exhausted.

    Also recognises the text of errors that carry no errno (safetensors' SafetensorError wraps Rust's
    `No space left on device (os error 28)`).
    """
    if isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE:
        return True
    text = str(exc)
    return any(f"os error {code}" in text for code in OUT_OF_SPACE) or "No space left" in text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], None], *, durable: bool = False
) -> None:
    """Call `write(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path, durable=durable) as tmp:
        write(tmp)


def write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = False) -> None:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- safetensors, streamed ------------------------------------------------------------------------------
# The safetensors format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
# length N, N bytes of JSON padded with spaces to a multiple of 8, then the tensors' bytes back to back. The
# library lays tensors out by dtype (largest first, in the order of its `Dtype` enum) and then by name; the
# same order here gives byte-identical files (tests/test_files.py compares with `safetensors.torch.save`).
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
             "F64", "I64", "U64")


def _st_dtype(dtype: torch.dtype) -> str:
    import torch

    names = {
        torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
        torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
        torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }
    return names[dtype]


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    chunk_bytes: int = 64 << 20,
) -> str:
    """Write CPU tensors as a safetensors file at `path` (no temp file of its own) and return its sha256.

    The bytes are hashed while they are written, so the file is never read back. Use it inside
    `atomic_path` for an atomic, durable write; an `OSError` (disk full, `ulimit -f`) leaves a partial file
    at `path` for the caller to remove.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    items = sorted(tensors.items(), key=lambda kv: (-_ST_ORDER.index(_st_dtype(kv[1].dtype)), kv[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset, views = 0, []
    for name, t in items:
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {t.device}; write CPU tensors")
        flat = t.detach().contiguous().reshape(-1).view(_uint8_dtype())  # (numel * itemsize,) raw bytes
        header[name] = {"dtype": _st_dtype(t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + flat.numel()]}
        offset += flat.numel()
        views.append(flat)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (len(text).to_bytes(8, "little"), text):
            digest.update(part)
            f.write(part)
        for flat in views:
            data = memoryview(flat.numpy())
            for b in range(0, len(data), chunk_bytes):
                chunk = data[b : b + chunk_bytes]
                digest.update(chunk)
                f.write(chunk)
    return digest.hexdigest()


def _uint8_dtype() -> torch.dtype:
    import torch

    return torch.uint8


@contextmanager
def disk_errors(
    path: str | os.PathLike[str], size: int, *, error: type[VitprobeError] | None = None,
    then: str = "re-run the same command",
) -> Iterator[None]:
    """Turn a failed write of `path` (`size` bytes) into one `error` line (default `VitprobeError`): the disk,
    quota or `ulimit -f` is exhausted, naming the directory and the space needed; or it is not writable.

    Errors without an errno (safetensors' SafetensorError carries the OS error as text) are recognised too.

    Args:
        then: what to do once space is freed, for the hint.
    """
    from vitprobe.errors import VitprobeError

    error = error or VitprobeError
    path = Path(path)
    try:
        yield
    except VitprobeError:
        raise
    except Exception as exc:
        if is_out_of_space(exc):
            raise error(
                f"no space left to write {path.name} in {path.parent} (it needs {format_bytes(size)}; "
                f"{format_bytes(_free(path.parent))} free, or a file-size limit such as `ulimit -f` was "
                f"reached): {exc}",
                f"free disk space (or raise the limit), then {then}",
            ) from exc
        if isinstance(exc, OSError):
            raise error(f"cannot write {path}: {exc}", "choose a writable output directory") from exc
        raise


def _free(directory: Path) -> int:
    import shutil

    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def format_bytes(n: float) -> str:
    """Decimal units, as disks are sold: 388.1 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
