"""Transfer datasets in torchvision's on-disk layouts: each kind opens a generated tree in that exact layout,
agrees with torchvision's own class (download=False) image by image, and shows in `vitprobe data show`."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from typer.testing import CliRunner

from transfer_trees import (
    Tree,
    make_aircraft,
    make_caltech101,
    make_cars,
    make_cifar10,
    make_cifar100,
    make_dtd,
    make_flowers102,
    make_food101,
    make_pets,
    make_stl10,
    make_sun397,
)
from vitprobe.cli import app
from vitprobe.data import KINDS, ImageDataset, list_splits, open_dataset
from vitprobe.errors import DatasetError

runner = CliRunner()


def _expected_fingerprint(pairs: list[tuple[str, int]]) -> str:
    """The documented definition, written out: sha256 of sorted "relpath<TAB>label<LF>" lines."""
    return hashlib.sha256("".join(f"{r}\t{y}\n" for r, y in sorted(pairs)).encode()).hexdigest()


def _check(dataset: ImageDataset, tree: Tree, pairs: list[tuple[str, int]]) -> None:
    """The dataset holds exactly `pairs` (relative path, label) in order, under the tree's root."""
    assert dataset.root == tree.root
    assert dataset.class_names == tree.class_names
    assert list(zip(dataset.relative_paths(), dataset.labels, strict=True)) == pairs
    assert dataset.fingerprint == _expected_fingerprint(pairs)
    for i in range(len(dataset)):
        image = dataset.load_image(i)
        assert image.mode == "RGB" and image.size == dataset.image_size(i)


def _same_as_torchvision(
    ours: ImageDataset, theirs: torch.utils.data.Dataset, *, ordered: bool = True
) -> None:
    """Image by image: the same pixels and the same label (as a multiset when torchvision's order is the
    file system's)."""

    def key(image: object, label: int) -> tuple[str, int]:
        pixels = np.asarray(image.convert("RGB"))  # type: ignore[attr-defined]
        return hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest(), int(label)

    assert len(ours) == len(theirs)
    mine = [key(ours.load_image(i), ours.labels[i]) for i in range(len(ours))]
    other = [key(*theirs[i]) for i in range(len(theirs))]
    assert mine == other if ordered else sorted(mine) == sorted(other)
    assert len(set(mine)) == len(mine), "the generated images are distinct, so the comparison means something"


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the md5 of the real archives' files; generated files cannot match them."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102

    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)


# --------------------------------------------------------------------------------------------- per kind


def test_flowers102(tmp_path: Path, no_md5: None) -> None:
    tree = make_flowers102(tmp_path)
    assert list_splits(f"flowers102:{tmp_path}") == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        dataset = open_dataset(f"flowers102:{tmp_path}", split)
        _check(dataset, tree, tree.splits[split])
        assert dataset.boxes is None and len(dataset.class_names) == 102
        _same_as_torchvision(dataset, tvd.Flowers102(tmp_path, split=split, download=False))
    inner = open_dataset(f"flowers102:{tree.root}", "test")  # the dataset folder itself works too
    assert inner.fingerprint == open_dataset(f"flowers102:{tmp_path}", "test").fingerprint


def test_pets_with_head_boxes(tmp_path: Path) -> None:
    tree = make_pets(tmp_path)
    for split in ("trainval", "test"):
        dataset = open_dataset(f"pets:{tmp_path}", split)
        _check(dataset, tree, tree.splits[split])
        theirs = tvd.OxfordIIITPet(tmp_path, split=split, download=False)
        assert theirs.classes == dataset.class_names
        _same_as_torchvision(dataset, theirs)
    trainval = open_dataset(f"pets:{tmp_path}", "trainval")
    expected = [tree.boxes.get(rel, []) for rel in trainval.relative_paths()]
    assert trainval.boxes == expected and sum(map(len, expected)) == 3  # one head box for 3 of the 6 images
    assert any("head boxes" in note and "3 of 6" in note for note in trainval.notes)
    assert open_dataset(f"pets:{tmp_path}", "test").boxes is None  # no xml for any test image


def test_dtd_partitions(tmp_path: Path) -> None:
    tree = make_dtd(tmp_path)
    for partition in (1, 3, 10):
        for split in ("train", "val", "test"):
            for spec in (f"dtd:{tmp_path}?partition={partition}", f"dtd:{tree.root}?partition={partition}"):
                dataset = open_dataset(spec, split)
                _check(dataset, tree, tree.splits[f"{split}{partition}"])
            _same_as_torchvision(dataset, tvd.DTD(tmp_path, split=split, partition=partition, download=False))
    assert open_dataset(f"dtd:{tmp_path}", "train").relative_paths() == [r for r, _ in tree.splits["train1"]]
    with pytest.raises(DatasetError, match=r"partition=11 is out of range .*1 <= partition <= 10"):
        open_dataset(f"dtd:{tmp_path}?partition=11", "train")


