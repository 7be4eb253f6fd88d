"""Reading a dataset's layout on disk: folders and files located, text read as UTF-8, splits, boxes checked.

Shared by the openers of every kind, so each problem is worded once: what is wrong, in which file (and
line), and how to fix it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from vitprobe.data.dataset import Box
from vitprobe.data.images import DatasetWarning
from vitprobe.data.spec import Spec
from vitprobe.errors import DatasetError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ALL = "all"


def existing_dir(spec: Spec, hint: str) -> Path:
    """`spec.path` as an absolute folder; a `DatasetError` with `hint` when it is not one."""
    root = Path(spec.path).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{spec.text}: folder {root} does not exist", hint)
    return root


def existing_file(spec: Spec, hint: str, what: str = "file") -> Path:
    """`spec.path` as an absolute file; a `DatasetError` with `hint` when it is a folder or absent."""
    path = Path(spec.path).expanduser().resolve()
    if path.is_dir():
        raise DatasetError(f"{spec.text}: {path} is a folder, not a {what}", hint)
    if not path.is_file():
        raise DatasetError(f"{spec.text}: file {path} does not exist", hint)
    return path


def locate(spec: Spec, folders: Sequence[str], marker: str, hint: str) -> Path:
    """The dataset folder: the first of `DIR/<folder>` (each of `folders`, then DIR itself) holding `marker`.

    torchvision's `root` is the parent of the dataset's own folder (`root/flowers-102/...`); users point at
    either, so both work and both give the same dataset root (and fingerprint).
    """
    top = existing_dir(spec, hint)
    candidates = [top / folder for folder in folders] + [top]
    for candidate in candidates:
        if (candidate / marker).exists():
            return candidate
    tried = " or ".join(str(c / marker) for c in candidates)
    raise DatasetError(f"{spec.text}: no {tried}", hint)


def read_text(spec: Spec, path: Path) -> str:
    """A text file of the layout as UTF-8 (a BOM is dropped); undecodable bytes name the file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{spec.text}: missing {path}", "restore the file from the dataset's archive"
        ) from exc
    except OSError as exc:
        raise DatasetError(
            f"{spec.text}: cannot read {path} ({exc.strerror or exc})", "check the file"
        ) from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{spec.text}: {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} "
            f"(offset {exc.start}) cannot be decoded",
            f"save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed_{path.name}",
        ) from exc


def numbered_lines(spec: Spec, path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-empty line of a text file."""
    return [(n, line.strip()) for n, line in enumerate(read_text(spec, path).splitlines(), 1) if line.strip()]


def check_split(spec: Spec, split: str, allowed: Sequence[str]) -> None:
    """Refuse a split the layout does not have, listing the ones it has."""
    if split not in allowed:
        raise DatasetError(
            f"{spec.text}: unknown split {split!r} for {spec.kind}", f"use --split {', '.join(allowed)}"
        )


def box_problem(box: Box) -> str | None:
    """Why (x, y, w, h) is not a usable box (a size not positive, a value not finite), or None."""
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        return f"has a value that is not a finite number: {box}"
    if w <= 0 or h <= 0:
        return (
            f"has width {w:g} and height {h:g}; both must be positive (x, y, w, h are the top-left corner "
            "and the size: corners x2,y2 written as w,h give negative sizes)"
        )
    return None


def drop_bad_boxes(boxes: list[Box], where: str, notes: list[str]) -> list[Box]:
    """The usable boxes of one image; each unusable one is dropped with a `DatasetWarning` and a note.

    For annotation files of published datasets (.mat, .xml, box lists) read as they come: one bad entry
    should not block classification on the whole dataset, and it must not silently score as a miss either.
    """
    kept = []
    for box in boxes:
        problem = box_problem(box)
        if problem is None:
            kept.append(box)
            continue
        message = f"dropped the box of {where}: it {problem}"
        notes.append(message)
        warnings.warn(message, DatasetWarning, stacklevel=2)
    return kept


def mat_scalar(value: object) -> object:
    """The single element of a MATLAB value as scipy.io.loadmat returns it (nested 1 x 1 arrays)."""
    import numpy as np

    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"expected one value, got shape {value.shape}")
        value = value.reshape(-1)[0]
    return value.item() if hasattr(value, "item") else value


def load_mat(spec: Spec, path: Path) -> dict[str, object]:
    """A .mat file as scipy.io.loadmat reads it (no squeezing); a broken or missing file names itself."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DatasetError(f"{spec.text}: missing {path}", "restore the file from the dataset's archive")
    try:
        return loadmat(path)
    except Exception as exc:  # noqa: BLE001 - a broken file raises anything from IndexError to MatReadError
        raise DatasetError(
            f"{spec.text}: cannot read the MATLAB file {path} ({type(exc).__name__}: {exc})",
            "restore the file from the dataset's archive",
        ) from exc


def mat_field(spec: Spec, mat: dict[str, object], key: str, path: Path) -> object:
    """`mat[key]` of a loaded .mat file; a missing variable names the file and the variable."""
    if key not in mat:
        raise DatasetError(f"{spec.text}: {path} has no variable {key!r}", "restore the original file")
    return mat[key]
