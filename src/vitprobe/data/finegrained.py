"""Fine-grained transfer datasets in torchvision's on-disk layouts, read without downloading: Flowers-102,
Oxford-IIIT Pet (with head boxes), Stanford Cars (with boxes), FGVC-Aircraft (with boxes) and Food-101.

Each opener reads the files torchvision's class of the same name reads, with the same splits, labels and
class names (tests/test_data_transfer.py compares them on generated trees); boxes come from the
annotations torchvision leaves unread. A box whose size is not positive is dropped with a warning.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from vitprobe.data.dataset import Box, ImageDataset
from vitprobe.data.layout import (
    check_split,
    drop_bad_boxes,
    load_mat,
    locate,
    mat_field,
    mat_scalar,
    numbered_lines,
    read_text,
)
from vitprobe.data.spec import Spec
from vitprobe.errors import DatasetError


def hint(folder: str, torchvision_class: str) -> str:
    """How to point at a torchvision layout, and how to get the files (vitprobe never downloads)."""
    return (
        f"point at torchvision's root (the folder holding {folder}/) or at {folder}/ itself; vitprobe never "
        f"downloads: fetch it once with torchvision.datasets.{torchvision_class}(root, download=True) or "
        "from the dataset's site"
    )


def first_image_exists(spec: Spec, paths: list[Path], listing: Path) -> None:
    """One stat, as for CUB: a layout whose images are elsewhere fails at once, naming the first one."""
    if paths and not paths[0].is_file():
        raise DatasetError(
            f"{spec.text}: missing image {paths[0]} (listed in {listing})",
            "restore the image folder from the dataset's archive (next to the file that lists it)",
        )


def open_flowers102(spec: Spec, split: str) -> ImageDataset:
    """`flowers102:DIR`: flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}; train, val, test."""
    from torchvision.datasets import Flowers102

    root = locate(spec, ["flowers-102"], "imagelabels.mat", hint("flowers-102", "Flowers102"))
    check_split(spec, split, ("train", "val", "test"))
    labels_file, setid_file = root / "imagelabels.mat", root / "setid.mat"
    labels_of = np.asarray(mat_field(spec, load_mat(spec, labels_file), "labels", labels_file)).reshape(-1)
    labels_of = labels_of.astype(int) - 1  # 1-based in the file
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    ids = np.asarray(mat_field(spec, load_mat(spec, setid_file), key, setid_file)).reshape(-1).astype(int)
    names = list(Flowers102.classes)
    if len(ids) and (ids.min() < 1 or ids.max() > len(labels_of)):
        raise DatasetError(f"{spec.text}: {root / 'setid.mat'} {key} has ids outside 1..{len(labels_of)}",
                           "restore the original files")  # fmt: skip
    if len(labels_of) and (labels_of.min() < 0 or labels_of.max() >= len(names)):
        raise DatasetError(f"{spec.text}: {root / 'imagelabels.mat'} has labels outside 1..{len(names)}",
                           "restore the original file")  # fmt: skip
    paths = [root / "jpg" / f"image_{i:05d}.jpg" for i in ids]
    first_image_exists(spec, paths, root / "setid.mat")
    return ImageDataset(
        spec=spec.text, split=split, kind="flowers102", root=root, class_names=names, paths=paths,
        labels=[int(labels_of[i - 1]) for i in ids], listing=root / "setid.mat",
    )  # fmt: skip


def open_pets(spec: Spec, split: str) -> ImageDataset:
    """`pets:DIR`: oxford-iiit-pet/{images/, annotations/{trainval,test}.txt, annotations/xmls/}; 37 breeds.

    Boxes are the head boxes of annotations/xmls/<id>.xml (the dataset provides them for trainval images
    only); an image without one has no box, and a split without any has `boxes` None.
    """
    root = locate(
        spec, ["oxford-iiit-pet"], "annotations/trainval.txt", hint("oxford-iiit-pet", "OxfordIIITPet")
    )
    check_split(spec, split, ("trainval", "test"))
    entries: dict[str, list[tuple[str, int]]] = {}
    for name in ("trainval", "test"):
        listing = root / "annotations" / f"{name}.txt"
        rows = []
        for number, line in numbered_lines(spec, listing):
            parts = line.split()
            if len(parts) != 4 or not parts[1].isdigit():
                raise DatasetError(
                    f"{spec.text}: {listing} line {number} is not 'IMAGE_ID CLASS SPECIES BREED'",
                    "restore the original file",
                )
            rows.append((parts[0], int(parts[1]) - 1))
        entries[name] = rows
    breeds = {label: image_id.rsplit("_", 1)[0] for rows in entries.values() for image_id, label in rows}
    if sorted(breeds) != list(range(len(breeds))):
        raise DatasetError(
            f"{spec.text}: the class ids in {root / 'annotations'} are not 1..K", "restore the files"
        )
    class_names = [" ".join(part.title() for part in breeds[k].split("_")) for k in range(len(breeds))]
    ids = [image_id for image_id, _ in entries[split]]
    paths = [root / "images" / f"{image_id}.jpg" for image_id in ids]
    first_image_exists(spec, paths, root / "annotations" / f"{split}.txt")
    notes: list[str] = []
    xmls = [root / "annotations" / "xmls" / f"{image_id}.xml" for image_id in ids]
    present = [xml.is_file() for xml in xmls]
    boxes: list[list[Box]] | None = None
    if any(present):
        boxes = [_voc_boxes(spec, xml, notes) if ok else [] for xml, ok in zip(xmls, present, strict=True)]
        notes.append(f"head boxes from annotations/xmls for {sum(present)} of {len(ids)} images")
    else:
        notes.append(f"no head boxes: annotations/xmls has none of the {split} images")
    return ImageDataset(
        spec=spec.text, split=split, kind="pets", root=root, class_names=class_names, paths=paths,
        labels=[label for _, label in entries[split]], boxes=boxes, notes=notes,
        listing=root / "annotations" / f"{split}.txt",
    )  # fmt: skip


def _voc_boxes(spec: Spec, path: Path, notes: list[str]) -> list[Box]:
    """The (x, y, w, h) of every `object/bndbox` (xmin, ymin, xmax, ymax as written) of a VOC-style XML."""
    try:
        tree = ET.fromstring(read_text(spec, path))
        corners = [[float(b.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
                   for b in tree.iter("bndbox")]  # fmt: skip
    except (ET.ParseError, ValueError) as exc:
        raise DatasetError(
            f"{spec.text}: cannot read the box file {path} ({exc})", "restore the file"
        ) from exc
    boxes = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in corners]
    return drop_bad_boxes(boxes, str(path), notes)


def open_cars(spec: Spec, split: str) -> ImageDataset:
    """`cars:DIR`: stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_test_annos_withlabels.mat, cars_train/, cars_test/}; train, test; boxes from the annotations."""
    root = locate(spec, ["stanford_cars"], "devkit/cars_meta.mat", hint("stanford_cars", "StanfordCars"))
    check_split(spec, split, ("train", "test"))
    if split == "train":
        annos_file, folder = root / "devkit" / "cars_train_annos.mat", root / "cars_train"
    else:
        annos_file, folder = root / "cars_test_annos_withlabels.mat", root / "cars_test"
        if not annos_file.is_file() and (root / "devkit" / annos_file.name).is_file():
            annos_file = root / "devkit" / annos_file.name  # some copies keep it in devkit/
    meta_file = root / "devkit" / "cars_meta.mat"
    names = mat_field(spec, load_mat(spec, meta_file), "class_names", meta_file)
    class_names = [str(mat_scalar(c)) for c in np.asarray(names).reshape(-1)]
    annos = np.asarray(mat_field(spec, load_mat(spec, annos_file), "annotations", annos_file)).reshape(-1)
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    if annos.dtype.names is None or any(f not in annos.dtype.names for f in fields):
        raise DatasetError(
            f"{spec.text}: {annos_file} has no 'annotations' struct with fields {', '.join(fields)}",
            "restore the original file",
        )
    paths, labels, boxes, notes = [], [], [], []
    for n, record in enumerate(annos):
        x1, y1, x2, y2, label, fname = (mat_scalar(record[f]) for f in fields)
        label = int(label) - 1  # type: ignore[call-overload]
        if not 0 <= label < len(class_names):
            raise DatasetError(
                f"{spec.text}: {annos_file} entry {n + 1} has class {label + 1}, not in "
                f"1..{len(class_names)}",
                "restore the original files",
            )
        paths.append(folder / str(fname))
        labels.append(label)
        box = (float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1))  # type: ignore[arg-type]
        boxes.append(drop_bad_boxes([box], f"{annos_file} entry {n + 1} ({fname})", notes))
    first_image_exists(spec, paths, annos_file)
    return ImageDataset(
        spec=spec.text, split=split, kind="cars", root=root, class_names=class_names, paths=paths,
        labels=labels, boxes=boxes, notes=notes, listing=annos_file,
    )  # fmt: skip


AIRCRAFT_LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


def open_aircraft(spec: Spec, split: str) -> ImageDataset:
    """`aircraft:DIR[?level=variant|family|manufacturer]`: fgvc-aircraft-2013b/data/{images/, variants.txt,
    images_variant_train.txt, ..., images_box.txt}; train, val, trainval, test; boxes from images_box.txt."""
    folder = "fgvc-aircraft-2013b"
    root = locate(spec, [f"{folder}/data", "data"], "variants.txt", hint(folder, "FGVCAircraft"))
    check_split(spec, split, ("train", "val", "trainval", "test"))
    level = str(spec.params.get("level") or "variant")
    class_names = [line for _, line in numbered_lines(spec, root / AIRCRAFT_LEVELS[level])]
    index = {name: k for k, name in enumerate(class_names)}
    listing = root / f"images_{level}_{split}.txt"
    paths, labels, ids = [], [], []
    for number, line in numbered_lines(spec, listing):
        image_id, _, name = line.partition(" ")
        if name not in index:
            raise DatasetError(
                f"{spec.text}: {listing} line {number}: {name!r} is not in {AIRCRAFT_LEVELS[level]}",
                "restore the original files",
            )
        paths.append(root / "images" / f"{image_id}.jpg")
        labels.append(index[name])
        ids.append(image_id)
    first_image_exists(spec, paths, listing)
    notes: list[str] = []
    boxes: list[list[Box]] | None = None
    box_file = root / "images_box.txt"
    if box_file.is_file():
        corners: dict[str, tuple[int, list[float]]] = {}
        for number, line in numbered_lines(spec, box_file):
            parts = line.split()
            try:
                corners[parts[0]] = (number, [float(v) for v in parts[1:]])
            except (ValueError, IndexError) as exc:
                raise DatasetError(f"{spec.text}: {box_file} line {number} is not 'ID XMIN YMIN XMAX YMAX'",
                                   "restore the original file") from exc  # fmt: skip
        boxes = []
        for image_id in ids:
            number, values = corners.get(image_id, (0, []))
            if len(values) != 4:
                boxes.append([])
                continue
            x0, y0, x1, y1 = values
            boxes.append(drop_bad_boxes([(x0, y0, x1 - x0, y1 - y0)], f"{box_file} line {number}", notes))
        if any(not b for b in boxes):
            notes.append(f"{sum(not b for b in boxes)} images have no box in {box_file}")
    else:
        notes.append(f"no {box_file}: no boxes")
    return ImageDataset(
        spec=spec.text, split=split, kind="aircraft", root=root, class_names=class_names, paths=paths,
        labels=labels, boxes=boxes, notes=notes, listing=listing,
    )  # fmt: skip


def open_food101(spec: Spec, split: str) -> ImageDataset:
    """`food101:DIR`: food-101/{images/<class>/<id>.jpg, meta/{train,test}.json}; train, test."""
    root = locate(spec, ["food-101"], "meta/train.json", hint("food-101", "Food101"))
    check_split(spec, split, ("train", "test"))
    metas = {name: _food_meta(spec, root / "meta" / f"{name}.json") for name in ("train", "test")}
    class_names = sorted(set(metas["train"]) | set(metas["test"]))
    index = {name: k for k, name in enumerate(class_names)}
    paths, labels = [], []
    for name, rels in metas[split].items():  # file order, as torchvision
        paths.extend(root / "images" / f"{rel}.jpg" for rel in rels)
        labels.extend([index[name]] * len(rels))
    first_image_exists(spec, paths, root / "meta" / f"{split}.json")
    return ImageDataset(
        spec=spec.text, split=split, kind="food101", root=root, class_names=class_names, paths=paths,
        labels=labels, listing=root / "meta" / f"{split}.json",
    )  # fmt: skip


def _food_meta(spec: Spec, path: Path) -> dict[str, list[str]]:
    try:
        meta = json.loads(read_text(spec, path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{spec.text}: {path} is not JSON ({exc})", "restore the original file") from exc
    if not isinstance(meta, dict) or not all(isinstance(v, list) for v in meta.values()):
        raise DatasetError(f"{spec.text}: {path} is not {{class: [class/image_id, ...]}}", "restore the file")
    return meta
