"""Decoding one image to RGB, every problem named by its file: missing, unreadable, bombs, corrupt JPEG data.

Policy (docs/datasets.md, "Bad images"):
- a missing or undecodable file is a `DatasetError` naming it;
- an image above Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 Mpx by default) is
  read with a `DatasetWarning` naming the file and its size; above twice the limit it is refused (Pillow's
  own `DecompressionBombError`, re-raised as a `DatasetError` naming the file);
- a JPEG whose last scan ends with entropy-coded data left over (what libjpeg reports as "Corrupt JPEG data:
  N extraneous bytes before marker 0xd9"; Pillow decodes such files silently, usually as garbage after the
  point of corruption) is read with a `DatasetWarning` naming the file;
- any other warning Pillow raises while decoding is re-raised as a `DatasetWarning` naming the file.
Images stored as array rows (CIFAR, STL-10) are `RecordImages`; they involve no decoder. Warnings are
caught with `warnings.catch_warnings`, which is process-wide: decode from processes (DataLoader workers),
not threads, or a warning may be attributed to another thread's file.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from vitprobe.errors import DatasetError

JPEG_SLACK_BYTES = 16  # scan bytes a healthy JPEG may leave unread at the end (bit-buffer look-ahead)
_FINE_TAIL = 256  # the decoder is fed in small blocks over the last this many bytes before the end marker
_FINE_BLOCK = 64  # ... so the leftover it can detect is about this many bytes or more


class DatasetWarning(UserWarning):
    """A suspicious image or annotation that does not stop the run; the message names the file."""


def decode(path: Path, *, where: str, missing_hint: str) -> Image.Image:
    """Image file `path` as an RGB PIL image (see the module docstring for what is refused or warned about).

    Args:
        path: the image file.
        where: the dataset spec, prefixed to every message.
        missing_hint: the fix to suggest when the file does not exist.

    Raises:
        DatasetError: the file is missing, cannot be decoded, or is more than twice the bomb limit.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{where}: missing image {path}", missing_hint) from exc
    except OSError as exc:
        raise DatasetError(
            f"{where}: cannot read image {path} ({exc.strerror or exc})", "check the file"
        ) from exc
    stream = _TailFed(data)
    with _named_warnings(path):
        image = _open(stream, path, where)
        with image:
            end = jpeg_end_of_image(data) if image.format == "JPEG" else None
            if end is not None:
                stream.fine_from = max(0, end - _FINE_TAIL)  # after the headers: fine blocks near the end
            try:
                image.load()
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise _unreadable(where, path, exc) from exc
            if end is not None and end - stream.tell() > JPEG_SLACK_BYTES:
                warnings.warn(
                    f"corrupt JPEG data: the image was complete with at least {end - stream.tell()} bytes of "
                    "its last scan unread (libjpeg: 'extraneous bytes before marker'); it probably decodes "
                    "as garbage after the damage: check the file, replace or remove it",
                    DatasetWarning,
                    stacklevel=2,
                )
            elif image.format == "JPEG" and end is None and ImageFile.LOAD_TRUNCATED_IMAGES:
                warnings.warn(
                    "JPEG without an end-of-image marker, decoded with its missing part filled in because "
                    "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: replace or remove the truncated file",
                    DatasetWarning,
                    stacklevel=2,
                )
            return to_rgb(image)


def size(path: Path, *, where: str, missing_hint: str) -> tuple[int, int]:
    """(width, height) of image file `path` as stored, from its header (bomb warnings as in `decode`)."""
    try:
        with _named_warnings(path), _open(path, path, where) as image:
            return image.size
    except FileNotFoundError as exc:
        raise DatasetError(f"{where}: missing image {path}", missing_hint) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha (RGBA, LA, palette transparency) is composited onto white,
    16-bit and 32-bit grayscale are scaled to 8 bits, CMYK and YCbCr use PIL's conversion."""
    if image.mode == "RGB":
        return image.copy()  # detached from the (closed) file
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            scale = 255.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def jpeg_end_of_image(data: bytes) -> int | None:
    """Offset of the EOI marker (FF D9) that ends the first image of a JPEG stream, or None if not found.

    Walks the marker segments from SOI; after each SOS header the entropy-coded data runs to the next 0xFF
    that is not a stuffed byte (FF 00), a restart marker (FF D0-D7) or fill (FF FF). Segments inside APPn
    (EXIF thumbnails) are skipped by their length. None for anything that does not parse as such a stream.
    """
    a = np.frombuffer(data, dtype=np.uint8)
    n = len(a)
    if n < 4 or a[0] != 0xFF or a[1] != 0xD8:
        return None
    ff = np.flatnonzero(a[:-1] == 0xFF)  # (F,) candidate marker offsets
    after = a[ff + 1]
    is_marker = (after != 0x00) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))
    markers = ff[is_marker]  # offsets of FF that start a marker (as seen from entropy-coded data)
    pos = 2
    while pos + 1 < n:
        if a[pos] != 0xFF:
            return None
        code = int(a[pos + 1])
        if code == 0xFF:  # fill byte before a marker
            pos += 1
        elif code == 0xD9:
            return pos
        elif code == 0x01 or 0xD0 <= code <= 0xD7:  # TEM, RSTn: no length
            pos += 2
        elif pos + 3 >= n:
            return None
        else:
            segment_end = pos + 2 + (int(a[pos + 2]) << 8 | int(a[pos + 3]))
            if code != 0xDA:
                pos = segment_end
                continue
            k = int(np.searchsorted(markers, segment_end))  # SOS: skip its entropy-coded data
            if k == len(markers):
                return None
            pos = int(markers[k])
    return None


