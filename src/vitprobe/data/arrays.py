"""Datasets stored as arrays, not image files: CIFAR-10/100 (python pickles) and STL-10 (binary), in
torchvision's on-disk layouts. Nothing is downloaded; CIFAR's pickles are read by the restricted unpickler
of `vitprobe.data.safe_pickle`.

Each image is named `<file>#<row>` in `ImageDataset.paths` (and so in the fingerprint); its pixels come from
`RecordImages`, which reads a file once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from vitprobe.data.dataset import ImageDataset
from vitprobe.data.images import RecordImages
from vitprobe.data.layout import check_split, locate, numbered_lines
from vitprobe.data.safe_pickle import load_data_pickle
from vitprobe.data.spec import Spec
from vitprobe.errors import DatasetError

CIFAR = {  # kind -> (folder, {split: batch files}, meta file, meta key per label set)
    "cifar10": ("cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", {"fine": "label_names"}),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]},
                 "meta", {"fine": "fine_label_names", "coarse": "coarse_label_names"}),
}  # fmt: skip
CIFAR_LABEL_KEYS = {"fine": ("labels", "fine_labels"), "coarse": ("coarse_labels",)}  # first present wins
STL10_SPLITS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
STL10_SIDE = 96


def _hint(kind: str) -> str:
    tv = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}[kind]
    folder = CIFAR[kind][0] if kind in CIFAR else "stl10_binary"
    return (
        f"point at torchvision's root (the folder holding {folder}/) or at {folder}/ itself; vitprobe never "
        f"downloads: fetch it once with torchvision.datasets.{tv}(root, download=True) or from the "
        "dataset's site"
    )


def open_cifar(spec: Spec, split: str) -> ImageDataset:
    """`cifar10:DIR` / `cifar100:DIR[?labels=fine|coarse]`: the python batches, splits train and test."""
    folder, batches, meta_file, meta_keys = CIFAR[spec.kind]
    root = locate(spec, [folder], meta_file, _hint(spec.kind))
    check_split(spec, split, tuple(batches))
    level = str(spec.params.get("labels") or "fine")
    meta = load_data_pickle(root / meta_file, where=spec.text)
    names = meta.get(meta_keys[level]) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetError(
            f"{spec.text}: {root / meta_file} has no list of class names {meta_keys[level]!r}",
            "restore the file from the CIFAR archive",
        )
    files = tuple(root / name for name in batches[split])
    paths: list[Path] = []
    labels: list[int] = []
    rows: list[tuple[int, int]] = []
    arrays: dict[int, np.ndarray] = {}
    for number, file in enumerate(files):
        pixels, file_labels = _read_cifar_batch(spec, file, level)
        bad = next((r for r, y in enumerate(file_labels) if not 0 <= y < len(names)), None)
        if bad is not None:
            raise DatasetError(
                f"{spec.text}: {file} row {bad} has label {file_labels[bad]}, but {root / meta_file} names "
                f"{len(names)} classes",
                "restore the files from the CIFAR archive",
            )
        arrays[number] = pixels
        paths.extend(root / f"{file.name}#{r}" for r in range(len(file_labels)))
        labels.extend(file_labels)
        rows.extend((number, r) for r in range(len(file_labels)))
    records = RecordImages(files=files, rows=rows, reader=functools.partial(_cifar_pixels, spec.text, level),
                           image_size=(32, 32), arrays=arrays)  # fmt: skip
    return ImageDataset(
        spec=spec.text, split=split, kind=spec.kind, root=root, class_names=list(names), paths=paths,
        labels=labels, records=records,
    )  # fmt: skip


def _read_cifar_batch(spec: Spec, file: Path, level: str) -> tuple[np.ndarray, list[int]]:
    """One batch: pixels (N, 32, 32, 3) uint8 (a view) and its labels at `level`, checked."""
    batch: Any = load_data_pickle(file, where=spec.text)
    data = batch.get("data") if isinstance(batch, dict) else None
    key = next((k for k in CIFAR_LABEL_KEYS[level] if isinstance(batch, dict) and k in batch), None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{spec.text}: {file} has no 'data' array of uint8 rows of 3072 values (3 x 32 x 32)",
            "restore the file from the CIFAR archive",
        )
    raw = batch[key] if key is not None else None
    if not isinstance(raw, list | np.ndarray) or len(raw) != len(data):
        want = " or ".join(repr(k) for k in CIFAR_LABEL_KEYS[level])
        raise DatasetError(
            f"{spec.text}: {file} has no list of {len(data)} labels {want}", "restore the file"
        )
    pixels = data.reshape(-1, 3, 32, 32).transpose(
        0, 2, 3, 1
    )  # (N, 3072) -> (N, 3, 32, 32) -> (N, 32, 32, 3)
    return pixels, [int(v) for v in raw]


def _cifar_pixels(where: str, level: str, file: Path) -> np.ndarray:
    """`RecordImages.reader` for CIFAR: the batch's pixels (N, 32, 32, 3), read again in a worker."""
    return _read_cifar_batch(Spec(text=where, kind="cifar", path=str(file)), file, level)[0]