def test_cars_with_boxes(tmp_path: Path) -> None:
    tree = make_cars(tmp_path)
    for split in ("train", "test"):
        dataset = open_dataset(f"cars:{tmp_path}", split)
        _check(dataset, tree, tree.splits[split])
        assert dataset.boxes == [tree.boxes[rel] for rel in dataset.relative_paths()]
        theirs = tvd.StanfordCars(tmp_path, split=split, download=False)
        assert theirs.classes == dataset.class_names
        _same_as_torchvision(dataset, theirs)


@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
def test_aircraft_levels_and_boxes(tmp_path: Path, level: str) -> None:
    tree = make_aircraft(tmp_path)
    for split in ("train", "val", "trainval", "test"):
        dataset = open_dataset(f"aircraft:{tmp_path}?level={level}", split)
        pairs = tree.splits[f"{level}/{split}"]
        theirs = tvd.FGVCAircraft(tmp_path, split=split, annotation_level=level, download=False)
        assert dataset.class_names == theirs.classes
        assert list(zip(dataset.relative_paths(), dataset.labels, strict=True)) == pairs
        assert dataset.boxes == [tree.boxes[rel] for rel in dataset.relative_paths()]
        _same_as_torchvision(dataset, theirs)
    if level == "variant":
        _check(open_dataset(f"aircraft:{tmp_path}", "test"), tree, tree.splits["variant/test"])  # the default
    with pytest.raises(DatasetError, match="level='model' is not one of variant, family, manufacturer"):
        open_dataset(f"aircraft:{tmp_path}?level=model", "train")


def test_food101(tmp_path: Path) -> None:
    tree = make_food101(tmp_path)
    for split in ("train", "test"):
        dataset = open_dataset(f"food101:{tmp_path}", split)
        _check(dataset, tree, tree.splits[split])
        theirs = tvd.Food101(tmp_path, split=split, download=False)
        assert theirs.classes == dataset.class_names
        _same_as_torchvision(dataset, theirs)


def test_caltech101_all_matches_torchvision_and_has_boxes(tmp_path: Path) -> None:
    tree = make_caltech101(tmp_path)
    dataset = open_dataset(f"caltech101:{tmp_path}", "all")
    _check(dataset, tree, tree.splits["all"])
    theirs = tvd.Caltech101(tmp_path, download=False)
    assert theirs.categories == dataset.class_names  # BACKGROUND_Google left out, as torchvision does
    _same_as_torchvision(dataset, theirs)
    assert dataset.boxes == [tree.boxes[rel] for rel in dataset.relative_paths()]  # read on first access
    assert "Faces" in dataset.class_names  # its annotations live in Annotations/Faces_2


def test_caltech101_seeded_split(tmp_path: Path) -> None:
    from vitprobe.data.subset import hash_key

    make_caltech101(tmp_path, per_class=5)
    everything = open_dataset(f"caltech101:{tmp_path}", "all")
    spec = f"caltech101:{tmp_path}?train_per_class=2&seed=7"
    train, test = open_dataset(spec, "train"), open_dataset(spec, "test")
    for label in range(3):  # the definition: per class, the 2 indices of `all` with the smallest hash keys
        members = [i for i, y in enumerate(everything.labels) if y == label]
        chosen = sorted(members, key=lambda i: hash_key(7, "caltech101", i))[:2]
        assert sorted(p for p, y in zip(train.paths, train.labels, strict=True) if y == label) == sorted(
            everything.paths[i] for i in chosen
        )
    assert sorted(train.paths + test.paths) == sorted(everything.paths) and not set(train.paths) & set(
        test.paths
    )
    default = open_dataset(f"caltech101:{tmp_path}", "train")  # 30 per class > 5: everything is train
    assert default.paths == everything.paths and default.labels == everything.labels
    with pytest.raises(DatasetError, match="no test images") as info:
        open_dataset(f"caltech101:{tmp_path}", "test")
    assert "train_per_class" in (info.value.hint or "")
    assert open_dataset(f"caltech101:{tmp_path}?train_per_class=2&seed=8", "train").paths != train.paths


def test_sun397_all_and_partitions(tmp_path: Path) -> None:
    tree = make_sun397(tmp_path)
    assert list_splits(f"sun397:{tmp_path}") == ["train", "test", "all"]
    everything = open_dataset(f"sun397:{tmp_path}", "all")
    _check(everything, tree, tree.splits["all"])
    assert everything.class_names == tvd.SUN397(tmp_path, download=False).classes
    _same_as_torchvision(everything, tvd.SUN397(tmp_path, download=False), ordered=False)
    for partition in (1, 2, 10):
        for split in ("train", "test"):
            dataset = open_dataset(f"sun397:{tmp_path}?partition={partition}", split)
            _check(dataset, tree, tree.splits[f"{split}{partition}"])
    assert open_dataset(f"sun397:{tmp_path}", "train").paths == open_dataset(f"sun397:{tmp_path}?partition=1",
                                                                             "train").paths  # fmt: skip


