"""Running a study: each planned step once, resumable, one backbone load per model, then one report.

State lives in OUT/study.json (`vitprobe.results.StudyState`): a step is skipped when its recorded
identity matches the plan's and its output exists (a cache must be complete). A step interrupted by a
kill or Ctrl-C is "started" there and runs again: an extraction resumes from its last complete shard,
the other steps rewrite their files (each writer is atomic). The steps of one model share one backbone,
loaded only if one of them has work to do.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vitprobe.errors import CacheError, VitprobeError
from vitprobe.study.plan import Step, plan
from vitprobe.study.spec import ModelEntry, Study, StudyError

RANDOM_BANNER = (
    "RANDOM WEIGHTS: a backbone of this study is untrained; its numbers only show the pipeline runs."
)


class StudyInterrupted(VitprobeError):
    """Ctrl-C during a study: finished steps are kept, the interrupted one reruns (exit code 130)."""

    exit_code = 130


@dataclass
class StepOutcome:
    key: str
    title: str
    status: str  # "ran", "skipped" (done before) or "skipped: <why>"
    seconds: float


@dataclass
class StudyResult:
    """What `run_study` did."""

    study: Study
    state: Path  # OUT/study.json
    report: Path | None
    runs: list[Path]
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [s.key for s in self.steps if s.status == "ran"]

    @property
    def skipped(self) -> list[str]:
        return [s.key for s in self.steps if s.status != "ran"]


class Backbones:
    """One loaded backbone per model, made on first use and dropped when its steps are over."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.loaded: dict[str, Any] = {}

    def get(self, model: ModelEntry) -> Any:
        if model.name not in self.loaded:
            import torch

            from vitprobe.devices import resolve_device
            from vitprobe.models import load_backbone

            torch.manual_seed(self.study.seed)  # random init draws what `extract --seed` draws
            backbone = load_backbone(
                model.model,
                checkpoint=model.checkpoint,
                random_init=model.random_init,
                branch=model.branch,
                device=str(resolve_device(self.study.device)),
            )
            backbone.model.eval()
            self.loaded[model.name] = backbone
        return self.loaded[model.name]

    def drop(self, model: ModelEntry | None) -> None:
        if model is not None and self.loaded.pop(model.name, None) is not None:
            gc.collect()


class State:
    """OUT/study.json: written atomically before and after every step."""

    def __init__(self, study: Study) -> None:
        from vitprobe import results as R

        self.path = study.out / "study.json"
        self.study = study
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            state = R.load(self.path, kind="study")
            self.steps = {k: v.to_dict() for k, v in state.steps.items()}  # type: ignore[attr-defined]

    def done(self, step: Step) -> bool:
        record = self.steps.get(step.key)
        if record is None or record["status"] != "done" or record["identity"] != step.identity:
            return False
        if step.kind == "extract":
            return _cache_complete(step.output.parent)
        return step.output.exists() or record.get("note") is not None

    def mark(self, step: Step, status: str, *, seconds: float | None = None, note: str | None = None) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        started = self.steps.get(step.key, {}).get("started", now) if status == "done" else now
        record = {
            "kind": step.kind,
            "identity": step.identity,
            "status": status,
            "started": started,
            "finished": now if status == "done" else None,
            "seconds": seconds,
            "output": str(step.output),
        }
        if note is not None:
            record["note"] = note
        self.steps[step.key] = record
        self.write()

    def write(self) -> None:
        from vitprobe import results as R
        from vitprobe.files import write_json
        from vitprobe.provenance import provenance

        data = {
            **R.header("study"),
            "title": self.study.title,
            "study_file": str(self.study.path) if self.study.path else None,
            "study": _resolved(self.study),
            "steps": self.steps,
            "provenance": provenance(),
        }
        write_json(self.path, R.validate("study", data))


def _resolved(study: Study) -> dict[str, Any]:
    d = asdict(study)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _cache_complete(path: Path) -> bool:
    from vitprobe.files import read_json

    try:
        return bool(read_json(path / "manifest.json").get("complete"))
    except (OSError, ValueError):
        return False


def run_study(
    study: Study,
    *,
    say: Callable[[str], None] = print,
    console: Any = None,
    dry_run: bool = False,
) -> StudyResult:
    """Run every step of `study` that is not done yet, then write its report.

    Args:
        study: a parsed study (`load_study`).
        say: prints one progress line per step.
        console: a rich console for the steps' own progress bars (None: quiet).
        dry_run: say what would run and what is done, run nothing.

    Raises:
        StudyInterrupted: on Ctrl-C (finished steps are kept; rerun to resume).
        VitprobeError: from any step.
    """
    steps = plan(study)
    study.out.mkdir(parents=True, exist_ok=True)
    state = State(study)
    backbones = Backbones(study)
    run_kinds = ("probe", "knn", "attention", "frequency", "localization")  # the steps that write a run
    runs = sorted({s.output.parent for s in steps if s.kind in run_kinds})
    result = StudyResult(study, state.path, None, runs)
    if study.random_init and not dry_run:
        say(f"⚠ {RANDOM_BANNER}")
    last_use = {s.model.name: i for i, s in enumerate(steps) if s.model is not None and s.needs_backbone}
    for i, step in enumerate(steps):
        tag = " [RANDOM WEIGHTS]" if step.model is not None and step.model.random_init else ""
        counter = f"[{i + 1}/{len(steps)}]"
        if state.done(step) and step.kind != "report":
            say(f"{counter} {step.title}{tag}: done, skipped")
            result.steps.append(StepOutcome(step.key, step.title, "skipped", 0.0))
            continue
        if dry_run:
            say(f"{counter} {step.title}{tag}: to run → {step.output}")
            continue
        say(f"{counter} {step.title}{tag} → {step.output}")
        state.mark(step, "started")
        start = time.perf_counter()
        try:
            note = _run_step(step, study, backbones, console)
        except KeyboardInterrupt:
            raise StudyInterrupted(
                f"study interrupted during {step.title}; the {i} steps before it are kept in {state.path}",
                "re-run the same command to resume (an extraction continues from its last complete shard)",
            ) from None
        seconds = time.perf_counter() - start
        state.mark(step, "done", seconds=seconds, note=note)
        result.steps.append(
            StepOutcome(step.key, step.title, "ran" if note is None else f"skipped: {note}", seconds)
        )
        if note is not None:
            say(f"      {note}")
        if step.model is not None and last_use.get(step.model.name) == i:
            backbones.drop(step.model)
        if step.kind == "report":
            result.report = step.output
    if study.random_init and not dry_run:
        say(f"⚠ {RANDOM_BANNER}")
    return result


