"""Synthetic needles: deterministic bytes, boxes that hold the needle, the class only in the needle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitprobe import synthetic
from vitprobe.data import open_dataset
from vitprobe.errors import DatasetError
from vitprobe.synthetic import SyntheticConfig, glyph_table, make_synthetic, render_batch


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def needles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("needles") / "ds", n=40, classes=4, size=64, seed=3)


def test_same_seed_gives_identical_bytes(needles: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", n=40, classes=4, size=64, seed=3)
    assert _file_hashes(again) == _file_hashes(needles)
    other = make_synthetic(tmp_path / "other", n=40, classes=4, size=64, seed=4)
    first = "images/001.needle_00/needle_00_000000.png"
    assert _file_hashes(other)[first] != _file_hashes(needles)[first]


def test_layout_is_cub_with_balanced_classes_and_half_split(needles: Path) -> None:
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
                 "classes.txt", "synthetic.json"):  # fmt: skip
        assert (needles / name).is_file(), name
    assert (needles / "classes.txt").read_text().splitlines()[0] == "1 001.needle_00"
    train, test = open_dataset(f"cub:{needles}", "train"), open_dataset(f"cub:{needles}", "test")
    assert (len(train), len(test)) == (20, 20)
    assert np.bincount(train.labels).tolist() == [5, 5, 5, 5]
    assert np.bincount(test.labels).tolist() == [5, 5, 5, 5]
    assert train.class_names == ["needle_00", "needle_01", "needle_02", "needle_03"]
    assert not set(train.paths) & set(test.paths)


def test_needle_pixels_are_exactly_the_box_and_show_the_class_glyph(needles: Path) -> None:
    dataset = open_dataset(f"cub:{needles}", "all")
    side = SyntheticConfig(size=64).needle_side
    assert side == 8  # 4 cells of 2 px: 1/8 of the side
    for i in range(len(dataset)):
        pixels = np.asarray(dataset.load_image(i))  # (H, W, 3)
        needle_mask = np.isin(pixels, (0, 255)).all(axis=-1)  # background is clipped to [16, 239]
        (box,) = dataset.boxes[i]
        x, y, w, h = (int(v) for v in box)
        assert (w, h) == (side, side)
        expected = np.zeros_like(needle_mask)
        expected[y : y + h, x : x + w] = True
        assert np.array_equal(needle_mask, expected), f"image {i}: needle pixels outside its box"
        cells = pixels[y : y + h : 2, x : x + w : 2, 0] == 255  # one sample per 2 px cell: (4, 4)
        assert np.array_equal(cells, glyph_table()[dataset.labels[i]])


def test_class_changes_only_the_needle_pixels() -> None:
    labels_a, labels_b = np.array([0, 1, 2]), np.array([3, 0, 1])
    images_a, corners_a = render_batch(np.random.default_rng(7), labels_a, size=48, side=8)
    images_b, corners_b = render_batch(np.random.default_rng(7), labels_b, size=48, side=8)
    assert np.array_equal(corners_a, corners_b)
    outside = np.ones(images_a.shape[:3], dtype=bool)  # (B, H, W)
    for j, (x, y) in enumerate(corners_a):
        outside[j, y : y + 8, x : x + 8] = False
    assert np.array_equal(images_a[outside], images_b[outside])
    assert not np.array_equal(images_a, images_b)


def test_glyphs_are_distinct_and_share_their_mean_colour() -> None:
    glyphs = glyph_table().reshape(len(glyph_table()), -1)  # (G, 4, 4) -> (G, 16)
    assert len(glyphs) >= 10
    assert (glyphs.sum(axis=1) == synthetic.GLYPH_ON).all()
    distances = (glyphs[:, None, :] != glyphs[None, :, :]).sum(-1)  # (G, G)
    assert distances[~np.eye(len(glyphs), dtype=bool)].min() >= synthetic.GLYPH_MIN_HAMMING


def test_needle_is_about_a_seventh_of_the_side() -> None:
    assert SyntheticConfig(size=224).needle_side == 32
    assert SyntheticConfig(size=32).needle_side == 4


def test_spec_generates_once_under_vitprobe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITPROBE_HOME", str(tmp_path / "home"))
    spec = "synthetic:needles?n=24&classes=3&size=32&seed=1"
    train = open_dataset(spec, "train")
    root = tmp_path / "home" / "synthetic" / "needles-v1-n24-c3-s32-seed1"
    assert train.root == root and train.kind == "synthetic" and len(train) == 12
    stamp = (root / "images.txt").stat().st_mtime_ns
    test = open_dataset(spec, "test")
    assert (root / "images.txt").stat().st_mtime_ns == stamp  # not regenerated
    assert len(test) == 12 and test.boxes is not None
    assert open_dataset(f"cub:{root}", "train").fingerprint == train.fingerprint
    assert [p.name for p in (tmp_path / "home" / "synthetic").iterdir()] == [root.name]  # no temp dirs left


@pytest.mark.parametrize("changed", [{"seed": 4}, {"size": 48}], ids=["seed", "size"])
def test_needles_differing_only_in_size_or_seed_have_different_fingerprints(
    needles: Path, tmp_path: Path, changed: dict[str, int]
) -> None:
    # same n and classes: identical file names and labels, other pixels and boxes
    other = make_synthetic(tmp_path / "other", **{"n": 40, "classes": 4, "size": 64, "seed": 3, **changed})
    for split in ("train", "test", "all"):
        ours, theirs = open_dataset(f"cub:{needles}", split), open_dataset(f"cub:{other}", split)
        assert ours.relative_paths() == theirs.relative_paths() and ours.labels == theirs.labels
        assert ours.fingerprint != theirs.fingerprint, split
    again = make_synthetic(tmp_path / "again", n=40, classes=4, size=64, seed=3)  # same settings, same print
    same = open_dataset(f"cub:{again}", "test").fingerprint
    assert same == open_dataset(f"cub:{needles}", "test").fingerprint


def test_spec_and_cub_agree_and_tell_seeds_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITPROBE_HOME", str(tmp_path / "home"))
    prints = {}
    for seed in (0, 1):
        spec = f"synthetic:needles?n=16&classes=4&size=32&seed={seed}"
        from_spec = open_dataset(spec, "test")
        assert open_dataset(f"cub:{from_spec.root}", "test").fingerprint == from_spec.fingerprint
        prints[seed] = from_spec.fingerprint
    assert prints[0] != prints[1]


def test_a_foreign_folder_in_home_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITPROBE_HOME", str(tmp_path))
    foreign = tmp_path / "synthetic" / SyntheticConfig(n=8, classes=2, size=32).name
    foreign.mkdir(parents=True)
    (foreign / "images.txt").write_text("1 x.png\n")
    with pytest.raises(DatasetError, match="has no synthetic.json") as info:
        open_dataset("synthetic:needles?n=8&classes=2&size=32", "train")
    assert str(foreign) in (info.value.hint or "")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("synthetic:needles?n=24&colour=3", "unknown parameter 'colour'"),
        ("synthetic:needles?n=many", "is not an integer"),
        ("synthetic:haystack", "unknown synthetic dataset 'haystack'"),
        ("synthetic:needles?classes=1", "classes=1 is out of range"),
        ("synthetic:needles?n=5&classes=4", "n=5 is too small"),
    ],
)
def test_bad_synthetic_specs(
    spec: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VITPROBE_HOME", str(tmp_path))
    with pytest.raises(DatasetError, match=fragment):
        open_dataset(spec, "train")


def test_generated_folders_get_the_usual_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = make_synthetic(tmp_path / "needles", n=8, classes=2, size=32, seed=0)
        monkeypatch.setenv("VITPROBE_HOME", str(tmp_path / "home"))
        home = open_dataset("synthetic:needles?n=8&classes=2&size=32", "train").root
    finally:
        os.umask(old)
    for root in (out, home):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755, root  # not mkdtemp's 0700
        assert stat.S_IMODE((root / "images").stat().st_mode) == 0o755


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="already exists and is not empty"):
        make_synthetic(tmp_path, n=8, classes=2, size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(self: Image.Image, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic(tmp_path / "ds", n=8, classes=2, size=32)
    assert list(tmp_path.iterdir()) == []
