"""Datasets: a spec string `KIND:PATH` plus a split -> an `ImageDataset` of image paths, labels and boxes.

Kinds: `imagefolder:DIR`, `imagenet:DIR`, `cub:DIR`, `csv:FILE` and
`synthetic:needles[?n=..&classes=..&size=..&seed=..]` (see docs/datasets.md). Nothing here decides how
images are resized: callers pass the backbone's transform. Every dataset has a `fingerprint`, the sha256 of
its sorted (relative path, label) list (plus the generator's config for generated datasets), that caches
record.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch.utils.data
from PIL import Image

from vitprobe.errors import DatasetError

KINDS = ("imagefolder", "imagenet", "cub", "csv", "synthetic")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test")  # sub-folders that are splits
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
CUB_SPLITS = ("train", "test", "all")
GENERATOR_MARKER = "synthetic.json"  # written by vitprobe.synthetic into the root of every generated dataset
ALL = "all"

Box = tuple[float, float, float, float]  # (x, y, w, h) in original pixels


class ImageDataset(torch.utils.data.Dataset):
    """Images on disk with integer labels, optional boxes, and a transform applied on access.

    `__getitem__(i)` returns `(transform(image) or the PIL image, label, i)`; the index lets extraction write
    tokens back in dataset order. Images are always RGB (see `load_image`).

    Attributes:
        spec: the spec string the dataset was opened from.
        split: the split actually read (`all` when a folder has no split sub-folders).
        kind: one of KINDS.
        root: the folder relative paths (and the fingerprint) are taken against.
        class_names: name of class k at index k (same list for every split of a dataset).
        paths: absolute path of each image.
        labels: class index of each image.
        boxes: per image a list of (x, y, w, h) boxes in original pixels, or None when the dataset has none.
        transform: callable applied to the PIL image in `__getitem__`; may be set after construction.
        notes: things the user should know about how the spec was read (e.g. a split fallback).
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
        boxes: list[list[Box]] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        notes: list[str] | None = None,
    ) -> None:
        assert len(paths) == len(labels), "one label per image"
        assert boxes is None or len(boxes) == len(paths), "one box list per image"
        self.spec = spec
        self.split = split
        self.kind = kind
        self.root = root
        self.class_names = class_names
        self.paths = paths
        self.labels = labels
        self.boxes = boxes
        self.transform = transform
        self.notes = notes or []

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
            relative.append(text[len(prefix) :].replace(os.sep, "/") if inside else _relative(path))
        return relative

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        image = self.load_image(i)
        return (self.transform(image) if self.transform is not None else image), self.labels[i], i

    def load_image(self, i: int) -> Image.Image:
        """Image `i` as RGB: grayscale replicated, CMYK converted, palette and alpha composited on white."""
        with self._open(i) as image:
            image.load()
            return to_rgb(image)

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image `i` as stored in the file (reads only the header)."""
        with self._open(i) as image:
            return image.size

    @contextmanager
    def _open(self, i: int) -> Iterator[Image.Image]:
        """Open image `i` with Pillow; a missing or unreadable file becomes a `DatasetError` naming it."""
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                yield image
        except FileNotFoundError as exc:
            raise DatasetError(f"{self.spec}: missing image {path}", _hint_for(self.kind)) from exc
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # OSError: truncated,
            raise DatasetError(  # UnidentifiedImageError (not an image); SyntaxError: broken headers
                f"{self.spec}: cannot read image {path} ({type(exc).__name__}: {exc})",
                "replace or remove the corrupt file",
            ) from exc

    def describe(self) -> dict[str, Any]:
        """What `data show --json` prints and manifests record: counts, classes, boxes, fingerprint."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "split": self.split,
            "root": str(self.root),
            "num_images": len(self),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "has_boxes": self.boxes is not None,
            "num_boxes": None if self.boxes is None else sum(len(b) for b in self.boxes),
            "fingerprint": self.fingerprint,
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return (
            f"ImageDataset(spec={self.spec!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, boxes={self.boxes is not None})"
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha (RGBA, LA, palette transparency) is composited onto white,
    16-bit and 32-bit grayscale are scaled to 8 bits, CMYK and YCbCr use PIL's conversion."""
    if image.mode == "RGB":
        return image.copy()  # detached from the (closed) file
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

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


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `KIND:REST` and check KIND; REST is a path (or `needles?...` for synthetic)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise DatasetError(
            f"unknown dataset spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}",
            "e.g. --data imagefolder:/data/flowers, cub:/data/CUB_200_2011 or synthetic:needles",
        )
    if not rest:
        raise DatasetError(f"dataset spec {spec!r} has no path after {kind}:", f"write {kind}:PATH")
    return kind, rest


def open_dataset(
    spec: str, split: str, *, transform: Callable[[Image.Image], Any] | None = None
) -> ImageDataset:
    """Open a dataset spec at one split.

    Args:
        spec: `imagefolder:DIR`, `imagenet:DIR`, `cub:DIR`, `csv:FILE` or `synthetic:needles[?k=v&...]`.
        split: `train`, `val`, `test`, ... as the layout has them, or `all`.
        transform: applied to each PIL image in `__getitem__` (usually `backbone.transform()`).

    Raises:
        DatasetError: unknown kind, missing files (the message names the expected file), unknown split.
    """
    kind, rest = parse_spec(spec)
    opener = {
        "imagefolder": _open_imagefolder,
        "imagenet": _open_imagenet,
        "cub": _open_cub,
        "csv": _open_csv,
        "synthetic": _open_synthetic,
    }[kind]
    dataset = opener(spec, rest, split)
    dataset.transform = transform
    return dataset


def list_splits(spec: str) -> list[str]:
    """The splits a spec offers, e.g. `["train", "test"]` for CUB or `["all"]` for a flat image folder."""
    kind, rest = parse_spec(spec)
    if kind == "imagefolder":
        root = _existing_dir(spec, rest, "imagefolder")
        return _split_folders(root) or [ALL]
    if kind == "imagenet":
        root = _existing_dir(spec, rest, "imagenet")
        splits = [s for s in ("train", "val") if (root / s).is_dir()]
        if not splits:
            raise DatasetError(
                f"{spec}: no train/ or val/ folder in {root}",
                "point at the folder that holds train/ and val/ (each with one sub-folder per synset)",
            )
        return splits
    if kind in ("cub", "synthetic"):
        return ["train", "test"]
    path = _existing_file(spec, rest)
    rows = _read_csv_rows(spec, path)
    splits = sorted({row["split"].strip() for row in rows if (row.get("split") or "").strip()})
    return splits or [ALL]


def summarize(spec: str, split: str | None = None) -> dict[str, Any]:
    """What `vitprobe data show` prints: `{"spec": spec, "splits": {split: ImageDataset.describe()}}`.

    Args:
        spec: a dataset spec.
        split: one split, or None for every split the spec offers (`list_splits`).
    """
    splits = [split] if split is not None else list_splits(spec)
    return {"spec": spec, "splits": {name: open_dataset(spec, name).describe() for name in splits}}


def vitprobe_home() -> Path:
    """`$VITPROBE_HOME`, default `~/.cache/vitprobe`: where generated datasets live."""
    return Path(os.environ.get("VITPROBE_HOME", "~/.cache/vitprobe")).expanduser()


# --------------------------------------------------------------------------------------------- image folders


def _open_imagefolder(spec: str, rest: str, split: str) -> ImageDataset:
    """`DIR/<class>/**/<image>`; with split folders (`DIR/train/<class>/...`) `split` picks one."""
    top = _existing_dir(spec, rest, "imagefolder")
    splits = _split_folders(top)
    notes: list[str] = []
    if splits:
        if split not in splits:
            raise DatasetError(
                f"{spec}: no split folder {top / split} (split folders: {', '.join(splits)})",
                f"use --split {' or --split '.join(splits)}",
            )
        folder = top / split
        class_names = sorted({c for s in splits for c in _class_folders(top / s)})
    else:
        if split != ALL:
            notes.append(f"{top} has no split folder {split!r}: reading all images in it (split 'all')")
        folder, split = top, ALL
        class_names = _class_folders(top)
    if not class_names:
        raise DatasetError(
            f"{spec}: no class sub-folders in {folder}",
            "an image folder needs DIR/<class name>/<image files>",
        )
    paths, labels = _scan_class_folders(folder, class_names)
    if not paths:
        raise DatasetError(
            f"{spec}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}",
            "put images in DIR/<class name>/",
        )
    return ImageDataset(
        spec=spec, split=split, kind="imagefolder", root=top, class_names=class_names,
        paths=paths, labels=labels, notes=notes,
    )  # fmt: skip


def _open_imagenet(spec: str, rest: str, split: str) -> ImageDataset:
    """`DIR/{train,val}/<synset>/<image>`; class index = sorted synset order (of train/ when present).

    A flat `val/` (the official ILSVRC2012_val_*.JPEG files) is labelled from `LOC_val_solution.csv`, which
    also gives boxes; it and `LOC_synset_mapping.txt` (class names) are looked up in DIR and its parents
    (the Kaggle layout keeps them three levels above ILSVRC/Data/CLS-LOC).
    """
    root = _existing_dir(spec, rest, "imagenet")
    if split not in ("train", "val"):
        raise DatasetError(f"{spec}: unknown split {split!r} for ImageNet", "use --split train or val")
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(
            f"{spec}: missing folder {folder}",
            "point at the folder that holds train/ and val/ (each with one sub-folder per synset)",
        )
    reference = root / "train" if (root / "train").is_dir() else folder
    synsets = _class_folders(reference)
    if not synsets:
        raise DatasetError(f"{spec}: no synset folders in {reference}", "expected train/n01440764/...")
    notes: list[str] = []
    boxes: list[list[Box]] | None = None
    solution = _find_upwards(root, "LOC_val_solution.csv")
    if split == "val" and not _class_folders(folder) and solution is not None:
        paths, labels, boxes = _read_val_solution(spec, solution, folder, synsets)
        notes.append(f"labels and boxes from {solution}")
    else:
        extra = sorted(set(_class_folders(folder)) - set(synsets))
        if extra:
            raise DatasetError(
                f"{spec}: {folder} has class folders not in {reference}: {', '.join(extra[:5])}",
                "train/ and val/ must use the same synset folders",
            )
        paths, labels = _scan_class_folders(folder, synsets)
    if not paths:
        raise DatasetError(
            f"{spec}: no images in synset folders under {folder}",
            f"sort {split}/ into synset folders, or put LOC_val_solution.csv next to train/ and val/",
        )
    names = synsets
    mapping = _find_upwards(root, "LOC_synset_mapping.txt")
    if mapping is not None:
        words = _read_synset_mapping(spec, mapping)
        names = [words.get(s, s) for s in synsets]
        notes.append(f"class names from {mapping}")
    return ImageDataset(
        spec=spec, split=split, kind="imagenet", root=root, class_names=names,
        paths=paths, labels=labels, boxes=boxes, notes=notes,
    )  # fmt: skip


def _find_upwards(folder: Path, name: str, levels: int = 3) -> Path | None:
    """`folder/name` or the same name in one of the next `levels` parents, whichever comes first."""
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / name).is_file():
            return candidate / name
    return None


