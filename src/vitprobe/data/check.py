"""Checking a dataset's images once, before a long run: which are missing, undecodable or suspicious.

Every image is decoded as extraction would decode it (`ImageDataset.load_image`); its `DatasetError` or
`DatasetWarning`s (corrupt JPEG data, decompression-bomb sizes, Pillow's own warnings) become one
`ImageProblem` each. Worker processes decode in parallel; each catches its own warnings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch.utils.data

from vitprobe.data.dataset import ImageDataset
from vitprobe.data.images import DatasetWarning
from vitprobe.errors import DatasetError


@dataclass(frozen=True)
class ImageProblem:
    """One problem with one image."""

    index: int  # dataset index
    path: str  # the file (or array record) it is about
    level: str  # "error": the image cannot be used; "warning": it can, but look at it
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_images(
    dataset: ImageDataset, *, workers: int = 0, on_progress: Callable[[int], None] | None = None
) -> list[ImageProblem]:
    """Decode every image of `dataset` once and return the problems found, in dataset order.

    Args:
        dataset: the opened split.
        workers: decoding processes (0: in this process).
        on_progress: called with 1 after each image.
    """
    loader = torch.utils.data.DataLoader(
        _Checked(dataset), batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity
    )
    problems: list[ImageProblem] = []
    for found in loader:
        problems.extend(ImageProblem(**p) for p in found)
        if on_progress is not None:
            on_progress(1)
    return problems


class _Checked(torch.utils.data.Dataset):
    """Index i -> the problems of image i, as plain dicts (they cross process boundaries)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        path = str(self.dataset.paths[i])
        found: list[dict[str, Any]] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DatasetWarning)
            try:
                self.dataset.load_image(i)
            except DatasetError as exc:
                found.append({"index": i, "path": path, "level": "error", "message": str(exc)})
        for w in caught:
            if issubclass(w.category, DatasetWarning):
                found.append({"index": i, "path": path, "level": "warning", "message": str(w.message)})
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return found


def _identity(item: Any) -> Any:
    return item
