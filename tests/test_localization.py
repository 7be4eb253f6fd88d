"""MaxBoxAccV2 against a direct implementation of Choe et al.'s definition, and hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitprobe.analysis import localization as loc
from vitprobe.analysis import maxboxacc as mba
from vitprobe.errors import VitprobeError

# ---------------------------------------------------------------------------------------------------------
# A direct, slow implementation written from the definition (wsolevaluation, multi-contour, multi-IoU):
# flood fill for 8-connected foreground regions (outer contours) and 4-connected background holes (hole
# contours, whose border pixels lie one pixel outside the hole); OpenCV boundingRect's x + w clipped to
# W - 1; IoU with inclusive pixels; BoxAcc(τ, δ) mean of [best IoU ≥ δ]; max over τ; mean over δ.


def _components(mask: np.ndarray, neighbours: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                stack, comp = [(y, x)], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    comp.append((cy, cx))
                    for dy, dx in neighbours:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                comps.append(comp)
    return comps


N8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
N4 = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def direct_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    h, w = mask.shape
    boxes = []
    for comp in _components(mask, N8):
        ys, xs = [p[0] for p in comp], [p[1] for p in comp]
        boxes.append((min(xs), min(ys), min(max(xs) + 1, w - 1), min(max(ys) + 1, h - 1)))
    if not boxes:
        return [(0, 0, 0, 0)]
    for comp in _components(~mask, N4):
        ys, xs = [p[0] for p in comp], [p[1] for p in comp]
        if min(ys) == 0 or min(xs) == 0 or max(ys) == h - 1 or max(xs) == w - 1:
            continue
        # the hole's border: foreground pixels 4-adjacent to it, from min - 1 to max + 1
        boxes.append((min(xs) - 1, min(ys) - 1, min(max(xs) + 2, w - 1), min(max(ys) + 2, h - 1)))
    return boxes


def direct_iou(a: tuple, b: tuple) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union > 0 else 0.0


def direct_maxboxaccv2(maps: list[np.ndarray], gts: list[list[tuple]]) -> tuple[float, dict]:
    taus = [i / 100 for i in range(100)]
    per_delta = {}
    for delta in (30, 50, 70):
        accs = []
        for tau in taus:
            correct = 0
            for m, gt in zip(maps, gts, strict=True):
                best = max(direct_iou(p, g) for p in direct_boxes(m > tau) for g in gt)
                correct += best >= delta / 100
            accs.append(100 * correct / len(maps))
        per_delta[delta] = max(accs)
    return sum(per_delta.values()) / 3, per_delta


def _normalise(m: np.ndarray) -> np.ndarray:
    return (m - m.min()) / (m.max() - m.min())


# ---------------------------------------------------------------------------------------------------------


def test_hand_computed_single_blob() -> None:
    # a 10x10 map with one bright 3x3 square at x 2..4, y 3..5
    m = np.zeros((10, 10))
    m[3:6, 2:5] = 1.0
    boxes = mba.boxes_from_scoremap(m, 0.5)
    # OpenCV boundingRect gives x=2, w=3 → x1 = x + w = 5; same for y: 3 + 3 = 6
    assert boxes.tolist() == [[2, 3, 5, 6]]
    # IoU with the GT box (2, 3, 4, 5) inclusive: areas 16 and 9, intersection 9 → 9 / 16
    assert mba.box_iou(boxes, np.array([[2, 3, 4, 5]]))[0, 0] == pytest.approx(9 / 16)
    res = mba.max_box_acc_v2([m], [np.array([[2, 3, 4, 5]])])
    # best IoU at every τ in [0, 1) is 9/16 = 0.5625: correct at δ=30 and 50, wrong at 70
    assert res.max_box_acc == {30: 100.0, 50: 100.0, 70: 0.0}
    assert res.max_box_acc_v2 == pytest.approx(200 / 3)


def test_empty_mask_gives_zero_box_and_edge_clipping() -> None:
    assert mba.boxes_from_mask(np.zeros((5, 7), bool)).tolist() == [[0, 0, 0, 0]]
    full = np.ones((5, 7), bool)
    assert mba.boxes_from_mask(full).tolist() == [[0, 0, 6, 4]]  # x + w = 7 clipped to W - 1 = 6


def test_hole_contours_are_boxes_too() -> None:
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # a 3x3 hole at 3..5
    boxes = sorted(map(tuple, mba.boxes_from_mask(ring).tolist()))
    assert boxes == sorted([(1, 1, 8, 8), (2, 2, 7, 7)])
    assert boxes == sorted(direct_boxes(ring))


def test_diagonal_pixels_are_one_region() -> None:
    m = np.zeros((6, 6), bool)
    m[1, 1] = m[2, 2] = m[4, 4] = True  # (1,1)-(2,2) touch diagonally; (4,4) is separate
    assert sorted(mba.boxes_from_mask(m).tolist()) == [[1, 1, 3, 3], [4, 4, 5, 5]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maxboxaccv2_equals_direct_implementation(seed: int) -> None:
    """The float definition (`quantize=False`: score > τ) against the direct, slow implementation above."""
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(6):
        h, w = rng.integers(8, 15, size=2)
        # smooth-ish random maps with several blobs, holes and plateaus
        coarse = rng.random((4, 4))
        m = np.kron(coarse, np.ones((4, 4)))[:h, :w] + 0.3 * rng.random((h, w))
        m = np.round(_normalise(m), 2)  # ties at the τ grid exercise the strict '>'
        maps.append(m)
        k = rng.integers(1, 3)
        gt = []
        for _ in range(k):
            x0, y0 = rng.integers(0, w - 3), rng.integers(0, h - 3)
            gt.append((int(x0), int(y0), int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))))
        gts.append(gt)
    expected_v2, expected = direct_maxboxaccv2(maps, gts)
    res = mba.max_box_acc_v2(maps, [np.array(g) for g in gts], quantize=False)
    assert res.max_box_acc == pytest.approx(expected)
    assert res.max_box_acc_v2 == pytest.approx(expected_v2)
    for m in maps:  # the boxes themselves, at a few thresholds
        for tau in (0.0, 0.3, 0.55, 0.9):
            got = sorted(map(tuple, mba.boxes_from_scoremap(m, tau, quantize=False).tolist()))
            assert got == sorted(direct_boxes(m > tau))


# ---------------------------------------------------------------------------------------------------------
# Golden test: clovaai/wsolevaluation's box evaluation, written out here as the reference definition
# (read at commit 96f4b88: inference.py `CAMComputer.compute_and_evaluate_cams` + `normalize_scoremap`,
# evaluation.py `compute_bboxes_from_scoremaps`, `calculate_multiple_iou`, `BoxEvaluator.accumulate/compute`,
# `evaluate_wsol`'s threshold grid `np.arange(0, 1, cam_curve_interval)` with its default 0.01).


def reference_scoremap(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2 bicubic resize to the image, then min-max normalise; exactly constant → zeros, NaN → zeros."""
    cv2 = pytest.importorskip("cv2")
    resized = cv2.resize(cam.astype(np.float64), (width, height), interpolation=cv2.INTER_CUBIC)
    if np.isnan(resized).any() or resized.min() == resized.max():
        return np.zeros_like(resized)
    shifted = resized - resized.min()
    return shifted / shifted.max()


