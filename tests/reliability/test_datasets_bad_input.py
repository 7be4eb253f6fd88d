"""Bad dataset input (issue 11): each case is one `DatasetError` or `DatasetWarning` that names the file (and
row) and the fix, never a traceback, a silent wrong class count, or code run from a data file."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vitprobe.cli import app
from vitprobe.data import DatasetWarning, open_dataset
from vitprobe.errors import DatasetError

runner = CliRunner()


def _png(path: Path, size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def _one_line(result: object) -> str:
    """A CLI failure's output: exit code 1 and no traceback."""
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return result.output  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------- labels


def test_a_csv_label_typo_is_refused_with_its_row_not_a_hundred_million_classes(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "c.png")
    (tmp_path / "d.csv").write_text("path,label\na.png,0\nb.png,100000000\nc.png,1\n")
    with pytest.raises(DatasetError, match=r"d\.csv line 3 has label 100000000, but only 3 distinct") as info:
        open_dataset(f"csv:{tmp_path / 'd.csv'}", "all")
    assert "99999998 class(es) would have no image" in info.value.message
    assert "class indices 0..K-1" in (info.value.hint or "")
    (tmp_path / "gap.csv").write_text("path,label\na.png,0\nb.png,2\n")  # class 1 never occurs
    with pytest.raises(DatasetError, match=r"gap\.csv line 3 has label 2.*\(1\)"):
        open_dataset(f"csv:{tmp_path / 'gap.csv'}", "all")
    (tmp_path / "neg.csv").write_text("path,label\na.png,0\nb.png,-1\n")
    with pytest.raises(DatasetError, match=r"neg\.csv line 3 has the negative label -1"):
        open_dataset(f"csv:{tmp_path / 'neg.csv'}", "all")
    (tmp_path / "ok.csv").write_text("path,label\na.png,1\nb.png,0\nc.png,1\n")  # dense: accepted
    assert open_dataset(f"csv:{tmp_path / 'ok.csv'}", "all").class_names == ["0", "1"]


