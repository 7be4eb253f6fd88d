"""Provenance: the software versions written into every cache manifest, result file and figure."""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    """Versions of the software that produced a result (vitprobe, Python, torch, timm, numpy, safetensors)."""
    import numpy
    import safetensors
    import timm
    import torch

    from vitprobe import __version__

    return {
        "vitprobe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }
