"""Model of a study's state file, OUT/study.json (`vitprobe run`): which steps are done, for what inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitprobe.results.common import Provenance
from vitprobe.results.schema import Model, Versioned, opt

model = dataclass(frozen=True, kw_only=True)


@model
class StepRecord(Model):
    """One step's last run: `identity` hashes its resolved config and its inputs' identities."""

    kind: str  # data, extract, probe, knn, attention, frequency, predict, localization, report
    identity: str
    status: str  # "started" (interrupted, or running) or "done"
    started: str
    finished: str | None
    seconds: float | None
    output: str  # the file or folder the step writes
    note: str | None = opt()  # e.g. "skipped: the dataset has no boxes"


@model
class StudyState(Versioned):
    FORMAT = "vitprobe-study"
    KIND = "study"
    FILE = "study.json"

    title: str
    study_file: str | None
    study: dict[str, Any]  # the resolved study (every path absolute)
    steps: dict[str, StepRecord]  # by step key, in run order
    provenance: Provenance | None = opt()