def reference_boxes_per_threshold(scoremap: np.ndarray, thresholds: np.ndarray) -> list[np.ndarray]:
    """8-bit map, `cv2.threshold(thresh=int(τ·max))`, every contour (RETR_TREE), boundingRect clipped."""
    cv2 = pytest.importorskip("cv2")
    height, width = scoremap.shape
    gray = (scoremap * 255).astype(np.uint8)[:, :, None]  # (H, W, 1)
    out = []
    for tau in thresholds:
        _, binary = cv2.threshold(gray, int(tau * np.max(gray)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        out.append(np.asarray(boxes if boxes else [[0, 0, 0, 0]]))
    return out


def reference_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (A, B) on inclusive pixels; a non-positive union counts as IoU 0."""
    a, b = a[:, None, :], b[None, :, :]  # (A, 1, 4), (1, B, 4)
    ix = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)  # (A, B)
    iy = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)  # (A, 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)  # (1, B)
    union = (area_a + area_b - ix * iy).astype(np.float64)
    return np.where(union > 0, ix * iy / np.where(union > 0, union, 1), 0.0)


def reference_box_evaluation(cams: list, sizes: list, gts: list) -> tuple[np.ndarray, list[float]]:
    """Correct counts (δ, τ) and MaxBoxAcc per δ (percent): best IoU over all boxes at τ ≥ δ/100."""
    thresholds = np.arange(0, 1, 0.01)
    correct = np.zeros((3, len(thresholds)))
    for cam, (w, h), gt in zip(cams, sizes, gts, strict=True):
        boxes = reference_boxes_per_threshold(reference_scoremap(cam, w, h), thresholds)
        best = np.array([reference_iou(b, np.asarray(gt)).max() for b in boxes])  # (T,)
        for d, delta in enumerate((30, 50, 70)):
            correct[d, best >= delta / 100] += 1
    return correct, list(correct.max(axis=1) * 100.0 / len(cams))


def golden_maps(seed: int, n: int, grid: tuple[int, int] | None) -> tuple[list, list, list]:
    """Peaked per-patch maps (many values below 1/255 once normalised), image sizes and 1-2 boxes each."""
    rng = np.random.default_rng(seed)
    cams, sizes, gts = [], [], []
    for _ in range(n):
        gh, gw = grid or (int(v) for v in rng.integers(3, 16, size=2))
        w, h = (int(v) for v in rng.integers(20, 70, size=2))
        cams.append(rng.random((gh, gw)) ** rng.uniform(1, 6))
        sizes.append((w, h))
        gt = []
        for _ in range(int(rng.integers(1, 3))):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            gt.append([x0, y0, int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))])
        gts.append(gt)
    return cams, sizes, gts


def test_maxboxaccv2_equals_the_reference_evaluation() -> None:
    """vitprobe's default (8-bit maps) equals wsolevaluation on the same maps and boxes: all BoxAcc(τ, δ)."""
    pytest.importorskip("cv2", reason="opencv-python-headless (a test extra) is not installed")
    square, any_grid = golden_maps(0, 25, (14, 14)), golden_maps(1, 25, None)
    cams, sizes, gts = (a + b for a, b in zip(square, any_grid, strict=True))
    ref_correct, ref_max = reference_box_evaluation(cams, sizes, gts)
    scoremaps = [mba.scoremap_at_image(cam, size) for cam, size in zip(cams, sizes, strict=True)]
    acc = mba.BoxAccuracy()
    for scoremap, gt in zip(scoremaps, gts, strict=True):
        acc.add(scoremap, np.asarray(gt))
    res = acc.result()
    np.testing.assert_array_equal(acc.correct, ref_correct)  # the whole curve, not only its maxima
    assert [res.max_box_acc[d] for d in (30, 50, 70)] == ref_max
    assert res.max_box_acc_v2 == pytest.approx(np.mean(ref_max), abs=1e-12)
    # float thresholds (the paper's written definition) give another curve on these maps: the test can fail
    floats = mba.BoxAccuracy(quantize=False)
    for scoremap, gt in zip(scoremaps, gts, strict=True):
        floats.add(scoremap, np.asarray(gt))
    assert not np.array_equal(floats.correct, ref_correct)


def test_quantisation_moves_the_lowest_thresholds() -> None:
    """At τ = 0 the reference keeps pixels with 255·s ≥ 1 only; s > 0 would also keep faint ones."""
    m = np.zeros((10, 10))
    m[2:4, 2:4] = 1.0
    m[6:9, 6:9] = 0.003  # below 1/255: zero in the 8-bit map
    assert mba.boxes_from_scoremap(m, 0.0).tolist() == [[2, 2, 4, 4]]
    assert sorted(mba.boxes_from_scoremap(m, 0.0, quantize=False).tolist()) == [[2, 2, 4, 4], [6, 6, 9, 9]]
    q = mba.quantize_scoremap(np.array([[0.0, 0.999, 1.0]]))
    assert q.tolist() == [[0, 254, 255]]  # floor, as astype(uint8), not round
    with pytest.raises(mba.LocalizationError, match=r"in \[0, 1\]"):
        mba.quantize_scoremap(np.array([[0.5, 1.5]]))


def test_constant_maps_score_zeros_where_the_reference_stretches_round_off() -> None:
    """A constant per-patch map: cv2's bicubic resize leaves round-off, which the reference's exact
    min == max test misses and stretches to [0, 1]; vitprobe returns zeros, one box (0, 0, 0, 0) per τ."""
    cv2 = pytest.importorskip("cv2")
    cam = np.full((14, 14), 0.37)
    resized = cv2.resize(cam, (57, 43), interpolation=cv2.INTER_CUBIC)
    assert 0 < resized.max() - resized.min() < 1e-14  # bicubic round-off
    assert reference_scoremap(cam, 57, 43).max() == 1.0  # ... stretched to [0, 1] and scored
    ours = mba.scoremap_at_image(cam, (57, 43))
    assert not ours.any()
    for tau in (0.0, 0.5):
        assert mba.boxes_from_scoremap(ours, tau).tolist() == [[0, 0, 0, 0]]


def test_box_accuracy_streaming_counts() -> None:
    acc = mba.BoxAccuracy(thresholds=(0.0, 0.5), iou_thresholds=(50,))
    m = np.zeros((10, 10))
    m[0:5, 0:5] = 1.0
    acc.add(m, np.array([[0, 0, 4, 4]]))  # τ=0 and 0.5: box (0,0,5,5) vs (0,0,4,4): IoU 25/36 ≥ 0.5
    acc.add(m, np.array([[6, 6, 9, 9]]))  # no overlap at either τ
    assert acc.box_acc().tolist() == [[50.0, 50.0]]
    assert acc.result().best_threshold == {50: 0.0}


def test_xywh_conversion() -> None:
    assert mba.xywh_to_xyxy([[60.0, 27.0, 325.0, 304.0]]).tolist() == [[60.0, 27.0, 385.0, 331.0]]


def test_scoremap_upsampling_equals_bicubic_interpolate() -> None:
    rng = np.random.default_rng(0)
    patch = rng.random((4, 5))
    got = mba.scoremap_at_image(patch, (40, 32))  # (W, H): the whole image is the model input
    ref = F.interpolate(torch.tensor(patch)[None, None], size=(32, 40), mode="bicubic", align_corners=False)
    ref = ref[0, 0].numpy()  # (32, 40)
    np.testing.assert_allclose(got, _normalise(ref), atol=1e-9)
    assert got.min() == 0.0 and got.max() == 1.0
    assert not mba.scoremap_at_image(np.ones((3, 3)), (9, 9)).any()  # constant map → zeros


def test_eval_input_view_matches_timm_transform() -> None:
    from timm.data import create_transform

    cfg = {
        "input_size": (3, 160, 160),
        "interpolation": "bilinear",
        "crop_pct": 0.95,
        "crop_mode": "center",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
    }
    w, h = 250, 200
    xs = np.tile(np.arange(w, dtype=np.uint8)[None, :], (h, 1))  # pixel value = x coordinate
    ys = np.tile(np.arange(h, dtype=np.uint8)[:, None], (1, w))  # pixel value = y coordinate
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1))
    out = create_transform(**cfg, is_training=False)(img).numpy() * 255  # (3, 160, 160)
    view = mba.eval_input_view((w, h), cfg)
    # input pixel u's centre came from original x = (u + 0.5 + left) / scale - 0.5 (pixel-index units)
    for u in (0, 80, 159):
        x_expected = (u + 0.5 + view.left) / view.scale_x - 0.5
        y_expected = (u + 0.5 + view.top) / view.scale_y - 0.5
        assert out[0, 80, u] == pytest.approx(x_expected, abs=1.0)
        assert out[1, u, 80] == pytest.approx(y_expected, abs=1.0)


