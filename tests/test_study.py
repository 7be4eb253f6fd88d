"""`vitprobe run STUDY.toml`: parsing, planning, resuming after a kill, one backbone load per model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from report_fixtures import RealRuns, session_runs
from vitprobe.cli import app
from vitprobe.study import StudyError, load_study, parse_study, plan

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "studies"


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return session_runs(tmp_path_factory)


def minimal(**extra: Any) -> dict[str, Any]:
    table = {
        "models": [{"name": "a", "model": "timm:test_vit", "random_init": True}],
        "datasets": [{"name": "needles", "synthetic": {"n": 16, "classes": 2, "size": 32, "seed": 0}}],
        "probe": {"epochs": 1, "min_steps": 0, "lr_grid": [0.1], "holdout": 0.25},
    }
    return {**table, **extra}


def test_the_two_checkpoint_study_resumes_after_a_kill(real: RealRuns) -> None:
    """The done-when of the issue: one STUDY.toml, SIGKILLed once, resumed, one report naming both runs."""
    r = real.resume
    assert r["killed"], "the first run finished before it could be killed"
    done = r["done_before_kill"]
    assert "probe:ckpt-a:needles" in done and "extract:ckpt-a:needles:train" in done
    resumed = r["resumed"]
    assert set(done) <= set(resumed["skipped"])  # nothing finished before the kill ran again
    assert set(resumed["ran"]).isdisjoint(done) and "report" in resumed["ran"]
    assert set(r["started_at_kill"]) <= set(resumed["ran"])  # the interrupted step ran again
    state = json.loads((real.out / "study.json").read_text())
    assert all(s["status"] == "done" for s in state["steps"].values())
    html = (real.out / "report.html").read_text()
    assert "ckpt-a" in html and "ckpt-b" in html
    rows = (real.out / "report.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["ckpt-a", "ckpt-b"]  # named by the study's models


def test_a_finished_study_skips_everything_but_the_report(real: RealRuns) -> None:
    state = json.loads((real.out / "study.json").read_text())
    result = runner.invoke(app, ["run", str(real.root / "study.toml"), "--format", "json"])  # another cwd
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ran"] == ["report"] and len(out["skipped"]) == len(state["steps"]) - 1


def test_editing_a_protocol_reruns_it_and_what_reads_it(tmp_path: Path) -> None:
    study = parse_study(minimal(knn={"ks": [5]}, localization={}), base=tmp_path)
    steps = {s.key: s.identity for s in plan(study)}
    edited = parse_study(
        minimal(knn={"ks": [5]}, localization={}, probe={**minimal()["probe"], "epochs": 2}),
        base=tmp_path,
    )
    after = {s.key: s.identity for s in plan(edited)}
    changed = {k for k in steps if steps[k] != after[k]}
    # the probe changed, and the localisation that scores its head's maps; the caches and k-NN did not
    assert changed == {"probe:a:needles", "localization:a:needles", "report"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update(prob={}), "unknown key 'prob'"),
        (lambda t: t["models"][0].update(chekpoint="x.pth"), "unknown key 'chekpoint'"),
        (lambda t: t["probe"].update(epoch=3), "unknown key 'epoch'"),
        (lambda t: t["models"].append(dict(t["models"][0])), "two models are named 'a'"),
        (lambda t: t.update(extract={"tokens": "everything"}), "unknown --tokens 'everything'"),
        (lambda t: t["datasets"][0].update(data="cub:/x"), "one of them"),
        (lambda t: t.update(localization={"head": "cls"}), "has no per-patch maps"),
        (lambda t: t["probe"].update(protocol="fast"), "unknown --protocol 'fast'"),
        (lambda t: t["models"][0].update(name="a/b"), "folder name"),
    ],
)
def test_a_study_file_error_names_the_key(tmp_path: Path, edit: Any, message: str) -> None:
    table = minimal()
    edit(table)
    with pytest.raises(StudyError, match=message):
        plan(parse_study(table, base=tmp_path))


def test_toml_errors_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("title = \n")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(tmp_path / "bad.toml")
    (tmp_path / "s.toml").write_text(
        'out = "o"\n[[models]]\nname = "m"\nmodel = "mae-b16"\ncheckpoint = "w/m.pth"\n'
        '[[datasets]]\nname = "cub"\ndata = "cub:data/CUB"\n[probe]\n'
    )
    study = load_study(tmp_path / "s.toml")
    assert study.out == tmp_path / "o" and study.caches == tmp_path / "o" / "caches"
    assert study.models[0].checkpoint == str(tmp_path / "w" / "m.pth")
    assert study.datasets[0].data == f"cub:{tmp_path / 'data' / 'CUB'}"


def test_probe_keys_are_the_probe_configs_fields() -> None:
    from vitprobe.probe.protocols import ProbeConfig
    from vitprobe.study.spec import PROBE_FIELDS

    assert PROBE_FIELDS == tuple(f.name for f in dataclasses.fields(ProbeConfig))


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.toml")), ids=lambda p: p.name)
def test_the_example_studies_parse_and_plan(path: Path, tmp_path: Path) -> None:
    study = load_study(path, out=tmp_path)
    steps = plan(study)
    assert steps[-1].kind == "report"
    assert {s.kind for s in steps} >= {"extract", "probe"} or path.name == "demo.toml"


def test_the_demo_is_the_documented_study(tmp_path: Path) -> None:
    from vitprobe.demo import DemoConfig, demo_study_table

    documented = load_study(DOCS / "demo.toml", out=tmp_path)
    demo = parse_study(demo_study_table(DemoConfig()), base=tmp_path, out=tmp_path)
    assert [s.identity for s in plan(documented)] == [s.identity for s in plan(demo)]


def test_one_backbone_load_per_model_and_ctrl_c_keeps_finished_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitprobe import models
    from vitprobe.study import StudyInterrupted, run_study
    from vitprobe.study import runner as study_runner

    table = minimal(
        attention={"limit": 4, "num_workers": 0, "batch_size": 4},
        frequency={"limit": 4, "num_workers": 0, "batch_size": 4},
        extract={"workers": 0},
    )
    table["device"] = "cpu"
    study = parse_study(table, base=tmp_path, out=tmp_path / "out")
    loads: list[str] = []
    real_load = models.load_backbone

    def counting(name: str, **kwargs: Any) -> Any:
        loads.append(name)
        return real_load(name, **kwargs)

    monkeypatch.setattr(models, "load_backbone", counting)
    real_step = study_runner._run_step

    def interrupt_frequency(step: Any, *args: Any) -> Any:
        if step.kind == "frequency":
            raise KeyboardInterrupt
        return real_step(step, *args)

    monkeypatch.setattr(study_runner, "_run_step", interrupt_frequency)
    with pytest.raises(StudyInterrupted, match="interrupted during frequency") as info:
        run_study(study, say=lambda _m: None)
    assert info.value.exit_code == 130
    assert loads == ["timm:test_vit"]  # extract train, extract test and attention shared one load
    state = json.loads((study.out / "study.json").read_text())["steps"]
    assert (
        state["frequency:a:needles"]["status"] == "started" and state["probe:a:needles"]["status"] == "done"
    )
    monkeypatch.setattr(study_runner, "_run_step", real_step)
    loads.clear()
    result = run_study(study, say=lambda _m: None)
    assert result.ran == ["frequency:a:needles", "report"] and loads == ["timm:test_vit"]
    assert (study.out / "report.html").is_file()


def test_dry_run_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        'out = "o"\n[[models]]\nname = "m"\nmodel = "timm:test_vit"\nrandom_init = true\n'
        '[[datasets]]\nname = "n"\nsynthetic = {n = 8, classes = 2, size = 32}\n[knn]\n'
    )
    result = runner.invoke(app, ["run", str(tmp_path / "s.toml"), "--dry-run", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ran"] == [] and "to run" in result.stderr
    assert not (tmp_path / "o" / "caches").exists()
