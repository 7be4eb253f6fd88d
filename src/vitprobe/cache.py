"""Token caches: safetensors shards plus a JSON manifest. Nothing here runs a model.

A cache is a directory::

    manifest.json                 what was extracted, how, and which shards are complete
    final_norm.safetensors        the backbone's final-norm parameters (absent if it has none)
    shard-00000.safetensors       samples [0, shard_size)
    shard-00001.safetensors       samples [shard_size, 2 * shard_size) ...
    verified.json                 which shard files were hashed, and the size / mtime / inode they had then

The format is a public contract, described in docs/cache-format.md. Readers (`open_cache`) validate the
manifest and stream shards memory-mapped; writers (`vitprobe.extract`) use `write_shard`, `write_manifest`
and `lock_cache` (vitprobe.lock) so that a shard exists only when it is complete and durable, and a crash or
a full disk never corrupts a cache.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vitprobe.errors import CacheError
from vitprobe.files import TEMP_SUFFIX, atomic_path, disk_errors, read_json, sha256_file, write_safetensors
from vitprobe.lock import LOCK_FILE, lock_cache  # noqa: F401 - writers import the lock from here too
from vitprobe.quant import QUANTS, SCALE_DTYPE, SCALE_SUFFIX
from vitprobe.quant import dequantise as _dequantise
from vitprobe.verified import VERIFIED_FILE, HashRecord

FORMAT_NAME = "vitprobe-token-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FINAL_NORM_FILE = "final_norm.safetensors"
TOKEN_MODES = ("all", "cls", "pooled")

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

REQUIRED_FIELDS = (
    "format", "format_version", "model", "layers", "grid", "dim", "num_prefix_tokens", "has_cls",
    "num_reg_tokens", "tokens", "store_dtype", "views", "dataset", "num_samples", "shard_size", "shards",
    "final_norm", "complete",
)
SHARD_FIELDS = {"file": str, "start": int, "stop": int, "sha256": str}
RESUME = "re-run the same command: it resumes from the last complete shard"


class ManifestUnreadable(CacheError):
    """manifest.json exists but cannot be parsed (empty after a power loss, truncated, overwritten)."""


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


def _manifest_field(key: str, convert: Callable[[Any], Any], doc: str) -> Any:
    """A read-only TokenCache property returning `convert(manifest[key])`."""
    return property(lambda self: convert(self.manifest[key]), doc=doc)


class TokenCache:
    """A validated token cache directory; reads shards lazily (memory-mapped), never the whole cache.

    Build it with `open_cache(path)`. Properties mirror the manifest; `manifest` is the parsed JSON.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._shards = [ShardInfo(**s) for s in manifest["shards"]]
        self._layout = layout_from_manifest(manifest)
        self._verified: set[int] = set()  # shards whose sha256 was checked (verify_shard)
        self._record: HashRecord | None = None  # verified.json, read on first use
        self._record_lock = threading.Lock()  # a token feed may verify shards from a reader thread

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete, {self.num_written}/{self.num_samples} rows"
        return (
            f"TokenCache({str(self.path)!r}, {self.manifest['model']['spec']}, layers={self.layers}, "
            f"tokens={self.tokens}, {self.num_samples} samples, {state})"
        )

    def __len__(self) -> int:
        return self.num_samples

    # --- manifest properties -------------------------------------------------------------------------
    num_samples = _manifest_field(
        "num_samples", int, "Rows of the finished cache (images x max(views, 1)); see `num_written`."
    )
    dim = _manifest_field("dim", int, "Token dimension D.")
    num_prefix_tokens = _manifest_field("num_prefix_tokens", int, "[cls] + register tokens per image.")
    num_reg_tokens = _manifest_field("num_reg_tokens", int, "Register (or distillation) tokens per image.")
    has_cls = _manifest_field("has_cls", bool, "Whether the backbone has a [cls] token.")
    tokens = _manifest_field("tokens", str, "Token mode: all, cls or pooled.")
    store_dtype = _manifest_field("store_dtype", str, "Stored dtype: fp16, bf16 or fp32.")
    views = _manifest_field("views", int, "Augmented views per image (0: the eval transform only).")
    complete = _manifest_field("complete", bool, "Whether every row has been written.")

    @property
    def num_written(self) -> int:
        return sum(s.num_samples for s in self._shards)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.manifest["grid"]
        return int(h), int(w)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest["layers"]]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["dataset"]["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["dataset"]["num_classes"])

    @property
    def shards(self) -> list[ShardInfo]:
        return list(self._shards)

    @property
    def keys(self) -> list[str]:
        """Names `read_shard` returns: tokens (dequantised for fp8 / int8 stores) and index columns."""
        return [k for k in self._layout if not k.endswith(SCALE_SUFFIX)]

    @property
    def layout(self) -> dict[str, KeySpec]:
        """Per stored tensor: shape (after the sample axis) and dtype; quantised stores add `k_scale` keys."""
        return dict(self._layout)

    @property
    def quantised(self) -> bool:
        """Whether tokens are stored as fp8 / int8 codes with per-token scales (`read_shard` dequantises)."""
        return self.store_dtype in QUANTS

    def verify_shard(self, i: int, *, full: bool = False) -> None:
        """Check that shard `i` holds the bytes the manifest's sha256 names, hashing each file state once.

        A shard hashed before (by the extraction that wrote it, or by an earlier reader) is recorded in
        `verified.json` with its size, mtime, ctime and inode; while those are unchanged the file is not read
        again. Otherwise (or with `full`) every byte is hashed, and a match is recorded for the next reader
        (when the directory is writable).

        Raises:
            CacheError: the shard's bytes changed since it was written (disk corruption, an edit).
        """
        if i in self._verified and not full:
            return
        info = self._shards[i]
        file = self.path / info.file
        with self._record_lock:
            if self._record is None:
                self._record = HashRecord.load(self.path)
            if not full and self._record.matches(file, info.sha256):
                self._verified.add(i)
                return
        if sha256_file(file) != info.sha256:
            raise CacheError(
                f"shard {file} is corrupt: its sha256 differs from the manifest",
                f"delete that file and re-run the `vitprobe extract` command that wrote {self.path}; it "
                "rewrites the cache from that shard on",
            )
        self._verified.add(i)
        with self._record_lock:
            self._record.add(file, info.sha256)
            self._record.save(quiet=True)

    # --- reading -------------------------------------------------------------------------------------
    def read_shard(
        self,
        i: int,
        keys: Sequence[str] | None = None,
        rows: slice | None = None,
        *,
        dequantise: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """Tensors of shard `i` (only `keys`, only `rows` of the shard), read from the memory-mapped file.

        Args:
            i: shard number, 0 <= i < len(shards).
            keys: tensor names to read (default: every key, see `keys`).
            rows: rows of this shard, e.g. slice(0, 128); the shard holds cache rows
                [shards[i].start, shards[i].stop).
            dequantise: for fp8 / int8 stores, return tokens as floats (codes * scales, in `dtype`); with
                False, return the codes as stored plus `k_scale` (fp32) for every token key `k`, for a
                reader that dequantises on its device (`vitprobe.quant.dequantise`).
            dtype: dtype of dequantised tokens (fp16, fp32 and bf16 stores are returned as stored).
        """
        if not 0 <= i < len(self._shards):
            raise CacheError(
                f"shard {i} does not exist in {self.path} ({len(self._shards)} complete shards)",
                f"use a shard number in [0, {len(self._shards) - 1}]",
            )
        names = self.keys if keys is None else list(keys)
        unknown = [k for k in names if k not in self._layout]
        if unknown:
            raise CacheError(
                f"{self.path} has no tensor {', '.join(map(repr, unknown))} (tokens={self.tokens})",
                f"use one of {', '.join(self.keys)}; extract with --tokens all for patch tokens",
            )
        out: dict[str, torch.Tensor] = {}
        with safe_open(self.path / self._shards[i].file, framework="pt", device="cpu") as f:

            def get(key: str) -> torch.Tensor:
                return f.get_slice(key)[rows] if rows is not None else f.get_tensor(key)

            for key in names:
                scale_key = self._layout[key].scale
                if scale_key is None or key.endswith(SCALE_SUFFIX):
                    out[key] = get(key)
                elif dequantise:
                    out[key] = _dequantise(get(key), get(scale_key), dtype)
                else:
                    out[key], out[scale_key] = get(key), get(scale_key)
        return out

    def iter_shards(
        self, keys: Sequence[str] | None = None, order: Sequence[int] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield `read_shard(i, keys)` for each shard, in cache order or in the given shard `order`."""
        for i in range(len(self._shards)) if order is None else order:
            yield self.read_shard(i, keys)

    def _column(self, key: str) -> torch.Tensor:
        if not self._shards:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([part[key] for part in self.iter_shards([key])])  # (N,)

    def labels(self) -> torch.Tensor:
        """Class label of every written row, (N,) int64, in cache order."""
        return self._column("labels")

    def indices(self) -> torch.Tensor:
        """Dataset index of every written row, (N,) int64, in cache order."""
        return self._column("indices")

    def view_ids(self) -> torch.Tensor:
        """Augmented-view number of every row, (N,) int64 (zeros when the cache has no views)."""
        if not self.views:
            return torch.zeros(self.num_written, dtype=torch.int64)
        return self._column("views")

    def final_norm_state(self) -> dict[str, torch.Tensor]:
        """The backbone's final-norm parameters, e.g. {"weight": (D,), "bias": (D,)} for a LayerNorm.

        Empty when the model has no final norm (`manifest["final_norm"]["type"] == "Identity"`);
        the norm's eps is `manifest["final_norm"]["eps"]`.
        """
        info = self.manifest["final_norm"]
        if not info.get("file"):
            return {}
        with safe_open(self.path / info["file"], framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}

    def provenance(self) -> dict[str, Any]:
        """How this cache was made, for results files: model, checkpoint, dataset, layers, versions."""
        m = self.manifest
        return {
            "cache": str(self.path),
            "format_version": m["format_version"],
            "model": m["model"]["spec"],
            "timm_name": m["model"]["timm_name"],
            "checkpoint": m["model"]["checkpoint"],
            "random_init": m["model"]["random_init"],
            "dataset": m["dataset"]["spec"],
            "split": m["dataset"]["split"],
            "fingerprint": m["dataset"]["fingerprint"],
            "layers": list(m["layers"]),
            "tokens": m["tokens"],
            "store_dtype": m["store_dtype"],
            "views": m["views"],
            "seed": m.get("seed"),
            "num_samples": m["num_samples"],
            "versions": dict(m.get("versions", {})),
        }


def open_cache(
    path: str | os.PathLike[str], *, require_complete: bool = True, verify: bool = False
) -> TokenCache:
    """Open and validate a token cache directory.

    Checks the format version, that every listed file exists, and that each shard's tensors have the
    names, shapes and dtypes the manifest implies (headers only, cheap). Nothing is loaded into RAM.

    Args:
        path: the cache directory (`--out` of `vitprobe extract`).
        require_complete: refuse a cache whose extraction has not finished.
        verify: also re-hash every shard and compare with the manifest's sha256 (reads every byte, whatever
            verified.json says).

    Raises:
        CacheError: missing, incomplete, corrupt or from another format version.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if path.is_file():
        raise CacheError(
            f"{path} is a file, not a token cache directory",
            "pass the `--out` directory of `vitprobe extract`",
        )
    if not manifest_path.is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST_FILE}"
        raise CacheError(f"token cache {path} {what}", f"run `vitprobe extract ... --out {path}` first")
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise CacheError(
            f"cannot read {manifest_path}: {exc}", "re-run `vitprobe extract --overwrite`"
        ) from exc
    check_manifest(manifest, where=manifest_path)
    if not manifest["complete"] and require_complete:
        written = sum(s["stop"] - s["start"] for s in manifest["shards"])
        raise CacheError(
            f"token cache {path} is incomplete ({written} of {manifest['num_samples']} samples written)",
            "re-run the same `vitprobe extract` command to resume it (--resume is the default)",
        )
    cache = TokenCache(path, manifest)
    _check_files(cache, verify=verify)
    return cache


def check_manifest(manifest: Any, *, where: Path | str) -> None:
    """Raise CacheError unless `manifest` is a version-1 manifest whose shard ranges are consistent."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(
            f"{where} is not a vitprobe token-cache manifest", "point at a `vitprobe extract --out` directory"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CacheError(
            f"{where} has cache format version {version}; this vitprobe reads version {FORMAT_VERSION}",
            "upgrade vitprobe" if newer else "re-extract the cache with this vitprobe (--overwrite)",
        )
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise CacheError(f"{where} lacks fields {', '.join(missing)}", "re-extract the cache (--overwrite)")
    if not isinstance(manifest["shards"], list):
        raise ManifestUnreadable(
            f"{where}: `shards` is not a list", "re-run the `vitprobe extract` command that wrote it: it "
            "rebuilds the manifest from the intact shards",
        )
    expected_start = 0
    for n, s in enumerate(manifest["shards"]):
        bad = [k for k, kind in SHARD_FIELDS.items()
               if not isinstance(s, dict) or not isinstance(s.get(k), kind)]
        if bad:
            raise ManifestUnreadable(
                f"{where}: shard entry {n} lacks a valid {', '.join(bad)} (each entry is "
                "{file, start, stop, sha256})",
                "re-run the `vitprobe extract` command that wrote it: it rebuilds the manifest from the "
                "shards (or pass --overwrite)",
            )
        if s["start"] != expected_start or s["stop"] <= s["start"]:
            raise CacheError(
                f"{where}: shard {s['file']} covers rows [{s['start']}, {s['stop']}) but rows start at "
                f"{expected_start}", "re-extract the cache (--overwrite)",
            )
        expected_start = s["stop"]
    if manifest["complete"] and expected_start != manifest["num_samples"]:
        raise CacheError(
            f"{where} is marked complete but its shards hold {expected_start} of "
            f"{manifest['num_samples']} rows",
            "re-extract the cache (--overwrite)",
        )


def _check_files(cache: TokenCache, *, verify: bool) -> None:
    for i, info in enumerate(cache.shards):
        problem = shard_problem(cache.path, info, cache.layout)
        if problem is not None:
            raise CacheError(problem, "delete that file and re-run `vitprobe extract` to resume")
        if verify:
            cache.verify_shard(i, full=True)  # an explicit verify reads every byte
    norm = cache.manifest["final_norm"]
    if norm.get("file") and not (cache.path / norm["file"]).is_file():
        raise CacheError(f"{cache.path / norm['file']} is missing", "re-extract the cache (--overwrite)")


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


# --- writing (used by vitprobe.extract) ----------------------------------------------------------------
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
    record = HashRecord.load(directory)
    record.add(directory / name, digest)
    record.save(quiet=True)
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


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Replace manifest.json atomically and durably (readers see the old or the new one, never a mix)."""
    text = json.dumps({**manifest, "updated": utc_now()}, indent=2) + "\n"
    path = Path(directory) / MANIFEST_FILE
    with disk_errors(path, len(text.encode()), error=CacheError, then=RESUME):
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(text, encoding="utf-8")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest of `directory`, or None when there is none.

    Raises:
        CacheError: it is empty, not JSON, or not a valid manifest (`ManifestUnreadable` when it cannot be
            parsed at all, which `vitprobe extract` answers by rebuilding it from the shards).
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        what = "is empty" if path.stat().st_size == 0 else f"is not valid JSON ({exc})"
        raise ManifestUnreadable(
            f"{path} {what}", "re-run the `vitprobe extract` command that wrote it: it rebuilds the manifest "
            "from the intact shards",
        ) from exc
    check_manifest(manifest, where=path)
    return manifest


def shard_infos(manifest: dict[str, Any]) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["shards"]]


