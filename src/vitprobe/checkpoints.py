"""Checkpoint files: safe reading (.pth/.pt/.pth.tar/.safetensors), URL and Hugging Face hub downloads.

Nothing here executes code from a file: pickles are read with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers, and only under torch >= 2.10 (older versions have known bypasses:
CVE-2025-32434 below 2.6, CVE-2026-24747 below 2.10). Two more types are allowed: `argparse.Namespace`,
because the official MAE, DINO, iBOT and BEiT training checkpoints store their command line as `args`, and
yacs' `CfgNode` (SimMIM's `config`), which is rebuilt as a plain `OrderedDict` by a stand-in class, so the
file's class is never imported and none of its code runs.

Downloads honour `HF_HUB_OFFLINE=1` (for the hub *and* plain URLs): when offline and the file is not cached,
`WeightsUnavailableError` names the file and how to pass it with `--checkpoint`.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vitprobe.errors import CheckpointError, WeightsUnavailableError
from vitprobe.files import sha256_file

__all__ = [
    "HF_HUB_PREFIX",
    "SAFE_TORCH",
    "PickledConfig",
    "cache_dir",
    "describe_content",
    "download_url",
    "fetch_checkpoint",
    "hf_hub_file",
    "is_offline",
    "is_url",
    "read_checkpoint",
    "url_cache_path",
    "sha256_file",
    "torch_is_safe",
]

HF_HUB_PREFIX = "hf-hub:"
_TRUTHY = {"1", "true", "yes", "on"}
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".pkl")
# torch versions whose weights_only unpickler can be made to run code: CVE-2025-32434 (fixed in 2.6.0),
# CVE-2026-24747 (memory corruption in the weights_only unpickler, fixed in 2.10.0)
SAFE_TORCH = (2, 10)


def is_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (read at call time, not import time) asks for no network access."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


def is_url(spec: str) -> bool:
    """True for http(s) URLs (the only remote scheme vitprobe downloads from besides `hf-hub:`)."""
    return urlparse(spec).scheme in ("http", "https")


def cache_dir() -> Path:
    """Where downloaded checkpoints live: `$VITPROBE_CACHE/checkpoints`, else torch hub's checkpoint folder
    (`$TORCH_HOME/hub/checkpoints`); each URL has its own `HOST/PATH` below it (`url_cache_path`)."""
    root = os.environ.get("VITPROBE_CACHE")
    if root:
        return Path(root).expanduser() / "checkpoints"
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> Path | None:
    """`$VITPROBE_CACHE/hf-hub` when set (tests, isolated runs); None keeps huggingface_hub's own cache."""
    root = os.environ.get("VITPROBE_CACHE")
    return Path(root).expanduser() / "hf-hub" if root else None


def url_cache_path(url: str) -> Path:
    """Where `download_url` keeps `url`: `cache_dir()/HOST/PATH`, so one URL never shadows another.

    Releases reuse file names (iBOT's `vitb_16/checkpoint_teacher.pth` and `vits_16/checkpoint_teacher.pth`,
    every `checkpoint.pth`); caching by file name alone would silently hand back the wrong weights.
    """
    parts = urlparse(url)
    path = [p for p in parts.path.split("/") if p not in ("", ".", "..")] or ["checkpoint.pth"]
    return cache_dir().joinpath(parts.netloc or "unknown-host", *path)


def download_url(url: str) -> Path:
    """Download `url` into `cache_dir()` once (atomically) and return the local file.

    Raises:
        WeightsUnavailableError: offline and not cached, or the download failed.
    """
    dst = url_cache_path(url)
    name = dst.name
    if dst.is_file():
        return dst
    hint = f"download {url} on a machine with network access and pass it with --checkpoint /path/to/{name}"
    if is_offline():
        raise WeightsUnavailableError(
            f"{name} is needed but not cached as {dst}, and HF_HUB_OFFLINE=1 forbids downloading it",
            f"{hint}, or copy it to {dst}, or unset HF_HUB_OFFLINE",
        )
    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # writes to a temporary file and renames it, so a partial download is never mistaken for the file
        torch.hub.download_url_to_file(url, str(dst), progress=sys.stderr.isatty())
    except Exception as exc:  # URLError, HTTPError, timeouts, disk full: all mean "no weights"
        raise WeightsUnavailableError(f"could not download {url}: {exc}", hint) from exc
    return dst


