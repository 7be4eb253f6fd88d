"""MaxBoxAccV2 (Choe et al., CVPR 2020): per-patch maps → score maps → boxes → box accuracy. No model here.

The metric follows "Evaluating Weakly Supervised Object Localization Methods Right" and its code,
clovaai/wsolevaluation (`inference.py` `normalize_scoremap`, `evaluation.py` `compute_bboxes_from_scoremaps`,
`calculate_multiple_iou`, `BoxEvaluator`), with multi-contour and multi-IoU evaluation:

1. Each per-patch map is upsampled (bicubic) to image resolution and min-max normalised to [0, 1]; a map
   that is constant (up to bicubic round-off) becomes all zeros.
2. The score map is quantised to 8 bits, q = floor(255·s) (`(s * 255).astype(np.uint8)`), and for every
   τ in [0, 1) with step 0.01 binarised as q > int(τ·max q), the reference's `cv2.threshold`. Every
   connected region gives a box: the bounding rectangle of each contour, outer borders and hole borders
   alike (OpenCV's `findContours(RETR_TREE)`), with OpenCV's exclusive right/bottom edge clipped to the last
   pixel. No region at all gives the box (0, 0, 0, 0). (`quantize=False` compares the float map with τ,
   the paper's written definition.)
3. An image is correct at IoU δ when the best IoU between any predicted box and any ground-truth box is ≥ δ
   (IoU with inclusive pixel coordinates, `+1` in widths, as the reference).
4. BoxAcc(τ, δ) is the fraction of correct images; MaxBoxAcc(δ) = max_τ BoxAcc(τ, δ); MaxBoxAccV2 is the mean
   of MaxBoxAcc over δ ∈ {30, 50, 70} %.

The reference evaluates at the 224×224 network input (the whole image resized, boxes rescaled with `int`);
vitprobe evaluates in the original image's pixels, mapping each pixel back through the model's eval
transform (resize + centre crop), so boxes need no rescaling and pixels cut away by the crop score 0. On the
same score maps and boxes the two give equal values (tests/test_localization.py, the golden test).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitprobe.errors import VitprobeError

if TYPE_CHECKING:
    import torch

THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(100))  # τ in [0, 1), step 0.01 (evaluate_wsol's default)
IOU_THRESHOLDS = (30, 50, 70)  # δ in percent, MaxBoxAccV2's three IoU levels
LEVELS = 255  # 8-bit score maps, as the reference thresholds them


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


def quantize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """The 8-bit score map the reference thresholds: floor(255·s) as uint8 (H, W), for s in [0, 1]."""
    s = np.asarray(scoremap, dtype=np.float64)
    if s.size and (not np.isfinite(s).all() or s.min() < 0.0 or s.max() > 1.0):
        raise LocalizationError(
            f"a score map must lie in [0, 1] (min-max normalised), got [{np.nanmin(s)}, {np.nanmax(s)}]",
            "normalise it first (scoremap_at_image does)",
        )
    return (s * LEVELS).astype(np.uint8)


def binarize(scoremap: np.ndarray, threshold: float, *, quantize: bool = True) -> np.ndarray:
    """The mask boxes are drawn from: q > int(τ·max q) on the 8-bit map (the reference), or s > τ."""
    if not quantize:
        return np.asarray(scoremap) > threshold
    q = quantize_scoremap(scoremap)
    return q > _level(threshold, q)


def _level(threshold: float, q: np.ndarray) -> int:
    """`cv2.threshold`'s `thresh=int(threshold * np.max(scoremap_image))`; 0 for an empty or all-zero map."""
    return int(threshold * int(q.max())) if q.size else 0


def boxes_from_scoremap(scoremap: np.ndarray, threshold: float, *, quantize: bool = True) -> np.ndarray:
    """All contour boxes (K, 4) of the score map binarised at `threshold` (see `binarize`)."""
    return boxes_from_mask(binarize(scoremap, threshold, quantize=quantize))


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
    scoremap: np.ndarray,
    gt_boxes: np.ndarray,
    thresholds: Sequence[float] = THRESHOLDS,
    *,
    quantize: bool = True,
) -> np.ndarray:
    """For each τ, the best IoU (T,) between any box of the map binarised at τ and any ground-truth box.

    Args:
        scoremap: normalised score map (H, W) in [0, 1].
        gt_boxes: ground-truth boxes (K, 4), x0 y0 x1 y1.
        thresholds: the τ grid.
        quantize: binarise the 8-bit map as the reference does (see `binarize`).
    """
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty(len(thresholds))
    previous: bytes | None = None
    q = quantize_scoremap(scoremap) if quantize else None
    for t, tau in enumerate(thresholds):
        mask = q > _level(tau, q) if q is not None else scoremap > tau
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
    quantize: bool = True  # threshold the 8-bit map, as clovaai/wsolevaluation does
    correct: np.ndarray = field(init=False)  # (D, T) number of correct images
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.correct = np.zeros((len(self.iou_thresholds), len(self.thresholds)), dtype=np.int64)

    def add(self, scoremap: np.ndarray, gt_boxes_xyxy: np.ndarray) -> np.ndarray:
        """Score one normalised map (H, W) against its ground-truth boxes; returns the best IoU per τ (T,)."""
        best = best_iou_per_threshold(
            scoremap, gt_boxes_xyxy, self.thresholds, quantize=self.quantize
        )  # (T,)
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
    quantize: bool = True,
) -> MaxBoxAccResult:
    """MaxBoxAccV2 of normalised score maps (each (H, W) in [0, 1]) against their boxes (K, 4) x0y0x1y1."""
    acc = BoxAccuracy(thresholds, iou_thresholds, quantize)
    for scoremap, boxes in zip(scoremaps, gt_boxes_xyxy, strict=True):
        acc.add(np.asarray(scoremap, dtype=np.float64), boxes)
    return acc.result()


def best_box(
    scoremap: np.ndarray, gt_boxes_xyxy: np.ndarray, threshold: float, *, quantize: bool = True
) -> np.ndarray:
    """The predicted box (4,) at τ that best matches the ground truth (for figures)."""
    boxes = boxes_from_scoremap(scoremap, threshold, quantize=quantize)
    return boxes[int(box_iou(boxes, gt_boxes_xyxy).max(axis=1).argmax())]
