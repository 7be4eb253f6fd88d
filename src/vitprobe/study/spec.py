"""Study files: a STUDY.toml (models × datasets × protocols) parsed into a typed, checked `Study`.

Every key is checked (a typo is an error naming the key and what is allowed); relative paths are taken
from the study file's folder. The tables [probe], [knn], [attention], [frequency] and [localization]
switch their protocol on (an empty table = the defaults); their keys are the fields of the library's own
configs (ProbeConfig, KnnConfig, AttentionConfig, ...), so a study says exactly what a command line would.
Torch-free: `vitprobe run --dry-run` plans without loading a model. docs/studies/ holds examples.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitprobe.choices import DATASET_KIND, DTYPE, REPORT_FORMAT, STORE, STUDY_STEPS, TOKENS
from vitprobe.errors import VitprobeError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (the tomli backport; see pyproject)
    import tomli as tomllib  # type: ignore[no-redef]


class StudyError(VitprobeError):
    """A study file that does not parse, or names something that does not exist."""


TOP_KEYS = (
    "title",
    "out",
    "caches",
    "device",
    "seed",
    "models",
    "datasets",
    "extract",
    "report",
    *STUDY_STEPS,
)
MODEL_KEYS = ("name", "model", "checkpoint", "random_init", "branch")
DATASET_KEYS = ("name", "data", "train", "test", "synthetic", "extract", "extract_train", "probe")
SYNTHETIC_KEYS = ("n", "classes", "size", "seed")
EXTRACT_KEYS = (
    "layers",
    "batch_size",
    "workers",
    "dtype",
    "store",
    "tokens",
    "views",
    "limit",
    "shard_size",
    "force",
)
KNN_KEYS = ("ks", "temperature", "pool", "layer", "final_norm", "batch_size", "train_chunk")
ATTENTION_KEYS = ("limit", "batch_size", "num_workers", "rollout", "n_maps")
FREQUENCY_KEYS = ("limit", "batch_size", "num_workers")
LOCALIZATION_KEYS = ("head", "cls_attention", "limit", "batch_size", "num_workers", "n_figures")
REPORT_KEYS = ("title", "formats", "pivot", "readout")
PROBE_EXCLUDED = ("device", "overrides")  # set by the study (device) or derived (overrides)


@dataclass(frozen=True)
class ModelEntry:
    """One backbone of the study: a preset, timm:NAME or a checkpoint file for a preset's architecture."""

    name: str  # names its runs in every table and legend
    model: str
    checkpoint: str | None = None
    random_init: bool = False
    branch: str | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: a spec with a train and a test split, or needles generated into the study folder."""

    name: str
    data: str | None  # None for generated needles (the spec is known once they exist)
    train: str = "train"
    test: str = "test"
    synthetic: dict[str, int] | None = None  # n, classes, size, seed of generated needles
    extract: dict[str, Any] = field(default_factory=dict)  # [extract] options for this dataset's caches
    extract_train: dict[str, Any] = field(default_factory=dict)  # ... for its train cache only (views)
    probe: dict[str, Any] = field(default_factory=dict)  # [probe] options for this dataset (batch, lr grid)


@dataclass(frozen=True)
class Study:
    """A parsed study: what to run, where the outputs go, and each protocol's options."""

    title: str
    path: Path | None  # the study file (None: built in code, e.g. the demo)
    out: Path  # runs/, caches/ (unless `caches`), report.html and study.json go here
    caches: Path
    device: str
    seed: int
    models: tuple[ModelEntry, ...]
    datasets: tuple[DatasetEntry, ...]
    extract: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] | None = None  # "protocol" plus ProbeConfig fields; None: no probing
    knn: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    frequency: dict[str, Any] | None = None
    localization: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> tuple[str, ...]:
        """The protocols switched on, in STUDY_STEPS order."""
        return tuple(s for s in STUDY_STEPS if getattr(self, s) is not None)

    def run_dir(self, model: ModelEntry, dataset: DatasetEntry) -> Path:
        return self.out / "runs" / model.name / dataset.name

    def cache_dir(self, model: ModelEntry, dataset: DatasetEntry, split: str) -> Path:
        return self.caches / model.name / f"{dataset.name}-{split}"

    def data_spec(self, dataset: DatasetEntry) -> str:
        return dataset.data if dataset.data is not None else f"cub:{self.out / 'data' / dataset.name}"

    @property
    def random_init(self) -> bool:
        return any(m.random_init for m in self.models)


