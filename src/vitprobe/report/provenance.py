"""Run provenance for the report: what made a run (model, weights, data, protocol, software, machine), read
from whichever of its result files say so, and a note when its files describe different weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vitprobe import results as R
from vitprobe.report.model import RunProvenance

if TYPE_CHECKING:
    from vitprobe.report.collect import Run


def provenance(run: Run) -> RunProvenance:
    """What made the run, from whichever of its files say so (probe caches first, then analyses)."""
    probe, knn, att, freq, loc = run.probe, run.knn, run.attention, run.frequency, run.localization
    cache = (probe or knn).test_cache.provenance if (probe or knn) else None
    load = att.model if att else (freq.model if freq else None)
    loc_model = loc.model if loc else None
    blocks = [d.provenance for d in run.files.values() if getattr(d, "provenance", None) is not None]
    model = cache.model if cache else load.model if load else getattr(loc_model, "model", None)
    model = model or getattr(loc_model, "spec", None) or run.path.name
    checkpoint = cache.checkpoint if cache else (load.checkpoint_id if load else None)
    if checkpoint is None and loc_model is not None:
        checkpoint = getattr(loc_model, "checkpoint_id", None) or getattr(loc_model, "checkpoint", None)
    random_init = any(bool(getattr(d, "random_init", False)) for d in run.files.values())
    files = [b.checkpoint.file for b in blocks if b.checkpoint and b.checkpoint.file]
    if not files and load is not None and not load.random_init and load.source:
        files = [Path(load.source).name]
    data = att.data if att else (freq.data if freq else (loc.data if loc else None))
    versions = (probe or knn or att or freq or loc).versions  # type: ignore[union-attr]
    commands = [b.command for b in blocks]
    gits = [b.git.commit[:12] + ("+dirty" if b.git.dirty else "") for b in blocks if b.git]
    devices = [f"{b.device.type}: {b.device.name}" for b in blocks if b.device]
    if not devices:
        devices = [d for d in (att.device if att else None, freq.device if freq else None) if d]
    return RunProvenance(
        model=str(model),
        timm_name=cache.timm_name if cache else (load.timm_name if load else None),
        checkpoint="random-init" if random_init else checkpoint,
        checkpoint_file=files[0] if files else None,
        random_init=random_init,
        dataset=cache.dataset if cache else (data.spec if data else None),
        split=cache.split if cache else (data.split if data else None),
        fingerprint=cache.fingerprint if cache else (data.fingerprint if data else None),
        layer=probe.layer if probe else (knn.layer if knn else None),
        layers=list(probe.layers or []) if probe and probe.layer is None else [],  # a sweep's blocks
        versions=dict(versions),
        commands=list(dict.fromkeys(commands)),
        git=list(dict.fromkeys(gits)),
        hosts=list(dict.fromkeys(b.host for b in blocks)),
        devices=list(dict.fromkeys(devices)),
        protocol=probe.protocol.name if probe else None,
        protocol_overrides=list(probe.protocol.overrides) if probe else [],
        protocol_text=_protocol_text(probe) if probe else None,
        schedule=_schedule_text(probe) if probe else None,
        selection=probe.selection.rule if probe else None,
        optimistic=bool(probe and probe.selection.optimistic),
        lowshot=_lowshot_text(probe.selection.lowshot) if probe and probe.selection.lowshot else None,
    )


def _lowshot_text(low: R.LowShot) -> str:
    """`4 images per class, 3 seeds (0, 1, 2), 16 train rows per seed`."""
    if low.shots is not None:
        subset = f"{low.shots} images per class"
    else:
        subset = f"{low.train_fraction:g} of each class"
    rows = sorted(set(low.train_rows))
    per = f"{rows[0]}" if len(rows) == 1 else f"{rows[0]}–{rows[-1]}"
    seeds = ", ".join(map(str, low.seeds))
    return f"{subset}, {len(low.seeds)} seed(s) ({seeds}), {per} train rows per seed; mean ± std over seeds"


def _protocol_text(probe: R.ProbeResults) -> str:
    c = probe.config
    if c.protocol == "logreg":
        return f"L-BFGS logistic regression, {len(c.c_grid)} C values, max {c.max_iter} iterations"
    grid = c.lr_grid
    lrs = f"blr {grid[0]:g}" if len(grid) == 1 else f"{len(grid)} base lrs {min(grid):g}–{max(grid):g}"
    return (
        f"{c.optimizer} (momentum {c.momentum:g}, wd {', '.join(f'{w:g}' for w in c.weight_decay)}), {lrs}, "
        f"batch {c.batch_size}, "
        f">= {c.epochs} epochs, >= {c.min_steps} steps, warm-up {c.warmup_epochs:g} epochs"
        + (", final norm" if c.final_norm else "")
    )


def _schedule_text(probe: R.ProbeResults) -> str | None:
    s = probe.schedule
    if s is None:
        return None
    return f"batch {s.batch_size}, {s.epochs} epochs × {s.steps_per_epoch} steps = {s.total_steps} steps" + (
        " (epochs raised to reach the step budget)" if s.scaled else ""
    )


def consistency_notes(run: Run) -> list[str]:
    """Files of one run that describe different weights: the report would compare unlike things."""
    seen: dict[str, str] = {}
    if run.probe:
        seen["results.json"] = run.probe.test_cache.provenance.checkpoint
    if run.knn:
        seen["knn.json"] = run.knn.test_cache.provenance.checkpoint
    for name, doc in (("attention.json", run.attention), ("frequency.json", run.frequency)):
        if doc is not None:
            seen[name] = doc.model.checkpoint_id
    ids = set(seen.values())
    if len(ids) <= 1:
        return []
    detail = ", ".join(f"{k}: {v[:12]}" for k, v in seen.items())
    return [f"WARNING: the files of this run come from different weights ({detail}); they are not one model"]
