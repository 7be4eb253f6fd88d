"""Scores: a run's probe and k-NN results (typed models) → the numbers the report shows, with intervals.

Each probe read-out and each k-NN k becomes a `Score` (top-1 in percent, its 95 % Wilson interval over the
test images, the selection's choices, the health findings); a low-shot read-out keeps its mean ± std over
seeds and every seed's choices; a per-layer sweep's read-outs (`abmilp@11`) keep their pool and block, and
give one accuracy-vs-depth curve per pool. Nothing is recomputed but the intervals.
"""

from __future__ import annotations

from dataclasses import replace

from vitprobe import results as R
from vitprobe.report import stats
from vitprobe.report.model import DepthCurve, Finding, LearningCurve, Score, SeedChoice

WEAKEST_CLASSES = 5  # per read-out


def _pct(x: float) -> float:
    return 100.0 * x


def probe_scores(results: R.ProbeResults | None, trivial_top5: bool) -> list[Score]:
    """One score per read-out of results.json (each block of a sweep), in the file's order."""
    if results is None:
        return []
    wd_grid = len(results.config.weight_decay) > 1
    out = []
    for name, r in results.readouts.items():
        pool, block = R.split_readout(name)
        low, high = stats.wilson_interval(r.top1, r.num_test_samples)
        seeds = tuple(
            SeedChoice(s.seed, _pct(s.top1), s.blr, s.weight_decay, s.C, s.epoch, s.verdict)
            for s in r.seeds or ()
        )
        out.append(
            Score(
                readout=name,
                source="probe",
                top1=_pct(r.top1),
                ci=(_pct(low), _pct(high)),
                n=r.num_test_samples,
                top5=None if trivial_top5 else _pct(r.top5),
                delta_vs_cls=None,
                blr=r.blr,
                lr=r.lr,
                epoch=r.epoch,
                C=r.C,
                findings=tuple(Finding(c.code, c.severity, c.message, c.fix) for c in r.health),
                optimistic=results.selection.optimistic,
                pool=pool,
                block=block,
                weight_decay=r.weight_decay,
                wd_grid=wd_grid,
                std=None if r.top1_std is None or not seeds else _pct(r.top1_std),
                seeds=seeds,
            )
        )
    return out


def knn_readout(pool: str, k: str) -> str:
    return f"k-NN@{k}" if pool == "cls" else f"k-NN {pool}@{k}"


def knn_scores(knn: R.KnnResults | None, trivial_top5: bool) -> list[Score]:
    """One score per k of knn.json; a k clipped to the train rows is a warning."""
    if knn is None:
        return []
    out = []
    for k, entry in knn.knn.items():
        findings = ()
        if str(entry.k_used) != k:
            findings = (
                Finding(
                    "k_clipped",
                    "warning",
                    f"k-NN: k = {k} is more than the {knn.num_train} train rows; k = {entry.k_used} voted",
                    f"use a k of at most {knn.num_train}, or a larger train cache",
                ),
            )
        low, high = stats.wilson_interval(entry.top1, knn.num_test)
        name = knn_readout(knn.pool, k)
        out.append(
            Score(
                readout=name,
                source="knn",
                top1=_pct(entry.top1),
                ci=(_pct(low), _pct(high)),
                n=knn.num_test,
                top5=None if trivial_top5 else _pct(entry.top5),
                delta_vs_cls=None,
                k_used=entry.k_used,
                findings=findings,
                pool=name,
            )
        )
    return out


def with_deltas(scores: list[Score]) -> list[Score]:
    """Each probe score's top-1 minus the [cls] read-out's at the same block (a sweep compares block by
    block; a multi-block read-out and k-NN compare with the pivot's [cls])."""
    cls_at = {s.block: s for s in scores if s.source == "probe" and s.pool == "cls"}
    if not cls_at:
        return scores
    last = cls_at[max(cls_at, key=lambda b: -1 if b is None else b)]
    out = []
    for s in scores:
        ref = cls_at.get(s.block, last)
        out.append(s if s is ref else replace(s, delta_vs_cls=s.top1 - ref.top1))
    return out


def depth_curves(results: R.ProbeResults | None, scores: list[Score]) -> list[DepthCurve]:
    """A per-layer sweep's test top-1 per block, one curve per pool, from `per_layer` (the intervals and
    flags from each block's read-out)."""
    if results is None or not results.per_layer:
        return []
    by_name = {s.readout: s for s in scores}
    curves = []
    for pool, per in results.per_layer.items():
        names = results.blocks_of(pool)
        cells = [by_name.get(names.get(b, "")) for b in per.layers]
        n = [s.n if s else (results.selection.test_rows) for s in cells]
        ci = [stats.wilson_interval(t, k) for t, k in zip(per.top1, n, strict=True)]
        curves.append(
            DepthCurve(
                pool=pool,
                blocks=list(per.layers),
                top1=[_pct(t) for t in per.top1],
                ci=[(_pct(lo), _pct(hi)) for lo, hi in ci],
                flagged=[bool(s and s.flagged) for s in cells],
            )
        )
    return curves


def learning_curves(results: R.ProbeResults | None, shown: set[str] | None = None) -> list[LearningCurve]:
    """Each read-out's selection and test top-1 per evaluated epoch, at the chosen base lr (`shown`: only
    those read-outs, e.g. a sweep's last block per pool)."""
    if results is None:
        return []
    split = results.selection.split
    out = []
    for name, r in results.readouts.items():
        curve = r.curve()
        if curve is None or (shown is not None and name not in shown):
            continue  # logreg: no epochs

        def series(key: str, curve: R.Curve = curve) -> list[float | None]:
            return [None if v is None else _pct(v) for v in curve.series.get(key, [])]

        out.append(
            LearningCurve(name, r.blr, list(curve.epoch), series(f"{split}_top1"), series("test_top1"), split)
        )
    return out


def weakest_classes(
    results: R.ProbeResults | None, shown: set[str] | None = None
) -> dict[str, list[tuple[str, float]]]:
    """The classes each read-out gets wrong most often (lowest per-class test top-1 first)."""
    if results is None:
        return {}
    out = {}
    for name, r in results.readouts.items():
        if shown is not None and name not in shown:
            continue
        scored = sorted(((c, _pct(a)) for c, a in r.per_class.items() if a is not None), key=lambda t: t[1])
        if scored:
            out[name] = scored[:WEAKEST_CLASSES]
    return out
