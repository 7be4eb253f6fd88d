"""Provenance: which software, command, machine, checkpoint and data produced a result, recorded in full.

`versions()` is written into every cache manifest; `provenance(...)` into every result file (results.json,
knn.json, the analyses' JSONs, the study state): the versions, the command line, the git commit of
vitprobe when it runs from a checkout, the host, the device name, the checkpoint (file name and sha256)
and the dataset fingerprint.
"""

from __future__ import annotations

import functools
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 2.0  # `git rev-parse` on a checkout takes milliseconds; never hang a run on it


def versions() -> dict[str, str]:
    """Versions of the software that produced a result (vitprobe, Python, torch, timm, numpy, safetensors).

    timm's is read from its installed metadata unless timm is already imported: importing timm (and with it
    torchvision) costs seconds, and a probe or k-NN run needs no model code.
    """
    import numpy
    import safetensors
    import torch

    from vitprobe import __version__

    return {
        "vitprobe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": sys.modules["timm"].__version__ if "timm" in sys.modules else version("timm"),
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def provenance(
    *,
    device: Any = None,
    checkpoint: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that says how a result was made (docs/results-format.md, "provenance").

    Args:
        device: the torch device (or its name) the work ran on; None = not recorded.
        checkpoint: `checkpoint_info(...)` of the backbone's weights.
        dataset: `{"spec", "split", "fingerprint"}` of the images.
    """
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": command_line(),
        "git": git_state(),
        "host": platform.node(),
        "platform": platform.platform(),
        "device": device_info(device),
        "checkpoint": dict(checkpoint) if checkpoint is not None else None,
        "dataset": (
            {k: dataset.get(k) for k in ("spec", "split", "fingerprint")} if dataset is not None else None
        ),
    }


def command_line() -> str:
    """The command as typed (`vitprobe probe --train ...`, `python -m vitprobe run ...`), shell-quoted."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    if first.name == "__main__.py":  # python -m vitprobe ...
        return shlex.join(["python", "-m", first.parent.name, *argv[1:]])
    argv[0] = first.name or argv[0]
    return shlex.join(argv)


def checkpoint_info(*, source: str | None, sha256: str | None, random_init: bool) -> dict[str, Any]:
    """The weights a backbone was loaded from: file name, where it came from, sha256 (None: random)."""
    if random_init:
        return {"file": None, "source": "random-init", "sha256": None, "random_init": True}
    name = None
    if source:
        remote = "://" in source or source.startswith("hf-hub:")
        name = source.rsplit("/", 1)[-1] if remote else Path(source).name
    return {"file": name, "source": source, "sha256": sha256, "random_init": False}


def checkpoint_of(report: Any) -> dict[str, Any]:
    """`checkpoint_info` of a backbone's `LoadReport` (what `load_backbone` read)."""
    return checkpoint_info(source=report.source, sha256=report.sha256, random_init=report.random_init)


def checkpoint_from_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`checkpoint_info` of a cache manifest's `model` block (`checkpoint`: the sha256, or random-init)."""
    model = manifest.get("model", {})
    random_init = bool(model.get("random_init"))
    sha = model.get("checkpoint")
    return checkpoint_info(
        source=model.get("source"), sha256=None if random_init else sha, random_init=random_init
    )


def device_info(device: Any) -> dict[str, Any] | None:
    """`{"type", "name"}` of a device: the GPU's name on CUDA, the CPU model otherwise."""
    if device is None:
        return None
    text = str(device)
    kind = text.split(":")[0]
    if kind == "cuda":
        import torch

        index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
        return {"type": "cuda", "index": index, "name": torch.cuda.get_device_name(index)}
    return {"type": kind, "name": cpu_name() if kind == "cpu" else text}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7763 64-Core Processor"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """`{"commit", "dirty"}` of the vitprobe checkout this code runs from; None when installed as a package.

    Only a checkout that holds this very package counts (src/vitprobe inside the repository's work tree):
    a site-packages install inside some other repository records nothing.
    """
    package = Path(__file__).resolve().parent
    root = package.parent.parent  # src/vitprobe -> the repository root
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
                check=False,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