def _read_val_solution(
    spec: str, path: Path, folder: Path, synsets: list[str]
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
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.DictReader(f), 2):
            fields = (row.get("PredictionString") or "").split()
            image_id = row.get("ImageId")
            if not image_id or not fields or len(fields) % 5 or fields[0] not in index:
                raise DatasetError(
                    f"{spec}: {path} line {number} is not 'ImageId,SYNSET x0 y0 x1 y1 ...' (known synset)",
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


def _read_synset_mapping(spec: str, path: Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines -> {synset: first name}."""
    words: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        synset, _, text = line.strip().partition(" ")
        if not text:
            raise DatasetError(f"{spec}: {path} line {number} is not 'SYNSET names'", "fix the file")
        words[synset] = text.split(",")[0].strip()
    return words


def _split_folders(top: Path) -> list[str]:
    return [name for name in SPLIT_FOLDER_NAMES if (top / name).is_dir()]


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_class_folders(folder: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """Images under `folder/<class>/` (recursively, sorted), labelled by the class's index."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(
                Path(dirpath) / f
                for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            )
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, labels


# ----------------------------------------------------------------------------------------- CUB and synthetic


def _open_cub(spec: str, rest: str, split: str, *, kind: str = "cub") -> ImageDataset:
    """The official CUB_200_2011 layout (DIR or DIR/CUB_200_2011); labels 1-based in the files -> 0-based."""
    root = _existing_dir(spec, rest, "cub")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    for name in CUB_FILES:
        if not (root / name).is_file():
            raise DatasetError(
                f"{spec}: missing {root / name}",
                "point --data at the CUB_200_2011 folder (the one with images.txt and images/)",
            )
    if split not in CUB_SPLITS:
        raise DatasetError(f"{spec}: unknown split {split!r} for CUB", "use --split train, test or all")
    images = _read_id_table(spec, root / "images.txt", 1)
    labels_by_id = _read_id_table(spec, root / "image_class_labels.txt", 1)
    is_train = _read_id_table(spec, root / "train_test_split.txt", 1)
    classes = _read_id_table(spec, root / "classes.txt", 1)
    box_file = root / "bounding_boxes.txt"
    boxes_by_id = _read_id_table(spec, box_file, 4) if box_file.is_file() else None
    notes = [] if boxes_by_id is not None else [f"no {box_file}: the dataset has no boxes"]

    class_ids = sorted(classes, key=int)
    if [int(c) for c in class_ids] != list(range(1, len(class_ids) + 1)):
        raise DatasetError(f"{spec}: {root / 'classes.txt'} ids are not 1..K", "restore the original file")
    class_names = [_strip_number(classes[c][0]) for c in class_ids]

    paths: list[Path] = []
    labels: list[int] = []
    boxes: list[list[Box]] = []
    for image_id in sorted(images, key=int):
        for table, name in ((labels_by_id, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise DatasetError(f"{spec}: image id {image_id} missing from {root / name}", "restore it")
        if split != ALL and (is_train[image_id][0] == "1") != (split == "train"):
            continue
        label = int(labels_by_id[image_id][0]) - 1
        if not 0 <= label < len(class_names):
            raise DatasetError(
                f"{spec}: image id {image_id} has class {label + 1}, not in {root / 'classes.txt'}",
                "restore the original files",
            )
        paths.append(root / "images" / images[image_id][0])
        labels.append(label)
        if boxes_by_id is not None:
            if image_id not in boxes_by_id:
                raise DatasetError(f"{spec}: image id {image_id} missing from {box_file}", "restore the file")
            x, y, w, h = (float(v) for v in boxes_by_id[image_id])
            boxes.append([(x, y, w, h)])
    if paths and not paths[0].is_file():
        raise DatasetError(
            f"{spec}: missing image {paths[0]} (listed in {root / 'images.txt'})",
            "point --data at the CUB_200_2011 folder that holds images/",
        )
    return ImageDataset(
        spec=spec, split=split, kind=kind, root=root, class_names=class_names, paths=paths, labels=labels,
        boxes=boxes if boxes_by_id is not None else None, notes=notes,
    )  # fmt: skip


def _read_id_table(spec: str, path: Path, columns: int) -> dict[str, list[str]]:
    """`<id> <value> ...` lines -> {id: values}; `columns` values per line (the last one may hold spaces)."""
    table: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns)
        if len(parts) != columns + 1:
            raise DatasetError(
                f"{spec}: {path} line {number} has {len(parts)} fields, expected {columns + 1}: {line!r}",
                "restore the original file",
            )
        table[parts[0]] = parts[1:]
    return table


def _strip_number(name: str) -> str:
    """`001.Black_footed_Albatross` -> `Black_footed_Albatross`."""
    return re.sub(r"^\d+\.", "", name)


def _open_synthetic(spec: str, rest: str, split: str) -> ImageDataset:
    """`synthetic:needles[?n=2000&classes=10&size=224&seed=0]`: made once in $VITPROBE_HOME, read as CUB."""
    from vitprobe.synthetic import SyntheticConfig, ensure_synthetic

    name, _, query = rest.partition("?")
    if name != "needles":
        raise DatasetError(f"unknown synthetic dataset {name!r} in {spec!r}", "use synthetic:needles")
    params: dict[str, int] = {}
    allowed = ("n", "classes", "size", "seed")
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in allowed:
            raise DatasetError(f"{spec}: unknown parameter {key!r}", f"use {', '.join(allowed)}")
        try:
            params[key] = int(value)
        except ValueError as exc:
            raise DatasetError(f"{spec}: {key}={value!r} is not an integer", f"e.g. {key}=10") from exc
    if split not in CUB_SPLITS:
        raise DatasetError(f"{spec}: unknown split {split!r}", "use --split train, test or all")
    root = ensure_synthetic(SyntheticConfig(**params), vitprobe_home())
    return _open_cub(spec, str(root), split, kind="synthetic")


# --------------------------------------------------------------------------------------------- CSV


def _open_csv(spec: str, rest: str, split: str) -> ImageDataset:
    """`path,label[,x,y,w,h][,split]` with a header; rows sharing a path add boxes to one image."""
    path = _existing_file(spec, rest)
    rows = _read_csv_rows(spec, path)
    root = path.parent
    has_boxes = "x" in rows[0]
    has_split = "split" in rows[0]

    raw_labels = [row["label"].strip() for row in rows]
    if all(re.fullmatch(r"\d+", label) for label in raw_labels):
        class_names = [str(k) for k in range(max(int(label) for label in raw_labels) + 1)]
        index = {name: k for k, name in enumerate(class_names)}
        raw_labels = [str(int(label)) for label in raw_labels]
    else:
        class_names = sorted(set(raw_labels))
        index = {name: k for k, name in enumerate(class_names)}

    notes: list[str] = []
    if has_split:
        available = sorted({row["split"].strip() for row in rows})
        if split != ALL and split not in available:
            raise DatasetError(
                f"{spec}: no rows with split {split!r} in {path} (splits: {', '.join(available)})",
                f"use --split {' or --split '.join(available)} or all",
            )
    elif split != ALL:
        notes.append(f"{path} has no split column: reading every row (split 'all')")
        split = ALL

    order: dict[str, int] = {}
    paths: list[Path] = []
    labels: list[int] = []
    boxes: list[list[Box]] = []
    for number, (row, label_text) in enumerate(zip(rows, raw_labels, strict=True), 2):
        if has_split and split != ALL and row["split"].strip() != split:
            continue
        rel = row["path"].strip()
        if not rel:
            raise DatasetError(f"{spec}: {path} line {number} has an empty path", "fill in or remove the row")
        label = index[label_text]
        if rel not in order:
            order[rel] = len(paths)
            image = Path(rel).expanduser()
            paths.append(image if image.is_absolute() else root / image)
            labels.append(label)
            boxes.append([])
        elif labels[order[rel]] != label:
            raise DatasetError(
                f"{spec}: {path} line {number} gives {rel} label {label_text!r}, an earlier row another",
                "one label per image",
            )
        if has_boxes:
            box = _csv_box(spec, path, number, row)
            if box is not None:
                boxes[order[rel]].append(box)
    if not paths:
        raise DatasetError(f"{spec}: {path} has no rows for split {split!r}", "add rows or pick a split")
    if not paths[0].is_file():  # as for CUB: one stat catches a CSV read against the wrong folder
        raise DatasetError(
            f"{spec}: missing image {paths[0]} (listed in {path})",
            "fix the path column; relative paths resolve against the CSV's folder",
        )
    return ImageDataset(
        spec=spec, split=split, kind="csv", root=root, class_names=class_names, paths=paths, labels=labels,
        boxes=boxes if has_boxes else None, notes=notes,
    )  # fmt: skip


def _read_csv_rows(spec: str, path: Path) -> list[dict[str, str]]:
    """Rows of a dataset CSV as dicts; checks the header (path, label, optional x,y,w,h and split)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DatasetError(
            f"{spec}: {path} has no column {', '.join(missing)} in its header {header}",
            "the first row must name the columns: path,label[,x,y,w,h][,split]",
        )
    box_columns = [c for c in ("x", "y", "w", "h") if c in header]
    if box_columns and len(box_columns) != 4:
        raise DatasetError(
            f"{spec}: {path} has box columns {box_columns}; boxes need all of x,y,w,h",
            "add the missing columns",
        )
    if not rows:
        raise DatasetError(f"{spec}: {path} has a header but no rows", "add one row per image")
    for number, row in enumerate(rows, 2):
        if None in row or any(row.get(c) is None for c in ("path", "label")):
            raise DatasetError(f"{spec}: {path} line {number} does not match the header", "fix the row")
    return rows


def _csv_box(spec: str, path: Path, number: int, row: dict[str, str]) -> Box | None:
    """The row's (x, y, w, h), or None when all four cells are empty."""
    cells = [row[c].strip() for c in ("x", "y", "w", "h")]
    if not any(cells):
        return None
    try:
        x, y, w, h = (float(c) for c in cells)
    except ValueError as exc:
        raise DatasetError(
            f"{spec}: {path} line {number} has a box that is not four numbers: {cells}",
            "write x,y,w,h in pixels, or leave all four empty",
        ) from exc
    return (x, y, w, h)


# --------------------------------------------------------------------------------------------- helpers


def _existing_dir(spec: str, rest: str, kind: str) -> Path:
    root = Path(rest).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{spec}: folder {root} does not exist", _hint_for(kind))
    return root


def _existing_file(spec: str, rest: str) -> Path:
    path = Path(rest).expanduser().resolve()
    if path.is_dir():
        raise DatasetError(f"{spec}: {path} is a folder, not a CSV file", _hint_for("csv"))
    if not path.is_file():
        raise DatasetError(f"{spec}: file {path} does not exist", _hint_for("csv"))
    return path


def _hint_for(kind: str) -> str:
    return {
        "imagefolder": "point at a folder of class sub-folders (optionally inside train/ val/ test/)",
        "imagenet": "point at the folder that holds train/ and val/",
        "cub": "point --data at the CUB_200_2011 folder (the one with images.txt and images/)",
        "csv": "point at a CSV with a header path,label[,x,y,w,h][,split]; relative paths resolve "
        "against the CSV's folder",
        "synthetic": "delete the folder under $VITPROBE_HOME/synthetic to regenerate it",
    }[kind]


def _relative(path: Path) -> str:
    """A path outside the dataset root, as it is recorded in the fingerprint: absolute, POSIX."""
    return path.absolute().as_posix()
