"""vitprobe: probe pretrained Vision Transformers beyond the [cls] token.

The public Python API (docs/api.md); every name loads on first use, so `import vitprobe` stays fast and
imports no torch:

    import vitprobe as vp
    backbone = vp.load("mae-b16")                       # or a timm name, a checkpoint, your own nn.Module
    train = vp.extract_tokens(backbone, "cub:/data/CUB_200_2011", split="train")   # in memory (or out=)
    test = vp.extract_tokens(backbone, "cub:/data/CUB_200_2011", split="test")
    vp.knn_accuracy(train, test, ks=(20,)).top1[20]
    vp.fit_probes(train, test, pools=("cls", "abmilp")).readouts["abmilp"].top1

Names avoid vitprobe's module names (vitprobe.extract, vitprobe.probe, ...), which Python binds on the
package when they are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> "module:attribute"
    "load": "vitprobe.api:load",
    "extract_tokens": "vitprobe.api:extract_tokens",
    "fit_probes": "vitprobe.api_probing:fit_probes",
    "knn_accuracy": "vitprobe.api_probing:knn_accuracy",
    "attention_stats": "vitprobe.api_analyses:attention_stats",
    "frequency_stats": "vitprobe.api_analyses:frequency_stats",
    "localize": "vitprobe.api_analyses:localize",
    "write_report": "vitprobe.api_analyses:write_report",
    "run_study": "vitprobe.api_analyses:run_study",
    "load_results": "vitprobe.api_analyses:load_results",
    "ProbeRun": "vitprobe.api_probing:ProbeRun",
    "KnnScores": "vitprobe.api_probing:KnnScores",
    "Backbone": "vitprobe.models:Backbone",
    "ProbeConfig": "vitprobe.probe.protocols:ProbeConfig",
    "PROTOCOLS": "vitprobe.probe.protocols:PROTOCOLS",
    "VitprobeError": "vitprobe.errors:VitprobeError",
}
__all__ = [  # the names of _EXPORTS (tests/test_api.py checks), literal for tools that read it
    "__version__",
    "load",
    "extract_tokens",
    "fit_probes",
    "knn_accuracy",
    "attention_stats",
    "frequency_stats",
    "localize",
    "write_report",
    "run_study",
    "load_results",
    "ProbeRun",
    "KnnScores",
    "Backbone",
    "ProbeConfig",
    "PROTOCOLS",
    "VitprobeError",
]

if TYPE_CHECKING:
    from vitprobe.api import extract_tokens, load
    from vitprobe.api_analyses import (
        attention_stats,
        frequency_stats,
        load_results,
        localize,
        run_study,
        write_report,
    )
    from vitprobe.api_probing import KnnScores, ProbeRun, fit_probes, knn_accuracy
    from vitprobe.errors import VitprobeError
    from vitprobe.models import Backbone
    from vitprobe.probe.protocols import PROTOCOLS, ProbeConfig


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'vitprobe' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