def test_sun397_without_partitions_offers_all_only(tmp_path: Path) -> None:
    tree = make_sun397(tmp_path, partitions=False)
    assert list_splits(f"sun397:{tmp_path}") == ["all"]
    _check(open_dataset(f"sun397:{tmp_path}", "all"), tree, tree.splits["all"])
    with pytest.raises(DatasetError, match="unknown split 'train'"):
        open_dataset(f"sun397:{tmp_path}", "train")
    with pytest.raises(DatasetError, match="partition=2 asks for the official split") as info:
        open_dataset(f"sun397:{tmp_path}?partition=2", "all")
    assert "Partitions.zip" in (info.value.hint or "")


def test_cifar10(tmp_path: Path, no_md5: None) -> None:
    tree = make_cifar10(tmp_path)
    for split in ("train", "test"):
        dataset = open_dataset(f"cifar10:{tmp_path}", split)
        _check(dataset, tree, tree.splits[split])
        theirs = tvd.CIFAR10(tmp_path, train=split == "train", download=False)  # a benign, generated pickle
        assert theirs.classes == dataset.class_names
        _same_as_torchvision(dataset, theirs)
        assert dataset.image_size(0) == (32, 32)


def test_cifar100_fine_and_coarse(tmp_path: Path, no_md5: None) -> None:
    tree = make_cifar100(tmp_path)
    for split in ("train", "test"):
        fine = open_dataset(f"cifar100:{tmp_path}", split)
        _check(fine, tree, tree.splits[split])
        _same_as_torchvision(fine, tvd.CIFAR100(tmp_path, train=split == "train", download=False))
        coarse = open_dataset(f"cifar100:{tmp_path}?labels=coarse", split)
        assert coarse.class_names == ["fruit_and_vegetables", "fish", "people"]
        assert (
            list(zip(coarse.relative_paths(), coarse.labels, strict=True)) == tree.splits[f"{split}/coarse"]
        )
        assert coarse.fingerprint != fine.fingerprint


def test_stl10_and_folds(tmp_path: Path, no_md5: None) -> None:
    tree = make_stl10(tmp_path)
    for split in ("train", "test"):
        dataset = open_dataset(f"stl10:{tmp_path}", split)
        _check(dataset, tree, tree.splits[split])
        theirs = tvd.STL10(tmp_path, split=split, download=False)
        assert theirs.classes == dataset.class_names
        _same_as_torchvision(dataset, theirs)
        assert dataset.image_size(0) == (96, 96)
    fold = open_dataset(f"stl10:{tmp_path}?fold=3", "train")
    _same_as_torchvision(fold, tvd.STL10(tmp_path, split="train", folds=3, download=False))
    assert fold.relative_paths() == ["train_X.bin#3", "train_X.bin#5"]  # line 3 of fold_indices.txt: "3 5"
    assert len(open_dataset(f"stl10:{tmp_path}?fold=3", "test")) == 4  # folds select training images only


def test_record_datasets_survive_pickling_for_workers(tmp_path: Path) -> None:
    """DataLoader workers get a pickled dataset: the arrays are left behind and read again from the files."""
    make_cifar10(tmp_path)
    make_stl10(tmp_path)
    for spec in (f"cifar10:{tmp_path}", f"stl10:{tmp_path}"):
        dataset = open_dataset(spec, "train")
        dataset.load_image(0)
        payload = pickle.dumps(dataset)
        assert len(payload) < 20_000, "no pixel arrays inside the pickle"
        restored = pickle.loads(payload)
        for i in range(len(dataset)):
            assert np.array_equal(np.asarray(restored.load_image(i)), np.asarray(dataset.load_image(i)))


# --------------------------------------------------------------------------------------------- every kind