def cifar_splits(spec: Spec) -> list[str]:
    return list(CIFAR[spec.kind][1])


def open_stl10(spec: Spec, split: str) -> ImageDataset:
    """`stl10:DIR[?fold=K]`: the binary files; splits train (or its fold K of 1,000) and test.

    The unlabelled split (unlabeled_X.bin) is not offered: every image here needs a label.
    """
    root = locate(spec, ["stl10_binary"], "class_names.txt", _hint("stl10"))
    check_split(spec, split, tuple(STL10_SPLITS))
    class_names = [line for _, line in numbered_lines(spec, root / "class_names.txt")]
    x_file, y_file = (root / name for name in STL10_SPLITS[split])
    for file in (x_file, y_file):
        if not file.is_file():
            raise DatasetError(f"{spec.text}: missing {file}", _hint("stl10"))
    raw_labels = np.fromfile(y_file, dtype=np.uint8).astype(np.int64) - 1  # 1-based in the file
    count = x_file.stat().st_size // (3 * STL10_SIDE * STL10_SIDE)
    if x_file.stat().st_size % (3 * STL10_SIDE * STL10_SIDE) or count != len(raw_labels):
        raise DatasetError(
            f"{spec.text}: {x_file} holds {x_file.stat().st_size} bytes, not {len(raw_labels)} images of "
            f"3 x 96 x 96 (one per label in {y_file.name})",
            "restore the files from the STL-10 archive",
        )
    if len(raw_labels) and (raw_labels.min() < 0 or raw_labels.max() >= len(class_names)):
        raise DatasetError(
            f"{spec.text}: {y_file} has labels outside 1..{len(class_names)} (class_names.txt)",
            "restore the files from the STL-10 archive",
        )
    selected = list(range(len(raw_labels)))
    notes: list[str] = []
    fold = spec.params.get("fold")
    if fold is not None and split == "train":
        selected = _stl10_fold(spec, root / "fold_indices.txt", int(fold), len(raw_labels))
        notes.append(f"train fold {fold} of fold_indices.txt: {len(selected)} of {len(raw_labels)} images")
    elif fold is not None:
        notes.append(f"fold={fold} selects training images only; the test split is read whole")
    records = RecordImages(files=(x_file,), rows=[(0, r) for r in selected], reader=_stl10_pixels,
                           image_size=(STL10_SIDE, STL10_SIDE))  # fmt: skip
    return ImageDataset(
        spec=spec.text, split=split, kind="stl10", root=root, class_names=class_names,
        paths=[root / f"{x_file.name}#{r}" for r in selected], labels=[int(raw_labels[r]) for r in selected],
        records=records, notes=notes,
    )  # fmt: skip


def _stl10_pixels(file: Path) -> np.ndarray:
    """`RecordImages.reader` for STL-10: a memmap view (N, 96, 96, 3); the file stores each channel
    column-major."""
    raw = np.memmap(file, dtype=np.uint8, mode="r").reshape(-1, 3, STL10_SIDE, STL10_SIDE)  # (N, C, x, y)
    return raw.transpose(0, 3, 2, 1)  # (N, C, x, y) -> (N, y, x, C)


def _stl10_fold(spec: Spec, path: Path, fold: int, total: int) -> list[int]:
    """The 0-based training indices on line `fold` (0-based) of fold_indices.txt."""
    lines = [line for _, line in numbered_lines(spec, path)] if path.is_file() else []
    if fold >= len(lines):
        raise DatasetError(
            f"{spec.text}: no fold {fold} in {path} ({len(lines)} lines)", "use 0 <= fold <= 9"
        )
    try:
        indices = [int(v) for v in lines[fold].split()]
    except ValueError as exc:
        raise DatasetError(
            f"{spec.text}: {path} line {fold + 1} is not integers", "restore the file"
        ) from exc
    if any(not 0 <= i < total for i in indices):
        raise DatasetError(
            f"{spec.text}: {path} line {fold + 1} has indices outside 0..{total - 1}", "restore it"
        )
    return indices