def hf_hub_file(repo_id: str, filename: str = "model.safetensors") -> Path:
    """Fetch `filename` from the Hugging Face hub repo `repo_id` (cached; offline-aware) and return its path.

    Raises:
        WeightsUnavailableError: offline and not cached, or the hub cannot be reached.
    """
    from huggingface_hub import hf_hub_download

    offline = is_offline()
    cache = _hf_cache_dir()
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    try:
        path = hf_hub_download(
            repo_id, filename, cache_dir=str(cache) if cache else None, local_files_only=offline
        )
    except Exception as exc:  # LocalEntryNotFoundError, OfflineModeIsEnabled, HTTP errors, no network
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local cache" if offline else f"{exc}"
        raise WeightsUnavailableError(
            f"{filename} from hf-hub:{repo_id} is needed: {why}",
            f"download {url} where there is network access and pass it with --checkpoint /path/to/{filename}"
            + (", or unset HF_HUB_OFFLINE" if offline else " (HF_HUB_OFFLINE=1 skips the download retries)"),
        ) from exc
    return Path(path)


def fetch_checkpoint(spec: str) -> Path:
    """Turn a weights spec into a local file: a path, an http(s) URL or `hf-hub:REPO[:FILENAME]`.

    Raises:
        CheckpointError: a local path that does not exist.
        WeightsUnavailableError: a remote file that cannot be fetched.
    """
    if spec.startswith(HF_HUB_PREFIX):
        repo, _, filename = spec.removeprefix(HF_HUB_PREFIX).partition(":")
        return hf_hub_file(repo, filename or "model.safetensors")
    if is_url(spec):
        return download_url(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        suffixes = (".safetensors", *_PICKLE_SUFFIXES)
        inside = sorted(p.name for p in path.iterdir() if p.name.endswith(suffixes))
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a weights file",
            "pass the file itself"
            + (f", e.g. {path / inside[0]} (weights files there: {', '.join(inside[:5])})" if inside else ""),
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} does not exist",
            "pass the path of a .pth, .pt, .pth.tar or .safetensors file (or an http(s) URL)",
        )
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint's top-level mapping on the CPU without running code from the file.

    The content decides, not the name: safetensors files are read with safetensors, torch.save zips and
    pickles with `torch.load(weights_only=True)`, allowing `argparse.Namespace` (the `args` entry of
    official training checkpoints) and yacs' `CfgNode` (read as plain data) and nothing else. Anything else
    (an HTML page, a Git LFS pointer, text, an empty or truncated file) is named as what it is.

    Raises:
        CheckpointError: the file needs arbitrary code to unpickle, is corrupt, is something else, or is not
            a mapping; pickles under a torch version with known weights_only bypasses are refused too.
    """
    path = Path(path)
    if _is_safetensors(path):
        return _read_safetensors(path)
    if path.name.endswith(".safetensors"):
        if _is_pickle(path):  # a torch file saved under a .safetensors name
            return _checked_mapping(path, _torch_load_safely(path))
        raise CheckpointError(
            f"{path} is not a safetensors file: it is {describe_content(path)}",
            _refetch_hint(path),
        )
    if path.suffix.lower() not in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is not a checkpoint format vitprobe reads (suffix {path.suffix or 'none'!r})",
            "use a .safetensors file or a torch-saved .pth/.pt/.pth.tar/.bin file",
        )
    return _checked_mapping(path, _torch_load_safely(path))


def _checked_mapping(path: Path, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint mapping",
            "save the model's state_dict() (a dict of tensors), not the module itself",
        )
    return obj


def describe_content(path: Path) -> str:
    """What a file that is not a weights file looks like from its first bytes, as a phrase for messages:
    "an HTML page (...)", "a Git LFS pointer", "an empty file", "a JSON/text file", ..."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not head:
        return "an empty file (0 bytes)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:256]:
        title = re.search(rb"<title>(.*?)</title>", head, re.IGNORECASE | re.DOTALL)
        shown = f": {title.group(1).decode('utf-8', 'replace').strip()[:60]!r}" if title else ""
        return f"an HTML page{shown}, not weights (a login, error or download page saved in its place)"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run `git lfs pull` in the repository, or download it)"
    if text.startswith(b"<?xml"):
        return "an XML document (often a cloud-storage error such as AccessDenied), not weights"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive that is not a torch checkpoint"
    if head[:2] == b"\x1f\x8b":
        return "a gzip archive (unpack it first)"
    if text[:1] in (b"{", b"["):
        return "a JSON/text file, not weights"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file, not weights"
    if len(head) >= 8:
        declared = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and declared > size - 8:
            return f"a truncated safetensors file (header needs {declared + 8} bytes, the file has {size})"
    return f"an unknown binary format (starts with {head[:8]!r})"


