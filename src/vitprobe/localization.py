"""Localisation: per-patch maps → score maps at image resolution → boxes → MaxBoxAccV2 (Choe et al.).

The metric follows "Evaluating Weakly Supervised Object Localization Methods Right" (Choe et al., CVPR 2020;
clovaai/wsolevaluation), box evaluation with `multi_contour_eval` and `multi_iou_eval` on:

1. Each score map is upsampled (bicubic) to image resolution and min-max normalised to [0, 1]; a constant map
   becomes all zeros.
2. For every threshold τ in [0, 1) with step 0.01 the map is binarised (score > τ) and every connected region
   gives a box: the bounding rectangle of each contour, outer borders and hole borders alike (OpenCV's
   `findContours(RETR_TREE)`), with OpenCV's exclusive right/bottom edge clipped to the last pixel.
   No region at all gives the box (0, 0, 0, 0).
3. An image is correct at IoU δ when the best IoU between any predicted box and any ground-truth box is ≥ δ
   (IoU with inclusive pixel coordinates, `+1` in widths, as the reference).
4. BoxAcc(τ, δ) is the fraction of correct images; MaxBoxAcc(δ) = max_τ BoxAcc(τ, δ); MaxBoxAccV2 is the mean
   of MaxBoxAcc over δ ∈ {30, 50, 70} %.

The reference evaluates at the 224×224 network input with boxes rescaled to it; vitprobe evaluates in the
original image's pixels, mapping each pixel back through the model's eval transform (resize + centre crop), so
boxes need no rescaling and pixels cut away by the crop score 0. The reference quantises maps to 8 bits
before thresholding; vitprobe compares the float map with τ, as the paper defines it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitprobe.errors import VitprobeError

if TYPE_CHECKING:
    import torch

THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(100))  # τ in [0, 1), step 0.01 (the paper's default)
IOU_THRESHOLDS = (30, 50, 70)  # δ in percent, MaxBoxAccV2's three IoU levels


class LocalizationError(VitprobeError):
    """Maps and boxes that cannot be evaluated together (missing boxes, mismatched indices or shapes)."""


# ----------------------------------------------------------------------------------------------------------
# From the model input back to the original image


@dataclass(frozen=True)
class InputView:
    """Where the model's input window lies in the original image, in original pixels.

    A model input pixel (u, v) came from original pixel ((u + left) / scale_x, (v + top) / scale_y), where
    the image was resized by (scale_x, scale_y) and then cropped at (left, top) to (width, height).
    """

    scale_x: float
    scale_y: float
    left: float
    top: float
    width: int
    height: int

    @classmethod
    def whole_image(cls, image_size: tuple[int, int], input_size: tuple[int, int]) -> InputView:
        """The whole image squashed to the input size (the reference's 224×224 resize, no crop)."""
        (w, h), (iw, ih) = image_size, input_size
        return cls(iw / w, ih / h, 0.0, 0.0, iw, ih)


def eval_input_view(image_size: tuple[int, int], data_config: Mapping[str, Any]) -> InputView:
    """The window timm's eval transform (`transforms_imagenet_eval`) cuts out of an image of `image_size`.

    Args:
        image_size: (width, height) of the original image.
        data_config: timm's resolved data config (`input_size`, `crop_pct`, `crop_mode`).
    """
    w, h = image_size
    _, ih, iw = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875
    crop_mode = data_config.get("crop_mode") or "center"
    sh, sw = math.floor(ih / crop_pct), math.floor(iw / crop_pct)
    if crop_mode == "squash":
        rw, rh = sw, sh
    elif crop_mode == "border" or sh != sw:  # longest edge to the scale size (ResizeKeepRatio), then crop/pad
        ratio = max(w / sw, h / sh) if crop_mode == "border" else min(w / sw, h / sh)
        rw, rh = round(w / ratio), round(h / ratio)
    else:  # torchvision Resize(int): the shorter side to `sh`, the longer one truncated
        if w <= h:
            rw, rh = sh, int(sh * h / w)
        else:
            rw, rh = int(sh * w / h), sh
    left = int(round((rw - iw) / 2.0))  # torchvision CenterCrop (negative when it pads)
    top = int(round((rh - ih) / 2.0))
    return InputView(rw / w, rh / h, float(left), float(top), iw, ih)


def scoremap_at_image(
    patch_map: np.ndarray | torch.Tensor, image_size: tuple[int, int], view: InputView | None = None
) -> np.ndarray:
    """Upsample a per-patch map (h, w) to a min-max normalised score map (H, W) over the original image.

    Pixels are sampled bicubically (clamped at the border, as `F.interpolate(mode="bicubic")` and OpenCV's
    INTER_CUBIC) at their centres mapped into the model input; pixels the crop cut away score 0.

    Args:
        patch_map: one score per patch, (h, w).
        image_size: (width, height) of the original image.
        view: where the model input lies in the image; default: the whole image resized to the patch grid.

    Returns:
        float64 array (H, W) in [0, 1]; all zeros when the map is constant inside the view.
    """
    import torch
    import torch.nn.functional as F

    grid = torch.as_tensor(patch_map).detach().to("cpu", torch.float64)  # (h, w)
    if grid.ndim != 2:
        raise LocalizationError(f"a patch map must be 2-D (h, w), got shape {tuple(grid.shape)}")
    gh, gw = grid.shape
    w, h = image_size
    view = view or InputView.whole_image(image_size, (gw, gh))
    # original pixel centres → model input coordinates → normalised [-1, 1] over the input window
    u = (torch.arange(w, dtype=torch.float64) + 0.5) * view.scale_x - view.left  # (W,)
    v = (torch.arange(h, dtype=torch.float64) + 0.5) * view.scale_y - view.top  # (H,)
    gx = 2.0 * u / view.width - 1.0
    gy = 2.0 * v / view.height - 1.0
    inside = (gy.abs() <= 1.0)[:, None] & (gx.abs() <= 1.0)[None, :]  # (H, W)
    sample_grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # (H, W, 2) as (x, y)
    up = F.grid_sample(
        grid[None, None], sample_grid[None], mode="bicubic", padding_mode="border", align_corners=False
    )[0, 0]  # (H, W)
    scores = up.numpy()
    mask = inside.numpy()
    out = np.zeros((h, w), dtype=np.float64)
    if not mask.any() or not np.isfinite(scores[mask]).all():
        return out
    lo, hi = scores[mask].min(), scores[mask].max()
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):  # constant (up to bicubic round-off)
        return out
    out[mask] = (scores[mask] - lo) / (hi - lo)
    return out


