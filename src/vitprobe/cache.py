"""Token caches: safetensors shards plus a JSON manifest. Nothing here runs a model.

A cache is a directory::

    manifest.json                 what was extracted, how, and which shards are complete
    final_norm.safetensors        the backbone's final-norm parameters (absent if it has none)
    shard-00000.safetensors       samples [0, shard_size)
    shard-00001.safetensors       samples [shard_size, 2 * shard_size) ...

The format is a public contract, described in docs/cache-format.md. Readers (`open_cache`) validate the
manifest and stream shards memory-mapped; writers (`vitprobe.extract`) use `write_shard`, `write_manifest`
and `lock_cache` so that a shard exists only when it is complete and a crash never corrupts a cache.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vitprobe.errors import CacheError
from vitprobe.files import atomic_path, read_json, sha256_file

FORMAT_NAME = "vitprobe-token-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FINAL_NORM_FILE = "final_norm.safetensors"
LOCK_FILE = "extract.lock"
TOKEN_MODES = ("all", "cls", "pooled")

# store dtype name -> (torch dtype, safetensors header dtype, bytes per element)
STORE_DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "fp16": (torch.float16, "F16", 2),
    "bf16": (torch.bfloat16, "BF16", 2),
    "fp32": (torch.float32, "F32", 4),
}
INDEX_DTYPE = (torch.int64, "I64", 8)

REQUIRED_FIELDS = (
    "format", "format_version", "model", "layers", "grid", "dim", "num_prefix_tokens", "has_cls",
    "num_reg_tokens", "tokens", "store_dtype", "views", "dataset", "num_samples", "shard_size", "shards",
    "final_norm", "complete",
)


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
    st_dtype: str  # safetensors header name (F16, BF16, F32, I64)
    itemsize: int

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
    """
    if tokens not in TOKEN_MODES:
        raise CacheError(f"unknown token mode {tokens!r}", f"use one of {', '.join(TOKEN_MODES)}")
    if store_dtype not in STORE_DTYPES:
        raise CacheError(f"unknown store dtype {store_dtype!r}", f"use one of {', '.join(STORE_DTYPES)}")
    dtype, st_dtype, itemsize = STORE_DTYPES[store_dtype]
    lead = (num_layers,) if num_layers > 1 else ()
    num_patches = int(grid[0]) * int(grid[1])

    def token_spec(*shape: int) -> KeySpec:
        return KeySpec(lead + shape, dtype, st_dtype, itemsize)

    layout: dict[str, KeySpec] = {}
    if tokens == "all":
        layout["patches"] = token_spec(num_patches, dim)
        if has_cls:
            layout["cls"] = token_spec(dim)
        if num_reg_tokens:
            layout["reg"] = token_spec(num_reg_tokens, dim)
    elif tokens == "cls":
        if not has_cls:
            raise CacheError(
                "--tokens cls asks for the [cls] token but this model has none",
                "use --tokens pooled (mean of patch tokens) or --tokens all",
            )
        layout["cls"] = token_spec(dim)
    else:  # pooled
        if has_cls:
            layout["cls"] = token_spec(dim)
        layout["mean"] = token_spec(dim)
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
        """Tensor names every shard holds."""
        return list(self._layout)

    @property
    def layout(self) -> dict[str, KeySpec]:
        """Per-key shape (after the sample axis) and dtype."""
        return dict(self._layout)

    def verify_shard(self, i: int) -> None:
        """Re-hash shard `i` once per TokenCache and compare with the manifest (reads every byte of it).

        Raises:
            CacheError: the shard's bytes changed since it was written (disk corruption, an edit).
        """
        if i in self._verified:
            return
        info = self._shards[i]
        if sha256_file(self.path / info.file) != info.sha256:
            raise CacheError(
                f"shard {self.path / info.file} is corrupt: its sha256 differs from the manifest",
                f"delete that file and re-run the `vitprobe extract` command that wrote {self.path}; it "
                "rewrites the cache from that shard on",
            )
        self._verified.add(i)

    # --- reading -------------------------------------------------------------------------------------
    def read_shard(
        self, i: int, keys: Sequence[str] | None = None, rows: slice | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors of shard `i` (only `keys`, only `rows` of the shard), read from the memory-mapped file.

        Args:
            i: shard number, 0 <= i < len(shards).
            keys: tensor names to read (default: every key, see `keys`).
            rows: rows of this shard, e.g. slice(0, 128); the shard holds cache rows
                [shards[i].start, shards[i].stop).
        """
        if not 0 <= i < len(self._shards):
            raise CacheError(
                f"shard {i} does not exist in {self.path} ({len(self._shards)} complete shards)",
                f"use a shard number in [0, {len(self._shards) - 1}]",
            )
        names = list(self._layout) if keys is None else list(keys)
        unknown = [k for k in names if k not in self._layout]
        if unknown:
            raise CacheError(
                f"{self.path} has no tensor {', '.join(map(repr, unknown))} (tokens={self.tokens})",
                f"use one of {', '.join(self._layout)}; extract with --tokens all for patch tokens",
            )
        out: dict[str, torch.Tensor] = {}
        with safe_open(self.path / self._shards[i].file, framework="pt", device="cpu") as f:
            for key in names:
                out[key] = f.get_slice(key)[rows] if rows is not None else f.get_tensor(key)
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
        verify: also re-hash every shard and compare with the manifest's sha256 (reads every byte).

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
    expected_start = 0
    for s in manifest["shards"]:
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
            cache.verify_shard(i)
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
def write_shard(directory: Path, index: int, start: int, tensors: dict[str, torch.Tensor]) -> ShardInfo:
    """Write shard `index` (rows [start, start + n)) atomically and return its manifest entry.

    The file appears under its final name only once fully written; the bytes depend only on the tensors
    and their row range, so a resumed run writes the same file as an uninterrupted one.
    """
    n = int(tensors["indices"].shape[0])
    name = shard_file(index)
    metadata = _metadata(start=start, stop=start + n)
    try:
        with atomic_path(directory / name) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            digest = sha256_file(tmp)
    except OSError as exc:  # disk full, quota, permissions: the temp file is gone, earlier shards are intact
        raise CacheError(
            f"cannot write {directory / name}: {exc}",
            "free disk space or fix the permissions, then re-run the same command to resume",
        ) from exc
    return ShardInfo(file=name, start=start, stop=start + n, sha256=digest)


def write_final_norm(directory: Path, norm: torch.nn.Module) -> dict[str, Any]:
    """Save a final-norm module's parameters (fp32) and return the manifest's `final_norm` entry."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in norm.state_dict().items()}
    info: dict[str, Any] = {"file": None, "type": type(norm).__name__, "eps": getattr(norm, "eps", None)}
    if state:
        with atomic_path(directory / FINAL_NORM_FILE) as tmp:
            save_file(state, str(tmp), metadata=_metadata(type=info["type"]))
            info["file"] = FINAL_NORM_FILE
    return info


def _metadata(**fields: Any) -> dict[str, str]:
    """safetensors header metadata as ONE key: the library writes several keys in random order, which
    would make the bytes (and sha256) of identical shards differ between runs."""
    return {FORMAT_NAME: json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Replace manifest.json atomically (readers see the old or the new one, never a mix)."""
    text = json.dumps({**manifest, "updated": utc_now()}, indent=2) + "\n"
    with atomic_path(Path(directory) / MANIFEST_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest of `directory`, or None when there is none."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {exc}", "pass --overwrite to start the cache again") from exc
    check_manifest(manifest, where=path)
    return manifest


def shard_infos(manifest: dict[str, Any]) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["shards"]]


def shard_entries(shards: Sequence[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]


def remove_cache_files(directory: Path) -> None:
    """Delete a cache's manifest, shards and final norm (for --overwrite); other files are left alone."""
    directory = Path(directory)
    shards = sorted(directory.glob("shard-*.safetensors"))
    for file in [directory / MANIFEST_FILE, directory / FINAL_NORM_FILE, *shards]:
        file.unlink(missing_ok=True)


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files a killed writer left behind (`.shard-*.tmp`, ...); call with the lock held."""
    names = (f".{MANIFEST_FILE}.", f".{FINAL_NORM_FILE}.", ".shard-")
    stale = [f for f in Path(directory).glob(".*.tmp") if f.name.startswith(names)]
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextmanager
def lock_cache(directory: Path) -> Iterator[Path]:
    """Hold `directory/extract.lock` (created with O_EXCL, holding pid and host) for the block.

    Raises:
        CacheError: another run holds the lock, or a crashed run left it behind (stale lock).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create cache directory {directory}: {exc}", "choose another --out") from exc
    lock = directory / LOCK_FILE
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise _locked_error(lock) from None
    except OSError as exc:  # read-only file system, no permission
        raise CacheError(f"cannot create {lock}: {exc}", "choose a writable --out") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _locked_error(lock: Path) -> CacheError:
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        pid, host, started = int(owner["pid"]), str(owner["host"]), owner.get("started", "?")
    except (OSError, ValueError, KeyError, TypeError):
        return CacheError(f"{lock} exists but is unreadable", f"if no extraction is running, delete {lock}")
    if host == socket.gethostname() and not _pid_alive(pid):
        return CacheError(
            f"stale lock {lock}: pid {pid} on {host} (started {started}) is no longer running",
            f"delete {lock} and re-run; the extraction resumes from its last complete shard",
        )
    return CacheError(
        f"{lock.parent} is being written by pid {pid} on {host} (started {started})",
        "wait for that run to finish or use another --out",
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