def test_an_empty_csv_label_is_refused_with_its_row(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text("path,label\na.png,cat\na.png, \n")
    with pytest.raises(DatasetError, match=r"d\.csv line 3 has an empty label") as info:
        open_dataset(f"csv:{tmp_path / 'd.csv'}", "all")
    assert "fill in the label" in (info.value.hint or "")


def test_a_non_utf8_csv_is_one_line_naming_the_file_and_the_byte(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_bytes("path,label\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"d\.csv is not UTF-8 text: byte 0xe9 on line 2") as info:
        open_dataset(f"csv:{tmp_path / 'd.csv'}", "all")
    assert "iconv" in (info.value.hint or "")
    output = _one_line(runner.invoke(app, ["data", "show", f"csv:{tmp_path / 'd.csv'}"]))
    assert "not UTF-8" in output and "d.csv" in output


def test_an_empty_class_folder_is_refused_and_a_class_missing_from_one_split_is_a_note(
    tmp_path: Path,
) -> None:
    flat = tmp_path / "flat"
    _png(flat / "cats" / "c.png")
    (flat / "dogs").mkdir()  # no images: would be a 0-image class
    with pytest.raises(
        DatasetError, match=r"1 class folder\(s\) hold no images in any split: .*flat/dogs"
    ) as info:
        open_dataset(f"imagefolder:{flat}", "all")
    assert "remove the empty folder" in (info.value.hint or "")
    split = tmp_path / "split"
    _png(split / "train" / "cats" / "c.png")
    _png(split / "train" / "dogs" / "d.png")
    _png(split / "val" / "cats" / "c2.png")
    (split / "val" / "dogs").mkdir()  # dogs has training images: val simply has none
    val = open_dataset(f"imagefolder:{split}", "val")
    assert val.class_names == ["cats", "dogs"] and any("no images in" in n and "dogs" in n for n in val.notes)
    (split / "train" / "dogs" / "d.png").unlink()  # now dogs has no image anywhere
    with pytest.raises(DatasetError, match="hold no images in any split"):
        open_dataset(f"imagefolder:{split}", "val")
    imagenet = tmp_path / "imagenet"
    _png(imagenet / "train" / "n01" / "a.png")
    (imagenet / "train" / "n02").mkdir()
    with pytest.raises(DatasetError, match=r"train/n02"):
        open_dataset(f"imagenet:{imagenet}", "train")


# --------------------------------------------------------------------------------------------- files


def _cub(top: Path, n: int = 3) -> Path:
    root = top / "CUB_200_2011"
    for i in range(1, n + 1):
        _png(root / "images" / "001.A" / f"{i}.jpg")
    (root / "images.txt").write_text("".join(f"{i} 001.A/{i}.jpg\n" for i in range(1, n + 1)))
    (root / "image_class_labels.txt").write_text("".join(f"{i} 1\n" for i in range(1, n + 1)))
    (root / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, n + 1)))
    (root / "classes.txt").write_text("1 001.A\n")
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 0 0 2 2\n" for i in range(1, n + 1)))
    return root


def test_one_missing_cub_image_is_named_not_answered_with_point_at_the_folder(tmp_path: Path) -> None:
    root = _cub(tmp_path)
    (root / "images" / "001.A" / "2.jpg").unlink()
    dataset = open_dataset(f"cub:{root}", "train")
    with pytest.raises(DatasetError, match=f"missing image {root / 'images/001.A/2.jpg'}") as info:
        dataset.load_image(1)
    assert (
        "restore the file, or remove it from" in (info.value.hint or "") and "images.txt" in info.value.hint
    )
    assert "point" not in (info.value.hint or "")


def test_a_cub_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    root = _cub(tmp_path)
    (root / "classes.txt").write_bytes(b"1 001.\xff\n")
    with pytest.raises(DatasetError, match=r"classes\.txt is not UTF-8 text: byte 0xff on line 1"):
        open_dataset(f"cub:{root}", "train")


def test_a_decompression_bomb_is_named_and_refused_above_twice_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's limit is lowered so the policy is tested on small files (89.5 Mpx by default)."""
    big = _png(tmp_path / "a" / "big.png", size=(40, 30))  # 1,200 px
    huge = _png(tmp_path / "a" / "huge.png", size=(50, 50))  # 2,500 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    dataset = open_dataset(f"imagefolder:{tmp_path}", "all")
    with pytest.warns(
        DatasetWarning,
        match=rf"image {big}: 0\.0 Mpx \(1,200 pixels\), above Pillow's decompression-bomb limit of 0\.0 Mpx",
    ):
        assert dataset.load_image(dataset.paths.index(big)).size == (40, 30)
    with pytest.warns(DatasetWarning, match=f"image {big}"):
        assert dataset.image_size(dataset.paths.index(big)) == (40, 30)
    with pytest.raises(
        DatasetError, match=f"image {huge} has .*more than twice Pillow's decompression-bomb"
    ) as info:
        dataset.load_image(dataset.paths.index(huge))
    assert "downscale" in (info.value.hint or "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing escapes unnamed: Pillow's own warning is replaced
        with pytest.raises(DatasetWarning, match=str(big)):
            dataset.load_image(dataset.paths.index(big))


def _corrupt_jpeg(tmp_path: Path) -> tuple[Path, Path]:
    """A healthy photo JPEG and a copy with 8 bytes of its entropy-coded data flipped (at 60 %)."""
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    start = data.find(b"\xff\xda")
    at = start + int((len(data) - start) * 0.6)
    good = tmp_path / "photos" / "good.jpg"
    bad = tmp_path / "photos" / "bad.jpg"
    good.parent.mkdir(parents=True)
    good.write_bytes(bytes(data))
    for i in range(at, at + 8):
        data[i] ^= 0x5A
    bad.write_bytes(bytes(data))
    return good, bad


def _libjpeg_says(path: Path) -> str:
    """What libjpeg itself prints decoding the file (through OpenCV, in a child process)."""
    code = f"import cv2; cv2.imread({str(path)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_a_jpeg_with_corrupt_scan_data_warns_naming_the_file(tmp_path: Path) -> None:
    good, bad = _corrupt_jpeg(tmp_path)
    assert "extraneous bytes before marker" in _libjpeg_says(bad)  # the reference decoder's own diagnosis
    assert _libjpeg_says(good) == ""
    dataset = open_dataset(f"imagefolder:{tmp_path}", "all")
    with pytest.warns(DatasetWarning, match=f"image {bad}: corrupt JPEG data") as record:
        image = dataset.load_image(dataset.paths.index(bad))
    assert image.size == (512, 512) and len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.load_image(dataset.paths.index(good))  # healthy: no warning at all
    plain = np.asarray(Image.open(good).convert("RGB"))
    assert np.array_equal(np.asarray(dataset.load_image(dataset.paths.index(good))), plain)  # same pixels


def test_negative_box_sizes_are_refused_in_csv_and_cub(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text("path,label,x,y,w,h\na.png,cat,1,1,3,3\na.png,cat,10,10,4,-2\n")
    with pytest.raises(DatasetError, match=r"d\.csv line 3: the box has width 4 and height -2") as info:
        open_dataset(f"csv:{tmp_path / 'd.csv'}", "all")
    assert "x2,y2" in info.value.message
    root = _cub(tmp_path)
    (root / "bounding_boxes.txt").write_text("1 0 0 2 2\n2 5 5 -3 2\n3 0 0 2 2\n")
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt line 2: the box has width -3"):
        open_dataset(f"cub:{root}", "train")


def test_a_bad_box_in_a_published_annotation_is_dropped_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    _png(data / "images" / "0001.jpg")
    _png(data / "images" / "0002.jpg")
    (data / "variants.txt").write_text("707-320\n")
    (data / "images_variant_test.txt").write_text("0001 707-320\n0002 707-320\n")
    (data / "images_box.txt").write_text("0001 1 1 5 3\n0002 9 2 4 3\n")  # xmax < xmin on line 2
    with pytest.warns(DatasetWarning, match=r"images_box\.txt line 2: it has width -5"):
        dataset = open_dataset(f"aircraft:{tmp_path}", "test")
    assert dataset.boxes == [[(1.0, 1.0, 4.0, 2.0)], []]
    assert any("images_box.txt line 2" in n for n in dataset.notes)


# --------------------------------------------------------------------------------------------- pickles


def _cifar(top: Path, batch: object) -> Path:
    """A cifar-10-batches-py folder whose data_batch_1 is `batch` (the other files benign)."""
    root = top / "cifar-10-batches-py"
    root.mkdir(parents=True)
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=4))
    benign = {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(benign, protocol=4))
    (root / "data_batch_1").write_bytes(
        batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=4)
    )
    return root


