"""Saved heads: one read-out's selected head as safetensors weights plus JSON saying what it was trained on.

The weights are a `ProbeHead` state dict; the JSON names the backbone, block, final norm, classes and how
the head was chosen. `load_head` rebuilds the module; `check_head_matches_cache` refuses a cache the head
was not trained for. Both files are byte-reproducible for the same head.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vitprobe.results as R
from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.pairing import backbone_identity, identity_mismatch, token_identity
from vitprobe.probe import rundir

if TYPE_CHECKING:
    from vitprobe.cache import TokenCache

HEAD_FORMAT = "vitprobe-head"  # the safetensors metadata key of a head's weights file


def save_head(
    head: ProbeHead,
    path: str | Path,
    *,
    spec: HeadSpec,
    cache: TokenCache,
    layer: int | None,
    final_norm: bool,
    blocks: list[int] | None = None,
    blr: float | None = None,
    lr: float | None = None,
    epoch: int | None = None,
    protocol: str | None = None,
    C: float | None = None,
) -> Path:
    """Write a head's weights (safetensors) and, beside them, JSON saying what it was trained on.

    `layer` is the block a single-block read-out reads; a multi-block read-out (cls-cat, fusion) has
    `layer` None and `blocks`, the stored blocks it reads in order.

    The safetensors metadata is one JSON string with sorted keys (the library writes several metadata keys
    in random order, which would make identical heads' bytes differ)."""
    from safetensors.torch import save_file

    from vitprobe.files import atomic_path, write_json

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={HEAD_FORMAT: json.dumps({"pool": spec.pool}, sort_keys=True)})
    model = cache.manifest.get("model", {})
    meta = {
        **R.header("head"),
        "weights": path.name,
        "pool": spec.pool,
        "options": spec.options(),
        "spec": asdict(spec),
        "backbone": {"spec": model.get("spec"), **backbone_identity(cache.manifest)},
        "layer": layer,
        "blocks": blocks,
        "final_norm": final_norm,
        "final_norm_eps": float(cache.manifest.get("final_norm", {}).get("eps", 1e-6))
        if final_norm
        else None,
        "num_classes": cache.num_classes,
        "class_names": list(cache.class_names),
        "dim": cache.dim,
        "grid": list(cache.grid),
        "num_prefix_tokens": cache.num_prefix_tokens,
        "blr": blr,
        "lr": lr,
        "epoch": epoch,
        "protocol": protocol,
        "C": C,
    }
    write_json(path.with_suffix(".json"), R.validate("head", meta))
    return path


def load_head(path: str | Path) -> tuple[ProbeHead, dict[str, Any]]:
    """A saved head (weights + JSON) as a module in eval mode, and its JSON."""
    from safetensors.torch import load_file

    from vitprobe.files import read_json

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ProbeError(
            f"saved head {path} (and {meta_path.name} beside it) not found",
            "pass RUN_DIR/heads/<pool>.safetensors from a `vitprobe probe` run",
        )
    if path.parent.name == rundir.HEADS:
        rundir.verify_heads(path.parent.parent)
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as exc:
        raise ProbeError(
            f"cannot read {meta_path}: {exc}", "re-run `vitprobe probe` to rewrite the head"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ProbeError(
            f"{meta_path} is not a vitprobe head (format {found!r})",
            "pass a heads/<pool>.json written by `vitprobe probe`",
        )
    R.parse(meta, kind="head", where=str(meta_path))  # a version this vitprobe reads, every key typed
    try:
        blocks = meta.get("blocks") or [meta["layer"]]
        head = build_head(
            HeadSpec(**meta["spec"]), int(meta["dim"]), int(meta["num_classes"]), blocks=len(blocks)
        )
        for key in ("backbone", "layer", "final_norm", "class_names", "pool"):
            meta[key]  # noqa: B018 - every reader below needs these
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeError(
            f"{meta_path} lacks or garbles a field of a saved head ({exc})",
            "re-run `vitprobe probe` to rewrite the head",
        ) from exc
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise ProbeError(
            f"cannot read the head weights {path}: {exc}", "re-run `vitprobe probe` to rewrite the head"
        ) from exc
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ProbeError(
            f"weights in {path} do not match the head its JSON describes: {exc}",
            "re-run `vitprobe probe`; the files were mixed up or edited",
        ) from exc
    return head.eval(), meta


def check_head_matches_cache(meta: dict[str, Any], cache: TokenCache) -> None:
    """Refuse a cache from another backbone, weights, layer, dim or class set than the head's."""
    where = f"head ({meta['pool']}, {meta['backbone']['timm_name']}) on cache {cache.path}"
    head = {**meta["backbone"], "dim": meta["dim"], "class_names": meta["class_names"]}
    problem = identity_mismatch(head, token_identity(cache.manifest))
    if problem is not None:
        raise ProbeError(f"{where}: {problem[0]}", problem[1])
    blocks = head_blocks(meta)
    missing = [b for b in blocks if b not in cache.layers]
    if missing:
        trained = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks}"
        raise ProbeError(
            f"{where}: the head was trained on {trained}, the cache holds {list(cache.layers)}",
            "extract that block with --layers" if len(blocks) == 1 else "extract those blocks with --layers",
        )


def head_blocks(meta: dict[str, Any]) -> list[int]:
    """The stored blocks a saved head reads: its `blocks` (multi-block read-outs) or its one `layer`."""
    return [int(b) for b in meta.get("blocks") or [meta["layer"]]]
