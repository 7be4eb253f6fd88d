"""Typed result models: every file the real writers make parses, round-trips and leaves no key untyped."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import vitprobe.results as R
from report_fixtures import RealRuns, every_file, session_runs
from vitprobe.results.schema import HEADER_STYLES, Model


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return session_runs(tmp_path_factory)


def extras(model: Any, where: str = "") -> dict[str, list[str]]:
    """Every model in the tree whose `extra` holds keys, with those keys."""
    found: dict[str, list[str]] = {}
    if isinstance(model, Model):
        if model.extra:
            found[where or type(model).__name__] = sorted(model.extra)
        for f in dataclasses.fields(model):
            if f.name != "extra":
                found |= extras(getattr(model, f.name), f"{where}.{f.name}")
    elif isinstance(model, list):
        for i, v in enumerate(model):
            found |= extras(v, f"{where}[{i}]")
    elif isinstance(model, dict):
        for k, v in model.items():
            found |= extras(v, f"{where}.{k}")
    return found


def test_every_file_the_writers_make_round_trips_with_every_key_typed(real: RealRuns) -> None:
    files = every_file(real)
    kinds = set()
    for path in files:
        written = json.loads(path.read_text())
        parsed = R.load(path)
        kinds.add(parsed.kind)
        assert parsed.to_dict() == written, path
        assert extras(parsed) == {}, f"{path}: keys no model declares"
        assert R.validate(parsed.kind, written) == written
    assert kinds == {
        "probe",
        "knn",
        "attention",
        "frequency",
        "localization",
        "predictions",
        "head",
        "cache",
        "study",
    }


def test_health_and_numbers_are_typed(real: RealRuns) -> None:
    results = R.load(real.runs["ckpt-a"] / "results.json", kind="probe")
    assert isinstance(results, R.ProbeResults)
    for readout in results.readouts.values():
        assert 0.0 <= readout.top1 <= 1.0 and readout.num_test_samples == 24
        assert readout.flagged == any(c.severity == "warning" for c in readout.health)
        assert all(isinstance(c, R.Check) for c in readout.health)
        assert set(readout.curves) == {"0.1", "1"}
    assert results.layer == 5  # test_vit's last block, 0-based (6 blocks)


def test_analyses_blocks_are_zero_based_and_version_1_files_convert(real: RealRuns) -> None:
    run = real.runs["ckpt-a"]
    written = json.loads((run / "attention.json").read_text())
    assert (written["format"], written["version"], written["kind"]) == ("vitprobe-attention", 3, "attention")
    assert "schema_version" not in written and written["blocks"] == [0, 1, 2, 3, 4, 5]  # the writer, today
    attention = R.load(run / "attention.json", kind="attention")
    assert attention.blocks == [0, 1, 2, 3, 4, 5]
    # version 2 (0-based, the analyses' own header) reads the same
    v2 = dataclasses.replace(attention, version=2).to_dict()
    assert v2["kind"] == "attention" and v2["schema_version"] == 2 and "format" not in v2
    assert R.parse(v2).blocks == attention.blocks and R.parse(v2).to_dict() == v2
    # the same result as an earlier vitprobe wrote it (version 1: blocks from 1): read back 0-based
    v1 = dataclasses.replace(attention, version=1).to_dict()
    assert v1["schema_version"] == 1 and v1["blocks"] == [1, 2, 3, 4, 5, 6]
    assert R.parse(v1).blocks == [0, 1, 2, 3, 4, 5]

    frequency = R.load(run / "frequency.json", kind="frequency")
    assert frequency.blocks == [None, 0, 1, 2, 3, 4, 5]  # None: the patch embedding
    v1 = dataclasses.replace(frequency, version=1).to_dict()
    assert "blocks" not in v1 and v1["depth"] == [0, 1, 2, 3, 4, 5, 6]
    assert R.parse(v1).blocks == frequency.blocks


def test_unknown_versions_are_refused_saying_who_is_out_of_date(real: RealRuns) -> None:
    written = json.loads((real.runs["ckpt-a"] / "knn.json").read_text())
    with pytest.raises(R.ResultsError, match="version 9 is not one this vitprobe reads") as newer:
        R.parse({**written, "version": 9}, where="knn.json")
    assert "upgrade vitprobe" in (newer.value.hint or "")
    results = json.loads((real.runs["ckpt-a"] / "results.json").read_text())
    with pytest.raises(R.ResultsError, match="reads 2") as older:
        R.parse({**results, "version": 1}, where="results.json")
    assert "re-run" in (older.value.hint or "")
    attention = json.loads((real.runs["ckpt-a"] / "attention.json").read_text())
    with pytest.raises(R.ResultsError, match="spelt"):  # version 2 of the analyses: kind + schema_version
        R.parse({**attention, "version": 2})
    body = {k: v for k, v in attention.items() if k not in ("format", "version")}
    with pytest.raises(R.ResultsError, match="spelt"):  # version 3 is the common header
        R.parse({**body, "schema_version": 3})


def test_every_file_carries_the_common_header(real: RealRuns) -> None:
    for path in every_file(real):
        written = json.loads(path.read_text())
        kind = R.kind_of(written, where=str(path))
        assert {k: written[k] for k in ("format", "version", "kind")} == R.header(kind), path
        assert not {"schema_version", "format_version"} & set(written), path


def test_version_1_heads_predictions_and_manifests_still_read(real: RealRuns) -> None:
    for path in every_file(real):
        written = json.loads(path.read_text())
        kind = R.kind_of(written, where=str(path))
        style = R.KINDS[kind].LEGACY.get(1)
        if kind not in ("head", "predictions", "cache"):
            continue
        old = dataclasses.replace(R.parse(written), version=1).to_dict()  # as vitprobe wrote it before
        assert list(old)[:2] == list(HEADER_STYLES[style]), path
        assert "kind" not in old and R.parse(old).version == 1, path
        assert R.parse(old).to_dict() == old, path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["readouts"]["cls"].__setitem__("top1", float("nan")), r"readouts\.cls\.top1: nan"),
        (lambda d: d["readouts"]["cls"].pop("verdict"), r"readouts\.cls\.verdict: missing"),
        (lambda d: d["readouts"]["cls"].__setitem__("epoch", "3"), r"readouts\.cls\.epoch: expected int"),
        (lambda d: d["selection"].__setitem__("optimistic", 1), r"selection\.optimistic: expected bool"),
        (lambda d: d.__setitem__("kind", "knn"), "not 'vitprobe-probe-results'"),
    ],
)
def test_a_malformed_file_names_the_key(real: RealRuns, edit: Any, message: str) -> None:
    data = json.loads((real.runs["ckpt-a"] / "results.json").read_text())
    edit(data)
    with pytest.raises(R.ResultsError, match=message):
        R.validate("probe", data)


def test_strict_json_only(tmp_path: Path) -> None:
    path = tmp_path / "knn.json"
    path.write_text('{"format": "vitprobe-knn-results", "version": 1, "kind": "knn", "x": NaN}')
    with pytest.raises(R.ResultsError, match="NaN is not strict JSON"):
        R.load(path)
    path.write_text('{"hello": 1}')
    with pytest.raises(R.ResultsError, match="not a vitprobe result file"):
        R.load(path)
    path.write_text('{"format": "somebody-else", "version": 1}')
    with pytest.raises(R.ResultsError, match="'somebody-else' is not a vitprobe result file"):
        R.load(path)
    with pytest.raises(R.ResultsError, match="inf is not a finite number"):
        R.dumps_strict({"a": float("inf")})


def test_provenance_records_the_run_in_full() -> None:
    from vitprobe.provenance import checkpoint_info, provenance

    p = provenance(
        device="cpu",
        checkpoint=checkpoint_info(source="/ckpt/mae_pretrain.pth", sha256="ab" * 32, random_init=False),
        dataset={"spec": "cub:/data", "split": "test", "fingerprint": "f00d"},
    )
    model = R.Provenance.from_dict(p)
    assert model.checkpoint is not None and model.checkpoint.file == "mae_pretrain.pth"
    assert model.dataset is not None and model.dataset.fingerprint == "f00d"
    assert model.device is not None and model.device.type == "cpu" and model.device.name
    assert model.host and model.command and model.versions["vitprobe"]
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # running from a checkout: its commit is recorded
        assert model.git is not None and model.git.commit == head.stdout.strip()


def test_a_saved_head_of_an_unknown_version_is_refused_by_predict(real: RealRuns, tmp_path: Path) -> None:
    import shutil

    from vitprobe.probe.saved import load_head

    heads = real.runs[next(iter(real.runs))] / "heads"
    meta = sorted(heads.glob("*.json"))[0]
    for suffix in (".json", ".safetensors"):
        shutil.copy(meta.with_suffix(suffix), tmp_path / meta.with_suffix(suffix).name)
    copy = tmp_path / meta.name
    head, _ = load_head(copy)  # as written: loads
    assert head is not None
    copy.write_text(json.dumps({**json.loads(meta.read_text()), "version": 9}))
    with pytest.raises(R.ResultsError, match="version 9 is not one this vitprobe reads") as info:
        load_head(copy)
    assert "upgrade vitprobe" in (info.value.hint or "")
