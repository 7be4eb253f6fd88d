"""Shard files of a token cache: which tensors a shard holds (layout), writing one atomically and durably,
and reading its header. Nothing here runs a model; vitprobe.cache is the cache as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vitprobe.errors import CacheError
from vitprobe.files import atomic_path, disk_errors, write_safetensors
from vitprobe.quant import QUANTS, SCALE_DTYPE, SCALE_SUFFIX
from vitprobe.verified import HashRecord

FORMAT_NAME = "vitprobe-token-cache"
FORMAT_VERSION = 1
FINAL_NORM_FILE = "final_norm.safetensors"
TOKEN_MODES = ("all", "cls", "pooled")
RESUME = "re-run the same command: it resumes from the last complete shard"

# store dtype name -> (torch dtype, safetensors header dtype, bytes per element); fp8 / int8 tokens are
# codes with one fp32 scale per token (vitprobe.quant), read back as floats
STORE_DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "fp16": (torch.float16, "F16", 2),
    "bf16": (torch.bfloat16, "BF16", 2),
    "fp32": (torch.float32, "F32", 4),
    **{name: (q.dtype, q.st_dtype, 1) for name, q in QUANTS.items()},
}
INDEX_DTYPE = (torch.int64, "I64", 8)
TOKEN_KEYS = ("patches", "cls", "reg", "mean")

def shard_file(index: int) -> str:
    """File name of shard `index` inside a cache directory."""
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard: the file and the half-open range [start, stop) of cache rows it holds."""

    file: str
    start: int
    stop: int
    sha256: str

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class KeySpec:
    """A tensor stored in every shard: its shape after the leading sample axis, and its dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    st_dtype: str  # safetensors header name (F16, BF16, F32, I64, F8_E4M3, I8)
    itemsize: int
    scale: str | None = None  # quantised codes: the key holding their per-token fp32 scales

    @property
    def bytes_per_sample(self) -> int:
        n = self.itemsize
        for s in self.shape:
            n *= s
        return n


def shard_layout(
    *,
    tokens: str,
    num_layers: int,
    grid: Sequence[int],
    dim: int,
    has_cls: bool,
    num_reg_tokens: int,
    store_dtype: str,
    views: int,
) -> dict[str, KeySpec]:
    """The tensors every shard holds, keyed by name, with shapes excluding the sample axis.

    Several layers add a layer axis after the sample axis: `patches` (n, L, P, D) instead of (n, P, D).
    With a quantised store (fp8, int8) each token key `k` has codes of that shape and `k_scale`, the same
    shape without D, in fp32.
    """
    if tokens not in TOKEN_MODES:
        raise CacheError(f"unknown token mode {tokens!r}", f"use one of {', '.join(TOKEN_MODES)}")
    if store_dtype not in STORE_DTYPES:
        raise CacheError(f"unknown store dtype {store_dtype!r}", f"use one of {', '.join(STORE_DTYPES)}")
    dtype, st_dtype, itemsize = STORE_DTYPES[store_dtype]
    lead = (num_layers,) if num_layers > 1 else ()
    num_patches = int(grid[0]) * int(grid[1])

    quantised = store_dtype in QUANTS
    scales: dict[str, KeySpec] = {}

    def token_spec(*shape: int, key: str) -> KeySpec:
        if not quantised:
            return KeySpec(lead + shape, dtype, st_dtype, itemsize)
        scales[key + SCALE_SUFFIX] = KeySpec(lead + shape[:-1], *SCALE_DTYPE)
        return KeySpec(lead + shape, dtype, st_dtype, itemsize, scale=key + SCALE_SUFFIX)

    layout: dict[str, KeySpec] = {}
    if tokens == "all":
        layout["patches"] = token_spec(num_patches, dim, key="patches")
        if has_cls:
            layout["cls"] = token_spec(dim, key="cls")
        if num_reg_tokens:
            layout["reg"] = token_spec(num_reg_tokens, dim, key="reg")
    elif tokens == "cls":
        if not has_cls:
            raise CacheError(
                "--tokens cls asks for the [cls] token but this model has none",
                "use --tokens pooled (mean of patch tokens) or --tokens all",
            )
        layout["cls"] = token_spec(dim, key="cls")
    else:  # pooled
        if has_cls:
            layout["cls"] = token_spec(dim, key="cls")
        layout["mean"] = token_spec(dim, key="mean")
    layout.update(scales)
    index_spec = KeySpec((), *INDEX_DTYPE)
    layout["labels"] = index_spec
    layout["indices"] = index_spec
    if views:
        layout["views"] = index_spec
    return layout


def layout_from_manifest(manifest: dict[str, Any]) -> dict[str, KeySpec]:
    """`shard_layout` for the cache a manifest describes."""
    return shard_layout(
        tokens=manifest["tokens"], num_layers=len(manifest["layers"]), grid=manifest["grid"],
        dim=manifest["dim"], has_cls=manifest["has_cls"], num_reg_tokens=manifest["num_reg_tokens"],
        store_dtype=manifest["store_dtype"], views=manifest["views"],
    )


def bytes_per_sample(layout: dict[str, KeySpec]) -> int:
    """Stored bytes of one cache row (all keys), excluding file headers."""
    return sum(spec.bytes_per_sample for spec in layout.values())


def shard_problem(directory: Path, info: ShardInfo, layout: dict[str, KeySpec]) -> str | None:
    """Why the file of a recorded shard cannot be used (missing, unreadable header, wrong tensors), or None.

    Reads the safetensors header only; `TokenCache.verify_shard` checks the bytes.
    """
    file = Path(directory) / info.file
    if not file.is_file():
        return f"shard {file} listed in the manifest is missing"
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            found = {key: (s.get_shape(), s.get_dtype()) for key, s in slices.items()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        return f"cannot read shard {file}: {exc}"
    expected = {key: ([info.num_samples, *spec.shape], spec.st_dtype) for key, spec in layout.items()}
    if found != expected:
        return f"shard {file} does not match the manifest: found {found}, expected {expected}"
    return None


def write_shard(
    directory: Path,
    index: int,
    start: int,
    tensors: dict[str, torch.Tensor],
    *,
    extraction: str | None = None,
) -> ShardInfo:
    """Write shard `index` (rows [start, start + n)) atomically and durably; return its manifest entry.

    The file appears under its final name only once fully written and fsynced, and is recorded in
    `verified.json` with the sha256 computed while writing. The bytes depend only on the tensors, their row
    range and `extraction` (an id of the extraction, kept in the header so that a lost manifest can be rebuilt
    from the shards), so a resumed run writes the same file as an uninterrupted one.

    Raises:
        CacheError: the disk is full (or `ulimit -f` is reached) or the directory is not writable; the
            partial file is gone and earlier shards are intact.
    """
    n = int(tensors["indices"].shape[0])
    name = shard_file(index)
    fields: dict[str, Any] = {"start": start, "stop": start + n}
    if extraction is not None:
        fields["extraction"] = extraction
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with disk_errors(directory / name, size, error=CacheError, then=RESUME):
        with atomic_path(directory / name, durable=True) as tmp:
            digest = write_safetensors(tmp, tensors, _metadata(**fields))
    HashRecord.update(directory, directory / name, digest)
    return ShardInfo(file=name, start=start, stop=start + n, sha256=digest)


def write_final_norm(directory: Path, norm: torch.nn.Module) -> dict[str, Any]:
    """Save a final-norm module's parameters (fp32) and return the manifest's `final_norm` entry."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in norm.state_dict().items()}
    info: dict[str, Any] = {"file": None, "type": type(norm).__name__, "eps": getattr(norm, "eps", None)}
    if state:
        path = Path(directory) / FINAL_NORM_FILE
        with disk_errors(path, sum(t.numel() * 4 for t in state.values()), error=CacheError, then=RESUME):
            with atomic_path(path, durable=True) as tmp:
                write_safetensors(tmp, state, _metadata(type=info["type"]))
        info["file"] = FINAL_NORM_FILE
    return info


def _metadata(**fields: Any) -> dict[str, str]:
    """safetensors header metadata as ONE key: the library writes several keys in random order, which
    would make the bytes (and sha256) of identical shards differ between runs."""
    return {FORMAT_NAME: json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True)}


def read_shard_metadata(file: Path) -> dict[str, Any] | None:
    """The vitprobe fields of a shard's header ({format_version, start, stop, extraction}), or None when the
    file is unreadable or not a vitprobe shard."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            fields = json.loads((f.metadata() or {}).get(FORMAT_NAME, "null"))
    except Exception:  # safetensors raises its own error types for corrupt headers
        return None
    return fields if isinstance(fields, dict) else None