MAKERS: dict[str, tuple[Callable[[Path], Tree], str]] = {
    "flowers102": (make_flowers102, ""), "pets": (make_pets, ""), "dtd": (make_dtd, "?partition=2"),
    "cars": (make_cars, ""), "aircraft": (make_aircraft, "?level=family"), "food101": (make_food101, ""),
    "caltech101": (make_caltech101, "?train_per_class=2"), "sun397": (make_sun397, "?partition=4"),
    "cifar10": (make_cifar10, ""), "cifar100": (make_cifar100, "?labels=coarse"),
    "stl10": (make_stl10, "?fold=1"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_data_show_every_transfer_kind(tmp_path: Path, kind: str) -> None:
    maker, query = MAKERS[kind]
    maker(tmp_path)
    spec = f"{kind}:{tmp_path}{query}"
    result = runner.invoke(app, ["data", "show", spec, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    expected = (
        [s for s in KINDS[kind].splits if s != "all"] if isinstance(KINDS[kind].splits, tuple) else None
    )
    assert list(shown["splits"]) == (expected or [s for s in list_splits(spec) if s != "all"])
    for split, info in shown["splits"].items():
        assert info == open_dataset(spec, split).describe() and info["kind"] == kind
    table = runner.invoke(app, ["data", "show", spec])
    assert table.exit_code == 0 and next(iter(shown["splits"].values()))["fingerprint"][:16] in table.output


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_a_wrong_folder_names_the_expected_file_and_never_downloads(tmp_path: Path, kind: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as info:
        open_dataset(f"{kind}:{tmp_path / 'empty'}", list_splits_static(kind)[0])
    assert str(tmp_path / "empty") in info.value.message and "never downloads" in (info.value.hint or "")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == []  # nothing fetched or created


def list_splits_static(kind: str) -> list[str]:
    splits = KINDS[kind].splits
    return list(splits) if isinstance(splits, tuple) else ["all"]


def test_transfer_study_opens_every_kind_by_spec(tmp_path: Path) -> None:
    """What a transfer study needs: every kind, each at its train and test split, from one spec each."""
    study = {}
    for kind, (maker, query) in MAKERS.items():
        maker(tmp_path / kind)
        spec = f"{kind}:{tmp_path / kind}{query}"
        splits = [s for s in list_splits(spec) if s != "all"] or ["all"]
        study[kind] = {split: len(open_dataset(spec, split)) for split in splits}
    assert all(all(n > 0 for n in sizes.values()) for sizes in study.values()), study


def test_kinds_without_parameters_refuse_a_query(tmp_path: Path) -> None:
    make_food101(tmp_path)
    with pytest.raises(DatasetError, match="unknown parameter 'partition' .*food101 takes no parameters"):
        open_dataset(f"food101:{tmp_path}?partition=1", "train")
    odd = tmp_path / "odd?name"
    shutil.copytree(tmp_path / "food-101", odd / "food-101")
    assert len(open_dataset(f"food101:{odd}", "train")) == 6  # a folder whose name holds '?' is a path


def _break_flowers(tree: Tree) -> None:
    (tree.root / "setid.mat").unlink()


def _break_cars_meta(tree: Tree) -> None:
    from scipy.io import savemat

    savemat(tree.root / "devkit" / "cars_meta.mat", {"names": np.zeros(2)})


def _break_cars_annos(tree: Tree) -> None:
    (tree.root / "devkit" / "cars_train_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, but truncated")


def _break_dtd(tree: Tree) -> None:
    (tree.root / "labels" / "train1.txt").write_text("banded/banded_0001.jpg\nno_class.jpg\n")


def _break_aircraft(tree: Tree) -> None:
    (tree.root / "images_variant_train.txt").write_text("1000000 747-400\n")


def _break_stl10(tree: Tree) -> None:
    (tree.root / "train_X.bin").write_bytes(b"\x00" * 1000)


def _break_cifar(tree: Tree) -> None:
    from transfer_trees import cifar_pixels, py2_pickle

    (tree.root / "data_batch_2").write_bytes(py2_pickle({"data": cifar_pixels(1, 0), "labels": [7]}))


def _break_pets(tree: Tree) -> None:
    (tree.root / "annotations" / "test.txt").write_text("Abyssinian_1 one 1 1\n")


BROKEN = {
    "flowers102": (make_flowers102, _break_flowers, "train", r"missing .*flowers-102/setid\.mat"),
    "cars/meta": (make_cars, _break_cars_meta, "train", r"cars_meta\.mat has no variable 'class_names'"),
    "cars/annos": (make_cars, _break_cars_annos, "train", r"cannot read the MATLAB file .*train_annos\.mat"),
    "dtd": (make_dtd, _break_dtd, "train", r"train1\.txt line 2 is not 'CLASS/FILE\.jpg'"),
    "aircraft": (make_aircraft, _break_aircraft, "train", r"variant_train\.txt line 1: '747-400' is not in"),
    "stl10": (make_stl10, _break_stl10, "train", r"train_X\.bin holds 1000 bytes, not 6 images"),
    "cifar10": (make_cifar10, _break_cifar, "train", r"data_batch_2 row 0 has label 7, but .*meta names 3"),
    "pets": (make_pets, _break_pets, "trainval", r"test\.txt line 1 is not 'IMAGE_ID CLASS SPECIES BREED'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_layout_names_the_file(tmp_path: Path, case: str) -> None:
    maker, breaker, split, message = BROKEN[case]
    tree = maker(tmp_path)
    breaker(tree)
    with pytest.raises(DatasetError, match=message):
        open_dataset(f"{case.split('/')[0]}:{tmp_path}", split)
