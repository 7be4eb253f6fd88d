"""Per-layer sweeps and low-shot runs in the results model and the report: accuracy vs depth beside the
analyses of the same blocks, the pivot at the last block, mean ± std over seeds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from report_fixtures import BLOCKS, RealRuns, session_runs, sweep_runs
from vitprobe import results as R
from vitprobe.cli import app
from vitprobe.report import ReportConfig, build_document, collect_report, make_figures, write_report
from vitprobe.report.document import Table
from vitprobe.report.stats import wilson_interval

runner = CliRunner()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return list(sweep_runs(tmp_path_factory).values())


def test_the_sweep_fields_are_typed_and_checked(sweeps: list[Path]) -> None:
    sweep = json.loads((sweeps[0] / "results.json").read_text())  # `vitprobe probe --layer all` wrote it
    parsed = R.parse(sweep)
    assert parsed.to_dict() == sweep and parsed.extra == {}  # every key declared, written back as read
    assert all(r.extra == {} for r in parsed.readouts.values())
    assert parsed.layer is None and parsed.layers == list(BLOCKS)
    singles = {f"{p}@{b}" for p in ("cls", "mean", "abmilp") for b in BLOCKS}
    assert set(parsed.readouts) == singles | {"fusion"}
    assert parsed.readouts["abmilp@3"].layer == 3 and parsed.readouts["fusion"].layer is None
    assert parsed.readouts["fusion"].blocks == list(BLOCKS)
    assert parsed.per_layer["mean"].layers == list(BLOCKS)
    assert parsed.per_layer["mean"].top1 == [parsed.readouts[f"mean@{b}"].top1 for b in BLOCKS]
    assert parsed.blocks_of("mean") == {1: "mean@1", 3: "mean@3", 5: "mean@5"}
    assert R.split_readout("abmilp@11") == ("abmilp", 11)
    assert R.split_readout("cls-cat+mean") == ("cls-cat+mean", None)
    bad = copy.deepcopy(sweep)
    bad["readouts"]["cls@4"] = bad["readouts"].pop("cls@3")  # block 4 is not swept
    with pytest.raises(R.ResultsError, match=r"readouts.cls@4: block 4 is not one of the blocks \[1, 3, 5\]"):
        R.parse(bad, where="results.json")
    bad = copy.deepcopy(sweep)
    bad["per_layer"]["cls"]["top1"].pop()
    with pytest.raises(R.ResultsError, match=r"per_layer.cls: 2 top-1 values for the blocks \[1, 3, 5\]"):
        R.parse(bad, where="results.json")


def test_the_pivot_shows_the_last_block_and_every_block_is_in_depth(
    sweeps: list[Path], real: RealRuns
) -> None:
    report = collect_report([str(p) for p in sweeps])
    assert report.readouts() == ["cls", "mean", "abmilp", "fusion"]  # pools, not one column per block
    written = json.loads((sweeps[0] / "results.json").read_text())
    a = report.runs[0]
    for pool in ("cls", "mean", "abmilp"):
        score = a.score(pool)
        assert score.readout == f"{pool}@5" and score.block == 5  # the last block, never the best one
        assert score.top1 == pytest.approx(100 * written["readouts"][f"{pool}@5"]["top1"])
    assert a.score("fusion").block is None
    depth = {c.pool: c for c in a.depth}
    assert set(depth) == {"cls", "mean", "abmilp"} and depth["mean"].blocks == list(BLOCKS)
    assert depth["mean"].top1 == pytest.approx([100 * t for t in written["per_layer"]["mean"]["top1"]])
    low, high = wilson_interval(written["per_layer"]["mean"]["top1"][0], 24)
    assert depth["mean"].ci[0] == pytest.approx((100 * low, 100 * high))
    assert depth["abmilp"].flagged == [written["readouts"][f"abmilp@{b}"]["verdict"] != "ok" for b in BLOCKS]
    assert a.provenance.layer is None and a.provenance.layers == list(BLOCKS)
    # the learning curves and weakest classes show the pivot's read-outs, not 3 blocks x 3 pools
    assert {c.readout for c in a.learning_curves} == {"cls@5", "mean@5", "abmilp@5", "fusion"}
    assert set(a.weakest_classes) <= {"cls@5", "mean@5", "abmilp@5", "fusion"}
    assert any("per-layer sweep over blocks 1, 3, 5" in n for n in a.notes)
    assert a.score("mean@3").delta_vs_cls == pytest.approx(a.score("mean@3").top1 - a.score("cls@3").top1)

    doc = build_document(report, make_figures(report))
    tables = {b.id: b for b in doc.blocks if isinstance(b, Table)}
    pivot = tables["pivot"]
    assert pivot.header[3:] == ["cls", "mean", "abmilp", "fusion"]
    assert "block 5" in pivot.rows[0][3].sub and "last (deepest) block" in pivot.caption
    table = tables["depth"]
    assert table.header == ["run", "read-out", "block 1", "block 3", "block 5"]
    assert [(r[0].text, r[1].text) for r in table.rows][:3] == [("ckpt-a", "cls"), ("ckpt-a", "mean"),
                                                                ("ckpt-a", "abmilp")]  # fmt: skip
    assert {r[0].text for r in table.rows} == {"ckpt-a", "ckpt-b"}
    readouts = tables["readouts"]
    assert "block" in readouts.header and {r[3].text for r in readouts.rows} == {"1", "3", "5", "—"}
    one_block = collect_report([str(real.runs["ckpt-a"])])
    assert one_block.runs[0].depth == [] and one_block.runs[0].provenance.layers == []  # not a sweep


def test_the_depth_figure_names_both_runs_beside_the_analyses(sweeps: list[Path]) -> None:
    report = collect_report([str(p) for p in sweeps])
    figures = {f.name: f for f in make_figures(report)}
    depth = figures["accuracy_vs_depth.svg"]
    assert depth.legend == ("ckpt-a", "ckpt-b") and depth.title == "Accuracy vs depth: ckpt-a, ckpt-b"
    svg = depth.data.decode()
    for text in ("cls: test top-1", "abmilp: test top-1", "[cls] self-attention A[0,0]",
                 "high-frequency energy ratio", "block (0-based)", "ckpt-a", "ckpt-b"):  # fmt: skip
        assert text in svg, text
    doc = build_document(report, list(figures.values()))
    placed = [b.figure.name for b in doc.blocks if hasattr(b, "figure")]
    assert placed.count("accuracy_vs_depth.svg") == 1  # each figure once, in its own section
    headings = [b.text for b in doc.blocks if type(b).__name__ == "Heading"]
    assert headings.index("Accuracy vs depth") == headings.index("Read-outs") + 1


def test_csv_and_latex_say_which_block(sweeps: list[Path], tmp_path: Path) -> None:
    runs = tuple(str(p) for p in sweeps)
    out = write_report(ReportConfig(runs=runs, out=str(tmp_path / "p.csv"), format="csv"))
    header, first, _ = out.text.splitlines()
    row = dict(zip(header.split(","), first.split(","), strict=True))
    assert row["cls block"] == "5" and "fusion block" not in row
    latex = write_report(ReportConfig(runs=runs, out=str(tmp_path / "p.tex"), format="latex")).text
    assert "$_{5}$" in latex and "subscript: the block of a per-layer sweep (its last)" in latex


@pytest.fixture(scope="module")
def lowshot(real: RealRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real low-shot run (2 images per class, 3 seeds) by `vitprobe probe` on the study's caches."""
    out = tmp_path_factory.mktemp("lowshot") / "run"
    train, test = (str(real.caches["ckpt-a"][s]) for s in ("train", "test"))
    done = runner.invoke(app, ["probe", "--train", train, "--test", test, "--out", str(out), "--pool", "cls",
                               "--pool", "mean", "--shots", "2", "--seeds", "3", "--epochs", "2",
                               "--min-steps", "0", "--batch-size", "4", "--lr-grid", "0.1,1",
                               "--weight-decay", "0,0.05", "--device", "cpu"])  # fmt: skip
    assert done.exit_code == 0, done.output
    return out


