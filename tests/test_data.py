"""Dataset specs: image folders, ImageNet, CUB, CSV; RGB conversion, fingerprints, errors, `vitprobe data`."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitprobe.cli import app
from vitprobe.data import list_splits, open_dataset, to_rgb
from vitprobe.errors import DatasetError

runner = CliRunner()


def _png(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _expected_fingerprint(pairs: list[tuple[str, int]]) -> str:
    """The documented definition, written out: sha256 of sorted "relpath<TAB>label<LF>" lines."""
    text = "".join(f"{rel}\t{label}\n" for rel, label in sorted(pairs))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    """Row-major RGB pixels of an RGB image."""
    assert image.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)]  # (H, W, 3) -> (H * W, 3)


# --------------------------------------------------------------------------------------------- RGB conversion


def test_every_pil_mode_becomes_rgb(tmp_path: Path) -> None:
    gray = Image.new("L", (2, 1), 100)
    gray.putpixel((1, 0), 7)
    assert _pixels(to_rgb(gray)) == [(100, 100, 100), (7, 7, 7)]

    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent -> the white background
    assert _pixels(to_rgb(rgba)) == [(10, 20, 30), (255, 255, 255)]

    half = Image.new("RGBA", (1, 1), (0, 100, 200, 128))
    alpha = 128 / 255  # alpha compositing over white: a * colour + (1 - a) * 255
    expected = tuple(round(alpha * c + (1 - alpha) * 255) for c in (0, 100, 200))
    assert all(abs(a - b) <= 1 for a, b in zip(to_rgb(half).getpixel((0, 0)), expected, strict=True))

    cmyk = Image.new("CMYK", (2, 1), (255, 0, 0, 0))  # pure cyan
    cmyk.putpixel((1, 0), (0, 0, 0, 0))  # no ink: white
    assert _pixels(to_rgb(cmyk)) == [(0, 255, 255), (255, 255, 255)]

    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))  # 16-bit grayscale
    assert _pixels(to_rgb(deep)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_files_of_every_mode_load_as_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "modes" / "only"
    folder.mkdir(parents=True)
    Image.new("L", (5, 3), 90).save(folder / "gray.png")
    Image.new("RGBA", (5, 3), (1, 2, 3, 0)).save(folder / "rgba.png")
    Image.new("CMYK", (5, 3), (0, 255, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    Image.new("CMYK", (5, 3), (0, 255, 0, 0)).save(folder / "cmyk.tif")
    palette = Image.new("P", (5, 3), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    palette.save(folder / "palette.png")
    transparent = Image.new("P", (5, 3), 0)
    transparent.putpalette([9, 9, 9] * 256)
    transparent.save(folder / "transparent.gif", transparency=0)
    Image.fromarray(np.full((3, 5), 65535, dtype=np.uint16)).save(folder / "deep.png")

    dataset = open_dataset(f"imagefolder:{tmp_path / 'modes'}", "all")
    colours = {p.name: dataset.load_image(i) for i, p in enumerate(dataset.paths)}
    assert sorted(colours) == ["cmyk.jpg", "cmyk.tif", "deep.png", "gray.png", "palette.png", "rgba.png",
                               "transparent.gif"]  # fmt: skip
    for name, image in colours.items():
        assert image.mode == "RGB" and image.size == (5, 3), name
    assert colours["gray.png"].getpixel((0, 0)) == (90, 90, 90)
    assert colours["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    assert colours["cmyk.tif"].getpixel((0, 0)) == (255, 0, 255)  # magenta ink
    r, g, b = colours["cmyk.jpg"].getpixel((0, 0))  # lossy, but still magenta
    assert r > 200 and g < 60 and b > 200
    assert colours["palette.png"].getpixel((0, 0)) == (200, 10, 10)
    assert colours["transparent.gif"].getpixel((0, 0)) == (255, 255, 255)
    assert colours["deep.png"].getpixel((0, 0)) == (255, 255, 255)
    assert dataset.image_size(0) == (5, 3)


def test_corrupt_and_missing_images_name_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "ds" / "a" / "good.png")
    bad = tmp_path / "ds" / "a" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really")
    dataset = open_dataset(f"imagefolder:{tmp_path / 'ds'}", "all")
    index = dataset.paths.index(bad)
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        dataset.load_image(index)
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        dataset.image_size(index)
    good = tmp_path / "ds" / "a" / "good.png"
    good.unlink()
    with pytest.raises(DatasetError, match=f"missing image {good}"):
        dataset[dataset.paths.index(good)]


# --------------------------------------------------------------------------------------------- image folders


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    root = tmp_path / "flowers"
    _png(root / "train" / "rose" / "r1.png")
    _png(root / "train" / "rose" / "nested" / "r2.jpg".replace(".jpg", ".png"))
    _png(root / "train" / "daisy" / "d1.png")
    _png(root / "val" / "tulip" / "t1.png")  # a class only val has: index still shared
    _png(root / "val" / "daisy" / "d2.png")
    (root / "train" / "rose" / "notes.txt").write_text("not an image")
    _png(root / "train" / "rose" / ".hidden.png")
    return root


def test_imagefolder_split_folders(split_folder: Path) -> None:
    spec = f"imagefolder:{split_folder}"
    assert list_splits(spec) == ["train", "val"]
    train = open_dataset(spec, "train")
    val = open_dataset(spec, "val")
    assert train.class_names == val.class_names == ["daisy", "rose", "tulip"]
    assert [p.relative_to(split_folder).as_posix() for p in train.paths] == [
        "train/daisy/d1.png", "train/rose/nested/r2.png", "train/rose/r1.png",
    ]  # fmt: skip
    assert train.labels == [0, 1, 1]
    assert val.labels == [0, 2]
    assert train.boxes is None and train.kind == "imagefolder" and train.split == "train"
    assert train.fingerprint == _expected_fingerprint(
        [("train/daisy/d1.png", 0), ("train/rose/nested/r2.png", 1), ("train/rose/r1.png", 1)]
    )
    with pytest.raises(DatasetError, match=r"no split folder .*test .*split folders: train, val"):
        open_dataset(spec, "test")


def test_imagefolder_without_splits_reads_all_and_says_so(tmp_path: Path) -> None:
    _png(tmp_path / "cats" / "a.png")
    _png(tmp_path / "dogs" / "b.png")
    dataset = open_dataset(f"imagefolder:{tmp_path}", "train")
    assert dataset.split == "all"
    assert any("split 'all'" in note for note in dataset.notes)
    assert dataset.class_names == ["cats", "dogs"] and dataset.labels == [0, 1]
    assert list_splits(f"imagefolder:{tmp_path}") == ["all"]


def test_getitem_applies_the_transform_and_returns_the_index(tmp_path: Path) -> None:
    import timm.data

    _png(tmp_path / "a" / "x.png", (255, 0, 0), size=(40, 30))
    _png(tmp_path / "b" / "y.png", (0, 0, 255), size=(30, 40))
    transform = timm.data.create_transform(input_size=(3, 32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    dataset = open_dataset(f"imagefolder:{tmp_path}", "all", transform=transform)
    image, label, index = dataset[1]
    assert (label, index) == (1, 1)
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([0.0, 0.0, 1.0]))
    restored = pickle.loads(pickle.dumps(dataset))  # DataLoader workers pickle the dataset
    images, labels, indices = next(iter(torch.utils.data.DataLoader(restored, batch_size=2)))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1] and indices.tolist() == [0, 1]
    dataset.transform = None
    assert isinstance(dataset[0][0], Image.Image)


def test_fingerprint_ignores_location_and_sees_labels(tmp_path: Path) -> None:
    _png(tmp_path / "one" / "a" / "x.png")
    _png(tmp_path / "one" / "b" / "y.png")
    _png(tmp_path / "one" / "b" / "z.png")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    first = open_dataset(f"imagefolder:{tmp_path / 'one'}", "all")
    assert open_dataset(f"imagefolder:{tmp_path / 'two'}", "all").fingerprint == first.fingerprint
    (tmp_path / "two" / "b" / "y.png").rename(tmp_path / "two" / "a" / "y.png")  # relabel one file
    assert open_dataset(f"imagefolder:{tmp_path / 'two'}", "all").fingerprint != first.fingerprint
    before = first.fingerprint
    first.labels[1] = 0  # edits after opening are seen (the fingerprint is not cached)
    expected = _expected_fingerprint([("a/x.png", 0), ("b/y.png", 0), ("b/z.png", 1)])
    assert first.fingerprint == expected != before


def test_empty_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class sub-folders"):
        open_dataset(f"imagefolder:{tmp_path}", "all")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(f"imagefolder:{tmp_path}", "all")
    with pytest.raises(DatasetError, match=f"folder {tmp_path / 'nope'} does not exist"):
        open_dataset(f"imagefolder:{tmp_path / 'nope'}", "all")


@pytest.mark.parametrize("spec", ["folder:/x", "/data/images", "cub:"])
def test_bad_specs_list_the_kinds(spec: str) -> None:
    with pytest.raises(DatasetError, match="imagefolder, imagenet, cub, csv, synthetic|has no path"):
        open_dataset(spec, "train")


# --------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_layout(tmp_path: Path) -> None:
    for synset in ("n02", "n01", "n03"):
        _png(tmp_path / "train" / synset / f"{synset}_1.JPEG".replace(".JPEG", ".png"))
    _png(tmp_path / "val" / "n03" / "v1.png")
    _png(tmp_path / "val" / "n01" / "v2.png")
    spec = f"imagenet:{tmp_path}"
    val = open_dataset(spec, "val")
    assert val.class_names == ["n01", "n02", "n03"]  # sorted synsets of train/, shared by val
    assert val.labels == [0, 2]
    mapping = "n01 tench, Tinca tinca\nn02 goldfish\nn03 great white shark\n"
    (tmp_path / "LOC_synset_mapping.txt").write_text(mapping)
    train = open_dataset(spec, "train")
    assert train.class_names == ["tench", "goldfish", "great white shark"]
    assert train.labels == [0, 1, 2]
    assert list_splits(spec) == ["train", "val"]
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        open_dataset(spec, "test")
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DatasetError, match=f"missing folder {tmp_path / 'val'}"):
        open_dataset(spec, "val")


def test_imagenet_flat_val_from_loc_solution(tmp_path: Path) -> None:
    """The Kaggle layout: ILSVRC/Data/CLS-LOC/{train,val}, LOC_*.{csv,txt} three levels up, val/ flat."""
    top = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    for synset in ("n01", "n02"):
        _png(top / "train" / synset / f"{synset}_0.png")
    _png(top / "val" / "ILSVRC2012_val_00000001.png", size=(8, 6))
    _png(top / "val" / "ILSVRC2012_val_00000002.png", size=(8, 6))
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01 1 2 5 6 n01 0 0 3 3 \n"
        "ILSVRC2012_val_00000001,n02 2 1 7 4 \n"
        "ILSVRC2012_val_00000003,n01 0 0 1 1 \n"  # not on disk: skipped
    )
    val = open_dataset(f"imagenet:{top}", "val")
    assert [p.name for p in val.paths] == ["ILSVRC2012_val_00000001.png", "ILSVRC2012_val_00000002.png"]
    assert val.labels == [1, 0]
    assert val.boxes == [[(2.0, 1.0, 5.0, 3.0)], [(1.0, 2.0, 4.0, 4.0), (0.0, 0.0, 3.0, 3.0)]]
    unknown_synset = "ImageId,PredictionString\nILSVRC2012_val_00000001,n09 1 1 2 2\n"
    (tmp_path / "LOC_val_solution.csv").write_text(unknown_synset)
    with pytest.raises(DatasetError, match="LOC_val_solution.csv line 2"):
        open_dataset(f"imagenet:{top}", "val")
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetError, match="no images in synset folders") as info:
        open_dataset(f"imagenet:{top}", "val")
    assert "LOC_val_solution.csv" in (info.value.hint or "")


# --------------------------------------------------------------------------------------------- CUB


def _cub_tree(top: Path) -> Path:
    """A tiny CUB_200_2011 tree: 5 images, 2 classes, ids and labels 1-based as in the real files."""
    root = top / "CUB_200_2011"
    rows = [  # id, relative path, class (1-based), is_train, box
        (1, "001.Albatross/a_1.jpg", 1, 1, (1.0, 2.0, 3.0, 4.0)),
        (2, "001.Albatross/a_2.jpg", 1, 0, (0.0, 0.0, 6.0, 4.0)),
        (3, "002.Auklet/b_1.jpg", 2, 1, (2.5, 1.5, 2.0, 2.0)),
        (4, "002.Auklet/b_2.jpg", 2, 1, (0.0, 1.0, 1.0, 1.0)),
        (5, "002.Auklet/b_3.jpg", 2, 0, (3.0, 0.0, 3.0, 3.0)),
    ]
    for _, rel, *_ in rows:
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (50, 60, 70)).save(path)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, *_ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, *_ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t, _ in rows))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {' '.join(map(str, b))}\n" for i, *_, b in rows))
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    return root


def test_cub_layout(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path)
    train = open_dataset(f"cub:{tmp_path}", "train")  # the parent of CUB_200_2011 works too
    assert train.root == root and train.kind == "cub"
    assert train.class_names == ["Albatross", "Auklet"]
    assert [p.relative_to(root).as_posix() for p in train.paths] == [
        "images/001.Albatross/a_1.jpg", "images/002.Auklet/b_1.jpg", "images/002.Auklet/b_2.jpg",
    ]  # fmt: skip
    assert train.labels == [0, 1, 1]
    assert train.boxes == [[(1.0, 2.0, 3.0, 4.0)], [(2.5, 1.5, 2.0, 2.0)], [(0.0, 1.0, 1.0, 1.0)]]
    test = open_dataset(f"cub:{root}", "test")
    assert test.labels == [0, 1] and test.boxes == [[(0.0, 0.0, 6.0, 4.0)], [(3.0, 0.0, 3.0, 3.0)]]
    assert len(open_dataset(f"cub:{root}", "all")) == 5
    assert test.fingerprint == _expected_fingerprint(
        [("images/001.Albatross/a_2.jpg", 0), ("images/002.Auklet/b_3.jpg", 1)]
    )
    description = train.describe()
    assert description["num_images"] == 3 and description["has_boxes"] and description["num_boxes"] == 3
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        open_dataset(f"cub:{root}", "val")


def test_a_generator_marker_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    """A root with synthetic.json adds the line "#generator<TAB><canonical JSON>" after the sorted lines."""
    root = _cub_tree(tmp_path)
    pairs = [("images/001.Albatross/a_2.jpg", 0), ("images/002.Auklet/b_3.jpg", 1)]
    assert open_dataset(f"cub:{root}", "test").fingerprint == _expected_fingerprint(pairs)  # real: unchanged
    marker = {"seed": 1, "generator": "needles", "size": 64}
    (root / "synthetic.json").write_text(json.dumps(marker, indent=2))
    canonical = '{"generator":"needles","seed":1,"size":64}'  # sorted keys, no spaces
    text = "".join(f"{rel}\t{label}\n" for rel, label in pairs) + f"#generator\t{canonical}\n"
    generated = open_dataset(f"cub:{root}", "test").fingerprint
    assert generated == hashlib.sha256(text.encode("utf-8")).hexdigest()
    (root / "synthetic.json").write_text(json.dumps({**marker, "seed": 2}))
    assert open_dataset(f"cub:{root}", "test").fingerprint != generated
    (root / "synthetic.json").write_text('{"note": "not made by a generator"}')  # a real dataset's own file
    assert open_dataset(f"cub:{root}", "test").fingerprint == _expected_fingerprint(pairs)
    (root / "synthetic.json").write_text("{broken")
    with pytest.raises(DatasetError, match="generator marker"):
        _ = open_dataset(f"cub:{root}", "test").fingerprint


@pytest.mark.parametrize(
    "missing", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
)
def test_cub_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    root = _cub_tree(tmp_path)
    (root / missing).unlink()
    with pytest.raises(DatasetError, match=f"missing {root / missing}") as info:
        open_dataset(f"cub:{root}", "train")
    assert "CUB_200_2011" in (info.value.hint or "")


def test_cub_without_boxes_and_with_missing_images(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path)
    (root / "bounding_boxes.txt").unlink()
    dataset = open_dataset(f"cub:{root}", "train")
    assert dataset.boxes is None and any("no boxes" in note for note in dataset.notes)
    (root / "images" / "001.Albatross" / "a_1.jpg").unlink()  # the first listed image
    with pytest.raises(DatasetError, match=f"missing image {root / 'images/001.Albatross/a_1.jpg'}") as info:
        open_dataset(f"cub:{root}", "train")
    assert "images.txt line 1" in info.value.message and "restore the file" in (info.value.hint or "")
    shutil.rmtree(root / "images")
    with pytest.raises(DatasetError, match=f"missing folder {root / 'images'}") as info:
        open_dataset(f"cub:{root}", "train")
    assert "CUB_200_2011" in (info.value.hint or "")


def test_cub_malformed_line_is_named(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path)
    (root / "bounding_boxes.txt").write_text("1 1.0 2.0\n")
    with pytest.raises(DatasetError, match=r"bounding_boxes.txt line 1 has 3 fields, expected 5"):
        open_dataset(f"cub:{root}", "train")


# --------------------------------------------------------------------------------------------- CSV


def test_csv_with_names_relative_paths_boxes_and_splits(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    _png(tmp_path / "img" / "c.png")
    outside = _png(tmp_path.parent / f"{tmp_path.name}_outside.png")
    (tmp_path / "labels.csv").write_text(
        "path,label,x,y,w,h,split\n"
        "img/a.png,zebra,1,2,3,4,train\n"
        "img/a.png,zebra,0,0,1,1,train\n"  # a second box on the same image
        "img/b.png,ant,,,,,train\n"  # no box
        f"{outside},zebra,1,1,2,2,test\n"  # absolute path
        "img/c.png,bee,0,0,6,4,test\n"
    )
    spec = f"csv:{tmp_path / 'labels.csv'}"
    assert list_splits(spec) == ["test", "train"]
    train = open_dataset(spec, "train")
    assert train.class_names == ["ant", "bee", "zebra"]  # sorted over every split, so indices are shared
    assert train.paths == [tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"]
    assert train.labels == [2, 0]
    assert train.boxes == [[(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 1.0, 1.0)], []]
    test = open_dataset(spec, "test")
    assert test.labels == [2, 1] and test.paths[0] == outside
    assert test.fingerprint == _expected_fingerprint([(outside.as_posix(), 2), ("img/c.png", 1)])
    assert len(open_dataset(spec, "all")) == 4
    with pytest.raises(DatasetError, match=r"no rows with split 'val' .*splits: test, train"):
        open_dataset(spec, "val")


def test_csv_with_integer_labels_and_no_split_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "d.csv").write_text("path,label\na.png,1\nb.png,0\n")
    dataset = open_dataset(f"csv:{tmp_path / 'd.csv'}", "train")
    assert dataset.class_names == ["0", "1"] and dataset.labels == [1, 0]
    assert dataset.boxes is None and dataset.split == "all" and dataset.notes


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("file,label\na.png,1\n", "no column path"),
        ("path,label,x,y\na.png,1,0,0\n", "boxes need all of x,y,w,h"),
        ("path,label\n", "has a header but no rows"),
        ("path,label,x,y,w,h\na.png,0,0,zero,1,1\n", "line 2 has a box that is not four numbers"),
        ("path,label\na.png,cat\na.png,dog\n", "line 3 gives a.png label 'dog'"),
    ],
)
def test_bad_csv_files(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DatasetError, match=fragment):
        open_dataset(f"csv:{tmp_path / 'd.csv'}", "all")


def test_missing_csv_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"file {tmp_path / 'none.csv'} does not exist"):
        open_dataset(f"csv:{tmp_path / 'none.csv'}", "all")
    with pytest.raises(DatasetError, match="is a folder, not a CSV file"):
        open_dataset(f"csv:{tmp_path}", "all")


def test_csv_listing_a_missing_image_names_it(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text("path,label\nimgs/a.png,cat\n")  # wrong folder in the path column
    with pytest.raises(DatasetError, match=r"missing image .*imgs/a\.png \(listed in .*d\.csv\)"):
        open_dataset(f"csv:{tmp_path / 'd.csv'}", "all")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_show_json_matches_describe(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path)
    result = runner.invoke(app, ["data", "show", f"cub:{root}", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert list(shown["splits"]) == ["train", "test"]
    assert shown["splits"]["test"] == open_dataset(f"cub:{root}", "test").describe()


def test_cli_show_table(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path)
    result = runner.invoke(app, ["data", "show", f"cub:{root}", "--split", "train"])
    assert result.exit_code == 0, result.output
    assert open_dataset(f"cub:{root}", "train").fingerprint[:16] in result.output
    assert "Albatross, Auklet" in result.output and "yes (3)" in result.output


def test_cli_errors_name_the_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "show", f"cub:{tmp_path}"])
    assert result.exit_code == 1
    assert "images.txt" in result.output and "CUB_200_2011" in result.output
    result = runner.invoke(app, ["data", "show", "pictures:/x"])
    assert result.exit_code == 1 and "imagefolder, imagenet, cub, csv, synthetic" in result.output


def test_cli_show_imagenet_without_split_folders_is_one_line(tmp_path: Path) -> None:
    _png(tmp_path / "n01" / "a.png")  # class folders, but no train/ or val/ above them
    result = runner.invoke(app, ["data", "show", f"imagenet:{tmp_path}"])
    assert result.exit_code == 1, result.output
    assert "no train/ or val/ folder" in result.output and "Traceback" not in result.output
    with pytest.raises(DatasetError, match="no train/ or val/ folder"):
        list_splits(f"imagenet:{tmp_path}")


def test_cli_make_synthetic_then_show(tmp_path: Path) -> None:
    out = tmp_path / "needles"
    args = ["data", "make-synthetic", str(out), "--n", "16", "--classes", "2", "--size", "32", "--seed", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 5
    shown = json.loads(runner.invoke(app, ["data", "show", f"cub:{out}", "--json"]).stdout)
    assert {name: s["num_images"] for name, s in shown["splits"].items()} == {"train": 8, "test": 8}
    assert runner.invoke(app, args).exit_code == 1  # refuses to overwrite


def test_cli_kinds_lists_every_kind_and_docs_describe_each(tmp_path: Path) -> None:
    from vitprobe.data import KINDS

    result = runner.invoke(app, ["data", "kinds", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["kinds"]
    assert [row["kind"] for row in shown] == list(KINDS)
    assert {p["name"] for p in next(r for r in shown if r["kind"] == "dtd")["params"]} == {"partition"}
    docs = (Path(__file__).parents[1] / "docs" / "datasets.md").read_text()
    headings = [line for line in docs.splitlines() if line.startswith("### ")]
    for kind in KINDS:
        assert any(f"`{kind}:" in h for h in headings), f"docs/datasets.md has no section for {kind}"
        assert f"`{kind}:" in docs.split("## The specs")[0], f"the table of docs/datasets.md lacks {kind}"
    table = runner.invoke(app, ["data", "kinds"])
    assert table.exit_code == 0 and "dtd:DIR" in table.output and "STL10" in table.output


def test_cli_check_lists_broken_and_suspicious_images(tmp_path: Path) -> None:
    import io

    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "good.jpg").write_bytes(bytes(data))
    start = data.find(b"\xff\xda")
    for i in range(start + (len(data) - start) // 2, start + (len(data) - start) // 2 + 8):
        data[i] ^= 0x5A  # corrupt scan data: decodes, with a warning
    (tmp_path / "a" / "scrambled.jpg").write_bytes(bytes(data))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # cannot be decoded
    for workers in ("0", "2"):  # warnings caught inside DataLoader workers come back too
        args = ["data", "check", f"imagefolder:{tmp_path}", "--json", "--workers", workers]
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output  # an unusable image
        problems = json.loads(result.stdout)["splits"]["all"]["problems"]
        assert [(Path(p["path"]).name, p["level"]) for p in problems] == [
            ("broken.png", "error"), ("scrambled.jpg", "warning"),
        ]  # fmt: skip
        assert "cannot read image" in problems[0]["message"] and "corrupt JPEG data" in problems[1]["message"]
    (tmp_path / "a" / "broken.png").unlink()
    result = runner.invoke(app, ["data", "check", f"imagefolder:{tmp_path}", "--workers", "0"])
    assert result.exit_code == 0, result.output  # warnings only
    assert "2 images, 0 error(s), 1 warning(s)" in result.output and "scrambled.jpg" in result.output
