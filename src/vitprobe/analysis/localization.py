"""Localisation: MaxBoxAccV2 of per-patch maps (a backbone's [cls] attention, a saved head's maps) vs boxes.

Three map sources, each scored by `vitprobe.analysis.maxboxacc` in the original images' pixels:
- `cls_attention`: the last block's [cls]→patch attention, heads averaged, from an explicit-attention pass
  of the backbone (`--model`, or the model of `--cache`);
- a saved head (`--head RUN/heads/abmilp.safetensors`, or attentive): its per-patch maps on the cache's
  tokens, computed here by `vitprobe.probe.predict`;
- a maps file exported earlier (`predict HEAD --export-maps FILE`, given as `--abmilp-maps`).
Maps are named by the head's pool ("abmilp" or "attentive").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitprobe.analysis.maxboxacc import (
    IOU_THRESHOLDS,
    BoxAccuracy,
    LocalizationError,
    MaxBoxAccResult,
    best_box,
    eval_input_view,
    scoremap_at_image,
    xywh_to_xyxy,
)
from vitprobe.analysis.runs import PassConfig
from vitprobe.results import header, validate

if TYPE_CHECKING:
    import torch

    from vitprobe.cache import TokenCache
    from vitprobe.models import Backbone

MAP_SOURCES = {
    "cls_attention": "[cls]→patch attention of the last block, heads averaged (post-softmax, patch keys)",
    "abmilp": "the trained AbMILP head's softmax scores over patches (--head on a cache, or "
    "`predict --export-maps`)",
    "attentive": "the trained attentive read-out's softmax attention over patches, averaged over its queries "
    "(--head on a cache, or `predict --export-maps`)",
}
EXPORTED_POOLS = ("abmilp", "attentive")  # heads that have per-patch maps


@dataclass(frozen=True)
class LocalizationConfig(PassConfig):
    """How `vitprobe analyze localization` runs; written into localization.json."""

    limit: int | None = None  # evenly spaced images to score, every map source alike; None = all
    cls_attention: bool = True  # score the [cls] attention when a backbone is known (--model or --cache)
    heads: tuple[str, ...] = ()  # saved heads (`probe` heads/<pool>.safetensors) whose maps --cache gives
    abmilp_maps: str | None = None  # `predict --export-maps` of an abmilp or attentive head
    quantize: bool = True  # threshold 8-bit maps, as clovaai/wsolevaluation; False: the float map vs τ
    n_figures: int = 6  # images drawn with their true and predicted boxes, per map


@dataclass
class LocalizationRun:
    """What `run_localization` wrote."""

    json_path: Path
    figures: list[Path]
    result: dict[str, Any]


def cls_attention_maps(backbone: Any, loader: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The last block's [cls]→patch attention, heads averaged, for every image of `loader`.

    Uses the explicit attention of `vitprobe.analysis.passes` (timm's fused SDPA hides the weights).

    Returns:
        maps (n, h, w) float32 and the dataset indices (n,) they belong to.
    """
    from vitprobe.analysis.passes import TokenLayout, attention_hooks, forward_pass

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
    """Maps (n, h, w), dataset indices (n,) and the head's pool, from `predict HEAD --export-maps`.

    The pool ("abmilp" or "attentive") is the file's `pool` metadata, which `vitprobe.probe.predict` writes;
    a file without it is taken as AbMILP maps.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise LocalizationError(
            f"--abmilp-maps {path}: no such file",
            "write it with `vitprobe predict RUN/heads/abmilp.safetensors --cache CACHE "
            "--export-maps FILE` (or heads/attentive.safetensors), or pass --head with --cache",
        )
    tensors = load_file(str(path))
    if "maps" not in tensors or "indices" not in tensors or tensors["maps"].ndim != 3:
        raise LocalizationError(
            f"{path}: expected tensors 'maps' (n, h, w) and 'indices' (n,), found {sorted(tensors)}",
            "pass the file written by `vitprobe predict ... --export-maps FILE`",
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


def check_head(path: str | Path, cache: TokenCache | None) -> dict[str, Any]:
    """A saved head's JSON, refused unless it has per-patch maps and was trained on `cache`'s tokens."""
    from vitprobe.probe import load_head
    from vitprobe.probe.saved import check_head_matches_cache

    if cache is None:
        raise LocalizationError(
            f"--head {path} needs --cache CACHE: the head's maps are computed from a cache's patch tokens",
            "pass the token cache of the split to score (the probe's test cache)",
        )
    _, meta = load_head(path)
    if meta["pool"] not in EXPORTED_POOLS:
        raise LocalizationError(
            f"--head {path} is a {meta['pool']!r} head, which has no per-patch maps",
            f"pass a heads/{EXPORTED_POOLS[0]}.safetensors or heads/{EXPORTED_POOLS[1]}.safetensors",
        )
    check_head_matches_cache(meta, cache)
    return meta


def head_maps(path: str | Path, cache: TokenCache, *, device: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A saved head's per-patch maps (n, h, w) on every image of `cache`, their dataset indices and pool.

    Computed by `vitprobe.probe.predict` (the same forward as `predict --export-maps`), through a
    temporary file that is removed afterwards.
    """
    import tempfile

    from vitprobe.probe import PredictConfig, predict

    with tempfile.TemporaryDirectory(prefix="vitprobe-maps-") as tmp:
        file = Path(tmp) / "maps.safetensors"
        predict(path, cache.path, cfg=PredictConfig(device=device), export_maps=file)
        return read_exported_maps(file)