def _run_step(step: Step, study: Study, backbones: Backbones, console: Any) -> str | None:
    """Run one step; returns a note when it had nothing to do (e.g. no boxes), else None."""
    backbone = backbones.get(step.model) if step.needs_backbone and step.model is not None else None
    kind, cfg = step.kind, step.config
    if kind == "data":
        make_needles(step.output, step.config["synthetic"])
    elif kind == "extract":
        from vitprobe.extract import extract

        try:
            extract(cfg, console=console, backbone=backbone)
        except CacheError as exc:
            if exc.hint and "--overwrite" in exc.hint:
                raise StudyError(
                    f"{exc.message} (the study's settings changed since that cache was made)",
                    f"delete {cfg.out} to extract it again, or point the study's `caches` elsewhere",
                ) from exc
            raise
    elif kind == "probe":
        from vitprobe.probe import run_probe

        run_probe(
            step.inputs["train"],
            step.inputs["test"],
            cfg,
            step.output.parent,
            overwrite=True,
            console=console,
        )
    elif kind == "knn":
        from vitprobe.knn import run_knn

        run_knn(step.inputs["train"], step.inputs["test"], cfg, step.output.parent, overwrite=True)
    elif kind == "attention":
        from vitprobe.analysis.attention import run_attention

        run_attention(cfg, backbone=backbone)
    elif kind == "frequency":
        from vitprobe.analysis.frequency import run_frequency

        run_frequency(cfg, backbone=backbone)
    elif kind == "localization":
        from vitprobe.analysis.localization import run_localization
        from vitprobe.data import open_dataset

        if open_dataset(cfg.data, cfg.split).boxes is None:
            return f"skipped: {cfg.data} ({cfg.split}) has no boxes to score maps against"
        run_localization(cfg, backbone=backbone)
    elif kind == "report":
        write_study_report(study, step.output)
    else:  # pragma: no cover - plan() makes only the kinds above
        raise AssertionError(f"unknown step kind {kind}")
    return None


def write_study_report(study: Study, out: Path) -> list[Path]:
    """The study's report: every run with a result, named by its model (and dataset when several)."""
    from vitprobe.report import EXTENSIONS, ReportConfig, write_report
    from vitprobe.results import RUN_FILES

    runs, labels, datasets = [], [], []
    for m in study.models:
        for d in study.datasets:
            run_dir = study.run_dir(m, d)
            if any((run_dir / f).is_file() for f in RUN_FILES):
                runs.append(str(run_dir))
                labels.append(m.name)
                datasets.append(d.name)
    title = str(study.report.get("title", study.title)) + (" — RANDOM WEIGHTS" if study.random_init else "")
    written = []
    for fmt in study.report.get("formats", ["html"]):
        path = out if fmt == "html" else out.with_suffix(f".{EXTENSIONS[fmt]}")
        write_report(
            ReportConfig(
                runs=tuple(runs),
                out=str(path),
                format=fmt,
                title=title,
                labels=tuple(labels),
                datasets=tuple(datasets),
                pivot=str(study.report.get("pivot", "readouts")),
                readout=study.report.get("readout"),
            )
        )
        written.append(path)
    return written


def make_needles(root: Path, settings: dict[str, int]) -> None:
    """Generate needles into `root`, or reuse those an earlier run made there with the same settings.

    Raises:
        StudyError: `root` holds needles made with other settings (their results would describe other data).
    """
    from vitprobe.files import read_json
    from vitprobe.synthetic import SyntheticConfig, make_synthetic

    wanted = asdict(SyntheticConfig(**settings))
    made_file = root / "synthetic.json"
    if not made_file.is_file():
        make_synthetic(root, **wanted)
        return
    made = read_json(made_file)
    differs = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
    if differs:
        was = ", ".join(f"{k}={old}" for k, (old, _) in differs.items())
        asked = ", ".join(f"{k}={new}" for k, (_, new) in differs.items())
        raise StudyError(
            f"{root} holds needles made earlier ({was}), not the ones asked for ({asked})",
            f"use another out folder, or delete {root} to generate them again",
        )
