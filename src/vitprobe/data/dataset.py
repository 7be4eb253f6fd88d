"""An opened dataset: `ImageDataset` (image paths or array records, labels, boxes) and its fingerprint.

Nothing here knows a layout on disk (the openers in this package do) or resizes images (callers pass the
backbone's transform).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch.utils.data
from PIL import Image

from vitprobe.data import images
from vitprobe.errors import DatasetError

GENERATOR_MARKER = "synthetic.json"  # written by vitprobe.synthetic into the root of every generated dataset

Box = tuple[float, float, float, float]  # (x, y, w, h) in original pixels


class ImageDataset(torch.utils.data.Dataset):
    """Images with integer labels, optional boxes, and a transform applied on access.

    `__getitem__(i)` returns `(transform(image) or the PIL image, label, i)`; the index lets extraction write
    tokens back in dataset order. Images are always RGB (`vitprobe.data.images.to_rgb`).

    Attributes:
        spec: the spec string the dataset was opened from.
        split: the split actually read (`all` when a folder has no split sub-folders).
        kind: the dataset kind (a key of `vitprobe.data.KINDS`).
        root: the folder relative paths (and the fingerprint) are taken against.
        class_names: name of class k at index k (same list for every split of a dataset).
        paths: absolute path of each image; for array records (CIFAR, STL-10) `root/<file>#<row>`, a name
            only (the pixels come from `records`).
        labels: class index of each image.
        boxes: per image a list of (x, y, w, h) boxes in original pixels, or None when the dataset has none.
            May be given as a function that reads them on first access (per-image annotation files).
        transform: callable applied to the PIL image in `__getitem__`; may be set after construction.
        notes: things the user should know about how the spec was read (e.g. a split fallback).
        listing: the file that lists the images (images.txt, a CSV, a split file), named when one is missing.
        records: where the pixels are when images are rows of array files, else None.
    """

    def __init__(
        self,
        *,
        spec: str,
        split: str,
        kind: str,
        root: Path,
        class_names: list[str],
        paths: list[Path],
        labels: list[int],
        boxes: list[list[Box]] | Callable[[], list[list[Box]]] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        notes: list[str] | None = None,
        listing: Path | None = None,
        records: images.RecordImages | None = None,
    ) -> None:
        assert len(paths) == len(labels), "one label per image"
        assert records is None or len(records.rows) == len(paths), "one record per image"
        self.spec = spec
        self.split = split
        self.kind = kind
        self.root = root
        self.class_names = class_names
        self.paths = paths
        self.labels = labels
        self._boxes: list[list[Box]] | None = None
        self._box_loader: Callable[[], list[list[Box]]] | None = None
        if callable(boxes):
            self._box_loader = boxes
        else:
            self.boxes = boxes
        self.transform = transform
        self.notes = notes or []
        self.listing = listing
        self.records = records

    @property
    def boxes(self) -> list[list[Box]] | None:
        if self._box_loader is not None:
            self.boxes, self._box_loader = self._box_loader(), None
        return self._boxes

    @boxes.setter
    def boxes(self, value: list[list[Box]] | None) -> None:
        assert value is None or len(value) == len(self.paths), "one box list per image"
        self._boxes, self._box_loader = value, None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the sorted lines `"<relative path>\\t<label>\\n"` (UTF-8, POSIX paths under root).

        It identifies which files carry which labels, not the pixels: relabelling or adding one file changes
        it. A generated dataset (its root holds GENERATOR_MARKER) also hashes the generator's config, because
        its file names and labels do not depend on `size` or `seed`: regenerating with the same parameters
        gives the same fingerprint, with other parameters another one. Computed on each access (seconds for
        ImageNet's 1.28 M files), so it follows edits to paths and labels.
        """
        return fingerprint(self.relative_paths(), self.labels, generator=generator_identity(self.root))

    def relative_paths(self) -> list[str]:
        """POSIX paths relative to `root` (absolute when an image lies outside it, e.g. in a CSV)."""
        prefix = str(self.root) + os.sep  # string slicing: Path.relative_to is slow for 1.28 M files
        relative = []
        for path in self.paths:
            text = str(path)
            inside = text.startswith(prefix)
            relative.append(
                text[len(prefix) :].replace(os.sep, "/") if inside else path.absolute().as_posix()
            )
        return relative

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        image = self.load_image(i)
        return (self.transform(image) if self.transform is not None else image), self.labels[i], i

    def load_image(self, i: int) -> Image.Image:
        """Image `i` as RGB: grayscale replicated, CMYK converted, palette and alpha composited on white.

        Raises:
            DatasetError: the file is missing or unreadable (named); warns (`DatasetWarning`) about corrupt
                JPEG data and very large images, naming the file.
        """
        if self.records is not None:
            return self.records.image(i)
        return images.decode(self.paths[i], where=self.spec, missing_hint=self.missing_hint())

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image `i` as stored in the file (reads only the header)."""
        if self.records is not None:
            return self.records.image_size
        return images.size(self.paths[i], where=self.spec, missing_hint=self.missing_hint())

    def missing_hint(self) -> str:
        """The fix to suggest when one listed image is missing (the dataset's folder itself was found)."""
        if self.listing is not None:
            return f"restore the file, or remove it from {self.listing}"
        return "the file was removed after the dataset was opened: restore it, or open the dataset again"

    def describe(self) -> dict[str, Any]:
        """What `data show --json` prints and manifests record: counts, classes, boxes, fingerprint."""
        boxes = self.boxes
        return {
            "spec": self.spec,
            "kind": self.kind,
            "split": self.split,
            "root": str(self.root),
            "num_images": len(self),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "has_boxes": boxes is not None,
            "num_boxes": None if boxes is None else sum(len(b) for b in boxes),
            "fingerprint": self.fingerprint,
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return (
            f"ImageDataset(spec={self.spec!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, boxes={self._boxes is not None or self._box_loader is not None})"
        )


def fingerprint(relative_paths: Iterable[str], labels: Iterable[int], *, generator: str | None = None) -> str:
    """sha256 hex of the sorted `"<relative path>\\t<label>\\n"` lines (see `ImageDataset.fingerprint`).

    Args:
        relative_paths: POSIX path of each image relative to the dataset root.
        labels: class index of each image.
        generator: `generator_identity(root)` of a generated dataset; when given, the line
            `"#generator\\t<generator>\\n"` follows the sorted lines. None (real datasets) adds nothing.
    """
    pairs = sorted(zip(relative_paths, map(int, labels), strict=True))
    text = "".join([f"{rel}\t{label}\n" for rel, label in pairs])
    if generator is not None:
        text += f"#generator\t{generator}\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def generator_identity(root: Path) -> str | None:
    """The canonical JSON (sorted keys, no spaces) of `root/synthetic.json`, or None when root has no marker.

    Only a JSON object with a "generator" key (what `vitprobe.synthetic` writes) counts, so a JSON file of
    that name in a real dataset leaves its fingerprint alone; a marker that is not JSON at all is an error.
    """
    path = root / GENERATOR_MARKER
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"{path}: cannot read the generator marker ({type(exc).__name__}: {exc})",
            "delete the generated folder and generate it again",
        ) from exc
    if not isinstance(meta, dict) or "generator" not in meta:
        return None
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