def shard_entries(shards: Sequence[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]


def remove_cache_files(directory: Path) -> None:
    """Delete a cache's manifest, shards, final norm and hash record (for --overwrite); other files stay."""
    directory = Path(directory)
    shards = sorted(directory.glob("shard-*.safetensors"))
    for file in [directory / MANIFEST_FILE, directory / FINAL_NORM_FILE, directory / VERIFIED_FILE, *shards]:
        file.unlink(missing_ok=True)


# temp files of atomic_path (`.NAME.XXXXXXXX.tmp`) and of safetensors >= 0.6 (`.tmpXXXXXX`), which earlier
# vitprobe versions left behind when killed while saving a shard
_TEMP_NAMES = re.compile(
    rf"^\.(({re.escape(MANIFEST_FILE)}|{re.escape(FINAL_NORM_FILE)}|{re.escape(VERIFIED_FILE)}|"
    rf"{re.escape(LOCK_FILE)}|shard-\d+\.safetensors)\..+{re.escape(TEMP_SUFFIX)}|tmp[A-Za-z0-9]{{6}})$"
)


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files a killed writer left behind (`.shard-*.tmp`, `.tmpXXXXXX`, ...); call with the
    lock held."""
    stale = sorted(f for f in Path(directory).glob(".*") if _TEMP_NAMES.match(f.name) and f.is_file())
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
