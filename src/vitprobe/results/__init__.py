"""Result files: one typed model per file vitprobe writes, one header, parsed strictly by every reader.

Writers build the dict, `validate(kind, d)` checks it against its model and returns strict JSON data;
readers call `load(path)` (any kind, told by its header) or `load(path, kind="probe")`. An unknown
version is refused with a message that says whether vitprobe is too old or the file is. Nothing here
guesses a key: each key has one spelling, declared in the models. docs/results-format.md describes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitprobe.results.analyses import (
    AttentionResults,
    FrequencyResults,
    LocalizationResults,
    MapScore,
    Stat,
)
from vitprobe.results.caches import CacheManifest
from vitprobe.results.common import (
    BackboneInfo,
    CacheProvenance,
    CacheRef,
    CheckpointInfo,
    DataInfo,
    LoadRecord,
    ManifestModel,
    Provenance,
)
from vitprobe.results.knn import KnnEntry, KnnResults, KnnTiming
from vitprobe.results.probing import (
    Check,
    Curve,
    HeadMeta,
    LowShot,
    PerLayer,
    Predictions,
    ProbeResults,
    Readout,
    Schedule,
    SeedResult,
    Selection,
    split_readout,
)
from vitprobe.results.schema import (
    Model,
    ResultsError,
    Versioned,
    dumps_strict,
    header_style,
    loads_strict,
)
from vitprobe.results.study import StepRecord, StudyState

KINDS: dict[str, type[Versioned]] = {
    cls.KIND: cls
    for cls in (
        ProbeResults,
        KnnResults,
        AttentionResults,
        FrequencyResults,
        LocalizationResults,
        Predictions,
        HeadMeta,
        CacheManifest,
        StudyState,
    )
}
FORMATS: dict[str, str] = {cls.FORMAT: kind for kind, cls in KINDS.items()}
RUN_FILES: dict[str, str] = {  # the files a run directory may hold, in report order
    "results.json": "probe",
    "knn.json": "knn",
    "attention.json": "attention",
    "frequency.json": "frequency",
    "localization.json": "localization",
}


def header(kind: str) -> dict[str, Any]:
    """The header a writer of `kind` starts its file with, at the current version."""
    cls = KINDS[kind]
    return {"format": cls.FORMAT, "version": cls.CURRENT, "kind": cls.KIND}


def kind_of(data: Any, *, where: str) -> str:
    """The kind a parsed JSON object declares in its header (refused when it declares none we know)."""
    if isinstance(data, dict) and header_style(data) is not None:
        if "format" in data and data["format"] in FORMATS:
            return FORMATS[data["format"]]
        if "format" not in data and data.get("kind") in KINDS:
            return str(data["kind"])
        raise ResultsError(
            f"{where}: format {data.get('format') or data.get('kind')!r} is not a vitprobe result file",
            "pass a file written by vitprobe (results.json, knn.json, attention.json, ...)",
        )
    raise ResultsError(
        f"{where}: not a vitprobe result file (no format/version header)",
        "pass a file written by vitprobe (results.json, knn.json, attention.json, ...)",
    )


def parse(data: Any, *, kind: str | None = None, where: str = "") -> Versioned:
    """The typed model of `data` (its kind from the header, or `kind`, which the header must agree with)."""
    found = kind_of(data, where=where or "result")
    if kind is not None and found != kind:
        hint = f"pass the {KINDS[kind].FILE or kind} file"
        raise ResultsError(f"{where}: a {found} file, not {kind}", hint)
    return KINDS[found].from_dict(data, where=where or KINDS[found].FILE or found)


def load(path: str | os.PathLike[str], *, kind: str | None = None) -> Versioned:
    """Read and parse a result file strictly (no NaN, known version, every key typed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror}", "check the path") from exc
    return parse(loads_strict(text, where=str(path)), kind=kind, where=str(path))


def validate(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A writer's dict checked against the model of `kind`, as the strict JSON data to write.

    Raises:
        ResultsError: a key missing or of the wrong type, a NaN, a header of another kind or version.
    """
    return KINDS[kind].from_dict(dict(data), where=KINDS[kind].FILE or kind).to_dict()


__all__ = [
    "KINDS",
    "FORMATS",
    "RUN_FILES",
    "AttentionResults",
    "BackboneInfo",
    "CacheManifest",
    "CacheProvenance",
    "CacheRef",
    "Check",
    "CheckpointInfo",
    "Curve",
    "DataInfo",
    "FrequencyResults",
    "HeadMeta",
    "KnnEntry",
    "KnnResults",
    "KnnTiming",
    "LoadRecord",
    "LowShot",
    "LocalizationResults",
    "ManifestModel",
    "MapScore",
    "Model",
    "PerLayer",
    "Predictions",
    "ProbeResults",
    "Provenance",
    "Readout",
    "ResultsError",
    "Schedule",
    "SeedResult",
    "Selection",
    "Stat",
    "StepRecord",
    "StudyState",
    "Versioned",
    "dumps_strict",
    "header",
    "kind_of",
    "load",
    "loads_strict",
    "parse",
    "split_readout",
    "validate",
]
