"""The synthetic "needles" dataset: textured images, each hiding one small class-defining glyph (CUB layout).

Every image is a random, class-independent texture (smooth colour blobs and two gratings) with one small
square "needle" pasted at a random place. The needle is a 4 x 4 black/white glyph; each class has its own
glyph and every glyph has the same number of white cells, so all needles share the same mean colour and the
class is decidable ONLY from the needle's spatial pattern. The needle is about 1/7 of the image side (2 x 2
patches of a ViT-B/16 at 224 px), so a probe that averages all tokens ([cls] or mean pooling) sees it diluted
among ~200 background tokens while a selective pooling (AbMILP) can attend to it.

Pixel values make the box checkable: the background is clipped to [16, 239] and the needle uses only 0 and
255, so a pixel is part of the needle exactly when all its channels are 0 or 255 (tests/test_synthetic.py).

The output is the official CUB_200_2011 layout (images.txt, image_class_labels.txt, train_test_split.txt,
bounding_boxes.txt, classes.txt, images/) plus `synthetic.json` recording how it was made, so
`open_dataset("cub:DIR", ...)` reads it like the real dataset. Same parameters -> identical PNG bytes.
File names and labels depend only on n and classes, so the dataset fingerprint (vitprobe.data) also hashes
`synthetic.json`: sets that differ only in size or seed get different fingerprints.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitprobe.errors import DatasetError

GENERATOR_VERSION = 1  # bump when the pixels a given config produces change
GLYPH_GRID = 4  # a needle is GLYPH_GRID x GLYPH_GRID cells
GLYPH_ON = 8  # white cells per glyph: equal for every class, so the needle's mean colour carries no class
GLYPH_MIN_HAMMING = 6  # glyphs of two classes differ in at least this many cells
BACKGROUND_RANGE = (16, 239)  # background pixel values; the needle uses only 0 and 255
_GLYPH_TABLE_SEED = 20240601  # fixed: glyph k looks the same for every seed, n and size
_BATCH = 64  # images generated per vectorised batch (also the unit of the per-batch random stream)


@dataclass(frozen=True)
class SyntheticConfig:
    """How a needles dataset is made; written to `synthetic.json` next to the images (and fingerprinted)."""

    n: int = 2000  # images in total; split half train / half test, balanced over classes
    classes: int = 10  # K: number of glyphs (classes)
    size: int = 224  # image side in pixels (square images)
    seed: int = 0  # seeds the textures, needle positions and the split; glyphs do not depend on it

    def validate(self) -> None:
        """Raise `DatasetError` for values the generator cannot honour."""
        max_classes = len(glyph_table())
        if not 2 <= self.classes <= max_classes:
            raise DatasetError(
                f"synthetic needles: classes={self.classes} is out of range",
                f"use 2 <= classes <= {max_classes}",
            )
        if self.n < 2 * self.classes:
            raise DatasetError(
                f"synthetic needles: n={self.n} is too small for {self.classes} classes",
                f"use n >= {2 * self.classes} so every class has a train and a test image",
            )
        if self.size < 16:
            raise DatasetError(f"synthetic needles: size={self.size} is too small", "use size >= 16")
        if self.seed < 0:
            raise DatasetError(f"synthetic needles: seed={self.seed} is negative", "use a seed >= 0")

    @property
    def needle_side(self) -> int:
        """Side of the needle in pixels: 4 cells of round(size / 28) px, i.e. about size / 7."""
        return GLYPH_GRID * max(1, round(self.size / (7 * GLYPH_GRID)))

    @property
    def name(self) -> str:
        """Folder name under `$VITPROBE_HOME/synthetic/` that identifies this config and generator version."""
        return f"needles-v{GENERATOR_VERSION}-n{self.n}-c{self.classes}-s{self.size}-seed{self.seed}"


def glyph_table() -> np.ndarray:
    """All class glyphs, (G, GLYPH_GRID, GLYPH_GRID) bool, in a fixed order; class k uses glyph k.

    Greedy pick over the 4x4 patterns with GLYPH_ON white cells, in a fixed random order, keeping a pattern
    when it differs from every kept one in at least GLYPH_MIN_HAMMING cells.
    """
    if _GLYPHS:
        return _GLYPHS[0]
    cells = GLYPH_GRID * GLYPH_GRID
    patterns = np.zeros((0, cells), dtype=bool)
    all_patterns = np.array(
        [[c in combo for c in range(cells)] for combo in itertools.combinations(range(cells), GLYPH_ON)]
    )  # (C(16, 8), 16)
    order = np.random.default_rng(_GLYPH_TABLE_SEED).permutation(len(all_patterns))
    for candidate in all_patterns[order]:
        if len(patterns) == 0 or (patterns != candidate).sum(axis=1).min() >= GLYPH_MIN_HAMMING:
            patterns = np.concatenate([patterns, candidate[None]])
    _GLYPHS.append(patterns.reshape(-1, GLYPH_GRID, GLYPH_GRID))  # (G, 16) -> (G, 4, 4)
    return _GLYPHS[0]


_GLYPHS: list[np.ndarray] = []


def class_names(classes: int) -> list[str]:
    """CUB-style class folder names, `001.needle_00`, ... (the number is 1-based like CUB's)."""
    return [f"{k + 1:03d}.needle_{k:02d}" for k in range(classes)]


def make_synthetic(
    out_dir: Path | str, *, n: int = 2000, classes: int = 10, size: int = 224, seed: int = 0
) -> Path:
    """Generate a needles dataset into `out_dir` (which must not exist or be empty), atomically.

    The images are written to a temporary sibling folder that is renamed to `out_dir` only when complete, so a
    crash never leaves a half-written dataset behind.

    Args:
        out_dir: folder to create; it becomes the CUB root (open it with `cub:out_dir`).
        n: number of images (half train, half test; classes balanced).
        classes: number of classes K.
        size: image side in pixels.
        seed: random seed; the same arguments always give identical files.

    Returns:
        `out_dir` as a Path.
    """
    config = SyntheticConfig(n=n, classes=classes, size=size, seed=seed)
    config.validate()
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(
            f"synthetic needles: {out_dir} already exists and is not empty",
            "choose a new folder or delete this one",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_folder(out_dir)
    try:
        _write_dataset(tmp, config)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace cannot replace a directory
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_synthetic(config: SyntheticConfig, home: Path) -> Path:
    """Return `home/synthetic/<config.name>`, generating it first if it is not there yet.

    Safe when several processes ask at once: each generates into its own temporary folder and the first rename
    wins; the others discard their copy.
    """
    config.validate()
    target = home / "synthetic" / config.name
    if (target / "synthetic.json").is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise DatasetError(
            f"synthetic needles: {target} exists but has no synthetic.json (not made by vitprobe)",
            f"delete {target}; it is regenerated on the next use",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_folder(target)
    try:
        _write_dataset(tmp, config)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "synthetic.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _temporary_folder(final: Path) -> Path:
    """An empty sibling folder of `final` to generate into, with the usual permissions (0777 & ~umask).

    `mkdtemp` creates 0700 folders; renamed into place as they are, a dataset would be unreadable to other
    users (a shared data folder, a container running as another user).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _write_dataset(root: Path, config: SyntheticConfig) -> None:
    """Write every image and the CUB metadata files of `config` into the existing folder `root`."""
    names = class_names(config.classes)
    labels = np.arange(config.n) % config.classes  # balanced: image i has class i mod K
    is_train = (np.arange(config.n) // config.classes) % 2 == 0  # alternate rounds of K images: ~half train
    side = config.needle_side
    rel_paths = [f"{names[labels[i]]}/needle_{labels[i]:02d}_{i:06d}.png" for i in range(config.n)]
    for name in names:
        (root / "images" / name).mkdir(parents=True)
    boxes = np.zeros((config.n, 2), dtype=np.int64)  # (x, y) of each needle's top-left corner

    batches = range(0, config.n, _BATCH)
    workers = min(8, os.cpu_count() or 1)  # PNG encoding releases the GIL; files are independent
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Future[None]] = []
        for start in _track(batches, total=len(batches), description="generating needles"):
            stop = min(start + _BATCH, config.n)
            rng = np.random.default_rng([config.seed, start // _BATCH])
            images, corners = render_batch(rng, labels[start:stop], size=config.size, side=side)
            boxes[start:stop] = corners
            for future in pending:  # the previous batch was written while this one rendered
                future.result()
            pending = [
                pool.submit(_save_png, image, root / "images" / rel_paths[start + offset])
                for offset, image in enumerate(images)
            ]
        for future in pending:
            future.result()

    ids = range(1, config.n + 1)  # CUB ids and labels are 1-based
    _write_lines(root / "images.txt", [f"{i} {rel_paths[i - 1]}" for i in ids])
    _write_lines(root / "image_class_labels.txt", [f"{i} {labels[i - 1] + 1}" for i in ids])
    _write_lines(root / "train_test_split.txt", [f"{i} {int(is_train[i - 1])}" for i in ids])
    _write_lines(
        root / "bounding_boxes.txt",
        [f"{i} {float(boxes[i - 1, 0])} {float(boxes[i - 1, 1])} {float(side)} {float(side)}" for i in ids],
    )
    _write_lines(root / "classes.txt", [f"{k + 1} {name}" for k, name in enumerate(names)])
    meta = {"generator": "needles", "version": GENERATOR_VERSION, **asdict(config), "needle_side": side}
    (root / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def render_batch(
    rng: np.random.Generator, labels: np.ndarray, *, size: int, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one batch of needle images.

    Args:
        rng: the batch's random stream (textures and positions are drawn from it, in a fixed order).
        labels: (B,) class of each image.
        size: image side in pixels.
        side: needle side in pixels (a multiple of GLYPH_GRID).

    Returns:
        images (B, size, size, 3) uint8 and the needles' top-left corners (B, 2) as (x, y).
    """
    b = len(labels)
    images = _texture(rng, b, size) * 255.0  # (B, S, S, 3) float64
    low, high = BACKGROUND_RANGE
    images = np.clip(np.rint(images, out=images), low, high, out=images)
    images = np.ascontiguousarray(images.astype(np.uint8))  # (B, S, S, 3) uint8

    corners = rng.integers(0, size - side + 1, size=(b, 2))  # (B, 2): x, y
    cell = side // GLYPH_GRID
    glyphs = glyph_table()[labels]  # (B, 4, 4) bool
    needles = glyphs.repeat(cell, axis=1).repeat(cell, axis=2)  # (B, side, side)
    needles = np.where(needles, 255, 0).astype(np.uint8)
    for j in range(b):  # B small pastes; the texture above is the vectorised part
        x, y = corners[j]
        images[j, y : y + side, x : x + side, :] = needles[j, :, :, None]
    return images, corners


def _texture(rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    """Class-independent backgrounds, (B, S, S, 3) float64 around [0, 1]: colour blobs plus two gratings.

    Each channel is a sum of separable terms, i.e. a rank-10 matrix `left @ right.T`: one batched matmul
    instead of many passes over (B, S, S, 3) arrays. float64 keeps the uint8 rounding stable.
    """
    # Smooth colour blobs: a random 6 x 6 colour grid, bilinearly upsampled: W @ grid_c @ W.T per channel.
    coarse = rng.uniform(0.2, 0.8, size=(b, 3, 6, 6))  # (B, 3, 6, 6)
    weights = _bilinear_weights(6, size)  # (S, 6)
    lefts = [weights @ coarse]  # (B, 3, S, 6)
    rights = [np.broadcast_to(weights, (b, 1, size, 6))]  # (B, 1, S, 6)

    # Two gratings (coarse and fine) with random period, orientation, phase, amplitude and colour:
    # sin(u_x + v_y) = cos(v_y) sin(u_x) + sin(v_y) cos(u_x), a rank-2 term per channel.
    coords = np.arange(size, dtype=np.float64)
    for low, high, max_amplitude in ((12.0, 48.0, 0.15), (3.0, 10.0, 0.08)):
        period = rng.uniform(low, high, size=(b, 1))
        angle = rng.uniform(0.0, np.pi, size=(b, 1))
        phase = rng.uniform(0.0, 2 * np.pi, size=(b, 1))
        amplitude = rng.uniform(0.0, max_amplitude, size=(b, 1))
        colour = rng.uniform(-1.0, 1.0, size=(b, 3))
        u = 2 * np.pi * np.cos(angle) / period * coords + phase  # (B, S) along x
        v = 2 * np.pi * np.sin(angle) / period * coords  # (B, S) along y
        scale = (amplitude * colour)[:, :, None, None]  # (B, 3, 1, 1)
        lefts.append(scale * np.stack([np.cos(v), np.sin(v)], axis=-1)[:, None])  # (B, 3, S, 2)
        rights.append(np.stack([np.sin(u), np.cos(u)], axis=-1)[:, None])  # (B, 1, S, 2)
    left = np.concatenate(lefts, axis=-1)  # (B, 3, S, 10) over y
    right = np.concatenate([np.broadcast_to(r, (b, 1, size, r.shape[-1])) for r in rights], axis=-1)  # x
    channels = left @ right.transpose(0, 1, 3, 2)  # (B, 3, S, 10) @ (B, 1, 10, S) -> (B, 3, S, S)
    return channels.transpose(0, 2, 3, 1)  # (B, 3, S, S) -> (B, S, S, 3), a view


def _bilinear_weights(n: int, size: int) -> np.ndarray:
    """(size, n) matrix that linearly interpolates n grid values onto `size` evenly spaced pixels."""
    pos = np.linspace(0.0, n - 1.0, size)
    i0 = np.minimum(pos.astype(np.int64), n - 2)
    t = pos - i0
    weights = np.zeros((size, n))
    weights[np.arange(size), i0] = 1 - t
    weights[np.arange(size), i0 + 1] = t
    return weights


def _save_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 array as PNG (zlib level 1: several times faster than 6, ~15% larger)."""
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _track(items: range, *, total: int, description: str):  # noqa: ANN202 - a generator over `items`
    """Iterate with a rich progress bar on a terminal; silently otherwise."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    return track(items, total=total, description=description, console=console,
                 disable=not console.is_terminal, transient=True)  # fmt: skip
