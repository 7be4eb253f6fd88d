"""Provenance: the software versions written into every cache manifest, result file and figure."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import version


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
