"""Suspect train/test pairs are said (terminal, JSON, report): swapped splits, test classes the train rows
lack; and knn keeps an earlier knn.json unless --overwrite, as probe and analyze do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from report_fixtures import RealRuns, session_runs
from vitprobe.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return session_runs(tmp_path_factory)


def test_swapped_train_and_test_are_warned_about(real: RealRuns, tmp_path: Path) -> None:
    train, test = real.caches["ckpt-a"]["train"], real.caches["ckpt-a"]["test"]
    args = ["knn", "--train", str(test), "--test", str(train), "--k", "5", "--device", "cpu"]
    swapped = runner.invoke(app, [*args, "--out", str(tmp_path / "swapped")])
    assert swapped.exit_code == 0, swapped.output
    expected = (
        f"--train and --test look swapped: the train cache {test} holds split 'test' and the test cache "
        f"{train} split 'train'; pass the train split's cache as --train"
    )
    assert f"warning: {expected}" in swapped.stderr  # one line, as written
    assert json.loads((tmp_path / "swapped" / "knn.json").read_text())["warnings"] == [expected]
    report = runner.invoke(app, ["report", str(tmp_path / "swapped"), "--format", "json"])
    assert expected in json.loads(report.stdout)["runs"][0]["notes"]
    straight = runner.invoke(app, ["knn", "--train", str(train), "--test", str(test), "--k", "5",
                                   "--device", "cpu", "--format", "json"])  # fmt: skip
    assert straight.exit_code == 0 and json.loads(straight.stdout)["warnings"] == []


def _csv_dataset(root: Path) -> str:
    """A CSV dataset whose class `c` has test images only (the class list is shared by both splits)."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for split, classes in (("train", "ab"), ("test", "abc")):
        for c in classes:
            for i in range(3):
                name = f"{split}-{c}{i}.png"
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name)
                rows.append(f"{name},{c},{split}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return f"csv:{root / 'data.csv'}"


def test_test_classes_missing_from_the_train_cache_are_warned_about(tmp_path: Path) -> None:
    spec = _csv_dataset(tmp_path)
    common = ["--model", "timm:test_vit", "--random-init", "--data", spec, "--workers", "0",
              "--device", "cpu"]  # fmt: skip
    for split in ("train", "test"):
        done = runner.invoke(app, ["extract", *common, "--split", split, "--out", str(tmp_path / split)])
        assert done.exit_code == 0, done.output
    expected = (
        "1 test classes never appear in the train rows (c): their test images cannot be classified correctly"
    )
    knn = runner.invoke(app, ["knn", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                              "--k", "2", "--device", "cpu", "--format", "json"])  # fmt: skip
    assert knn.exit_code == 0, knn.output
    assert expected in json.loads(knn.stdout)["warnings"] and f"warning: {expected}" in knn.stderr
    probe = runner.invoke(app, ["probe", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                                "--out", str(tmp_path / "run"), "--pool", "cls", "--epochs", "1",
                                "--min-steps", "0", "--lr-grid", "0.1", "--select-on", "test",
                                "--device", "cpu"])  # fmt: skip
    assert probe.exit_code == 0, probe.output
    assert expected in json.loads((tmp_path / "run" / "results.json").read_text())["warnings"]
    assert expected in " ".join(probe.stdout.split())


def test_knn_keeps_an_earlier_result_unless_overwrite(real: RealRuns, tmp_path: Path) -> None:
    train, test = (str(real.caches["ckpt-b"][s]) for s in ("train", "test"))
    args = ["knn", "--train", train, "--test", test, "--device", "cpu", "--out", str(tmp_path)]
    assert runner.invoke(app, [*args, "--k", "5"]).exit_code == 0
    before = (tmp_path / "knn.json").read_text()
    again = runner.invoke(app, [*args, "--k", "20"])
    assert again.exit_code == 1 and again.stdout == ""
    assert again.stderr.strip() == (
        f"error: {tmp_path} already holds knn.json of an earlier `vitprobe knn` run — fix: pass --overwrite "
        "to replace it, or choose another --out"
    )
    assert (tmp_path / "knn.json").read_text() == before
    replaced = runner.invoke(app, [*args, "--k", "20", "--overwrite"])
    assert replaced.exit_code == 0 and list(json.loads((tmp_path / "knn.json").read_text())["knn"]) == ["20"]