# ----------------------------------------------------------------------------------------------------------
# Boxes and IoU


def boxes_from_mask(mask: np.ndarray) -> np.ndarray:
    """Boxes (K, 4) as x0, y0, x1, y1 of every contour of a binary mask, as OpenCV's RETR_TREE finds them.

    Outer borders: one per 8-connected foreground region, its bounding rectangle. Hole borders: one per
    4-connected background region not touching the image edge; the border pixels around a hole extend one
    pixel beyond it on every side. OpenCV's `boundingRect` gives x + w, one past the last pixel, which the
    reference clips to the last column/row. No foreground gives [[0, 0, 0, 0]].
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros((1, 4), dtype=np.int64)
    # work on the foreground's bounding box plus a one-pixel background margin (where the image allows):
    # a background region reaching the crop's edge reaches the margin or the image edge, so it is no hole
    top, left = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
    sub = mask[top : rows[-1] + 2, left : cols[-1] + 2]  # (h', w') crop
    labels, count = ndimage.label(sub, structure=_EIGHT)  # 8-connected foreground
    boxes = [[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for sl in ndimage.find_objects(labels)]
    if euler_number(sub) != count:  # some region has a hole (Euler number = regions - holes)
        sh, sw = sub.shape
        holes, _ = ndimage.label(~sub)  # 4-connected background
        for sl in ndimage.find_objects(holes):
            if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == sh or sl[1].stop == sw:
                continue  # touches the edge: the outside, not a hole
            boxes.append([sl[1].start - 1, sl[0].start - 1, sl[1].stop + 1, sl[0].stop + 1])
    out = np.asarray(boxes, dtype=np.int64) + np.array([left, top, left, top])  # (K, 4) in image pixels
    out[:, 2] = np.minimum(out[:, 2], w - 1)
    out[:, 3] = np.minimum(out[:, 3], h - 1)
    return out


_EIGHT = np.ones((3, 3), dtype=int)


def euler_number(mask: np.ndarray) -> int:
    """Euler number (regions − holes) of a binary mask, 8-connected foreground, by Gray's 2×2 quad counts.

    E = (n₁ − n₃ − 2·n_d) / 4 over all 2×2 windows of the zero-padded mask, with n₁ / n₃ windows holding one /
    three foreground pixels and n_d the two diagonal patterns (Gray 1971; Pratt, Digital Image Processing).
    """
    m = np.pad(np.asarray(mask, dtype=np.int8), 1)
    a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]  # the 2×2 window's corners
    total = a + b + c + d
    diagonal = (total == 2) & (a == d)  # two pixels on one diagonal
    n1, n3, nd = int((total == 1).sum()), int((total == 3).sum()), int(diagonal.sum())
    return (n1 - n3 - 2 * nd) // 4


def boxes_from_scoremap(scoremap: np.ndarray, threshold: float) -> np.ndarray:
    """All contour boxes (K, 4) of `scoremap > threshold`."""
    return boxes_from_mask(np.asarray(scoremap) > threshold)


def xywh_to_xyxy(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Dataset boxes (x, y, w, h) → (x0, y0, x1, y1) = (x, y, x + w, y + h), the reference's conversion."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (K, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (A, B) of boxes (A, 4) and (B, 4) in x0, y0, x1, y1 with inclusive pixel edges (widths + 1).

    Degenerate unions (≤ 0) give IoU 0, as in the reference.
    """
    a = np.asarray(a, dtype=np.float64)[:, None, :]  # (A, 1, 4)
    b = np.asarray(b, dtype=np.float64)[None, :, :]  # (1, B, 4)
    iw = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih  # (A, B)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_iou_per_threshold(
    scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> np.ndarray:
    """For each τ, the best IoU (T,) between any box of `scoremap > τ` and any ground-truth box (x0y0x1y1)."""
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty(len(thresholds))
    previous: bytes | None = None
    for t, tau in enumerate(thresholds):
        mask = scoremap > tau
        key = np.packbits(mask).tobytes()
        if key != previous:  # neighbouring thresholds often give the same mask
            best = float(box_iou(boxes_from_mask(mask), gt).max())
            previous = key
        out[t] = best
    return out


