"""Class-folder layouts: `imagefolder:DIR` (optionally split folders) and `imagenet:DIR` (train/ and val/).

A class folder that holds no image in any split is refused (it would count as a class, changing the number
of classes and chance level, with nothing to learn from); a class missing from one split only is a note.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from vitprobe.data.dataset import Box, ImageDataset
from vitprobe.data.layout import ALL, IMAGE_EXTENSIONS, check_split, existing_dir, read_text
from vitprobe.data.spec import Spec
from vitprobe.errors import DatasetError

SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test")  # sub-folders that are splits
IMAGEFOLDER_HINT = "point at a folder of class sub-folders (optionally inside train/ val/ test/)"
IMAGENET_HINT = "point at the folder that holds train/ and val/ (each with one sub-folder per synset)"


def open_imagefolder(spec: Spec, split: str) -> ImageDataset:
    """`DIR/<class>/**/<image>`; with split folders (`DIR/train/<class>/...`) `split` picks one."""
    top = existing_dir(spec, IMAGEFOLDER_HINT)
    splits = split_folders(top)
    notes: list[str] = []
    if splits:
        if split not in splits:
            raise DatasetError(
                f"{spec.text}: no split folder {top / split} (split folders: {', '.join(splits)})",
                f"use --split {' or --split '.join(splits)}",
            )
        folder = top / split
        class_names = sorted({c for s in splits for c in class_folders(top / s)})
    else:
        if split != ALL:
            notes.append(f"{top} has no split folder {split!r}: reading all images in it (split 'all')")
        folder, split = top, ALL
        class_names = class_folders(top)
    if not class_names:
        raise DatasetError(
            f"{spec.text}: no class sub-folders in {folder}",
            "an image folder needs DIR/<class name>/<image files>",
        )
    paths, labels, counts = scan_class_folders(folder, class_names)
    if not paths:
        raise DatasetError(
            f"{spec.text}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}",
            "put images in DIR/<class name>/",
        )
    others = [top / s for s in splits if s != split]
    check_empty_classes(spec, folder, others, class_names, counts, notes)
    return ImageDataset(
        spec=spec.text, split=split, kind="imagefolder", root=top, class_names=class_names,
        paths=paths, labels=labels, notes=notes,
    )  # fmt: skip


def imagefolder_splits(spec: Spec) -> list[str]:
    return split_folders(existing_dir(spec, IMAGEFOLDER_HINT)) or [ALL]


def open_imagenet(spec: Spec, split: str) -> ImageDataset:
    """`DIR/{train,val}/<synset>/<image>`; class index = sorted synset order (of train/ when present).

    A flat `val/` (the official ILSVRC2012_val_*.JPEG files) is labelled from `LOC_val_solution.csv`, which
    also gives boxes; it and `LOC_synset_mapping.txt` (class names) are looked up in DIR and its parents
    (the Kaggle layout keeps them three levels above ILSVRC/Data/CLS-LOC).
    """
    root = existing_dir(spec, IMAGENET_HINT)
    check_split(spec, split, ("train", "val"))
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{spec.text}: missing folder {folder}", IMAGENET_HINT)
    reference = root / "train" if (root / "train").is_dir() else folder
    synsets = class_folders(reference)
    if not synsets:
        raise DatasetError(f"{spec.text}: no synset folders in {reference}", "expected train/n01440764/...")
    notes: list[str] = []
    boxes: list[list[Box]] | None = None
    solution = find_upwards(root, "LOC_val_solution.csv")
    listing = None
    if split == "val" and not class_folders(folder) and solution is not None:
        paths, labels, boxes = _read_val_solution(spec, solution, folder, synsets)
        notes.append(f"labels and boxes from {solution}")
        listing = solution
    else:
        extra = sorted(set(class_folders(folder)) - set(synsets))
        if extra:
            raise DatasetError(
                f"{spec.text}: {folder} has class folders not in {reference}: {', '.join(extra[:5])}",
                "train/ and val/ must use the same synset folders",
            )
        paths, labels, counts = scan_class_folders(folder, synsets)
        if paths:
            others = [root / s for s in ("train", "val") if s != split and (root / s).is_dir()]
            check_empty_classes(spec, folder, others, synsets, counts, notes)
    if not paths:
        raise DatasetError(
            f"{spec.text}: no images in synset folders under {folder}",
            f"sort {split}/ into synset folders, or put LOC_val_solution.csv next to train/ and val/",
        )
    names = synsets
    mapping = find_upwards(root, "LOC_synset_mapping.txt")
    if mapping is not None:
        words = _read_synset_mapping(spec, mapping)
        names = [words.get(s, s) for s in synsets]
        notes.append(f"class names from {mapping}")
    return ImageDataset(
        spec=spec.text, split=split, kind="imagenet", root=root, class_names=names,
        paths=paths, labels=labels, boxes=boxes, notes=notes, listing=listing,
    )  # fmt: skip


def imagenet_splits(spec: Spec) -> list[str]:
    root = existing_dir(spec, IMAGENET_HINT)
    splits = [s for s in ("train", "val") if (root / s).is_dir()]
    if not splits:
        raise DatasetError(f"{spec.text}: no train/ or val/ folder in {root}", IMAGENET_HINT)
    return splits


def check_empty_classes(
    spec: Spec, folder: Path, others: list[Path], class_names: list[str], counts: list[int], notes: list[str]
) -> None:
    """Refuse classes with no image in `folder` nor in any of the `others` split folders; note the rest."""
    empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    nowhere = [name for name in empty if not any(has_image(other / name) for other in others)]
    if nowhere:
        shown = ", ".join(str(folder / name) for name in nowhere[:3]) + (" ..." if len(nowhere) > 3 else "")
        raise DatasetError(
            f"{spec.text}: {len(nowhere)} class folder(s) hold no images in any split: {shown} (an empty "
            "class would still count as a class)",
            "remove the empty folder(s) or put images in them",
        )
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        notes.append(f"{len(empty)} class(es) have no images in {folder}, only in other splits: {shown}")


def find_upwards(folder: Path, name: str, levels: int = 3) -> Path | None:
    """`folder/name` or the same name in one of the next `levels` parents, whichever comes first."""
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / name).is_file():
            return candidate / name
    return None


def split_folders(top: Path) -> list[str]:
    return [name for name in SPLIT_FOLDER_NAMES if (top / name).is_dir()]


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(folder: Path, class_names: list[str]) -> tuple[list[Path], list[int], list[int]]:
    """Images under `folder/<class>/` (recursively, sorted), labelled by class index; images per class."""
    paths: list[Path] = []
    labels: list[int] = []
    counts: list[int] = []
    for label, name in enumerate(class_names):
        found = sorted(_images_under(folder / name))
        paths.extend(found)
        labels.extend([label] * len(found))
        counts.append(len(found))
    return paths, labels, counts


def has_image(folder: Path) -> bool:
    """Whether `folder` (searched recursively) holds at least one image file."""
    return next(_images_under(folder), None) is not None


def _images_under(folder: Path):  # noqa: ANN202 - a generator of Paths
    if not folder.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / f


def _read_val_solution(
    spec: Spec, path: Path, folder: Path, synsets: list[str]
) -> tuple[list[Path], list[int], list[list[Box]]]:
    """`ImageId,PredictionString` rows (`n01751748 x0 y0 x1 y1 ...`) -> paths, labels, boxes (x, y, w, h).

    Only images present in `folder` are kept, so a subset of val/ on disk works.
    """
    index = {synset: k for k, synset in enumerate(synsets)}
    files = {
        os.path.splitext(e.name)[0]: Path(e.path)
        for e in os.scandir(folder)
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
    }
    entries: list[tuple[Path, int, list[Box]]] = []
    for number, row in enumerate(csv.DictReader(io.StringIO(read_text(spec, path), newline="")), 2):
        fields = (row.get("PredictionString") or "").split()
        image_id = row.get("ImageId")
        if not image_id or not fields or len(fields) % 5 or fields[0] not in index:
            raise DatasetError(
                f"{spec.text}: {path} line {number} is not 'ImageId,SYNSET x0 y0 x1 y1 ...' (known synset)",
                "use the LOC_val_solution.csv of the ImageNet release",
            )
        if image_id not in files:
            continue
        groups = [fields[i : i + 5] for i in range(0, len(fields), 5)]  # (synset, x0, y0, x1, y1) each
        box_list = [(float(x0), float(y0), float(x1) - float(x0), float(y1) - float(y0))
                    for _, x0, y0, x1, y1 in groups]  # fmt: skip
        entries.append((files[image_id], index[fields[0]], box_list))
    entries.sort(key=lambda entry: entry[0])
    return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


def _read_synset_mapping(spec: Spec, path: Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines -> {synset: first name}."""
    words: dict[str, str] = {}
    for number, line in enumerate(read_text(spec, path).splitlines(), 1):
        if not line.strip():
            continue
        synset, _, text = line.strip().partition(" ")
        if not text:
            raise DatasetError(f"{spec.text}: {path} line {number} is not 'SYNSET names'", "fix the file")
        words[synset] = text.split(",")[0].strip()
    return words