def _refetch_hint(path: Path) -> str:
    return (
        f"re-download {path.name} (with a browser or `huggingface-cli download` for hub files) and check its "
        "size, or pass a .pth/.pt written by torch.save"
    )


def _is_pickle(path: Path) -> bool:
    """True when the file starts like torch.save output: a zip (PK) or a protocol >= 2 pickle."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    return magic == b"PK\x03\x04" or magic[:1] == b"\x80"


def _is_safetensors(path: Path) -> bool:
    """True when the file starts like safetensors: a little-endian u64 header size, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    return head[8:9] == b"{" and 2 <= size <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        message = f"{path} is not a readable safetensors file: {exc}"
        raise CheckpointError(message, _refetch_hint(path)) from exc


class PickledConfig:
    """Stand-in for config classes that official checkpoints pickle (yacs `CfgNode`, SimMIM's `config`).

    torch's weights-only unpickler may create it (it is allow-listed under the pickled class's name); it
    builds an empty `OrderedDict` that the pickle then fills with the config's items and attributes, so the
    config is read as plain data and the real class (which vitprobe never imports) never runs.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict[Any, Any]:  # type: ignore[misc]
        return OrderedDict()


def torch_is_safe(version: str) -> bool:
    """True when torch `version` has no known way around `weights_only=True` (>= SAFE_TORCH)."""
    from torch.torch_version import TorchVersion

    return TorchVersion(version) >= SAFE_TORCH


def _torch_load_safely(path: Path) -> Any:
    import argparse
    import pickle

    import torch

    if not _is_pickle(path):  # torch.save writes a zip (PK\x03\x04); legacy files start with PROTO (0x80)
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (neither a torch.save zip nor a pickle): it is "
            f"{describe_content(path)}",
            _refetch_hint(path),
        )
    if not torch_is_safe(torch.__version__):
        raise CheckpointError(
            f"refused to unpickle {path} with torch {torch.__version__}: torch < 2.10 can be made to run "
            "code while loading with weights_only=True (CVE-2025-32434 below 2.6, CVE-2026-24747 below 2.10)",
            "upgrade torch (pip install 'torch>=2.10'), or pass the weights as a .safetensors file",
        )
    allowed = [argparse.Namespace, (PickledConfig, "yacs.config.CfgNode")]
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")  # protocol-version chatter from the weights-only unpickler
            with open(path, "rb") as f:  # a file object: torch never picks a loader from the name
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # not a pickle at all: truncated or another format
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint: {exc}", "re-download the file"
            ) from exc
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the Python object {match.group(1)}" if match else "Python objects other than tensors"
        raise CheckpointError(
            f"refused to load {path}: unpickling it would need {what}, which can run arbitrary code",
            "only load files you trust; re-save the weights as a plain state dict "
            "(torch.save(model.state_dict(), ...)) or as .safetensors and pass that file",
        ) from exc
    except Exception as exc:  # RuntimeError, EOFError, IndexError...: a truncated file or another format
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); it may be truncated "
            "or another format",
            _refetch_hint(path),
        ) from exc