# ----------------------------------------------------------------------------------------------------------
# The metric


@dataclass
class BoxAccuracy:
    """Streaming BoxAcc(τ, δ): add images one at a time; memory stays (δ, τ) counts."""

    thresholds: Sequence[float] = THRESHOLDS
    iou_thresholds: Sequence[int] = IOU_THRESHOLDS
    correct: np.ndarray = field(init=False)  # (D, T) number of correct images
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.correct = np.zeros((len(self.iou_thresholds), len(self.thresholds)), dtype=np.int64)

    def add(self, scoremap: np.ndarray, gt_boxes_xyxy: np.ndarray) -> np.ndarray:
        """Score one normalised map (H, W) against its ground-truth boxes; returns the best IoU per τ (T,)."""
        best = best_iou_per_threshold(scoremap, gt_boxes_xyxy, self.thresholds)  # (T,)
        delta = np.asarray(self.iou_thresholds, dtype=np.float64)[:, None] / 100.0  # (D, 1)
        self.correct += best[None, :] >= delta
        self.count += 1
        return best

    def box_acc(self) -> np.ndarray:
        """BoxAcc(δ, τ) in percent, (D, T)."""
        if self.count == 0:
            raise LocalizationError("no images were scored", "check that the maps and the dataset overlap")
        return 100.0 * self.correct / self.count

    def result(self) -> MaxBoxAccResult:
        """MaxBoxAcc per δ, the τ that reaches it, and MaxBoxAccV2."""
        acc = self.box_acc()  # (D, T)
        best_t = acc.argmax(axis=1)  # (D,)
        per_delta = {int(d): float(acc[i, best_t[i]]) for i, d in enumerate(self.iou_thresholds)}
        return MaxBoxAccResult(
            max_box_acc_v2=float(np.mean(list(per_delta.values()))),
            max_box_acc=per_delta,
            best_threshold={
                int(d): float(self.thresholds[best_t[i]]) for i, d in enumerate(self.iou_thresholds)
            },
            box_acc=acc.tolist(),
            thresholds=[float(t) for t in self.thresholds],
            num_images=self.count,
        )