def load_study(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None) -> Study:
    """Read and check a study file; `out` overrides its `out`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyError(
            f"cannot read study file {path}: {exc.strerror}", "pass the path of a STUDY.toml"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML ({exc})", "fix the line it names") from None
    path = path.resolve()  # the study's paths are absolute from here on, whatever the working directory
    return parse_study(data, base=path.parent, path=path, out=None if out is None else Path(out).resolve())


def parse_study(
    data: Mapping[str, Any],
    *,
    base: Path,
    path: Path | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Study:
    """A `Study` from a parsed TOML table; relative paths are taken from `base`."""
    where = str(path) if path else "study"
    _keys(data, TOP_KEYS, where)
    models = tuple(
        _model(m, base, f"{where}: models[{i}]") for i, m in enumerate(_tables(data, "models", where))
    )
    datasets = tuple(
        _dataset(d, base, f"{where}: datasets[{i}]") for i, d in enumerate(_tables(data, "datasets", where))
    )
    for what, entries in (("models", models), ("datasets", datasets)):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise StudyError(
                f"{where}: two {what} are named {_dupe(names)!r}", f"give every entry of {what} its own name"
            )
    default_out = base / (path.stem if path else "study")
    out_dir = Path(out) if out is not None else _path(data.get("out"), base) or default_out
    caches = _path(data.get("caches"), out_dir) or out_dir / "caches"
    tables = {name: _table(data, name, where) for name in ("extract", "report", *STUDY_STEPS)}
    _keys(tables["extract"] or {}, EXTRACT_KEYS, f"{where}: [extract]")
    for key, choice in (("tokens", TOKENS), ("store", STORE), ("dtype", DTYPE)):
        if key in (tables["extract"] or {}):
            choice.check(str(tables["extract"][key]), where=f"{where}: [extract]", error=StudyError)
    for name, allowed in (
        ("knn", KNN_KEYS),
        ("attention", ATTENTION_KEYS),
        ("frequency", FREQUENCY_KEYS),
        ("localization", LOCALIZATION_KEYS),
        ("report", REPORT_KEYS),
    ):
        if tables[name] is not None:
            _keys(tables[name], allowed, f"{where}: [{name}]")
    if tables["probe"] is not None:
        _probe_keys(tables["probe"], f"{where}: [probe]")
    for fmt in (tables["report"] or {}).get("formats", []):
        REPORT_FORMAT.check(str(fmt), where=f"{where}: [report] formats", error=StudyError)
    if tables["localization"] is not None and tables["probe"] is None:
        if tables["localization"].get("head") is not None:
            raise StudyError(
                f"{where}: [localization] head needs a [probe] table", "add [probe], or drop head"
            )
    return Study(
        title=str(data.get("title", path.stem if path else "study")),
        path=path,
        out=out_dir,
        caches=caches,
        device=str(data.get("device", "auto")),
        seed=int(data.get("seed", 0)),
        models=models,
        datasets=datasets,
        extract=dict(tables["extract"] or {}),
        probe=tables["probe"],
        knn=tables["knn"],
        attention=tables["attention"],
        frequency=tables["frequency"],
        localization=tables["localization"],
        report=dict(tables["report"] or {}),
    )


def _keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise StudyError(
            f"{where}: unknown key {', '.join(map(repr, unknown))}", f"allowed: {', '.join(allowed)}"
        )


def _dupe(names: list[str]) -> str:
    return next(n for n in names if names.count(n) > 1)


def _tables(data: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    items = data.get(key)
    if not isinstance(items, list) or not items or not all(isinstance(i, Mapping) for i in items):
        raise StudyError(f"{where}: needs at least one [[{key}]] table", f"add e.g. [[{key}]] with a name")
    return items


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise StudyError(f"{where}: {key} must be a table ([{key}])", f"write [{key}] with its options below")
    return dict(value)


def _path(value: Any, base: Path) -> Path | None:
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _model(table: Mapping[str, Any], base: Path, where: str) -> ModelEntry:
    _keys(table, MODEL_KEYS, where)
    for key in ("name", "model"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise StudyError(f'{where}: needs {key} = "..."', 'e.g. name = "mae-400e", model = "mae-b16"')
    checkpoint = table.get("checkpoint")
    if checkpoint is not None and not _remote(str(checkpoint)):
        checkpoint = str(_path(checkpoint, base))
    if checkpoint is not None and table.get("random_init"):
        raise StudyError(f"{where}: checkpoint and random_init = true", "give one of them")
    return ModelEntry(
        name=_name(table["name"], where),
        model=table["model"],
        checkpoint=checkpoint,
        random_init=bool(table.get("random_init", False)),
        branch=table.get("branch"),
    )


def _remote(source: str) -> bool:
    return "://" in source or source.startswith("hf-hub:")


def _name(name: str, where: str) -> str:
    if "/" in name or name in (".", "..") or name.startswith("."):
        raise StudyError(f"{where}: name {name!r} is used as a folder name", "use letters, digits, - and _")
    return name


def _dataset(table: Mapping[str, Any], base: Path, where: str) -> DatasetEntry:
    _keys(table, DATASET_KEYS, where)
    if not isinstance(table.get("name"), str):
        raise StudyError(f'{where}: needs name = "..."', 'e.g. name = "cub"')
    synthetic = table.get("synthetic")
    data = table.get("data")
    if (synthetic is None) == (data is None):
        raise StudyError(
            f'{where}: give data = "KIND:PATH" or a [datasets.synthetic] table (one of them)',
            'e.g. data = "cub:/data/CUB_200_2011"',
        )
    if synthetic is not None:
        _keys(synthetic, SYNTHETIC_KEYS, f"{where}.synthetic")
        synthetic = {k: int(v) for k, v in synthetic.items()}
    else:
        kind, _, rest = str(data).partition(":")
        DATASET_KIND.check(kind, where=where, error=StudyError)
        if rest and kind != "synthetic" and not Path(rest).expanduser().is_absolute():
            data = f"{kind}:{base / rest}"
    extras = {}
    for key, allowed in (("extract", EXTRACT_KEYS), ("extract_train", EXTRACT_KEYS), ("probe", None)):
        value = table.get(key, {})
        if not isinstance(value, Mapping):
            raise StudyError(f"{where}.{key} must be a table", f"e.g. {key} = {{batch_size = 256}}")
        if allowed is not None:
            _keys(value, allowed, f"{where}.{key}")
        else:
            _probe_keys(value, f"{where}.{key}")
        extras[key] = dict(value)
    return DatasetEntry(
        name=_name(table["name"], where),
        data=data,
        train=str(table.get("train", "train")),
        test=str(table.get("test", "test")),
        synthetic=synthetic,
        **extras,
    )


def _probe_keys(table: Mapping[str, Any], where: str) -> None:
    from vitprobe.choices import PROTOCOL

    _keys(table, tuple(f for f in PROBE_FIELDS if f not in PROBE_EXCLUDED), where)
    PROTOCOL.check(str(table.get("protocol", "auto")), where=where, error=StudyError)


PROBE_FIELDS = (  # vitprobe.probe.protocols.ProbeConfig fields; tests/test_study.py checks they agree
    "protocol",
    "overrides",
    "pools",
    "layer",
    "n_last_blocks",
    "final_norm",
    "abmilp_depth",
    "abmilp_act",
    "abmilp_content",
    "queries",
    "optimizer",
    "momentum",
    "weight_decay",
    "decay_vectors",
    "lr_grid",
    "batch_size",
    "epochs",
    "min_steps",
    "warmup_epochs",
    "select_on",
    "select_epoch",
    "holdout",
    "min_holdout",
    "refit",
    "eval_every",
    "shots",
    "train_fraction",
    "seeds",
    "c_grid",
    "max_iter",
    "seed",
    "device",
    "amp",
    "load",
    "preload_gb",
    "shuffle_shards",
)