class _Exec:
    """Unpickling this calls `builtins.exec(code)`: what a malicious data file does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (self.code,)


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", ["exec", "system", "in_meta"])
def test_a_malicious_cifar_pickle_is_refused_and_its_payload_never_runs(
    tmp_path: Path, protocol: int, payload: str
) -> None:
    marker = tmp_path / "payload-ran"
    code = f"open({str(marker)!r}, 'w').close()"
    evil = _Exec(code) if payload != "system" else _System(f"touch {marker}")
    data = pickle.dumps({"data": evil, "labels": [0]}, protocol=protocol)
    if payload == "in_meta":
        root = _cifar(tmp_path / "ds", {"data": np.zeros((1, 3072), dtype=np.uint8), "labels": [0]})
        (root / "batches.meta").write_bytes(pickle.dumps({"label_names": evil}, protocol=protocol))
    else:
        root = _cifar(tmp_path / "ds", data)
    with pytest.raises(DatasetError, match="refused without running it") as info:
        open_dataset(f"cifar10:{root.parent}", "train")
    assert ("exec" if payload != "system" else "system") in info.value.message
    assert not marker.exists()
    output = _one_line(runner.invoke(app, ["data", "show", f"cifar10:{root.parent}"]))
    assert "refused without running it" in output and not marker.exists()
    pickle.loads(data if payload != "in_meta" else (root / "batches.meta").read_bytes())  # the control:
    assert marker.exists(), "an unrestricted unpickler does run this payload"  # the payload is live


def test_an_allowed_module_with_another_name_is_refused_too(tmp_path: Path) -> None:
    """The allow-list is (module, name) pairs: numpy.load or numpy.testing helpers are not arrays."""
    data = b"\x80\x02cnumpy\nload\nX\x05\x00\x00\x00x.npy\x85R."  # numpy.load('x.npy')
    root = _cifar(tmp_path, data)
    with pytest.raises(DatasetError, match=r"calls numpy\.load"):
        open_dataset(f"cifar10:{tmp_path}", "train")
    assert root.is_dir()


def test_a_cifar_batch_holding_objects_instead_of_pixels_is_refused(tmp_path: Path) -> None:
    _cifar(tmp_path, {"data": np.zeros((2, 5), dtype=np.int64), "labels": [0, 1]})
    with pytest.raises(DatasetError, match="has no 'data' array of uint8 rows"):
        open_dataset(f"cifar10:{tmp_path}", "train")
