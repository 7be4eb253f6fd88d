"""Memory-mapped safetensors files: every tensor a zero-copy view of the file, paged in ahead of use.

The token feed (`vitprobe.tokens`) reads cache shards through these maps, so a batch is gathered straight
from the page cache into a reused buffer — one copy per byte, as a plain `read` makes — and `page_in` asks
the kernel to read a row range ahead of use (on the feed's reader thread). A map costs a header read; pages
count as this process's memory only while a view of them is alive, so dropping the views bounds memory.
Sparse rows (a holdout) are read with `read_rows` instead: a map would page in the whole large folios
around each row, ten times the bytes wanted.

The header follows the safetensors format (8-byte little-endian length, a JSON header of dtype, shape and
data offsets per tensor, then the data); tests/test_tokens.py checks every tensor against `safe_open`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from vitprobe.errors import CacheError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
MADV_POPULATE_READ = 22  # Linux >= 5.14: map a range's pages, reading them from disk first where needed
_PAGE = mmap.PAGESIZE
_populate_works = True  # cleared when the kernel refuses MADV_POPULATE_READ (then MADV_WILLNEED only)


class MappedFile:
    """One safetensors file mapped copy-on-write (nothing is ever written back to it).

    Args:
        path: the .safetensors file.

    Raises:
        CacheError: the file is not a readable safetensors file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (length,) = struct.unpack("<Q", f.read(8))
                if not 0 < length <= min(size - 8, MAX_HEADER):
                    raise ValueError(f"header length {length} does not fit a {size}-byte file")
                header = json.loads(f.read(length))
                self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            self._data = 8 + length
            self.entries: dict[str, dict] = {k: v for k, v in header.items() if k != "__metadata__"}
            for key, entry in self.entries.items():
                _check_entry(key, entry, size - self._data)
        except (OSError, ValueError, TypeError, KeyError, struct.error) as exc:
            raise CacheError(
                f"cannot map {self.path}: {exc}", "delete that file and re-run `vitprobe extract` to resume"
            ) from exc

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` as a view of the mapped file, shaped and typed as stored (no bytes are read)."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        shape = [int(s) for s in entry["shape"]]
        dtype = ST_DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data + begin)
        return raw.view(dtype).view(shape)

    def read_rows(self, key: str, rows: torch.Tensor, part: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows of `key` read with `pread` into fresh memory (nothing mapped): (m, bytes per row) uint8, or
        (m, part length) with `part`. For sparse rows, where a map would page in whole folios around each.

        Args:
            key: tensor name.
            rows: sorted row numbers along the tensor's first axis.
            part: (byte offset, byte length) inside each row, or None for whole rows.
        """
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        row = (end - begin) // max(1, int(entry["shape"][0]))
        width = row if part is None else part[1]
        out = torch.empty((len(rows), width), dtype=torch.uint8)
        if len(rows) == 0:
            return out
        flat = memoryview(out.numpy()).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            at = 0
            for lo, length in _byte_runs(rows.tolist(), row, part, exact=True):
                done = 0
                while done < length:  # pread may return less than asked
                    got = os.preadv(fd, [flat[at + done : at + length]], self._data + begin + lo + done)
                    if got <= 0:
                        raise CacheError(f"{self.path} ended early", "re-run `vitprobe extract` to repair it")
                    done += got
                at += length
        finally:
            os.close(fd)
        return out

    def page_in(self, key: str, rows: torch.Tensor, part: tuple[int, int] | None = None) -> None:
        """Ask the kernel to read rows of `key` into memory now (blocking where supported), so a later
        gather neither waits for the disk nor faults.

        Args:
            key: tensor name.
            rows: sorted row numbers along the tensor's first axis.
            part: (byte offset, byte length) inside each row when only part of it is needed (one layer of a
                multi-layer cache); None for whole rows.
        """
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        n = int(entry["shape"][0]) if entry["shape"] else 0
        if n == 0 or len(rows) == 0:
            return
        row = (end - begin) // n
        start = self._data + begin
        for lo, length in _byte_runs(rows.tolist(), row, part):
            _advise(self._map, start + lo, length)


def _check_entry(key: str, entry: dict, data_bytes: int) -> None:
    """Raise ValueError unless a header entry's dtype, shape and offsets describe bytes inside the file."""
    begin, end = entry["data_offsets"]
    count = 1
    for s in entry["shape"]:
        count *= int(s)
    itemsize = torch.empty((), dtype=ST_DTYPES[entry["dtype"]]).element_size()
    if not 0 <= begin <= end <= data_bytes or end - begin != count * itemsize:
        raise ValueError(f"tensor {key!r}: offsets {[begin, end]} do not match its shape and the file")


def _byte_runs(
    rows: Sequence[int], row: int, part: tuple[int, int] | None, *, exact: bool = False
) -> list[tuple[int, int]]:
    """(offset, length) byte ranges covering `part` of each row (whole rows merged into runs); a part that
    is most of a row is covered by whole rows unless `exact`."""
    if part is not None and (exact or 2 * part[1] < row):  # one range per row
        return [(r * row + part[0], part[1]) for r in rows]
    runs: list[tuple[int, int]] = []
    first = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            runs.append((first * row, (prev - first + 1) * row))
            first = r
        prev = r
    runs.append((first * row, (prev - first + 1) * row))
    return runs


def _advise(region: mmap.mmap, offset: int, length: int) -> None:
    global _populate_works
    lo = offset - offset % _PAGE
    length += offset - lo
    length = min(length, len(region) - lo)
    if _populate_works:
        try:
            region.madvise(MADV_POPULATE_READ, lo, length)
            return
        except (OSError, ValueError, AttributeError):
            _populate_works = False
    if hasattr(mmap, "MADV_WILLNEED"):
        region.madvise(mmap.MADV_WILLNEED, lo, length)
