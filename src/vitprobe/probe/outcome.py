"""What a probe run produced: each read-out's reported head, how it was chosen, its metrics and health."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitprobe.heads import HeadSpec, ProbeHead
from vitprobe.probe.engine import Metrics
from vitprobe.probe.protocols import Schedule
from vitprobe.probe.selection import Check


@dataclass
class ReadoutResult:
    """One read-out's reported head: how it was chosen, its test metrics, curves and health."""

    spec: HeadSpec
    head: ProbeHead  # the reported head (the chosen one, or its refit), on the CPU, eval mode
    test: Metrics
    selection_top1: float | None  # on the selection split (holdout, or test when optimistic)
    blr: float | None = None  # chosen base lr (gradient protocols)
    lr: float | None = None
    weight_decay: float | None = None  # chosen weight decay (gradient protocols)
    epoch: int | None = None  # chosen epoch (1-based)
    C: float | None = None  # chosen L2 strength (logreg)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)  # per grid value
    sweep: list[dict[str, Any]] | None = None  # logreg: one entry per C
    health: list[Check] = field(default_factory=list)
    movement: float | None = None  # |W - W0| / |W0| of the chosen head's Linear
    refit: bool = False
    test_top1_before_refit: float | None = None
    baseline_top1: float | None = None  # test top-1 of the ridge reference on the same features (pooled)
    top1_std: float | None = None  # low-shot: standard deviation of the test top-1 over seeds
    seeds: list[dict[str, Any]] | None = None  # low-shot: each seed's test top-1 and choices

    @property
    def verdict(self) -> str:
        return "warning" if any(c.severity == "warning" for c in self.health) else "ok"


@dataclass
class ProbeOutcome:
    """What `train_probes` returns."""

    readouts: dict[str, ReadoutResult]
    selection: dict[str, Any]
    schedule: Schedule | None
    timing: dict[str, Any]
