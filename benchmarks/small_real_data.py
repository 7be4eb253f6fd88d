"""Small real-image datasets built from images that scikit-learn and scikit-image ship (no download).

Each is written as an `imagefolder:` tree with `train/` and `test/` splits:

- `digits`: scikit-learn's 1,797 handwritten digits (8×8, upsampled to 32×32), 10 classes, stratified
  2/3 : 1/3.
- `lfw`: scikit-image's LFW subset, 100 faces and 100 non-faces (25×25), 2 classes, stratified 60 : 40.
- `textures`: 40×40 tiles of 16 scikit-image photos and textures (brick, grass, gravel, camera, moon, ...),
  one class per source image, non-overlapping tiles assigned 2/3 : 1/3 to train / test.

    python benchmarks/small_real_data.py OUT_DIR      # writes OUT_DIR/{digits,lfw,textures}
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURE_SOURCES = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "moon",
    "coins",
    "text",
    "page",
    "cell",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


def _save(root: Path, split: str, cls: str, i: int, pixels: np.ndarray) -> None:
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def digits(root: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    train, test = train_test_split(np.arange(len(y)), test_size=1 / 3, random_state=0, stratify=y)
    for split, ids in (("train", train), ("test", test)):
        for i in ids:
            img = Image.fromarray((x[i].reshape(8, 8) * 255 / 16).astype(np.uint8))
            _save(root, split, f"digit{y[i]}", int(i), np.array(img.resize((32, 32), Image.BILINEAR)))


def lfw(root: Path) -> None:
    import skimage
    from sklearn.model_selection import train_test_split

    x = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")  # (200, 25, 25) in [0, 1]
    y = np.array([0] * 100 + [1] * 100)  # the file holds 100 faces, then 100 non-faces
    train, test = train_test_split(np.arange(200), test_size=0.4, random_state=0, stratify=y)
    for split, ids in (("train", train), ("test", test)):
        for i in ids:
            _save(root, split, ["face", "nonface"][y[i]], int(i), (x[i] * 255).astype(np.uint8))


def textures(root: Path, *, size: int = 40, per_class: int = 90) -> None:
    from skimage import color, data

    rng = np.random.default_rng(0)
    for name in TEXTURE_SOURCES:
        im = getattr(data, name)()
        if im.ndim == 3:
            im = (color.rgb2gray(im[..., :3]) * 255).astype(np.uint8)
        h, w = im.shape
        step = max(size, int(np.sqrt(h * w / per_class)))
        tiles = [(y, x) for y in range(0, h - size + 1, step) for x in range(0, w - size + 1, step)]
        order = rng.permutation(len(tiles))[:per_class]
        n_train = round(len(order) * 2 / 3)
        for j, t in enumerate(order):
            y0, x0 = tiles[t]
            _save(root, "train" if j < n_train else "test", name, j, im[y0 : y0 + size, x0 : x0 + size])


DATASETS: dict[str, Callable[[Path], None]] = {"digits": digits, "lfw": lfw, "textures": textures}


def build(out: Path, names: tuple[str, ...] = tuple(DATASETS)) -> dict[str, Path]:
    """Write each dataset under `out` (skipped when its folder exists); returns name -> folder."""
    folders = {}
    for name in names:
        folder = out / name
        if not (folder / "test").is_dir():
            DATASETS[name](folder)
        folders[name] = folder
    return folders


if __name__ == "__main__":
    for name, folder in build(Path(sys.argv[1])).items():
        counts = {s: sum(1 for _ in (folder / s).rglob("*.png")) for s in ("train", "test")}
        print(name, folder, counts)
