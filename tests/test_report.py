"""`vitprobe report`: reads run JSONs, never recomputes; HTML / Markdown / JSON / GitHub outputs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from report_fixtures import make_run
from vitprobe.cli import app
from vitprobe.report import RANDOM_INIT_WARNING, ReportConfig, ReportError, collect_report, write_report

runner = CliRunner()


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path, "mae-tiny", cls=0.5, abmilp=0.7, cls_self=0.4),
        make_run(tmp_path, "dino-tiny", cls=0.6, abmilp=0.65, random_init=False, with_analyses=False),
    ]


def test_collect_reads_every_piece(runs: list[Path]) -> None:
    report = collect_report(runs)
    assert report["format"] == "vitprobe-report" and report["version"] == 1
    assert report["random_init"] is True  # one of the two runs has random weights
    mae, dino = report["runs"]
    assert mae["provenance"]["random_init"] and mae["provenance"]["checkpoint"] == "random-init"
    assert not dino["provenance"]["random_init"] and dino["provenance"]["checkpoint"] == "ab" * 32
    assert mae["provenance"]["dataset"] == "synthetic:needles" and mae["provenance"]["fingerprint"] == "f00d"
    acc = {a["readout"]: a for a in mae["accuracy"]}
    assert acc["cls"]["top1"] == pytest.approx(50.0) and acc["abmilp"]["top1"] == pytest.approx(70.0)
    assert acc["abmilp"]["delta_top1_vs_cls"] == pytest.approx(20.0)
    assert acc["mean"]["delta_top1_vs_cls"] == pytest.approx(10.0)
    assert acc["k-NN cls k=10"]["top1"] == pytest.approx(48.0)
    # weakest classes: lowest first; class_i has top1 + 5 (i - 4) points
    assert [w["class"] for w in mae["weakest_classes"]["cls"]] == [f"class_{i}" for i in range(5)]
    assert mae["weakest_classes"]["cls"][0]["accuracy"] == pytest.approx(30.0)
    # learning curve of the chosen blr (0.1), not the other one
    assert mae["learning_curves"]["abmilp"]["series"]["holdout_top1"] == pytest.approx([20.0, 65.0, 70.0])
    assert mae["attention"]["cls_self"] == [0.15, 0.3, 0.4]
    assert mae["localization"]["abmilp"]["max_box_acc_v2"] == 30.0
    # the run without analyses still renders, with notes saying what was skipped
    assert dino["attention"] is None and dino["frequency"] is None
    assert "attention.json not found: skipped" in dino["notes"]
    assert "the backbone was randomly initialised: these accuracies measure nothing" in mae["notes"]
    assert not any("randomly initialised" in n for n in dino["notes"])


def test_why_cls_loses_table(runs: list[Path]) -> None:
    rows = {r["model"]: r for r in collect_report(runs)["why_cls_loses"]}
    mae = rows["mae-tiny"]
    assert mae["abmilp_gain"] == pytest.approx(20.0)
    assert mae["cls_self_last"] == 0.4 and mae["cls_entropy_last"] == 3.9
    assert mae["high_frequency_ratio_last"] == 0.125
    assert (mae["maxboxaccv2_cls"], mae["maxboxaccv2_abmilp"]) == (20.0, 30.0)
    assert (
        rows["dino-tiny"]["abmilp_gain"] == pytest.approx(5.0) and rows["dino-tiny"]["cls_self_last"] is None
    )


def test_html_is_self_contained_and_escaped(tmp_path: Path, runs: list[Path]) -> None:
    evil = make_run(tmp_path, "<b>evil</b>", cls=0.1, abmilp=0.2, with_analyses=False)
    out = write_report(ReportConfig(runs=tuple(map(str, [*runs, evil])), out=str(tmp_path / "r.html")))
    text = (tmp_path / "r.html").read_text()
    assert text == out.text
    assert "<b>evil</b>" not in text and "&lt;b&gt;evil&lt;/b&gt;" in text
    assert RANDOM_INIT_WARNING.split(":")[0] in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) >= 6  # cross-model attention/frequency plots, learning curves, the runs' own figures
    assert all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(src|href)="(https?:|file:|/)', text)  # nothing outside the file
    for s in srcs:  # every embedded image decodes to a real PNG
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert '<table id="accuracy">' in text and '<table id="why-cls-loses">' in text
    assert text.count('alt="mae-tiny (random weights): cls maps"') == 1  # the PNG; its SVG twin is skipped
    assert "selected on the test set" not in text  # holdout selection is not labelled optimistic


def test_markdown_writes_figures_next_to_it(tmp_path: Path, runs: list[Path]) -> None:
    out = write_report(
        ReportConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "rep" / "r.md"), format="md")
    )
    text = out.path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert refs and len(refs) == len(out.figure_files)
    for ref in refs:
        assert (tmp_path / "rep" / ref).is_file()
    assert "| mae-tiny ⚠ random weights | synthetic:needles | abmilp | 70.0 | 95.0 | +20.0 |" in text
    # every figure is captioned with its title, as in the HTML report
    assert "*[cls] self-attention A[0,0] per block*" in text
    assert re.search(r"\*mae-tiny \(random weights\).*: learning curves \(chosen learning rate\)\*", text)


def test_json_is_the_collected_report(tmp_path: Path, runs: list[Path]) -> None:
    write_report(ReportConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "r.json"), format="json"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == "vitprobe-report"
    assert [r["name"] for r in data["runs"]] == ["mae-tiny", "dino-tiny"]


def test_github_summary_appends_to_step_summary(
    tmp_path: Path, runs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = runner.invoke(app, ["report", *map(str, runs), "--format", "github"])
    assert result.exit_code == 0, result.output
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert (
        "> [!WARNING]" in text and "| dino-tiny | synthetic:needles | abmilp | 65.0 | 95.0 | +5.0 |" in text
    )
    assert "data:image" not in text  # compact: no figures


def test_cli_writes_html_and_reports_missing_dirs(tmp_path: Path, runs: list[Path]) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(runs[0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "random weights" in result.output
    bad = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "no such run directory" in " ".join(bad.output.split())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="none of results.json"):
        collect_report([empty])
    assert runner.invoke(app, ["report", str(runs[0]), "--format", "pdf"]).exit_code == 1


def test_only_results_json_still_renders(tmp_path: Path) -> None:
    run = make_run(tmp_path, "solo", cls=0.3, abmilp=0.4, with_analyses=False)
    (run / "knn.json").unlink()
    out = write_report(ReportConfig(runs=(str(run),), out=str(tmp_path / "solo.html")))
    assert '<table id="accuracy">' in out.text and "knn.json not found: skipped" in out.text


def test_top5_is_not_shown_when_it_is_trivially_100(tmp_path: Path) -> None:
    run = make_run(tmp_path, "four-classes", cls=0.3, abmilp=0.6, with_analyses=False)
    results = json.loads((run / "results.json").read_text())
    results["class_names"] = results["class_names"][:4]  # 4 classes: the top-5 always holds the label
    results["num_classes"] = 4
    (run / "results.json").write_text(json.dumps(results))
    report = collect_report([run])
    (r,) = report["runs"]
    assert all(a["top5"] is None for a in r["accuracy"])  # probe and k-NN rows alike
    assert any("top-5 not shown" in n and "4 classes" in n for n in r["notes"])
    wide = collect_report([make_run(tmp_path, "eight-classes", cls=0.3, abmilp=0.6, with_analyses=False)])
    assert all(a["top5"] is not None for a in wide["runs"][0]["accuracy"])
    assert not any("top-5 not shown" in n for n in wide["runs"][0]["notes"])


def test_line_plots_print_plain_tick_values_for_flat_curves() -> None:
    from vitprobe.report import _line_figure

    fig = _line_figure({"random": [4.60452, 4.60481, 4.60486]}, xlabel="block", ylabel="entropy (nats)", x0=1)
    (ax,) = fig.axes
    fig.canvas.draw()
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "+4.604" to add to every tick in one's head
    assert all(t.get_text().startswith("4.60") for t in ax.get_yticklabels() if t.get_text())


def test_drawn_figures_have_print_resolution() -> None:
    import struct

    from vitprobe.report import _line_plot

    png = _line_plot({"a": [1.0, 2.0, 3.0]}, xlabel="block", ylabel="value", x0=1)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width >= 1200 and height >= 700  # 6 x 3.6 in at 200 dpi, not 100


def test_a_run_of_broken_json_files_says_which_file_and_why(tmp_path: Path) -> None:
    run = tmp_path / "broken"
    run.mkdir()
    (run / "results.json").write_text('{"kind": "probe", ')  # cut off mid-write
    (run / "attention.json").write_text("[1, 2]")
    with pytest.raises(ReportError) as info:
        collect_report([run])
    message = str(info.value)
    assert "results.json could not be read" in message and "attention.json is not a JSON object" in message
    assert "none of" not in message  # not "nothing found": the files are there
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "results.json could not be read" in " ".join(result.output.split())


def test_learning_curves_pair_each_readout_and_say_random_weights(
    runs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitprobe import report as rp

    drawn: dict[str, dict] = {}
    real = rp._line_plot

    def spy(series, **kwargs):  # noqa: ANN001, ANN202 - records what each figure was drawn with
        drawn[kwargs["ylabel"] + str(len(drawn))] = {"series": dict(series), **kwargs}
        return real(series, **kwargs)

    monkeypatch.setattr(rp, "_line_plot", spy)
    rp.make_figures(collect_report(runs[:1]))  # the random-init run
    (curves,) = [d for d in drawn.values() if d["xlabel"] == "epoch"]
    assert "random weights" in curves["title"] and curves["pair_by_readout"]
    assert set(curves["series"]) == {"cls holdout_top1", "mean holdout_top1", "abmilp holdout_top1"}
    pairs = {"cls holdout_top1": [2.0, 3.0], "cls test_top1": [1.0, 2.0], "abmilp holdout_top1": [3.0, 5.0]}
    fig = rp._line_figure(pairs, xlabel="epoch", ylabel="top-1 (%)", pair_by_readout=True)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["cls holdout_top1"].get_color() == lines["cls test_top1"].get_color()
    assert lines["cls holdout_top1"].get_color() != lines["abmilp holdout_top1"].get_color()
    assert lines["cls test_top1"].get_linestyle() == "--" and lines["cls holdout_top1"].get_linestyle() == "-"


def test_wide_multi_panel_figures_get_the_page_width() -> None:
    import io

    from matplotlib.figure import Figure as MplFigure

    from vitprobe.report import Figure, _img_tag

    def png(w: float, h: float) -> bytes:
        buf = io.BytesIO()
        MplFigure(figsize=(w, h), dpi=50).savefig(buf, format="png")
        return buf.getvalue()

    # a 3-panel curve figure or an 8-image map grid squeezed to 520 px is unreadable
    assert _img_tag(Figure("grid.png", "maps", png(12.0, 3.0))).startswith('<figure class="wide">')
    assert _img_tag(Figure("one.png", "curve", png(6.0, 3.6))).startswith("<figure>")
    assert _img_tag(Figure("x.svg", "svg", b"<svg/>", mime="image/svg+xml")).startswith("<figure>")


def test_protocol_shows_the_lr_grid_instead_of_an_unused_blr(tmp_path: Path) -> None:
    run = make_run(tmp_path, "grid", cls=0.5, abmilp=0.7, with_analyses=False)
    results = json.loads((run / "results.json").read_text())
    results["config"]["lr_grid"] = [0.001, 0.01]
    (run / "results.json").write_text(json.dumps(results))
    protocol = collect_report([run])["runs"][0]["provenance"]["protocol"]
    assert protocol["lr_grid"] == [0.001, 0.01] and "blr" not in protocol
    plain = collect_report([make_run(tmp_path, "plain", cls=0.5, abmilp=0.7, with_analyses=False)])
    assert plain["runs"][0]["provenance"]["protocol"]["blr"] == 0.1


def test_a_clipped_knn_k_is_labelled_with_the_k_used(tmp_path: Path) -> None:
    run = make_run(tmp_path, "clipped", cls=0.5, abmilp=0.7, with_analyses=False)
    knn = json.loads((run / "knn.json").read_text())
    first = next(iter(knn["knn"]))
    knn["knn"] = {first: knn["knn"][first], "500": {"top1": 0.3, "top5": 0.9, "k_used": 200}}
    knn["knn"][first]["k_used"] = int(first)
    (run / "knn.json").write_text(json.dumps(knn))
    readouts = [a["readout"] for a in collect_report([run])["runs"][0]["accuracy"]]
    assert f"k-NN cls k={first}" in readouts and "k-NN cls k=500 (used 200)" in readouts