def test_scoremap_outside_the_crop_scores_zero() -> None:
    cfg = {"input_size": (3, 32, 32), "crop_pct": 0.5, "crop_mode": "center"}
    view = mba.eval_input_view((64, 64), cfg)  # resize to 64, crop the central 32x32
    assert (view.left, view.top, view.scale_x) == (16.0, 16.0, 1.0)
    s = mba.scoremap_at_image(np.arange(4.0).reshape(2, 2), (64, 64), view)
    assert not s[:16].any() and not s[:, :16].any() and not s[48:].any() and not s[:, 48:].any()
    assert s[16:48, 16:48].max() == 1.0


# ---------------------------------------------------------------------------------------------------------
# The `analyze localization` pass on a tiny random ViT and generated needles


@pytest.fixture(scope="module")
def needles(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vitprobe.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("needles") / "data"
    make_synthetic(root, n=16, classes=4, size=96, seed=0)
    return f"cub:{root}"


def test_cls_attention_maps_equal_timm_unfused_attention(needles: str) -> None:
    from vitprobe.analysis.passes import make_loader, open_subset
    from vitprobe.models import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("timm:test_vit", random_init=True)
    subset, _ = open_subset(needles, "test", backbone, 5)
    loader = make_loader(subset, batch_size=4, num_workers=0, device=torch.device("cpu"))
    maps, indices = loc.cls_attention_maps(backbone, loader, torch.device("cpu"))
    assert maps.shape == (5, *backbone.grid) and indices.tolist() == list(subset.indices)
    # reference: timm's own unfused attention of the last block, caught after softmax (attn_drop's input)
    attn_mod = backbone.model.blocks[-1].attn
    attn_mod.fused_attn = False
    caught = []
    handle = attn_mod.attn_drop.register_forward_hook(lambda m, args, out: caught.append(args[0]))
    with torch.inference_mode():
        backbone.model.forward_features(torch.stack([subset[i][0] for i in range(5)]))
    handle.remove()
    ref = caught[0][:, :, 0, backbone.num_prefix_tokens :].mean(1).reshape(5, *backbone.grid)  # (B, h, w)
    np.testing.assert_allclose(maps, ref.numpy(), rtol=1e-5, atol=1e-7)


def test_run_localization_writes_json_and_figures(needles: str, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from vitprobe.data import open_dataset
    from vitprobe.models import load_backbone

    dataset = open_dataset(needles, "test")
    dc = load_backbone("timm:test_vit", random_init=True).data_config()
    gh, gw = 10, 10
    oracle = np.zeros((len(dataset), gh, gw), dtype=np.float32)  # 1 on the patches under the true box
    for i in range(len(dataset)):
        w, h = dataset.image_size(i)
        view = mba.eval_input_view((w, h), dc)
        x, y, bw, bh = dataset.boxes[i][0]
        cx = ((x + bw / 2) * view.scale_x - view.left) / view.width * gw  # box centre in patch units
        cy = ((y + bh / 2) * view.scale_y - view.top) / view.height * gh
        oracle[i, int(np.clip(cy, 0, gh - 1)), int(np.clip(cx, 0, gw - 1))] = 1.0
    maps_file = tmp_path / "maps.safetensors"
    save_file({"maps": oracle, "indices": np.arange(len(dataset), dtype=np.int64)}, str(maps_file))
    config = loc.LocalizationConfig(
        data=needles,
        split="test",
        out=str(tmp_path / "run"),
        model="timm:test_vit",
        random_init=True,
        abmilp_maps=str(maps_file),
        n_figures=3,
        limit=6,
    )
    run = loc.run_localization(config)
    saved = json.loads(run.json_path.read_text())
    assert saved["kind"] == "localization" and saved["random_init"] is True
    assert set(saved["maps"]) == {"cls_attention", "abmilp"}
    assert saved["maps"]["cls_attention"]["num_images"] == 6 and saved["maps"]["abmilp"]["num_images"] == 6
    for rel in saved["figures"]:
        png = (tmp_path / "run" / rel).read_bytes()
        assert png[:4] == b"\x89PNG"
        assert int.from_bytes(png[16:20], "big") >= 1500  # IHDR width: 3 panels of 2.6 in at 200 dpi, not 100
    # the pass scores exactly what the metric gives on the same score maps
    from vitprobe.analysis.passes import select_indices

    rows = select_indices(len(dataset), 6)  # the evenly spaced subset --limit picks
    sizes = {i: dataset.image_size(i) for i in rows}
    direct = mba.max_box_acc_v2(
        [mba.scoremap_at_image(oracle[i], sizes[i], mba.eval_input_view(sizes[i], dc)) for i in rows],
        [mba.xywh_to_xyxy(dataset.boxes[i]) for i in rows],
    )
    assert saved["maps"]["abmilp"]["max_box_acc_v2"] == pytest.approx(direct.max_box_acc_v2)
    # an oracle map centred on the object localises it at IoU 0.3 on every image
    assert saved["maps"]["abmilp"]["max_box_acc"]["30"] == 100.0


def test_localization_refusals(tmp_path: Path, needles: str) -> None:
    with pytest.raises(mba.LocalizationError, match="nothing to score"):
        loc.run_localization(loc.LocalizationConfig(data=needles, split="test", out=str(tmp_path)))
    with pytest.raises(mba.LocalizationError, match="no such file"):
        loc.read_exported_maps(tmp_path / "missing.safetensors")
    with pytest.raises(mba.LocalizationError, match="eval transform"):
        loc.run_localization(
            loc.LocalizationConfig(
                data=needles, split="test", out=str(tmp_path), abmilp_maps=str(tmp_path / "m.safetensors")
            )
        )


def test_analyze_localization_command(needles: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vitprobe.cli import app

    args = [
        "analyze",
        "localization",
        "--model",
        "timm:test_vit",
        "--random-init",
        "--data",
        needles,
        "--split",
        "test",
        "--out",
        str(tmp_path),
        "--limit",
        "3",
        "--workers",
        "0",
        "--figures",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cls_attention" in result.output and "random weights" in result.output
    saved = json.loads((tmp_path / "localization.json").read_text())
    assert saved["maps"]["cls_attention"]["num_images"] == 3
    assert (tmp_path / "localization_cls_attention.png").is_file()


def test_boxes_equal_opencv_contours_when_available() -> None:
    """The reference's own box extraction: cv2.findContours(RETR_TREE) + boundingRect, x + w clipped."""
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (a test extra) is not installed")
    rng = np.random.default_rng(0)
    for t in range(600):
        h, w = (int(v) for v in rng.integers(3, 30, size=2))
        if t % 2:
            m = rng.random((h, w)) > rng.uniform(0.2, 0.8)  # many holes and diagonal touches
        else:
            m = mba.scoremap_at_image(rng.random((4, 5)), (w, h)) > rng.uniform(0, 1)
        contours = cv2.findContours((m * 255).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        expected = [(0, 0, 0, 0)] if len(contours) == 0 else []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            expected.append((x, y, min(x + bw, w - 1), min(y + bh, h - 1)))
        assert sorted(map(tuple, mba.boxes_from_mask(m).tolist())) == sorted(expected)


# ---------------------------------------------------------------------------------------------------------
# Map sources from a token cache: the cache names model, data and split; saved heads give their maps


def extract_cache(out: Path, data: str, split: str = "test", **options) -> Path:
    from vitprobe.extract import ExtractConfig, extract

    config = ExtractConfig(model="timm:test_vit", data=data, split=split, out=out, random_init=True,
                           workers=0, batch_size=4, **options)  # fmt: skip
    extract(config)
    return out


@pytest.fixture(scope="module")
def needles_cache(needles: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_cache(tmp_path_factory.mktemp("cache") / "test", needles)


def save_attention_head(cache_dir: Path, path: Path, pool: str = "abmilp", seed: int = 0) -> Path:
    """A head as `vitprobe probe` saves it (weights + JSON), with seeded random weights."""
    from vitprobe.cache import open_cache
    from vitprobe.heads import HeadSpec, build_head
    from vitprobe.probe import save_head

    cache = open_cache(cache_dir)
    spec = HeadSpec(pool=pool)
    torch.manual_seed(seed)
    head = build_head(spec, cache.dim, cache.num_classes)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_()  # peaked, image-dependent maps
    return save_head(head, path, spec=spec, cache=cache, layer=cache.layers[-1], final_norm=False)


def test_maps_of_one_split_are_not_scored_against_another(
    needles_cache: Path, needles: str, tmp_path: Path
) -> None:
    from vitprobe.errors import CacheError

    maps = tmp_path / "missing-maps.safetensors"

    def run(split: str) -> None:
        loc.run_localization(
            loc.LocalizationConfig(
                data=needles, split=split, out=str(tmp_path / "out"), abmilp_maps=str(maps),
                cache=str(needles_cache), cls_attention=False,
            )
        )  # fmt: skip

    with pytest.raises(CacheError, match=r"another image list") as info:
        run("train")  # map i is test image i: pairing it with train image i would be silently wrong
    assert "--split test" in (info.value.hint or "")
    with pytest.raises(mba.LocalizationError, match="no such file"):
        run("test")  # the right split passes the check and goes on to read the maps


@pytest.mark.parametrize("changed", [{"seed": 1}, {"size": 64}], ids=["seed", "size"])
def test_maps_of_other_needles_with_the_same_file_names_are_refused(
    tmp_path: Path, needles: str, changed: dict[str, int]
) -> None:
    """Needles of another seed or size have the same file names and labels, but other images and boxes."""
    from vitprobe.data import open_dataset
    from vitprobe.errors import CacheError
    from vitprobe.synthetic import make_synthetic

    other = make_synthetic(tmp_path / "other", **{"n": 16, "classes": 4, "size": 96, "seed": 0, **changed})
    same_names = open_dataset(needles, "test").relative_paths()
    assert open_dataset(f"cub:{other}", "test").relative_paths() == same_names
    cache = extract_cache(tmp_path / "cache", f"cub:{other}", limit=2)
    config = loc.LocalizationConfig(
        data=needles, split="test", out=str(tmp_path / "o"), abmilp_maps=str(tmp_path / "m"), cache=str(cache)
    )
    with pytest.raises(CacheError, match="another image list"):
        loc.run_localization(config)


def _export_maps(path: Path, pool: str | None, n: int = 8, grid: int = 10) -> Path:
    """A maps file as `vitprobe.probe.predict` writes it: metadata {"pool", "grid"}."""
    from safetensors.numpy import save_file

    maps = np.random.default_rng(0).random((n, grid, grid)).astype(np.float32)
    metadata = None if pool is None else {"pool": pool, "grid": f"{grid}x{grid}"}
    save_file({"maps": maps, "indices": np.arange(n, dtype=np.int64)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("pool", "name"), [("abmilp", "abmilp"), ("attentive", "attentive"), (None, "abmilp")]
)
def test_exported_maps_are_named_by_the_pool_of_their_head(
    tmp_path: Path, needles: str, needles_cache: Path, pool: str | None, name: str
) -> None:
    from typer.testing import CliRunner

    from vitprobe.cli import app

    maps = _export_maps(tmp_path / "maps.safetensors", pool)
    assert loc.read_exported_maps(maps)[2] == name
    out = tmp_path / "out"
    args = ["analyze", "localization", "--out", str(out), "--abmilp-maps", str(maps),
            "--cache", str(needles_cache), "--no-cls-attention", "--figures", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "localization.json").read_text())
    assert set(saved["maps"]) == {name} and saved["maps"][name]["num_images"] == 8
    assert saved["maps"][name]["block"] is None  # a maps file does not say which block it came from
    assert set(saved["map_sources"]) == {name}
    assert ("attentive read-out" in saved["map_sources"][name]) == (name == "attentive")
    assert ("AbMILP" in saved["map_sources"][name]) == (name == "abmilp")
    assert saved["figures"] == [f"localization_{name}.png"]
    assert saved["inputs"]["data"] == needles and saved["inputs"]["split"] == "test"  # from the manifest
    other = {"abmilp": "attentive", "attentive": "abmilp"}[name]
    rows = [line for line in result.output.splitlines() if "│" in line]
    assert any(name in row for row in rows) and not any(other in row for row in rows)


def test_maps_of_a_head_without_an_attention_read_out_are_refused(tmp_path: Path) -> None:
    maps = _export_maps(tmp_path / "maps.safetensors", "cls")
    with pytest.raises(mba.LocalizationError, match="maps of a 'cls' head"):
        loc.read_exported_maps(maps)


@pytest.mark.parametrize("pool", ["abmilp", "attentive"])
def test_a_saved_head_gives_the_maps_predict_exports(
    tmp_path: Path, needles: str, needles_cache: Path, pool: str
) -> None:
    """`--head` computes the head's maps on the cache itself: the same numbers as exporting them with
    `vitprobe.probe.predict` and scoring the file, and the cache names model, data and split."""
    from vitprobe.cache import open_cache
    from vitprobe.data import open_dataset
    from vitprobe.probe import predict

    head = save_attention_head(needles_cache, tmp_path / "heads" / f"{pool}.safetensors", pool)
    config = loc.LocalizationConfig(
        out=str(tmp_path / "a"), cache=str(needles_cache), heads=(str(head),), n_figures=1, num_workers=0
    )
    run = loc.run_localization(config).result
    cache = open_cache(needles_cache)
    assert set(run["maps"]) == {"cls_attention", pool}  # the cache's backbone: [cls] attention too
    assert run["maps"][pool]["block"] == cache.layers[-1] == 5  # test_vit: blocks 0..5
    assert run["maps"]["cls_attention"]["block"] == 5
    assert run["heads"][pool]["block"] == 5 and len(run["heads"][pool]["sha256"]) == 64
    assert run["inputs"]["model"] == "timm:test_vit" and run["random_init"] is True
    exported = tmp_path / "exported.safetensors"
    predict(head, needles_cache, export_maps=exported)
    maps, indices, name = loc.read_exported_maps(exported)
    assert name == pool
    dataset = open_dataset(needles, "test")
    direct, _ = loc.score_maps(maps, indices, dataset, cache.manifest["transform"])
    assert run["maps"][pool]["max_box_acc"] == {str(k): v for k, v in direct.max_box_acc.items()}
    assert run["maps"][pool]["box_acc"] == direct.box_acc
    assert np.ptp(maps) > 0.3 * maps.mean()  # the head's maps vary, so equal curves say something


def test_head_refusals(tmp_path: Path, needles: str, needles_cache: Path) -> None:
    from vitprobe.errors import ProbeError

    head = save_attention_head(needles_cache, tmp_path / "heads" / "abmilp.safetensors")
    cls_head = save_attention_head(needles_cache, tmp_path / "heads" / "cls.safetensors", "cls")
    with pytest.raises(mba.LocalizationError, match="needs --cache"):
        loc.run_localization(loc.LocalizationConfig(out=str(tmp_path / "o"), data=needles, split="test",
                                                    heads=(str(head),)))  # fmt: skip
    with pytest.raises(mba.LocalizationError, match="'cls' head, which has no per-patch maps"):
        loc.run_localization(loc.LocalizationConfig(out=str(tmp_path / "o"), cache=str(needles_cache),
                                                    heads=(str(cls_head),)))  # fmt: skip
    other = extract_cache(tmp_path / "other", needles, seed=3, limit=2)  # other random weights
    with pytest.raises(ProbeError, match="different random weights"):
        loc.run_localization(
            loc.LocalizationConfig(out=str(tmp_path / "o"), cache=str(other), heads=(str(head),))
        )
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_an_earlier_localization_is_kept_unless_overwrite(tmp_path: Path, needles_cache: Path) -> None:
    maps = _export_maps(tmp_path / "maps.safetensors", "abmilp")
    config = loc.LocalizationConfig(
        out=str(tmp_path / "run"), cache=str(needles_cache), abmilp_maps=str(maps), cls_attention=False,
        n_figures=0,
    )  # fmt: skip
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "localization.json").write_text("earlier")
    with pytest.raises(VitprobeError, match="already holds localization.json") as info:
        loc.run_localization(config)
    assert "--overwrite" in (info.value.hint or "")
    assert (tmp_path / "run" / "localization.json").read_text() == "earlier"
    from dataclasses import replace

    loc.run_localization(replace(config, overwrite=True))
    saved = json.loads((tmp_path / "run" / "localization.json").read_text())
    assert saved["maps"]["abmilp"]["num_images"] == 8