def test_lowshot_is_mean_and_std_over_seeds(lowshot: Path, tmp_path: Path) -> None:
    written = json.loads((lowshot / "results.json").read_text())
    parsed = R.load(lowshot / "results.json")
    assert parsed.to_dict() == written and parsed.selection.lowshot.shots == 2  # typed, every key declared
    assert [s.seed for s in parsed.readouts["cls"].seeds] == [0, 1, 2]
    report = collect_report([str(lowshot)])
    run = report.runs[0]
    score = run.score("cls")
    r = written["readouts"]["cls"]
    assert score.top1 == pytest.approx(100 * r["top1"]) and score.std == pytest.approx(100 * r["top1_std"])
    assert [s.top1 for s in score.seeds] == pytest.approx([100 * s["top1"] for s in r["seeds"]])
    assert score.wd_grid and run.provenance.lowshot.startswith("2 images per class, 3 seed(s) (0, 1, 2)")
    doc = build_document(report, [])
    pivot = next(b for b in doc.blocks if isinstance(b, Table) and b.id == "pivot")
    cell = pivot.rows[0][3]
    assert cell.text.startswith(f"{score.top1:.1f} ± {score.std:.1f} [{score.ci[0]:.1f}, {score.ci[1]:.1f}]")
    blrs = "/".join(f"{b:g}" for b in dict.fromkeys(s["blr"] for s in r["seeds"]))
    assert f"blr {blrs}" in cell.sub and "3 seeds" in cell.sub and "wd " in cell.sub
    assert "Low-shot: mean ± std over seeds" in pivot.caption
    provenance = next(b for b in doc.blocks if isinstance(b, Table) and b.id == "provenance")
    assert any(row[0].text == "low-shot" for row in provenance.rows)
    out = write_report(ReportConfig(runs=(str(lowshot),), out=str(tmp_path / "p.csv"), format="csv"))
    header, first = out.text.splitlines()
    row = dict(zip(header.split(","), first.split(","), strict=True))
    assert float(row["cls std"]) == pytest.approx(round(100 * r["top1_std"], 2))
    data = json.loads(write_report(ReportConfig(runs=(str(lowshot),), out="", format="json")).text)
    shown = next(s for s in data["runs"][0]["scores"] if s["readout"] == "cls")
    assert shown["std"] == pytest.approx(100 * r["top1_std"]) and len(shown["seeds"]) == 3
