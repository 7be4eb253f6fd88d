"""`vitprobe report` on a real two-checkpoint study: pivot, intervals, health, labels, formats, figures."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from report_fixtures import RealRuns, session_runs
from vitprobe.cli import app
from vitprobe.report import (
    RANDOM_INIT_WARNING,
    ReportConfig,
    ReportError,
    build_document,
    collect_report,
    make_figures,
    write_report,
)
from vitprobe.report.document import Table
from vitprobe.report.stats import uniform_distance, uniform_entropy, uniform_self_share, wilson_interval

runner = CliRunner()


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return session_runs(tmp_path_factory)


@pytest.fixture
def runs(real: RealRuns) -> list[str]:
    return [str(real.runs["ckpt-a"]), str(real.runs["ckpt-b"])]


def test_wilson_interval_matches_scipy() -> None:
    from scipy.stats import binomtest

    for k, n in ((0, 10), (3, 10), (10, 10), (57, 100), (24, 24), (1, 2000)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(k / n, n)
        assert low == pytest.approx(ref.low, abs=1e-9) and high == pytest.approx(ref.high, abs=1e-9)


def test_uniform_attention_references() -> None:
    import math

    import numpy as np

    assert uniform_entropy(196) == pytest.approx(math.log(196))
    assert uniform_self_share(197) == pytest.approx(1 / 197)
    # 2x2 grid of 16 px patches: distances 0 (4 pairs), 16 (8 pairs), 16*sqrt(2) (4 pairs) over 16 pairs
    assert uniform_distance((2, 2), 16) == pytest.approx((8 * 16 + 4 * 16 * np.sqrt(2)) / 16)


def test_collect_reads_typed_results(real: RealRuns, runs: list[str]) -> None:
    report = collect_report(runs)
    a, b = report.runs
    # both directories are called "needles": each run is named by the shortest path that tells them apart
    assert (a.label, b.label) == ("ckpt-a/needles", "ckpt-b/needles")
    assert report.readouts() == ["cls", "mean", "abmilp", "k-NN@5", "k-NN@20"]
    written = json.loads((real.runs["ckpt-a"] / "results.json").read_text())
    for s in a.scores:
        if s.source == "probe":
            r = written["readouts"][s.readout]
            assert s.top1 == pytest.approx(100 * r["top1"]) and s.n == r["num_test_samples"] == 24
            low, high = wilson_interval(r["top1"], 24)
            assert s.ci == pytest.approx((100 * low, 100 * high))
            assert s.lr == r["lr"] and s.epoch == r["epoch"]
            assert s.flagged == (r["verdict"] != "ok")  # a health warning is never a clean number
            assert s.top5 is None  # 4 classes: top-5 is always 100 % and is not shown
    assert any("top-5 not shown" in n for n in a.notes)
    # provenance in full: the checkpoint file and sha256, fingerprint, commands, host, device
    p = a.provenance
    assert (
        p.checkpoint_file == "ckpt-a.pth"
        and p.checkpoint == written["test_cache"]["provenance"]["checkpoint"]
    )
    assert p.fingerprint == written["test_cache"]["provenance"]["fingerprint"] and not p.random_init
    assert p.layer == 5 and p.protocol == "auto" and "epochs" in p.protocol_overrides
    assert p.commands and all("-m vitprobe run study.toml" in c for c in p.commands)
    assert p.hosts and p.devices and p.versions["vitprobe"]
    assert a.attention is not None and a.attention.blocks == [0, 1, 2, 3, 4, 5]  # 0-based everywhere
    assert a.attention.references["cls_self"] == pytest.approx(
        1 / (1 + 100)
    )  # test_vit: 160 px, 10x10 patches
    assert a.attention.references["cls_entropy"] == pytest.approx(uniform_entropy(100))
    assert a.frequency is not None and a.frequency.blocks == [None, 0, 1, 2, 3, 4, 5]
    assert set(a.localization) == {"cls_attention", "abmilp"}


def test_pivot_first_names_both_runs_with_intervals_and_health(runs: list[str]) -> None:
    report = collect_report(runs)
    doc = build_document(report, [])
    tables = [b for b in doc.blocks if isinstance(b, Table)]
    pivot = tables[0]
    assert pivot.id == "pivot" and pivot.header[:3] == ["run", "model", "checkpoint"]
    assert pivot.header[3:] == ["cls", "mean", "abmilp", "k-NN@5", "k-NN@20"]
    assert [row[0].text for row in pivot.rows] == ["ckpt-a/needles", "ckpt-b/needles"]
    for run, row in zip(report.runs, pivot.rows, strict=True):
        for readout, cell in zip(pivot.header[3:], row[3:], strict=True):
            score = run.score(readout)
            assert cell.text.startswith(f"{score.top1:.1f} [{score.ci[0]:.1f}, {score.ci[1]:.1f}]")
            assert ("⚠" in cell.text) == score.flagged == cell.flag
            assert score.verdict in cell.sub
            if score.lr is not None:
                assert f"lr {score.lr:.3g}" in cell.sub and f"ep {score.epoch}" in cell.sub
    flagged = report.flagged()
    health = next(b for b in doc.blocks if getattr(b, "id", None) == "health-warnings")
    for run, score in flagged:  # each flagged number is listed with what to run instead
        assert any(i.startswith(f"{run.label} · {score.readout}:") and "— fix:" in i for i in health.items)
    for table in tables:  # every table names both runs (rows, or columns for provenance)
        text = " ".join([*table.header, *(c.text for row in table.rows for c in row)])
        assert "ckpt-a" in text and "ckpt-b" in text, table.id


def test_labels_name_the_runs_and_must_be_one_per_run(runs: list[str]) -> None:
    report = collect_report(runs, labels=["MAE 400e", "MAE 800e"])
    assert [r.label for r in report.runs] == ["MAE 400e", "MAE 800e"]
    with pytest.raises(ReportError, match="1 --label for 2 runs"):
        collect_report(runs, labels=["only one"])
    with pytest.raises(ReportError, match="share a label"):
        collect_report(runs, labels=["same", "same"])


def test_same_directory_names_get_the_shortest_telling_path(tmp_path: Path, real: RealRuns) -> None:
    for parent in ("mae", "dino"):
        shutil.copytree(real.runs["ckpt-a"], tmp_path / parent / "cub")
    report = collect_report([tmp_path / "mae" / "cub", tmp_path / "dino" / "cub"])
    assert [r.label for r in report.runs] == ["mae/cub", "dino/cub"]


def test_why_cls_loses_has_mean_pooling_references_and_definitions(runs: list[str]) -> None:
    report = collect_report(runs)
    (row, _) = report.why_cls_loses
    a = report.runs[0]
    assert row.run == "ckpt-a/needles" and row.mean is a.score("mean")
    assert row.abmilp_minus_mean == pytest.approx(a.score("abmilp").top1 - a.score("mean").top1)
    assert row.cls_self_uniform == pytest.approx(1 / 101) and row.entropy_uniform == pytest.approx(
        uniform_entropy(100)
    )
    assert row.cls_self_last == a.attention.series["cls_self"][-1]
    assert set(report.definitions) >= {"cls_self", "cls_entropy", "patch_entropy", "high_freq_energy_ratio"}
    assert report.definitions["cls_self"] == "A[0,0]"  # as attention.json stores it


def test_figures_appear_once_name_every_run_and_keep_noise_flat(runs: list[str]) -> None:
    report = collect_report(runs)
    figures = make_figures(report)
    names = [f.name for f in figures]
    assert len(names) == len(set(names))
    assert not any(
        ("attention_curves" in n or "frequency_" in n) and n.startswith("run") for n in names
    )  # redrawn
    for f in figures:  # every legend (and caption) names its run(s)
        wanted = ["ckpt-a", "ckpt-b"] if f.run is None else [f.run]
        assert all(w in f.title for w in wanted), f.name
        assert all(w in " ".join(f.legend) for w in wanted), f.name
        if f.mime == "image/svg+xml":
            svg = f.data.decode()
            assert all(w in svg for w in wanted), f.name  # the legend text is in the image
    attention = next(f for f in figures if f.name == "attention_per_block.svg")
    assert "uniform attention" in attention.data.decode()  # the reference lines are labelled


def test_attention_axes_and_reference_lines() -> None:
    """The [cls] self-share panel spans [0, 1] with 1/T dotted, so a flat random-weights curve stays flat."""
    from vitprobe.report import figures as F
    from vitprobe.report.model import Curves

    drawn: dict = {}
    real_svg = F._svg

    def spy(fig):  # noqa: ANN001, ANN202 - records the figure's axes
        drawn["axes"] = fig.axes
        return real_svg(fig)

    class Run:
        label = "run-x"
        attention = Curves(
            blocks=[0, 1, 2],
            labels=["0", "1", "2"],
            series={"cls_self": [0.0101, 0.0102, 0.0100], "cls_entropy": [2.77, 2.772, 2.771]},
            references={"cls_self": 1 / 17, "cls_entropy": uniform_entropy(16)},
        )

    class Rep:
        runs = [Run()]

    F._svg, saved = spy, F._svg
    try:
        F.attention_figure(Rep())  # type: ignore[arg-type]
    finally:
        F._svg = saved
    share, entropy = drawn["axes"][:2]
    assert share.get_ylim() == (0.0, 1.0)
    assert entropy.get_ylim()[0] == 0.0 and entropy.get_ylim()[1] >= uniform_entropy(16)
    dotted = [line for line in share.get_lines() if line.get_linestyle() == ":"]
    assert dotted and dotted[0].get_ydata()[0] == pytest.approx(1 / 17)


def test_html_is_self_contained_small_and_escaped(tmp_path: Path, real: RealRuns, runs: list[str]) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(real.runs["ckpt-a"], evil)
    labels = ("a", "b", "<b>evil</b>")  # a label is text, never markup
    out = write_report(ReportConfig(runs=(*runs, str(evil)), out=str(tmp_path / "r.html"), labels=labels))
    text = (tmp_path / "r.html").read_text()
    assert text == out.text and out.bytes == len(text.encode())
    assert "<b>evil</b>" not in text and "&lt;b&gt;evil&lt;/b&gt;" in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(src|href)="(https?:|file:|/)', text)  # nothing outside the file
    assert "<script" not in text
    for s in srcs:
        data = base64.b64decode(s.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" or data.lstrip().startswith(b"<?xml")
    two = write_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "two.html")))
    assert two.bytes < 1_500_000  # two models, every figure: well under the old 8 MB


def test_markdown_json_csv_latex_github(
    tmp_path: Path, runs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    md = write_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "rep" / "r.md"), format="md"))
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.text)
    assert refs and len(refs) == len(md.figure_files) and all((tmp_path / "rep" / r).is_file() for r in refs)
    assert "| run | model | checkpoint | cls | mean | abmilp | k-NN@5 | k-NN@20 |" in md.text

    data = json.loads(
        write_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "r.json"), format="json")).text
    )
    assert data["format"] == "vitprobe-report" and data["version"] == 2
    assert [r["label"] for r in data["runs"]] == ["ckpt-a/needles", "ckpt-b/needles"]
    assert all("ci" in s and "verdict" in s and "flagged" in s for r in data["runs"] for s in r["scores"])

    text = write_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "r.csv"), format="csv")).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["run"] for r in rows] == ["ckpt-a/needles", "ckpt-b/needles"]
    report = collect_report(runs)
    for row, run in zip(rows, report.runs, strict=True):
        for readout in report.readouts():
            s = run.score(readout)
            assert float(row[readout]) == pytest.approx(s.top1, abs=0.005)
            assert float(row[f"{readout} ci_low"]) == pytest.approx(s.ci[0], abs=0.005)
            assert row[f"{readout} verdict"] == s.verdict

    tex = write_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "r.tex"), format="latex")).text
    assert "\\toprule" in tex and "ckpt-a" in tex and "ckpt-b" in tex
    cells = [line for line in tex.splitlines() if " & " in line and not line.startswith("run &")]
    flagged = sum(1 for r in report.runs for s in r.scores if s.flagged)
    assert sum(line.count("$^\\dagger$") for line in cells) == flagged

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = runner.invoke(app, ["report", *runs, "--format", "github"])
    assert result.exit_code == 0, result.output
    gh = summary.read_text()
    assert gh.startswith("earlier step\n") and "| ckpt-a/needles |" in gh and "data:image" not in gh


def test_pivot_over_datasets(tmp_path: Path, real: RealRuns) -> None:
    for model in ("ckpt-a", "ckpt-b"):
        for dataset in ("cub", "pets"):
            shutil.copytree(real.runs[model], tmp_path / model / dataset)
    dirs = [str(tmp_path / m / d) for m in ("ckpt-a", "ckpt-b") for d in ("cub", "pets")]
    config = ReportConfig(
        runs=tuple(dirs),
        out=str(tmp_path / "t.csv"),
        format="csv",
        labels=("a", "a", "b", "b"),
        datasets=("cub", "pets", "cub", "pets"),
        pivot="datasets",
        readout="abmilp",
    )
    rows = list(csv.DictReader(io.StringIO(write_report(config).text)))
    assert [r["run"] for r in rows] == ["a", "b"] and {"cub", "pets"} <= set(rows[0])
    report = collect_report(dirs, labels=["a", "a", "b", "b"], datasets=["cub", "pets", "cub", "pets"])
    assert [r.label for r in report.runs] == ["a · cub", "a · pets", "b · cub", "b · pets"]
    with pytest.raises(ReportError, match="needs --readout"):
        write_report(
            ReportConfig(
                runs=tuple(dirs),
                out=str(tmp_path / "x.csv"),
                format="csv",
                labels=("a", "a", "b", "b"),
                datasets=("cub", "pets", "cub", "pets"),
                pivot="datasets",
            )
        )


def test_random_weights_are_said_everywhere(tmp_path: Path, real: RealRuns) -> None:
    run = tmp_path / "random"
    shutil.copytree(real.runs["ckpt-a"], run)
    results = json.loads((run / "results.json").read_text())
    results["random_init"] = True
    (run / "results.json").write_text(json.dumps(results))
    out = write_report(ReportConfig(runs=(str(run),), out=str(tmp_path / "r.html")))
    assert out.report.random_init and RANDOM_INIT_WARNING.split(":")[0] in out.text
    assert "random weights" in out.text and 'id="random-init-warning"' in out.text


def test_broken_or_unknown_version_files_are_refused_naming_them(tmp_path: Path, real: RealRuns) -> None:
    run = tmp_path / "broken"
    shutil.copytree(real.runs["ckpt-a"], run)
    (run / "results.json").write_text('{"format": "vitprobe-probe-results", ')  # cut off mid-write
    knn = json.loads((run / "knn.json").read_text())
    (run / "knn.json").write_text(json.dumps({**knn, "version": 7}))
    with pytest.raises(ReportError) as info:
        collect_report([run])
    message = str(info.value)
    assert "results.json: not valid JSON" in message and "knn.json: vitprobe-knn-results version 7" in message
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "version 7" in " ".join(result.output.split())


def test_missing_files_are_skipped_with_a_note(tmp_path: Path, real: RealRuns) -> None:
    run = tmp_path / "solo"
    run.mkdir()
    shutil.copy(real.runs["ckpt-a"] / "results.json", run)
    (solo,) = collect_report([run]).runs
    assert "knn.json not found: skipped" in solo.notes and solo.attention is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="none of results.json"):
        collect_report([empty])
    bad = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "no such run directory" in " ".join(bad.output.split())


def test_cli_json_on_stdout_and_diagnostics_on_stderr(runs: list[str]) -> None:
    result = runner.invoke(app, ["report", *runs, "--format", "json", "--label", "A", "--label", "B"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is one JSON object
    assert [r["label"] for r in data["runs"]] == ["A", "B"]
    assert "read 2 run(s)" in result.stderr
    csv_out = runner.invoke(app, ["report", *runs, "--format", "csv", "--out", "-"])
    assert csv_out.exit_code == 0 and csv_out.stdout.startswith("run,model,checkpoint,dataset")