def score_maps(
    maps: np.ndarray,
    indices: np.ndarray,
    dataset: Any,
    data_config: Mapping[str, Any],
    *,
    quantize: bool = True,
    n_keep: int = 0,
    on_progress: Any = None,
) -> tuple[MaxBoxAccResult, list[tuple[int, np.ndarray]]]:
    """MaxBoxAccV2 of per-patch maps (n, h, w) against the dataset's boxes, in original image pixels.

    Args:
        maps: one per-patch map per image.
        indices: the dataset index of each map.
        dataset: a `vitprobe.data.ImageDataset` with `boxes` and `image_size(i)`.
        data_config: the eval transform the maps were made under (timm data config).
        quantize: threshold the 8-bit score maps as the reference does.
        n_keep: keep the score maps of this many leading images (for figures).
        on_progress: called with 1 after each image.

    Returns:
        The metric and [(dataset index, score map (H, W))] for the kept images.
    """
    _require_boxes(dataset)
    acc = BoxAccuracy(quantize=quantize)
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


def _require_boxes(dataset: Any) -> None:
    if dataset.boxes is None:
        raise LocalizationError(
            f"{dataset.spec} ({dataset.split}) has no boxes",
            "localisation needs boxes: cub:DIR, synthetic:needles or csv: with x,y,w,h columns",
        )


