"""The CSV layout (`csv:FILE`): `path,label[,x,y,w,h][,split]` with a header; labels and boxes checked.

Integer labels are class indices and must form the dense set 0..K-1 (one typo such as `100000000` would
otherwise make 100,000,001 classes); names may be anything but empty.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from pathlib import Path

from vitprobe.data.dataset import Box, ImageDataset
from vitprobe.data.layout import ALL, box_problem, existing_file, read_text
from vitprobe.data.spec import Spec
from vitprobe.errors import DatasetError

CSV_HINT = (
    "point at a CSV with a header path,label[,x,y,w,h][,split]; relative paths resolve against the CSV's "
    "folder"
)


def open_csv(spec: Spec, split: str) -> ImageDataset:
    """`path,label[,x,y,w,h][,split]` with a header; rows sharing a path add boxes to one image."""
    path = existing_file(spec, CSV_HINT, "CSV file")
    rows = read_rows(spec, path)
    root = path.parent
    has_boxes = "x" in rows[0]
    has_split = "split" in rows[0]
    class_names, label_of = _classes(spec, path, [row["label"].strip() for row in rows])

    notes: list[str] = []
    if has_split:
        available = sorted({row["split"].strip() for row in rows})
        if split != ALL and split not in available:
            raise DatasetError(
                f"{spec.text}: no rows with split {split!r} in {path} (splits: {', '.join(available)})",
                f"use --split {' or --split '.join(available)} or all",
            )
    elif split != ALL:
        notes.append(f"{path} has no split column: reading every row (split 'all')")
        split = ALL

    order: dict[str, int] = {}
    paths: list[Path] = []
    labels: list[int] = []
    boxes: list[list[Box]] = []
    for number, row in enumerate(rows, 2):
        if has_split and split != ALL and row["split"].strip() != split:
            continue
        rel = row["path"].strip()
        if not rel:
            raise DatasetError(
                f"{spec.text}: {path} line {number} has an empty path", "fill in or remove the row"
            )
        label = label_of[row["label"].strip()]
        if rel not in order:
            order[rel] = len(paths)
            image = Path(rel).expanduser()
            paths.append(image if image.is_absolute() else root / image)
            labels.append(label)
            boxes.append([])
        elif labels[order[rel]] != label:
            raise DatasetError(
                f"{spec.text}: {path} line {number} gives {rel} label {row['label'].strip()!r}, an "
                "earlier row another",
                "one label per image",
            )
        if has_boxes:
            box = _box(spec, path, number, row)
            if box is not None:
                boxes[order[rel]].append(box)
    if not paths:
        raise DatasetError(f"{spec.text}: {path} has no rows for split {split!r}", "add rows or pick a split")
    if not paths[0].is_file():  # as for CUB: one stat catches a CSV read against the wrong folder
        raise DatasetError(
            f"{spec.text}: missing image {paths[0]} (listed in {path})",
            "fix the path column; relative paths resolve against the CSV's folder",
        )
    return ImageDataset(
        spec=spec.text, split=split, kind="csv", root=root, class_names=class_names, paths=paths,
        labels=labels, boxes=boxes if has_boxes else None, notes=notes, listing=path,
    )  # fmt: skip


def csv_splits(spec: Spec) -> list[str]:
    rows = read_rows(spec, existing_file(spec, CSV_HINT, "CSV file"))
    splits = sorted({row["split"].strip() for row in rows if (row.get("split") or "").strip()})
    return splits or [ALL]


def read_rows(spec: Spec, path: Path) -> list[dict[str, str]]:
    """Rows of a dataset CSV as dicts; checks the header (path, label, optional x,y,w,h and split)."""
    reader = csv.DictReader(io.StringIO(read_text(spec, path), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise DatasetError(
            f"{spec.text}: {path} line {reader.line_num} is not valid CSV ({exc})", "fix the row"
        ) from exc
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DatasetError(
            f"{spec.text}: {path} has no column {', '.join(missing)} in its header {header}",
            "the first row must name the columns: path,label[,x,y,w,h][,split]",
        )
    box_columns = [c for c in ("x", "y", "w", "h") if c in header]
    if box_columns and len(box_columns) != 4:
        raise DatasetError(
            f"{spec.text}: {path} has box columns {box_columns}; boxes need all of x,y,w,h",
            "add the missing columns",
        )
    if not rows:
        raise DatasetError(f"{spec.text}: {path} has a header but no rows", "add one row per image")
    for number, row in enumerate(rows, 2):
        if None in row or any(row.get(c) is None for c in ("path", "label")):
            raise DatasetError(f"{spec.text}: {path} line {number} does not match the header", "fix the row")
        if not row["label"].strip():
            raise DatasetError(
                f"{spec.text}: {path} line {number} has an empty label", "fill in the label or remove the row"
            )
    return rows


def _classes(spec: Spec, path: Path, raw: list[str]) -> tuple[list[str], dict[str, int]]:
    """The class names and {label text: class index}, over every row (so all splits share the indices).

    Integer labels must be the dense set 0..K-1: a class index that no row uses is refused, naming the row
    with the largest label (usually the typo). Anything else is a class name; names are sorted.
    """
    if not all(re.fullmatch(r"-?\d+", label) for label in raw):
        class_names = sorted(set(raw))
        return class_names, {name: k for k, name in enumerate(class_names)}
    values = [int(label) for label in raw]
    negative = next((n for n, v in enumerate(values, 2) if v < 0), None)
    if negative is not None:
        raise DatasetError(
            f"{spec.text}: {path} line {negative} has the negative label {values[negative - 2]}",
            "integer labels are class indices 0..K-1",
        )
    distinct = sorted(set(values))
    if distinct[-1] + 1 != len(distinct):
        top = values.index(distinct[-1]) + 2
        present = set(distinct)
        count = distinct[-1] + 1 - len(distinct)  # class indices no row uses
        first = list(itertools.islice((k for k in itertools.count() if k not in present), min(count, 5)))
        shown = ", ".join(map(str, first)) + (" ..." if count > 5 else "")
        raise DatasetError(
            f"{spec.text}: {path} line {top} has label {distinct[-1]}, but only {len(distinct)} distinct "
            f"integer labels occur: as class indices 0..{distinct[-1]}, {count} class(es) would "
            f"have no image ({shown})",
            "fix the label; integer labels must be the class indices 0..K-1 with every class present (write "
            "class names instead if some classes have no images)",
        )
    return [str(k) for k in distinct], {label: int(label) for label in set(raw)}


def _box(spec: Spec, path: Path, number: int, row: dict[str, str]) -> Box | None:
    """The row's (x, y, w, h), or None when all four cells are empty; a non-positive size is refused."""
    cells = [row[c].strip() for c in ("x", "y", "w", "h")]
    if not any(cells):
        return None
    try:
        x, y, w, h = (float(c) for c in cells)
    except ValueError as exc:
        raise DatasetError(
            f"{spec.text}: {path} line {number} has a box that is not four numbers: {cells}",
            "write x,y,w,h in pixels, or leave all four empty",
        ) from exc
    problem = box_problem((x, y, w, h))
    if problem is not None:
        raise DatasetError(f"{spec.text}: {path} line {number}: the box {problem}", "fix the row")
    return (x, y, w, h)
