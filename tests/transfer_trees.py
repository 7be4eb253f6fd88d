"""Tiny dataset trees in torchvision's exact on-disk layouts, written the way the official archives are.

Each `make_<kind>(top)` writes the layout under `top` (torchvision's `root`) and returns a `Tree` with what a
correct reader must find. The layouts follow torchvision/datasets/<name>.py (file names, split files, .mat
fields) and, for what torchvision does not read (boxes, SUN397's partitions), the datasets' own READMEs.
Every image is a small JPEG whose colour encodes its number, so readers can be compared pixel by pixel.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


@dataclass
class Tree:
    """What was written: the spec path, and per split the relative image paths and labels, in order."""

    top: Path
    root: Path  # the dataset's own folder (the fingerprint's root)
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)  # rel -> boxes


def jpeg(path: Path, number: int, size: tuple[int, int] = (12, 10)) -> None:
    """A small JPEG whose colour encodes `number` (distinct for number < 4096)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (16 * (number % 16), 16 * ((number // 16) % 16), 16 * ((number // 256) % 16))
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=95)


def make_flowers102(top: Path, classes: int = 3, per_class: int = 3) -> Tree:
    """flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat (labels 1 x N, 1-based), setid.mat (trnid, valid,
    tstid)}."""
    from torchvision.datasets import Flowers102

    root = top / "flowers-102"
    n = classes * per_class
    labels = [1 + (i % classes) for i in range(n)]  # image id i + 1
    for i in range(n):
        jpeg(root / "jpg" / f"image_{i + 1:05d}.jpg", i)
    ids = {"trnid": [], "valid": [], "tstid": []}
    for i in range(n):
        ids[("trnid", "valid", "tstid")[(i // classes) % 3]].append(i + 1)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.float64)})
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    tree = Tree(top, root, list(Flowers102.classes))
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        tree.splits[split] = [(f"jpg/image_{i:05d}.jpg", labels[i - 1] - 1) for i in ids[key]]
    return tree


PET_BREEDS = [
    "Abyssinian",
    "american_bulldog",
    "Bengal",
]  # cats are capitalised, dogs not (as in the release)


def make_pets(top: Path) -> Tree:
    """oxford-iiit-pet/{images/<id>.jpg, annotations/{trainval,test,list}.txt, annotations/xmls/<id>.xml}."""
    root = top / "oxford-iiit-pet"
    (root / "annotations" / "xmls").mkdir(parents=True)
    tree = Tree(top, root, ["Abyssinian", "American Bulldog", "Bengal"])
    number = 0
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for split, per_breed in (("trainval", 2), ("test", 1)):
        tree.splits[split] = []
        for label, breed in enumerate(PET_BREEDS):
            for k in range(per_breed):
                image_id = f"{breed}_{100 + number}"
                jpeg(root / "images" / f"{image_id}.jpg", number, size=(40, 30))
                species = 1 if breed[0].isupper() else 2
                lines[split].append(f"{image_id} {label + 1} {species} {k + 1}")
                tree.splits[split].append((f"images/{image_id}.jpg", label))
                if split == "trainval" and k == 0:  # a head box for some trainval images only
                    box = (3 + label, 4, 10 + label, 8)  # xmin, ymin, xmax, ymax
                    (root / "annotations" / "xmls" / f"{image_id}.xml").write_text(_voc_xml(image_id, box))
                    tree.boxes[f"images/{image_id}.jpg"] = [
                        (box[0], box[1], box[2] - box[0], box[3] - box[1])
                    ]
                number += 1
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("".join(r + "\n" for r in rows))
    return tree


def _voc_xml(image_id: str, box: tuple[int, int, int, int]) -> str:
    x0, y0, x1, y1 = box
    return (
        f"<annotation><folder>OXIIIT</folder><filename>{image_id}.jpg</filename><size><width>40</width>"
        "<height>30</height><depth>3</depth></size><segmented>0</segmented><object><name>cat</name>"
        "<pose>Frontal</pose><truncated>0</truncated><occluded>0</occluded><bndbox>"
        f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox><difficult>0</difficult>"
        "</object></annotation>\n"
    )


def make_dtd(top: Path, classes: tuple[str, ...] = ("banded", "blotchy", "zigzagged")) -> Tree:
    """dtd/dtd/{images/<class>/<class>_NNNN.jpg, labels/{train,val,test}{1..10}.txt}: torchvision's
    root/dtd/dtd."""
    root = top / "dtd" / "dtd"
    tree = Tree(top, root, sorted(classes))
    files = {c: [f"{c}_{k:04d}.jpg" for k in range(1, 4)] for c in classes}
    for number, (c, name) in enumerate((c, name) for c in classes for name in files[c]):  # noqa: B020
        jpeg(root / "images" / c / name, number)
    (root / "labels").mkdir(parents=True)
    for partition in range(1, 11):
        for s, split in enumerate(("train", "val", "test")):
            chosen = [(c, files[c][(s + partition) % 3]) for c in classes]  # one image per class per split
            (root / "labels" / f"{split}{partition}.txt").write_text("".join(f"{c}/{n}\n" for c, n in chosen))
            tree.splits[f"{split}{partition}"] = [
                (f"images/{c}/{n}", sorted(classes).index(c)) for c, n in chosen
            ]
    return tree


def make_cars(
    top: Path, classes: tuple[str, ...] = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012")
) -> Tree:
    """stanford_cars/{devkit/{cars_meta.mat, cars_train_annos.mat}, cars_test_annos_withlabels.mat,
    cars_train/, cars_test/}; annotations are 1 x N structs (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
    fname)."""
    root = top / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    tree = Tree(top, root, list(classes))
    names = np.empty((1, len(classes)), dtype=object)
    names[0, :] = list(classes)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    number = 0
    for split, mat_path, folder in (
        ("train", root / "devkit" / "cars_train_annos.mat", "cars_train"),
        ("test", root / "cars_test_annos_withlabels.mat", "cars_test"),
    ):
        fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
        annos = np.zeros((1, 4), dtype=[(f, "O") for f in fields])
        tree.splits[split] = []
        for k in range(4):
            label = k % len(classes)
            fname = f"{k + 1:05d}.jpg"
            jpeg(root / folder / fname, number, size=(50, 40))
            x1, y1, x2, y2 = 2 + k, 3, 30 + k, 25
            values = [np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)]
            annos[0, k] = (*values, np.array([[label + 1]], dtype=np.uint8), np.array([fname]))
            tree.splits[split].append((f"{folder}/{fname}", label))
            tree.boxes[f"{folder}/{fname}"] = [(x1, y1, x2 - x1, y2 - y1)]
            number += 1
        savemat(mat_path, {"annotations": annos})
    return tree


AIRCRAFT = {
    "variant": ["707-320", "A300B4", "Boeing 717"],
    "family": ["Boeing 707", "A300", "Boeing 717"],
    "manufacturer": ["Boeing", "Airbus", "Boeing"],
}  # per variant; lists below are deduplicated


def make_aircraft(top: Path) -> Tree:
    """fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, families.txt, manufacturers.txt,
    images_<level>_<split>.txt, images_box.txt (id xmin ymin xmax ymax)}."""
    data = top / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    levels = {level: list(dict.fromkeys(values)) for level, values in AIRCRAFT.items()}
    for level, file in (("variant", "variants"), ("family", "families"), ("manufacturer", "manufacturers")):
        (data / f"{file}.txt").write_text("".join(f"{name}\n" for name in levels[level]))
    tree = Tree(top, data, levels["variant"])
    boxes = []
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in ("train", "val", "test")}
    for number in range(9):
        image_id = f"{1000000 + number * 17:07d}"
        jpeg(data / "images" / f"{image_id}.jpg", number, size=(60, 40))
        rows[("train", "val", "test")[number // 3]].append((image_id, number % 3))
        box = (5 + number, 6, 40 + number, 30)
        boxes.append(f"{image_id} {' '.join(map(str, box))}")
        tree.boxes[f"images/{image_id}.jpg"] = [(box[0], box[1], box[2] - box[0], box[3] - box[1])]
    rows["trainval"] = rows["train"] + rows["val"]
    for level in levels:
        for split, entries in rows.items():
            lines = [f"{image_id} {AIRCRAFT[level][variant]}" for image_id, variant in entries]
            (data / f"images_{level}_{split}.txt").write_text("".join(line + "\n" for line in lines))
            tree.splits[f"{level}/{split}"] = [
                (f"images/{image_id}.jpg", levels[level].index(AIRCRAFT[level][variant]))
                for image_id, variant in entries
            ]
    (data / "images_box.txt").write_text("".join(line + "\n" for line in boxes))
    return tree


def make_food101(top: Path, classes: tuple[str, ...] = ("waffles", "apple_pie", "ramen")) -> Tree:
    """food-101/{images/<class>/<id>.jpg, meta/{train,test}.json ({class: ["class/id", ...]}),
    classes.txt}."""
    root = top / "food-101"
    (root / "meta").mkdir(parents=True)
    names = sorted(classes)
    tree = Tree(top, root, names)
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    number = 0
    for c in classes:  # the json keeps this (unsorted) order; classes are sorted
        for split, count in (("train", 2), ("test", 1)):
            ids = [f"{c}/{100 + number + k}" for k in range(count)]
            meta[split][c] = ids
            for k, rel in enumerate(ids):
                jpeg(root / "images" / f"{rel}.jpg", number + k)
            number += count
    for split in meta:
        (root / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
        tree.splits[split] = [
            (f"images/{rel}.jpg", names.index(c)) for c, rels in meta[split].items() for rel in rels
        ]
    (root / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in names))
    return tree


def make_caltech101(
    top: Path, classes: tuple[str, ...] = ("Faces", "accordion", "airplanes"), per_class: int = 4
) -> Tree:
    """caltech101/{101_ObjectCategories/<class>/image_NNNN.jpg (and BACKGROUND_Google/),
    Annotations/<class or its annotation name>/annotation_NNNN.mat (box_coord = [top bottom left right])}."""
    # Annotations/ names four classes differently from 101_ObjectCategories/ in the release:
    annotation_folder = {"Faces": "Faces_2", "Faces_easy": "Faces_3", "Motorbikes": "Motorbikes_16",
                         "airplanes": "Airplanes_Side_2"}  # fmt: skip
    root = top / "caltech101"
    tree = Tree(top, root, sorted(classes))
    number = 0
    for c in (*classes, "BACKGROUND_Google"):
        for k in range(1, per_class + 1):
            jpeg(root / "101_ObjectCategories" / c / f"image_{k:04d}.jpg", number, size=(40, 30))
            if c != "BACKGROUND_Google":
                folder = root / "Annotations" / annotation_folder.get(c, c)
                folder.mkdir(parents=True, exist_ok=True)
                top_, bottom, left, right = 2, 20 + k, 3, 30
                box_coord = np.array([[top_, bottom, left, right]], dtype=np.uint16)
                savemat(
                    folder / f"annotation_{k:04d}.mat",
                    {"box_coord": box_coord, "obj_contour": np.zeros((2, 5))},
                )
                tree.boxes[f"101_ObjectCategories/{c}/image_{k:04d}.jpg"] = [
                    (left, top_, right - left, bottom - top_)
                ]
            number += 1
    tree.splits["all"] = [
        (f"101_ObjectCategories/{c}/image_{k:04d}.jpg", sorted(classes).index(c))
        for c in sorted(classes) for k in range(1, per_class + 1)
    ]  # fmt: skip
    return tree


SUN_CLASSES = ["/a/abbey", "/b/bakery/shop", "/z/zen_garden"]  # ClassName.txt lines (with a two-level class)


def make_sun397(top: Path, partitions: bool = True) -> Tree:
    """SUN397/{ClassName.txt, a/abbey/sun_*.jpg, ...} and, from Partitions.zip, SUN397/Partitions/
    {ClassName.txt, Training_01..10.txt, Testing_01..10.txt} listing "/a/abbey/sun_x.jpg" lines."""
    root = top / "SUN397"
    root.mkdir(parents=True)
    (root / "ClassName.txt").write_text("".join(f"{c}\n" for c in SUN_CLASSES))
    names = [c[3:] for c in SUN_CLASSES]
    tree = Tree(top, root, names)
    files: dict[str, list[str]] = {}
    number = 0
    for c in SUN_CLASSES:
        files[c] = []
        for _ in range(4):
            rel = f"{c[1:]}/sun_{'abcdefghijklmnop'[number % 16]}{number:05d}.jpg"
            jpeg(root / rel, number)
            files[c].append(rel)
            number += 1
    tree.splits["all"] = sorted((rel, names.index(c[3:])) for c in SUN_CLASSES for rel in files[c])
    if partitions:
        (root / "Partitions").mkdir()
        for p in range(1, 11):
            train = [(rel, names.index(c[3:])) for c in SUN_CLASSES for rel in files[c][(p % 2) :: 2]]
            test = [(rel, names.index(c[3:])) for c in SUN_CLASSES for rel in files[c][(1 - p % 2) :: 2]]
            for name, rows in (("Training", train), ("Testing", test)):
                (root / "Partitions" / f"{name}_{p:02d}.txt").write_text(
                    "".join(f"/{rel}\n" for rel, _ in rows)
                )
            tree.splits[f"train{p}"], tree.splits[f"test{p}"] = train, test
    return tree


def py2_pickle(obj: object) -> bytes:
    """`obj` pickled as Python 2's cPickle (protocol 2) wrote CIFAR's batches: str as 8-bit strings, numpy
    arrays through numpy.core.multiarray._reconstruct with a raw-bytes state."""
    out = bytearray(b"\x80\x02")

    def string(value: str | bytes) -> None:
        raw = value.encode("latin1") if isinstance(value, str) else value
        out.extend(
            b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<I", len(raw)) + raw
        )

    def integer(value: int) -> None:
        if 0 <= value < 256:
            out.extend(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            out.extend(b"M" + struct.pack("<H", value))
        else:
            out.extend(b"J" + struct.pack("<i", value))

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + f"{module}\n{name}\n".encode())

    def value(v: object) -> None:
        if isinstance(v, dict):
            out.extend(b"}(")
            for k, x in v.items():
                value(k)
                value(x)
            out.extend(b"u")
        elif isinstance(v, list):
            out.extend(b"](")
            for x in v:
                value(x)
            out.extend(b"e")
        elif isinstance(v, str | bytes):
            string(v)
        elif isinstance(v, int):
            integer(v)
        elif isinstance(v, np.ndarray):
            glob("numpy.core.multiarray", "_reconstruct")
            glob("numpy", "ndarray")
            integer(0)
            out.extend(b"\x85")  # (0,)
            string("b")
            out.extend(b"\x87R(")  # _reconstruct(ndarray, (0,), 'b'); then the state tuple
            integer(1)
            out.extend(b"(")
            for d in v.shape:
                integer(d)
            out.extend(b"t")
            glob("numpy", "dtype")
            string(v.dtype.str[1:])
            integer(0)
            integer(1)
            out.extend(b"\x87R(")  # dtype('u1', 0, 1); then its state
            integer(3)
            string("|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")  # BUILD the dtype; is_fortran False
            string(v.tobytes())
            out.extend(b"tb")  # BUILD the array
        else:
            raise TypeError(type(v))

    value(obj)
    return bytes(out + b".")


def cifar_pixels(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows, each 3 x 32 x 32 channel-major, distinct per image."""
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_cifar10(top: Path, per_batch: int = 4) -> Tree:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}: py2 pickles of dicts."""
    root = top / "cifar-10-batches-py"
    root.mkdir(parents=True)
    names = ["airplane", "automobile", "bird"]
    meta = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
    (root / "batches.meta").write_bytes(py2_pickle(meta))
    tree = Tree(top, root, names)
    tree.splits = {"train": [], "test": []}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [(k + r) % 3 for r in range(per_batch)]
        batch = {"batch_label": f"batch {k + 1} of 5", "labels": labels, "data": cifar_pixels(per_batch, k),
                 "filenames": [f"img_{k}_{r}.png" for r in range(per_batch)]}  # fmt: skip
        (root / name).write_bytes(py2_pickle(batch))
        split = "test" if name == "test_batch" else "train"
        tree.splits[split].extend((f"{name}#{r}", y) for r, y in enumerate(labels))
    return tree


def make_cifar100(top: Path, n: int = 6) -> Tree:
    """cifar-100-python/{train, test, meta}: fine and coarse labels."""
    root = top / "cifar-100-python"
    root.mkdir(parents=True)
    fine, coarse = ["apple", "aquarium_fish", "baby", "bear"], ["fruit_and_vegetables", "fish", "people"]
    coarse_of = [0, 1, 2, 2]
    (root / "meta").write_bytes(py2_pickle({"fine_label_names": fine, "coarse_label_names": coarse}))
    tree = Tree(top, root, fine)
    for k, name in enumerate(("train", "test")):
        labels = [(k + r) % 4 for r in range(n)]
        batch = {"filenames": [f"f{r}.png" for r in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": labels, "coarse_labels": [coarse_of[y] for y in labels],
                 "data": cifar_pixels(n, 10 + k)}  # fmt: skip
        (root / name).write_bytes(py2_pickle(batch))
        tree.splits[name] = [(f"{name}#{r}", y) for r, y in enumerate(labels)]
        tree.splits[f"{name}/coarse"] = [(f"{name}#{r}", coarse_of[y]) for r, y in enumerate(labels)]
    return tree


def make_stl10(top: Path, n_train: int = 6, n_test: int = 4) -> Tree:
    """stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt, fold_indices.txt}:
    uint8 images 3 x 96 x 96 stored column-major per channel, labels 1..10."""
    root = top / "stl10_binary"
    root.mkdir(parents=True)
    names = ["airplane", "bird", "car"]
    (root / "class_names.txt").write_text("".join(f"{c}\n" for c in names))
    tree = Tree(top, root, names)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8).tofile(root / f"{split}_X.bin")
        labels = [r % 3 for r in range(n)]
        np.array([y + 1 for y in labels], dtype=np.uint8).tofile(root / f"{split}_y.bin")
        tree.splits[split] = [(f"{split}_X.bin#{r}", y) for r, y in enumerate(labels)]
    folds = [" ".join(str((f + 2 * j) % n_train) for j in range(2)) for f in range(10)]
    (root / "fold_indices.txt").write_text("".join(f"{line} \n" for line in folds))
    return tree
