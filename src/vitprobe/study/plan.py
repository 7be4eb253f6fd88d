"""A study's plan: its steps in run order, each with the config it runs and an identity of its inputs.

Steps: `data` (generated needles), then per model and dataset `extract` (train, test), `probe`, `knn`,
`attention`, `frequency`, `localization`; then one `report`. A step's
identity hashes its resolved config and the identities of the steps it reads, so editing the study
reruns what changed and everything downstream of it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from vitprobe.study.spec import DatasetEntry, ModelEntry, Study, StudyError

MAP_HEADS = ("abmilp", "attentive")  # read-outs whose per-patch maps localisation scores


@dataclass(frozen=True)
class Step:
    """One unit of work: what it is, what it runs with, what it writes."""

    key: str  # unique, e.g. "probe:mae-400e:cub"
    kind: str
    title: str  # "probe mae-400e × cub"
    output: Path  # the file or folder whose completion marks the step done
    config: Any  # the library config it runs (ExtractConfig, ProbeConfig, ...), or a dict
    identity: str
    model: ModelEntry | None = None
    dataset: DatasetEntry | None = None
    needs_backbone: bool = False
    inputs: dict[str, Path] = field(default_factory=dict)  # e.g. train/test caches, head, maps


def identity(kind: str, config: Any, *upstream: str, extra: Any = None) -> str:
    """sha256 (16 hex digits) of a step's kind, resolved config, upstream identities and extras."""
    body = asdict(config) if is_dataclass(config) else config
    text = json.dumps([kind, body, list(upstream), extra], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_stamp(path: str | None) -> Any:
    """Size and mtime of a local checkpoint: a file rewritten in place makes its caches stale."""
    if path is None or "://" in path or path.startswith("hf-hub:"):
        return path
    p = Path(path)
    return [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else str(p)


def plan(study: Study) -> list[Step]:
    """Every step of `study`, in the order they run (a model's steps together, so one load serves them)."""
    from vitprobe.analysis.attention import AttentionConfig
    from vitprobe.analysis.frequency import FrequencyConfig
    from vitprobe.analysis.localization import LocalizationConfig
    from vitprobe.extract import ExtractConfig
    from vitprobe.knn import KnnConfig
    from vitprobe.probe.protocols import ProbeConfig

    if not study.steps:
        raise StudyError(
            f"{study.path or 'study'}: no protocol switched on",
            "add at least one of [probe], [knn], [attention], [frequency], [localization]",
        )
    probes = {
        d.name: _probe_config(study, ProbeConfig, d) if study.probe is not None else None
        for d in study.datasets
    }
    heads = {name: _map_head(study, cfg) for name, cfg in probes.items()}
    steps: list[Step] = []
    data_ids: dict[str, str] = {}
    for d in study.datasets:
        if d.synthetic is not None:
            cfg = {"synthetic": d.synthetic, "root": str(study.out / "data" / d.name)}
            data_ids[d.name] = identity("data", cfg)
            steps.append(
                Step(
                    f"data:{d.name}",
                    "data",
                    f"generate needles {d.name}",
                    study.out / "data" / d.name,
                    cfg,
                    data_ids[d.name],
                    dataset=d,
                )
            )
        else:
            data_ids[d.name] = identity("data", {"spec": d.data})
    needs_train = study.probe is not None or study.knn is not None
    for m in study.models:
        load = {
            "model": m.model,
            "checkpoint": _file_stamp(m.checkpoint),
            "random_init": m.random_init,
            "branch": m.branch,
            "seed": study.seed,
        }
        for d in study.datasets:
            spec, run_dir = study.data_spec(d), study.run_dir(m, d)
            probe_cfg, head = probes[d.name], heads[d.name]
            needs_test = needs_train or head is not None
            tag = f"{m.name} × {d.name}"
            caches: dict[str, Path] = {}
            cache_ids: dict[str, str] = {}
            for split, wanted in ((d.train, needs_train), (d.test, needs_test)):
                if not wanted:
                    continue
                out = study.cache_dir(m, d, split)
                cfg = ExtractConfig(
                    model=m.model,
                    data=spec,
                    split=split,
                    out=out,
                    checkpoint=m.checkpoint,
                    random_init=m.random_init,
                    device=study.device,
                    seed=study.seed,
                    **_extract_options(study, d, train=split == d.train),
                )
                caches[split], cache_ids[split] = out, identity("extract", cfg, data_ids[d.name], extra=load)
                steps.append(
                    Step(
                        f"extract:{m.name}:{d.name}:{split}",
                        "extract",
                        f"extract {tag} ({split})",
                        out / "manifest.json",
                        cfg,
                        cache_ids[split],
                        m,
                        d,
                        needs_backbone=True,
                    )
                )
            ids = (cache_ids.get(d.train, ""), cache_ids.get(d.test, ""))
            inputs = {"train": caches.get(d.train), "test": caches.get(d.test)}
            probe_id = None
            if probe_cfg is not None:
                probe_id = identity("probe", probe_cfg, *ids)
                steps.append(
                    Step(
                        f"probe:{m.name}:{d.name}",
                        "probe",
                        f"probe {tag}",
                        run_dir / "results.json",
                        probe_cfg,
                        probe_id,
                        m,
                        d,
                        inputs=inputs,
                    )
                )
            if study.knn is not None:
                knn_cfg = KnnConfig(device=study.device, **_tuples(study.knn, ("ks",)))
                steps.append(
                    Step(
                        f"knn:{m.name}:{d.name}",
                        "knn",
                        f"k-NN {tag}",
                        run_dir / "knn.json",
                        knn_cfg,
                        identity("knn", knn_cfg, *ids),
                        m,
                        d,
                        inputs=inputs,
                    )
                )
            common = {
                "model": m.model,
                "data": spec,
                "split": d.test,
                "out": str(run_dir),
                "checkpoint": m.checkpoint,
                "random_init": m.random_init,
                "device": study.device,
                "seed": study.seed,
                "overwrite": True,  # the step is not done: an earlier result in the run is stale
            }
            for kind, cls, table in (
                ("attention", AttentionConfig, study.attention),
                ("frequency", FrequencyConfig, study.frequency),
            ):
                if table is not None:
                    cfg = cls(**common, **_limit(table))
                    steps.append(
                        Step(
                            f"{kind}:{m.name}:{d.name}",
                            kind,
                            f"{kind} {tag}",
                            run_dir / f"{kind}.json",
                            cfg,
                            identity(kind, cfg, data_ids[d.name], extra=load),
                            m,
                            d,
                            needs_backbone=True,
                        )
                    )
            if study.localization is not None:
                options = {
                    k: v for k, v in _limit(study.localization).items() if k not in ("head", "cls_attention")
                }
                with_cls = bool(study.localization.get("cls_attention", True))
                head_file = run_dir / "heads" / f"{head}.safetensors" if head else None
                cfg = LocalizationConfig(  # a head's maps are computed from the test cache's tokens
                    out=str(run_dir), model=m.model if with_cls else None, data=spec, split=d.test,
                    cache=str(caches[d.test]) if head_file else None, checkpoint=m.checkpoint,
                    random_init=m.random_init, device=study.device, seed=study.seed, overwrite=True,
                    cls_attention=with_cls, heads=(str(head_file),) if head_file else (), **options,
                )  # fmt: skip
                if not cfg.cls_attention and not cfg.heads:
                    raise StudyError(
                        "[localization] scores nothing: cls_attention = false and no head",
                        "set cls_attention = true, or add a [probe] with abmilp",
                    )
                steps.append(
                    Step(
                        f"localization:{m.name}:{d.name}",
                        "localization",
                        f"localization {tag}",
                        run_dir / "localization.json",
                        cfg,
                        identity("localization", cfg, data_ids[d.name], probe_id or "", ids[1], extra=load),
                        m,
                        d,
                        needs_backbone=with_cls,
                    )
                )
    steps.append(
        Step(
            "report",
            "report",
            "report",
            study.out / "report.html",
            dict(study.report),
            identity("report", dict(study.report), *(s.identity for s in steps)),
        )
    )
    return steps


def _extract_options(study: Study, dataset: DatasetEntry, *, train: bool) -> dict[str, Any]:
    """[extract], then the dataset's `extract`, then (train cache) its `extract_train`."""
    options = {**study.extract, **dataset.extract, **(dataset.extract_train if train else {})}
    if "layers" in options:
        options["layers"] = tuple(int(x) for x in options["layers"])
    return options


def _limit(table: dict[str, Any]) -> dict[str, Any]:
    """An analysis table's options; `limit = 0` (TOML has no null) means every image."""
    return {k: (None if k == "limit" and v == 0 else v) for k, v in table.items()}


def _tuples(table: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """TOML lists of `keys` as tuples (a single number as a 1-tuple), as the configs take them."""
    out = {}
    for k, v in table.items():
        if k in keys and isinstance(v, list):
            v = tuple(v)
        elif k in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = (v,)
        out[k] = v
    return out


def _probe_config(study: Study, cls: Any, dataset: DatasetEntry) -> Any:
    """[probe] with the dataset's `probe` options on top, resolved from its protocol."""
    tuples = ("pools", "lr_grid", "c_grid", "weight_decay")
    options = _tuples({**(study.probe or {}), **dataset.probe}, tuples)
    protocol = options.pop("protocol", "auto")
    options.setdefault("seed", study.seed)
    return cls.from_protocol(protocol, device=study.device, **options)


def _map_head(study: Study, probe_cfg: Any) -> str | None:
    """The read-out whose maps localisation scores: [localization] head, else abmilp when it is probed."""
    if study.localization is None:
        return None
    head = study.localization.get("head")
    pools = tuple(probe_cfg.pools) if probe_cfg is not None else ()
    if head is None:
        return next((p for p in MAP_HEADS if p in pools), None)
    if head not in MAP_HEADS:
        raise StudyError(f"[localization] head = {head!r} has no per-patch maps", f"use one of {MAP_HEADS}")
    if head not in pools:
        raise StudyError(
            f"[localization] head = {head!r} is not among [probe] pools {list(pools)}",
            f'add "{head}" to pools',
        )
    return head