def run_localization(config: LocalizationConfig, *, backbone: Backbone | None = None) -> LocalizationRun:
    """`vitprobe analyze localization`: MaxBoxAccV2 of every map source asked for; JSON + figures.

    With `config.cache` the model, weights, dataset and split come from the cache's manifest (flags given
    beside it must agree), the [cls] maps are taken on the cache's images, and `config.heads` are evaluated
    on its tokens. An earlier localization.json in `config.out` is refused unless `config.overwrite`.
    """
    from vitprobe.analysis.passes import make_loader, open_subset, select_indices
    from vitprobe.analysis.runs import (
        check_backbone,
        check_images,
        check_out,
        load_pass_backbone,
        manifest_model,
        resolve_inputs,
    )
    from vitprobe.data import open_dataset
    from vitprobe.devices import resolve_device
    from vitprobe.files import sha256_file, write_json
    from vitprobe.progress import progress_bar
    from vitprobe.provenance import versions

    out = check_out(config.out, "localization.json", overwrite=config.overwrite)
    with_cls = config.cls_attention and bool(config.model or config.cache)
    if not with_cls and not config.heads and config.abmilp_maps is None:
        raise LocalizationError(
            "nothing to score: give --model or --cache (for [cls] attention maps), --head HEAD with --cache, "
            "or --abmilp-maps FILE",
            "e.g. vitprobe analyze localization --cache CACHE --head RUN/heads/abmilp.safetensors --out RUN",
        )
    inputs = resolve_inputs(config, need_model=False)
    cache = inputs.cache
    dataset = open_dataset(inputs.data, inputs.split)
    _require_boxes(dataset)
    check_images({"fingerprint": dataset.fingerprint}, inputs)
    heads = {str(h): check_head(h, cache) for h in config.heads}  # refused before any pass
    names = [meta["pool"] for meta in heads.values()]
    if len(set(names)) < len(names):
        raise LocalizationError(f"--head: two heads of one pool ({', '.join(names)})", "score one per pool")

    results: dict[str, MaxBoxAccResult] = {}
    kept: dict[str, list[tuple[int, np.ndarray]]] = {}
    blocks: dict[str, int | None] = {}
    notes: list[str] = []
    model_info = None if cache is None else manifest_model(cache)
    random_init = inputs.random_init
    data_config: Mapping[str, Any] | None = None if cache is None else cache.manifest["transform"]
    device = resolve_device(config.device)

    def score(name: str, maps: np.ndarray, indices: np.ndarray, transform: Mapping[str, Any]) -> None:
        with progress_bar(len(maps), f"scoring {name} maps") as advance:
            results[name], kept[name] = score_maps(
                maps, indices, dataset, transform, quantize=config.quantize, n_keep=config.n_figures,
                on_progress=advance,
            )  # fmt: skip

    if with_cls:
        if backbone is None:  # else: already loaded (a study's shared load), checked as a loaded one
            backbone = load_pass_backbone(inputs, device)
        else:
            backbone.model.to(device).eval()
            check_backbone(backbone, inputs)
        model_info = backbone.report.to_dict()
        random_init = random_init or backbone.report.random_init
        data_config = data_config or backbone.data_config()
        if backbone.has_cls:
            subset, _ = open_subset(
                inputs.data, inputs.split, backbone, config.limit, among=inputs.cache_images()
            )
            loader = make_loader(
                subset, batch_size=config.batch_size, num_workers=config.num_workers, device=device
            )
            score("cls_attention", *cls_attention_maps(backbone, loader, device), backbone.data_config())
            blocks["cls_attention"] = backbone.depth - 1
        else:
            notes.append(f"{inputs.model} has no [cls] token: [cls] attention maps skipped")
    exported: list[tuple[np.ndarray, np.ndarray, str, int | None]] = []
    for path, meta in heads.items():
        assert cache is not None
        exported.append((*head_maps(path, cache, device=str(device)), int(meta["layer"])))
    if config.abmilp_maps is not None:
        if data_config is None:
            raise LocalizationError(
                "--abmilp-maps needs the eval transform the maps were made under",
                "also pass --cache CACHE (the cache the maps came from) or --model MODEL",
            )
        exported.append((*read_exported_maps(config.abmilp_maps), None))
    for maps, indices, pool, block in exported:
        if pool in results:
            raise LocalizationError(
                f"two {pool} maps to score (--head and --abmilp-maps)", "pass one of them"
            )
        rows = select_indices(len(maps), config.limit)
        assert data_config is not None
        score(pool, maps[rows], indices[rows], data_config)
        blocks[pool] = block
    figures = []
    for name, images in kept.items():
        path = out / f"localization_{name}.png"
        title = _figure_title(name, random_init)
        draw_boxes_figure(path, dataset, images, results[name], title=title, quantize=config.quantize)
        figures.append(path)
    label = (model_info or {}).get("model") or "maps"
    result = {
        **header("localization"),
        "label": f"{label} (random weights)" if random_init else label,
        "model": model_info,
        "random_init": random_init,
        "data": {
            "spec": inputs.data,
            "split": inputs.split,
            "fingerprint": dataset.fingerprint,
            "size": len(dataset),
        },
        "inputs": inputs.record(),
        "cache": None if cache is None else cache.provenance(),
        "config": asdict(config),
        "versions": versions(),
        "metric": {
            "name": "MaxBoxAccV2 (Choe et al., CVPR 2020)",
            "thresholds": "tau in [0, 1), step 0.01",
            "binarise": "uint8(255 s) > int(tau * max), as clovaai/wsolevaluation"
            if config.quantize
            else "s > tau on the float score map",
            "quantize": config.quantize,
            "constant_maps": "a per-patch map constant up to bicubic round-off scores as all zeros: one box "
            "(0, 0, 0, 0) at every tau",
            "iou_thresholds": list(IOU_THRESHOLDS),
            "boxes": "all contours (outer and hole borders), original image pixels, IoU on inclusive pixels",
            "blocks": "0-based block index of the tokens each map comes from (null: not known)",
        },
        "map_sources": {k: MAP_SOURCES[k] for k in results},
        "maps": {k: {**v.to_dict(), "block": blocks.get(k)} for k, v in results.items()},
        "heads": {
            meta["pool"]: {"file": path, "sha256": sha256_file(path), "block": meta["layer"],
                           "final_norm": meta["final_norm"]}
            for path, meta in heads.items()
        },  # fmt: skip
        "figures": [str(p.relative_to(out)) for p in figures],
        "provenance": _provenance(device, model_info, inputs, dataset),
        "notes": notes
        + (["random weights: these maps come from an untrained backbone"] if random_init else []),
    }
    json_path = out / "localization.json"
    result = validate("localization", result)
    write_json(json_path, result)
    return LocalizationRun(json_path=json_path, figures=figures, result=result)


def _provenance(device: Any, model_info: dict[str, Any] | None, inputs: Any, dataset: Any) -> dict[str, Any]:
    from vitprobe.provenance import checkpoint_info, provenance

    info = model_info or {}
    random_init = bool(info.get("random_init", inputs.random_init))
    sha = None if random_init else info.get("checkpoint_id")
    weights = None
    if info:
        weights = checkpoint_info(source=info.get("source"), sha256=sha, random_init=random_init)
    data = {"spec": inputs.data, "split": inputs.split, "fingerprint": dataset.fingerprint}
    return provenance(device=device, checkpoint=weights, dataset=data)


def _figure_title(name: str, random_init: bool) -> str:
    titles = {
        "cls_attention": "[cls] attention (last block)",
        "abmilp": "AbMILP scores",
        "attentive": "attentive read-out (queries averaged)",
    }
    title = titles.get(name, name)
    return title + (" — RANDOM WEIGHTS" if random_init else "")


def draw_boxes_figure(
    path: Path,
    dataset: Any,
    images: Sequence[tuple[int, np.ndarray]],
    result: MaxBoxAccResult,
    *,
    title: str,
    quantize: bool = True,
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
        x0, y0, x1, y1 = best_box(scoremap, gt, tau, quantize=quantize)
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
    "EXPORTED_POOLS",
    "MAP_SOURCES",
    "LocalizationConfig",
    "LocalizationRun",
    "check_head",
    "cls_attention_maps",
    "draw_boxes_figure",
    "head_maps",
    "read_exported_maps",
    "run_localization",
    "score_maps",
]
