"""The CUB-200-2011 layout (`cub:DIR`) and the generated needles written in it (`synthetic:needles`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vitprobe.data.dataset import Box, ImageDataset
from vitprobe.data.layout import ALL, box_problem, check_split, existing_dir, numbered_lines
from vitprobe.data.spec import Spec
from vitprobe.errors import DatasetError

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
CUB_SPLITS = ("train", "test", ALL)
CUB_HINT = "point --data at the CUB_200_2011 folder (the one with images.txt and images/)"


def open_cub(spec: Spec, split: str, *, kind: str = "cub", root: Path | None = None) -> ImageDataset:
    """The official CUB_200_2011 layout (DIR or DIR/CUB_200_2011); labels 1-based in the files -> 0-based.

    Args:
        spec: the parsed spec (its text names the dataset in messages).
        split: train, test or all.
        kind: recorded as the dataset's kind (`synthetic` for generated needles).
        root: the folder to read instead of `spec.path` (the generated folder for `synthetic:`).
    """
    if root is None:
        root = existing_dir(spec, CUB_HINT)
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    for name in CUB_FILES:
        if not (root / name).is_file():
            raise DatasetError(f"{spec.text}: missing {root / name}", CUB_HINT)
    check_split(spec, split, CUB_SPLITS)
    images = _read_id_table(spec, root / "images.txt", 1)
    labels_by_id = _read_id_table(spec, root / "image_class_labels.txt", 1)
    is_train = _read_id_table(spec, root / "train_test_split.txt", 1)
    classes = _read_id_table(spec, root / "classes.txt", 1)
    box_file = root / "bounding_boxes.txt"
    boxes_by_id = _read_id_table(spec, box_file, 4) if box_file.is_file() else None
    notes = [] if boxes_by_id is not None else [f"no {box_file}: the dataset has no boxes"]

    class_ids = sorted(classes, key=int)
    if [int(c) for c in class_ids] != list(range(1, len(class_ids) + 1)):
        raise DatasetError(
            f"{spec.text}: {root / 'classes.txt'} ids are not 1..K", "restore the original file"
        )
    class_names = [
        re.sub(r"^\d+\.", "", classes[c][1]) for c in class_ids
    ]  # 001.Black_footed -> Black_footed

    paths: list[Path] = []
    labels: list[int] = []
    boxes: list[list[Box]] = []
    ids: list[str] = []
    for image_id in sorted(images, key=int):
        for table, name in ((labels_by_id, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise DatasetError(
                    f"{spec.text}: image id {image_id} missing from {root / name}", "restore it"
                )
        if split != ALL and (is_train[image_id][1] == "1") != (split == "train"):
            continue
        label = int(labels_by_id[image_id][1]) - 1
        if not 0 <= label < len(class_names):
            raise DatasetError(
                f"{spec.text}: image id {image_id} has class {label + 1}, not in {root / 'classes.txt'}",
                "restore the original files",
            )
        paths.append(root / "images" / images[image_id][1])
        labels.append(label)
        ids.append(image_id)
        if boxes_by_id is not None:
            if image_id not in boxes_by_id:
                raise DatasetError(
                    f"{spec.text}: image id {image_id} missing from {box_file}", "restore the file"
                )
            line, *values = boxes_by_id[image_id]
            try:
                box = tuple(float(v) for v in values)
            except ValueError as exc:
                raise DatasetError(
                    f"{spec.text}: {box_file} line {line} has a box that is not four numbers: {values}",
                    "restore the original file",
                ) from exc
            problem = box_problem(box)  # type: ignore[arg-type]
            if problem is not None:
                raise DatasetError(f"{spec.text}: {box_file} line {line}: the box {problem}", "fix the line")
            boxes.append([box])  # type: ignore[list-item]
    if not (root / "images").is_dir():
        raise DatasetError(
            f"{spec.text}: missing folder {root / 'images'} (images.txt lists files in it)", CUB_HINT
        )
    if paths and not paths[0].is_file():
        line = images[ids[0]][0]
        raise DatasetError(
            f"{spec.text}: missing image {paths[0]} (listed in {root / 'images.txt'} line {line})",
            "restore the file or remove its lines from the CUB files, or point --data at the CUB_200_2011 "
            "folder that holds it",
        )
    return ImageDataset(
        spec=spec.text, split=split, kind=kind, root=root, class_names=class_names, paths=paths,
        labels=labels, boxes=boxes if boxes_by_id is not None else None, notes=notes,
        listing=root / "images.txt",
    )  # fmt: skip


def _read_id_table(spec: Spec, path: Path, columns: int) -> dict[str, list[str]]:
    """`<id> <value> ...` lines -> {id: [line number, values...]}; `columns` values per line (the last one may
    hold spaces)."""
    table: dict[str, list[str]] = {}
    for number, line in numbered_lines(spec, path):
        parts = line.split(maxsplit=columns)
        if len(parts) != columns + 1:
            raise DatasetError(
                f"{spec.text}: {path} line {number} has {len(parts)} fields, expected {columns + 1}: "
                f"{line!r}",
                "restore the original file",
            )
        table[parts[0]] = [str(number), *parts[1:]]
    return table


def open_synthetic(spec: Spec, split: str) -> ImageDataset:
    """`synthetic:needles[?n=2000&classes=10&size=224&seed=0]`: made once in $VITPROBE_HOME, read as CUB."""
    from vitprobe.synthetic import SyntheticConfig, ensure_synthetic

    if spec.path != "needles":
        raise DatasetError(
            f"unknown synthetic dataset {spec.path!r} in {spec.text!r}", "use synthetic:needles"
        )
    check_split(spec, split, CUB_SPLITS)
    config = SyntheticConfig(**{k: int(v) for k, v in spec.params.items() if v is not None})
    return open_cub(spec, split, kind="synthetic", root=ensure_synthetic(config, vitprobe_home()))


def vitprobe_home() -> Path:
    """`$VITPROBE_HOME`, default `~/.cache/vitprobe`: where generated datasets live."""
    return Path(os.environ.get("VITPROBE_HOME", "~/.cache/vitprobe")).expanduser()
