"""Texture, scene and object transfer datasets in torchvision's on-disk layouts, read without downloading:
DTD (10 official partitions), SUN397 (its 10 official partitions when the Partitions files are there) and
Caltech-101 (boxes from its annotations; a seeded per-class train/test split, as the field uses).

The readers follow torchvision's classes of the same name (tests/test_data_transfer.py compares them on
generated trees); the split files and box annotations torchvision leaves unread are read here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from vitprobe.data.dataset import Box, ImageDataset
from vitprobe.data.finegrained import first_image_exists, hint
from vitprobe.data.layout import ALL, check_split, drop_bad_boxes, locate, numbered_lines
from vitprobe.data.spec import Spec
from vitprobe.data.subset import hash_key
from vitprobe.errors import DatasetError


def open_dtd(spec: Spec, split: str) -> ImageDataset:
    """`dtd:DIR[?partition=1..10]`: dtd/{images/<class>/<file>.jpg, labels/{train,val,test}<P>.txt}.

    Class indices are the sorted classes named in the partition's three files (all 47 in the real dataset,
    as torchvision's per-split list), so they agree between splits.
    """
    root = locate(spec, ["dtd/dtd", "dtd"], "labels/train1.txt", hint("dtd", "DTD"))
    check_split(spec, split, ("train", "val", "test"))
    partition = int(spec.params.get("partition") or 1)
    listed: dict[str, list[tuple[str, str]]] = {}
    for name in ("train", "val", "test"):
        listing = root / "labels" / f"{name}{partition}.txt"
        rows = []
        for number, line in numbered_lines(spec, listing):
            cls, sep, file = line.partition("/")
            if not sep or not file or "/" in file:
                raise DatasetError(f"{spec.text}: {listing} line {number} is not 'CLASS/FILE.jpg'",
                                   "restore the original file")  # fmt: skip
            rows.append((cls, file))
        listed[name] = rows
    class_names = sorted({cls for rows in listed.values() for cls, _ in rows})
    index = {name: k for k, name in enumerate(class_names)}
    paths = [root / "images" / cls / file for cls, file in listed[split]]
    listing = root / "labels" / f"{split}{partition}.txt"
    first_image_exists(spec, paths, listing)
    return ImageDataset(
        spec=spec.text, split=split, kind="dtd", root=root, class_names=class_names, paths=paths,
        labels=[index[cls] for cls, _ in listed[split]], listing=listing, notes=[f"partition {partition}"],
    )  # fmt: skip


def _sun397_partitions(root: Path, top: Path) -> Path | None:
    """The folder holding the official Training_NN.txt / Testing_NN.txt (from Partitions.zip), if any."""
    for candidate in (root / "Partitions", top / "Partitions", root.parent / "Partitions", root):
        if (candidate / "Training_01.txt").is_file():
            return candidate
    return None


def open_sun397(spec: Spec, split: str) -> ImageDataset:
    """`sun397:DIR[?partition=1..10]`: SUN397/{ClassName.txt, a/abbey/sun_*.jpg, ...}.

    `all` is every `sun_*.jpg` (torchvision's SUN397, which has no split); `train` and `test` are the
    official partition's Training_NN.txt / Testing_NN.txt (50 + 50 images per class), found in
    SUN397/Partitions/, DIR/Partitions/ or next to SUN397/.
    """
    root, top, partitions = _sun397_folders(spec)
    check_split(spec, split, ["train", "test", ALL] if partitions else [ALL])
    given = spec.params.get("partition")
    if given is not None and partitions is None:
        raise DatasetError(
            f"{spec.text}: partition={given} asks for the official split, but no Training_01.txt was "
            f"found in {root / 'Partitions'} or {top / 'Partitions'}",
            "unzip the official Partitions.zip into SUN397/Partitions, or use --split all without partition=",
        )
    class_names = [line[3:].strip() for _, line in numbered_lines(spec, root / "ClassName.txt")]  # "/a/abbey"
    index = {name: k for k, name in enumerate(class_names)}
    notes: list[str] = []
    if split == ALL:
        paths = sorted(root.rglob("sun_*.jpg"))
        rels = [p.relative_to(root).parts for p in paths]
        listing, where = None, root
    else:
        partition = int(given or 1)
        assert partitions is not None
        listing = partitions / f"{'Training' if split == 'train' else 'Testing'}_{partition:02d}.txt"
        lines = numbered_lines(spec, listing)
        rels = [tuple(line.lstrip("/").split("/")) for _, line in lines]
        paths = [root.joinpath(*parts) for parts in rels]
        where = listing
        notes.append(f"partition {partition} from {listing}")
    labels = []
    for number, parts in enumerate(rels, 1):
        name = "/".join(parts[1:-1])  # a/abbey/sun_x.jpg -> abbey; b/bakery/shop/sun_y.jpg -> bakery/shop
        if name not in index:
            raise DatasetError(
                f"{spec.text}: {where} (entry {number}): class {name!r} is not in {root / 'ClassName.txt'}",
                "restore the original files",
            )
        labels.append(index[name])
    if not paths:
        raise DatasetError(f"{spec.text}: no sun_*.jpg images under {root}", hint("SUN397", "SUN397"))
    if listing is not None:
        first_image_exists(spec, paths, listing)
    return ImageDataset(
        spec=spec.text, split=split, kind="sun397", root=root, class_names=class_names, paths=paths,
        labels=labels, notes=notes, listing=listing,
    )  # fmt: skip


def sun397_splits(spec: Spec) -> list[str]:
    return ["train", "test", ALL] if _sun397_folders(spec)[2] else [ALL]


def _sun397_folders(spec: Spec) -> tuple[Path, Path, Path | None]:
    """(the SUN397 folder, the folder the spec names, the folder of the official partition files or None)."""
    root = locate(spec, ["SUN397"], "ClassName.txt", hint("SUN397", "SUN397"))
    top = Path(spec.path).expanduser().resolve()
    return root, top, _sun397_partitions(root, top)


CALTECH_ANNOTATION_FOLDERS = {  # 101_ObjectCategories name -> Annotations name, where the release differs
    "Faces": "Faces_2", "Faces_easy": "Faces_3", "Motorbikes": "Motorbikes_16",
    "airplanes": "Airplanes_Side_2",
}  # fmt: skip


def open_caltech101(spec: Spec, split: str) -> ImageDataset:
    """`caltech101:DIR[?train_per_class=30&seed=0]`: caltech101/{101_ObjectCategories/<class>/image_NNNN.jpg,
    Annotations/<class>/annotation_NNNN.mat}.

    Caltech-101 has no official split. `all` is torchvision's Caltech101 (101 classes: every category
    folder but BACKGROUND_Google); `train` takes `train_per_class` images of each class (the images with
    the smallest `hash_key(seed, "caltech101", index)`), `test` the rest. Boxes are each annotation's
    `box_coord` = [top, bottom, left, right] (as show_annotation.m of the release draws them), read on first
    use of `dataset.boxes`.
    """
    root = locate(spec, ["caltech101"], "101_ObjectCategories", hint("caltech101", "Caltech101"))
    check_split(spec, split, ("train", "test", ALL))
    folder = root / "101_ObjectCategories"
    class_names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name != "BACKGROUND_Google")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = sorted(f for f in os.listdir(folder / name) if f.startswith("image_") and f.endswith(".jpg"))
        paths.extend(folder / name / f for f in found)
        labels.extend([label] * len(found))
    if not paths:
        raise DatasetError(
            f"{spec.text}: no image_NNNN.jpg files under {folder}", hint("caltech101", "Caltech101")
        )
    notes: list[str] = []
    if split != ALL:
        per_class = int(spec.params.get("train_per_class") or 30)
        seed = int(spec.params.get("seed") or 0)
        train = _per_class_first(labels, per_class, seed)
        keep = [i for i in range(len(paths)) if (i in train) == (split == "train")]
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        notes.append(
            f"{split}: seeded split, {per_class} training images per class (seed {seed}), the rest test"
        )
        if not paths:
            raise DatasetError(
                f"{spec.text}: no {split} images: no class has more than train_per_class={per_class} images",
                "use a smaller ?train_per_class=",
            )
        short = len(class_names) - len(set(labels))
        if short:
            notes.append(f"{short} classes have no {split} images (fewer than {per_class + 1} images in all)")
    annotations = root / "Annotations"
    boxes = functools.partial(_caltech_boxes, spec.text, annotations, tuple(paths), notes)
    if not annotations.is_dir():
        notes.append(f"no {annotations}: no boxes")
    return ImageDataset(
        spec=spec.text, split=split, kind="caltech101", root=root, class_names=class_names, paths=paths,
        labels=labels, boxes=boxes if annotations.is_dir() else None, notes=notes,
    )  # fmt: skip


def _per_class_first(labels: list[int], per_class: int, seed: int) -> set[int]:
    """The `per_class` indices of each class with the smallest hash keys."""
    members: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    chosen: set[int] = set()
    for indices in members.values():
        chosen.update(sorted(indices, key=lambda i: hash_key(seed, "caltech101", i))[:per_class])
    return chosen


def _caltech_boxes(
    where: str, annotations: Path, paths: tuple[Path, ...], notes: list[str]
) -> list[list[Box]]:
    """Each image's box from Annotations/<class>/annotation_NNNN.mat; [] where the file is missing."""
    from scipy.io import loadmat

    boxes: list[list[Box]] = []
    missing = 0
    for path in paths:
        name = path.parent.name
        number = path.stem.removeprefix("image_")
        mat_path = annotations / CALTECH_ANNOTATION_FOLDERS.get(name, name) / f"annotation_{number}.mat"
        if not mat_path.is_file():
            boxes.append([])
            missing += 1
            continue
        try:
            coords = np.asarray(loadmat(mat_path)["box_coord"], dtype=np.float64).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - a broken .mat raises anything from IndexError to MatReadError
            raise DatasetError(f"{where}: cannot read the box of {mat_path} ({type(exc).__name__}: {exc})",
                               "restore the file from the Caltech-101 archive") from exc  # fmt: skip
        if coords.shape != (4,):
            raise DatasetError(f"{where}: {mat_path} box_coord has {coords.size} values, expected 4",
                               "restore the file")  # fmt: skip
        top, bottom, left, right = coords.tolist()
        boxes.append(drop_bad_boxes([(left, top, right - left, bottom - top)], str(mat_path), notes))
    if missing:
        notes.append(f"{missing} of {len(paths)} images have no annotation file under {annotations}")
    return boxes
