"""Token caches: safetensors shards plus a JSON manifest. Nothing here runs a model.

A cache is a directory::

    manifest.json                 what was extracted, how, and which shards are complete
    final_norm.safetensors        the backbone's final-norm parameters (absent if it has none)
    shard-00000.safetensors       samples [0, shard_size)
    shard-00001.safetensors       samples [shard_size, 2 * shard_size) ...
    verified.json                 which shard files were hashed, and the size / mtime / inode they had then

The format is a public contract, described in docs/cache-format.md. Readers (`open_cache`) validate the
manifest (vitprobe.manifest) and stream shards memory-mapped; writers (`vitprobe.extract`) use
`write_shard` (vitprobe.shards), `write_manifest` and `lock_cache` (vitprobe.lock) so that a shard exists
only when it is complete and durable, and a crash or a full disk never corrupts a cache.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vitprobe.errors import CacheError
from vitprobe.files import TEMP_SUFFIX, read_json, sha256_file
from vitprobe.lock import LOCK_FILE, lock_cache  # noqa: F401 - the cache API: writers take the lock
from vitprobe.manifest import (  # noqa: F401 - the cache API: the manifest lives in vitprobe.manifest
    MANIFEST_FILE,
    MANIFEST_VERSIONS,
    ManifestUnreadable,
    check_manifest,
    manifest_version,
    read_manifest,
    shard_entries,
    shard_infos,
    utc_now,
    write_manifest,
)
from vitprobe.quant import QUANTS, SCALE_SUFFIX
from vitprobe.quant import dequantise as _dequantise
from vitprobe.shards import (  # noqa: F401 - the cache API: shard layout and writing live in vitprobe.shards
    FINAL_NORM_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DTYPE,
    RESUME,
    STORE_DTYPES,
    TOKEN_MODES,
    KeySpec,
    ShardInfo,
    bytes_per_sample,
    layout_from_manifest,
    read_shard_metadata,
    shard_file,
    shard_layout,
    shard_problem,
    write_final_norm,
    write_shard,
)
from vitprobe.verified import VERIFIED_FILE, HashRecord


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
            HashRecord.update(self.path, file, info.sha256)  # merged with what other readers recorded

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
            "format_version": manifest_version(m),
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