@dataclass
class MaxBoxAccResult:
    """MaxBoxAccV2 and its parts, all in percent."""

    max_box_acc_v2: float  # mean of MaxBoxAcc over the IoU thresholds
    max_box_acc: dict[int, float]  # δ (percent) → max_τ BoxAcc(τ, δ)
    best_threshold: dict[int, float]  # δ → the τ reaching it (first one on ties)
    box_acc: list[list[float]]  # (D, T) BoxAcc curve
    thresholds: list[float]  # the τ grid
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_box_acc"] = {str(k): v for k, v in self.max_box_acc.items()}
        d["best_threshold"] = {str(k): v for k, v in self.best_threshold.items()}
        return d


def max_box_acc_v2(
    scoremaps: Iterable[np.ndarray],
    gt_boxes_xyxy: Iterable[np.ndarray],
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    iou_thresholds: Sequence[int] = IOU_THRESHOLDS,
) -> MaxBoxAccResult:
    """MaxBoxAccV2 of normalised score maps (each (H, W) in [0, 1]) against their boxes (K, 4) x0y0x1y1."""
    acc = BoxAccuracy(thresholds, iou_thresholds)
    for scoremap, boxes in zip(scoremaps, gt_boxes_xyxy, strict=True):
        acc.add(np.asarray(scoremap, dtype=np.float64), boxes)
    return acc.result()


def best_box(scoremap: np.ndarray, gt_boxes_xyxy: np.ndarray, threshold: float) -> np.ndarray:
    """The predicted box (4,) at τ that best matches the ground truth (for figures)."""
    boxes = boxes_from_scoremap(scoremap, threshold)
    return boxes[int(box_iou(boxes, gt_boxes_xyxy).max(axis=1).argmax())]


# ----------------------------------------------------------------------------------------------------------
# `vitprobe analyze localization`

SCHEMA_VERSION = 1  # bump when a key of localization.json changes meaning
MAP_SOURCES = {
    "cls_attention": "[cls]→patch attention of the last block, heads averaged (post-softmax, patch keys)",
    "abmilp": "the trained AbMILP head's softmax scores over patches (`probe --predict --export-maps`)",
    "attentive": "the trained attentive read-out's softmax attention over patches, averaged over its queries "
    "(`probe --predict --export-maps`)",
}
EXPORTED_POOLS = ("abmilp", "attentive")  # heads whose `probe --predict --export-maps` writes per-patch maps


@dataclass(frozen=True)
class LocalizationConfig:
    """How `vitprobe analyze localization` runs; written into localization.json."""

    data: str  # dataset spec with boxes (cub:, synthetic:needles, csv: with x,y,w,h)
    split: str  # split the maps belong to (the probe's test split)
    out: str  # directory for localization.json and the box figures
    model: str | None = None  # backbone for the [cls] attention maps; None: only --abmilp-maps are scored
    checkpoint: str | None = None  # its official checkpoint file or URL
    random_init: bool = False  # random weights (tests, offline demo); every output says so
    abmilp_maps: str | None = None  # `probe --predict --export-maps` of an abmilp or attentive head
    cache: str | None = None  # token cache of those maps: gives the eval transform and the backbone identity
    limit: int | None = None  # evenly spaced images to score ([cls] pass and exported maps alike); None = all
    batch_size: int = 32  # images per forward pass for the [cls] maps
    num_workers: int = 0  # DataLoader workers for the [cls] pass
    device: str = "auto"  # auto = CUDA when available
    n_figures: int = 6  # images drawn with their true and predicted boxes, per map
    seed: int = 0  # seeds torch before building the model: random init matches `extract --seed` weights


@dataclass
class LocalizationRun:
    """What `run_localization` wrote."""

    json_path: Path
    figures: list[Path]
    result: dict[str, Any]