@dataclass(eq=False)
class RecordImages:
    """Images stored as rows of array files (CIFAR batches, STL-10 binaries) rather than one file each.

    Each process reads a file the first time one of its rows is asked for; pickling (DataLoader workers)
    leaves the arrays behind, so workers read the files again instead of receiving copies.

    Attributes:
        files: the array files.
        rows: per dataset image, (index into `files`, row in that file).
        reader: module-level function reading one file into (N, H, W, 3) uint8 (an array or a memmap view).
        image_size: (width, height) of every image.
    """

    files: tuple[Path, ...]
    rows: list[tuple[int, int]]
    reader: Callable[[Path], np.ndarray]
    image_size: tuple[int, int]
    arrays: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def image(self, i: int) -> Image.Image:
        """Image `i` as an RGB PIL image."""
        number, row = self.rows[i]
        if number not in self.arrays:
            self.arrays[number] = self.reader(self.files[number])
        return Image.fromarray(np.ascontiguousarray(self.arrays[number][row]), mode="RGB")  # (H, W, 3)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "arrays": {}}


class _TailFed(io.BytesIO):
    """The file's bytes, handed to Pillow's decoder in small blocks from `fine_from` on.

    Pillow stops feeding a JPEG decoder once the image is complete, so `tell()` afterwards says (to within one
    block) how much of the stream libjpeg used. Coarse blocks before `fine_from` keep the cost negligible.
    """

    fine_from: int | None = None

    def read(self, n: int | None = -1, /) -> bytes:
        pos = self.tell()
        if self.fine_from is not None and n is not None and n > 0:
            n = min(n, self.fine_from - pos) if pos < self.fine_from else min(n, _FINE_BLOCK)
        return super().read(n)


def _open(source: Any, path: Path, where: str) -> Image.Image:
    """`Image.open` with the errors named: not an image, broken header, or a decompression bomb."""
    try:
        return Image.open(source)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as exc:
        limit = Image.MAX_IMAGE_PIXELS or 0
        raise DatasetError(
            f"{where}: image {path} has {_megapixels(exc)}, more than twice Pillow's decompression-bomb "
            f"limit ({limit / 1e6:.1f} Mpx): refused",
            "downscale the file (the model sees it resized anyway), or raise PIL.Image.MAX_IMAGE_PIXELS in "
            "Python if you trust it",
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # UnidentifiedImageError is an OSError
        raise _unreadable(where, path, exc) from exc


def _unreadable(where: str, path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{where}: cannot read image {path} ({type(exc).__name__}: {exc})",
        "replace or remove the corrupt file",
    )


def _megapixels(exc: BaseException) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match is None:
        return "too many pixels"
    pixels = int(match.group(1))
    return f"{pixels / 1e6:.1f} Mpx ({pixels:,} pixels)"


class _named_warnings:  # noqa: N801 - used as a context manager, like warnings.catch_warnings
    """Collect the warnings raised while decoding `path` and re-raise them as `DatasetWarning`s naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self) -> None:
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
        for caught in self._caught or []:
            if issubclass(caught.category, Image.DecompressionBombWarning):
                pixels = Image.MAX_IMAGE_PIXELS or 0
                message = (
                    f"{_megapixels(caught.message)}, above Pillow's decompression-bomb limit of "
                    f"{pixels / 1e6:.1f} Mpx: read anyway (refused above {2 * pixels / 1e6:.1f} Mpx); "
                    "downscale it to save memory and time"
                )
            elif issubclass(caught.category, DatasetWarning) or "PIL" in Path(caught.filename).parts:
                message = str(caught.message)
            else:  # not about the image: passed on as it was
                warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
                continue
            warnings.warn(f"image {self.path}: {message}", DatasetWarning, stacklevel=3)