def cls_attention_maps(backbone: Any, loader: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The last block's [cls]→patch attention, heads averaged, for every image of `loader`.

    Uses the explicit attention of `vitprobe.analysis.attention` (timm's fused SDPA hides the weights).

    Returns:
        maps (n, h, w) float32 and the dataset indices (n,) they belong to.
    """
    from vitprobe.analysis import forward_pass
    from vitprobe.analysis.attention import TokenLayout, attention_hooks

    layout = TokenLayout.of(backbone)
    last = backbone.depth - 1
    h, w = layout.grid
    maps: list[np.ndarray] = []

    def on_block(block: int, x: torch.Tensor, attn: torch.Tensor, y: torch.Tensor) -> None:
        if block == last:
            cls_row = attn[:, :, 0, layout.num_prefix :].float().mean(1)  # (B, H, N) -> (B, N)
            maps.append(cls_row.reshape(-1, h, w).cpu().numpy())  # (B, N) -> (B, h, w)

    with attention_hooks(backbone.model, on_block):
        forward_pass(backbone, loader, device, description="[cls] maps")
    indices = np.asarray(loader.dataset.indices, dtype=np.int64)
    return np.concatenate(maps), indices


def read_exported_maps(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Maps (n, h, w), dataset indices (n,) and the head's pool, from `probe --predict HEAD --export-maps`.

    The pool ("abmilp" or "attentive") is the file's `pool` metadata, which `vitprobe.probe.predict` writes;
    a file without it is taken as AbMILP maps.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise LocalizationError(
            f"--abmilp-maps {path}: no such file",
            "write it with `vitprobe probe --predict RUN/heads/abmilp.safetensors --cache CACHE "
            "--export-maps FILE` (or heads/attentive.safetensors)",
        )
    tensors = load_file(str(path))
    if "maps" not in tensors or "indices" not in tensors or tensors["maps"].ndim != 3:
        raise LocalizationError(
            f"{path}: expected tensors 'maps' (n, h, w) and 'indices' (n,), found {sorted(tensors)}",
            "pass the file written by `vitprobe probe --predict ... --export-maps FILE`",
        )
    maps, indices = tensors["maps"].astype(np.float32), tensors["indices"].astype(np.int64)
    if len(maps) != len(indices):
        raise LocalizationError(f"{path}: {len(maps)} maps but {len(indices)} indices", "re-export the maps")
    with safe_open(str(path), framework="np") as f:
        pool = (f.metadata() or {}).get("pool", "abmilp")
    if pool not in EXPORTED_POOLS:
        raise LocalizationError(
            f"{path}: maps of a {pool!r} head; localisation scores {' or '.join(EXPORTED_POOLS)} maps",
            "export them from heads/abmilp.safetensors or heads/attentive.safetensors",
        )
    return maps, indices, pool


def score_maps(
    maps: np.ndarray,
    indices: np.ndarray,
    dataset: Any,
    data_config: Mapping[str, Any],
    *,
    n_keep: int = 0,
    on_progress: Any = None,
) -> tuple[MaxBoxAccResult, list[tuple[int, np.ndarray]]]:
    """MaxBoxAccV2 of per-patch maps (n, h, w) against the dataset's boxes, in original image pixels.

    Args:
        maps: one per-patch map per image.
        indices: the dataset index of each map.
        dataset: a `vitprobe.data.ImageDataset` with `boxes` and `image_size(i)`.
        data_config: the eval transform the maps were made under (timm data config).
        n_keep: keep the score maps of this many leading images (for figures).
        on_progress: called with 1 after each image.

    Returns:
        The metric and [(dataset index, score map (H, W))] for the kept images.
    """
    if dataset.boxes is None:
        raise LocalizationError(
            f"{dataset.spec} ({dataset.split}) has no boxes",
            "localisation needs boxes: cub:DIR, synthetic:needles or csv: with x,y,w,h columns",
        )
    acc = BoxAccuracy()
    kept: list[tuple[int, np.ndarray]] = []
    for patch_map, index in zip(maps, indices, strict=True):
        index = int(index)
        if not 0 <= index < len(dataset):
            raise LocalizationError(
                f"a map for dataset index {index}, but {dataset.spec} ({dataset.split}) has "
                f"{len(dataset)} images",
                "score maps against the dataset split they were made from",
            )
        size = dataset.image_size(index)
        scoremap = scoremap_at_image(patch_map, size, eval_input_view(size, data_config))
        acc.add(scoremap, xywh_to_xyxy(dataset.boxes[index]))
        if len(kept) < n_keep:
            kept.append((index, scoremap))
        if on_progress is not None:
            on_progress(1)
    return acc.result(), kept


def run_localization(config: LocalizationConfig, *, backbone: Any = None) -> LocalizationRun:
    """`vitprobe analyze localization`: MaxBoxAccV2 of [cls] attention and/or exported maps; JSON + figures.

    `backbone`: an already loaded `Backbone` that `config.model` describes (else that model is loaded).

    Exported maps (`--abmilp-maps`) are named by the pool of the head that made them: "abmilp" or "attentive".
    """
    from vitprobe.analysis import make_loader, open_subset, select_indices
    from vitprobe.data import open_dataset
    from vitprobe.devices import resolve_device
    from vitprobe.files import read_json, write_json
    from vitprobe.progress import progress_bar
    from vitprobe.provenance import versions

    if config.model is None and config.abmilp_maps is None:
        raise LocalizationError(
            "nothing to score: give --model (for [cls] attention maps) and/or --abmilp-maps FILE",
            "e.g. vitprobe analyze localization --model mae-b16 --data cub:DIR --split test --out RUN",
        )
    dataset = open_dataset(config.data, config.split)
    if dataset.boxes is None:
        raise LocalizationError(
            f"{config.data} ({config.split}) has no boxes",
            "localisation needs boxes: cub:DIR, synthetic:needles or csv: with x,y,w,h columns",
        )
    manifest = None
    if config.cache is not None:
        manifest_path = Path(config.cache) / "manifest.json"
        if not manifest_path.is_file():
            raise LocalizationError(
                f"--cache {config.cache}: no manifest.json", "pass a token cache directory"
            )
        manifest = read_json(manifest_path)
        _check_same_images(manifest, dataset, config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    kept: dict[str, list[tuple[int, np.ndarray]]] = {}
    notes: list[str] = []
    model_info: dict[str, Any] | None = None
    random_init = bool(manifest and manifest.get("model", {}).get("random_init"))
    data_config: Mapping[str, Any] | None = manifest.get("transform") if manifest else None
    device = resolve_device(config.device)

    if config.model is not None:
        import torch

        from vitprobe.models import load_backbone

        torch.manual_seed(config.seed)
        if backbone is None:
            backbone = load_backbone(
                config.model, checkpoint=config.checkpoint, random_init=config.random_init, device=str(device)
            )
        backbone.model.to(device).eval()
        model_info = backbone.report.to_dict()
        random_init = random_init or backbone.report.random_init
        data_config = backbone.data_config()
        if backbone.has_cls:
            subset, _ = open_subset(config.data, config.split, backbone, config.limit)
            loader = make_loader(
                subset, batch_size=config.batch_size, num_workers=config.num_workers, device=device
            )
            maps, indices = cls_attention_maps(backbone, loader, device)
            with progress_bar(len(maps), "scoring [cls] maps") as advance:
                results["cls_attention"], kept["cls_attention"] = score_maps(
                    maps, indices, dataset, data_config, n_keep=config.n_figures, on_progress=advance
                )
        else:
            notes.append(f"{config.model} has no [cls] token: [cls] attention maps skipped")
    if config.abmilp_maps is not None:
        if data_config is None:
            raise LocalizationError(
                "--abmilp-maps needs the eval transform the maps were made under",
                "also pass --cache CACHE (the cache the maps came from) or --model MODEL",
            )
        maps, indices, pool = read_exported_maps(config.abmilp_maps)
        if config.limit:
            rows = select_indices(len(maps), config.limit)
            maps, indices = maps[rows], indices[rows]
        with progress_bar(len(maps), f"scoring {pool} maps") as advance:
            results[pool], kept[pool] = score_maps(
                maps, indices, dataset, data_config, n_keep=config.n_figures, on_progress=advance
            )
    figures = []
    for name, images in kept.items():
        path = out / f"localization_{name}.png"
        draw_boxes_figure(path, dataset, images, results[name], title=_figure_title(name, random_init))
        figures.append(path)
    label = (model_info or {}).get("model") or (manifest or {}).get("model", {}).get("spec") or "maps"
    result = {
        "kind": "localization",
        "schema_version": SCHEMA_VERSION,
        "label": f"{label} (random weights)" if random_init else label,
        "model": model_info or (manifest or {}).get("model"),
        "random_init": random_init,
        "data": {
            "spec": config.data,
            "split": config.split,
            "fingerprint": dataset.fingerprint,
            "size": len(dataset),
        },
        "config": asdict(config),
        "versions": versions(),
        "metric": {
            "name": "MaxBoxAccV2 (Choe et al., CVPR 2020)",
            "thresholds": "tau in [0, 1), step 0.01; binarise score > tau",
            "iou_thresholds": list(IOU_THRESHOLDS),
            "boxes": "all contours (outer and hole borders), original image pixels, IoU on inclusive pixels",
        },
        "map_sources": {k: MAP_SOURCES[k] for k in results},
        "maps": {k: v.to_dict() for k, v in results.items()},
        "figures": [str(p.relative_to(out)) for p in figures],
        "provenance": _provenance(device, model_info, manifest, config, dataset),
        "notes": notes
        + (["random weights: these maps come from an untrained backbone"] if random_init else []),
    }
    json_path = out / "localization.json"
    write_json(json_path, result)
    return LocalizationRun(json_path=json_path, figures=figures, result=result)


def _provenance(device: Any, model_info: Any, manifest: Any, config: Any, dataset: Any) -> dict[str, Any]:
    from vitprobe.provenance import checkpoint_from_manifest, checkpoint_info, provenance

    if model_info is not None:
        ckpt = checkpoint_info(source=model_info["source"], sha256=model_info["sha256"],
                               random_init=model_info["random_init"])  # fmt: skip
    else:
        ckpt = checkpoint_from_manifest(manifest) if manifest else None
    data = {"spec": config.data, "split": config.split, "fingerprint": dataset.fingerprint}
    return provenance(device=device, checkpoint=ckpt, dataset=data)


def _check_same_images(manifest: Mapping[str, Any], dataset: Any, config: LocalizationConfig) -> None:
    """Refuse maps of one image list scored against another: map i belongs to dataset index i of the cache's
    split, so another split (or dataset) would pair maps with the wrong images and boxes, silently."""
    made = manifest.get("dataset") or {}
    fingerprint = made.get("fingerprint")
    if fingerprint and fingerprint != dataset.fingerprint:
        raise LocalizationError(
            f"--cache {config.cache} holds {made.get('spec')} ({made.get('split')}), but "
            f"--data {config.data} --split {config.split} is another image list "
            f"(fingerprint {str(fingerprint)[:12]} vs {dataset.fingerprint[:12]})",
            f"score the maps against the split they were made from: --data {made.get('spec')} "
            f"--split {made.get('split')}",
        )


def _figure_title(name: str, random_init: bool) -> str:
    titles = {
        "cls_attention": "[cls] attention (last block)",
        "abmilp": "AbMILP scores",
        "attentive": "attentive read-out (queries averaged)",
    }
    title = titles.get(name, name)
    return title + (" — RANDOM WEIGHTS" if random_init else "")


def draw_boxes_figure(
    path: Path, dataset: Any, images: Sequence[tuple[int, np.ndarray]], result: MaxBoxAccResult, *, title: str
) -> None:
    """Images with their score map, the true boxes (green) and the best predicted box at τ*(δ=50) (red)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from vitprobe.files import atomic_path

    tau = result.best_threshold.get(50, next(iter(result.best_threshold.values())))
    n = max(len(images), 1)
    fig = Figure(figsize=(2.6 * n, 3.0), dpi=100)
    for k, (index, scoremap) in enumerate(images):
        ax = fig.add_subplot(1, n, k + 1)
        ax.imshow(dataset.load_image(index))
        ax.imshow(scoremap, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        gt = xywh_to_xyxy(dataset.boxes[index])
        for x0, y0, x1, y1 in gt:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
        x0, y0, x1, y1 = best_box(scoremap, gt, tau)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(f"#{index}", fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"{title}: true (green) vs predicted at τ={tau:.2f} (red); MaxBoxAccV2 {result.max_box_acc_v2:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=200)  # as the analyses' figures: sharp in print


__all__ = [
    "IOU_THRESHOLDS",
    "LocalizationConfig",
    "cls_attention_maps",
    "read_exported_maps",
    "run_localization",
    "score_maps",
    "THRESHOLDS",
    "BoxAccuracy",
    "InputView",
    "LocalizationError",
    "MaxBoxAccResult",
    "best_box",
    "best_iou_per_threshold",
    "box_iou",
    "boxes_from_mask",
    "boxes_from_scoremap",
    "eval_input_view",
    "max_box_acc_v2",
    "scoremap_at_image",
    "xywh_to_xyxy",
]
