"""`vitprobe demo` end to end on a small needles set: one study, offline, saying weights are random."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitprobe.cli import app


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n", "80", "--epochs", "3", "--device", "cpu", "--format", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # --format json: one object on stdout
    assert summary["random_init"] is True and set(summary["top1"]) == {"cls", "mean", "abmilp"}
    log = " ".join(result.stderr.split())
    assert log.count("RANDOM WEIGHTS") >= 9  # the banner and every step line of the model say so
    for step in ("[1/9]", "[5/9]", "[9/9]"):
        assert step in log
    run = Path(summary["run"])
    for name in ("results.json", "knn.json", "attention.json", "frequency.json", "localization.json"):
        saved = json.loads((run / name).read_text())
        assert saved["random_init"] is True, name
    loc = json.loads((run / "localization.json").read_text())
    assert set(loc["maps"]) == {"cls_attention", "abmilp"}
    assert loc["maps"]["abmilp"]["num_images"] == 40  # the whole test half
    html = (out / "report.html").read_text()
    assert '<table id="pivot">' in html and "RANDOM WEIGHTS" in html and "data:image/" in html
    assert "test-vit ⚠ random weights" in html  # the run is named, and flagged, in every table
    state = json.loads((out / "study.json").read_text())
    assert state["format"] == "vitprobe-study" and all(s["status"] == "done" for s in state["steps"].values())


def test_demo_refuses_data_made_with_other_settings(tmp_path: Path) -> None:
    from vitprobe.demo import DemoConfig, run_demo
    from vitprobe.errors import VitprobeError
    from vitprobe.synthetic import make_synthetic

    out = tmp_path / "demo"
    make_synthetic(out / "data" / "needles", n=8, classes=2, size=32, seed=0)  # an earlier demo's needles
    config = DemoConfig(out=str(out), n=16, classes=2, size=32, device="cpu")
    with pytest.raises(VitprobeError, match=r"n=8.*n=16") as info:
        run_demo(config, say=lambda _: None)
    assert "new --out" in (info.value.hint or "")
    assert not (out / "caches").exists()  # refused before extracting anything from the wrong data


def test_demo_on_an_out_made_with_another_model_says_what_works_for_the_demo(tmp_path: Path) -> None:
    from vitprobe.demo import DemoConfig, run_demo
    from vitprobe.errors import VitprobeError
    from vitprobe.extract import ExtractConfig, extract
    from vitprobe.synthetic import make_synthetic

    out = tmp_path / "demo"
    data = out / "data" / "needles"
    make_synthetic(data, n=16, classes=2, size=32, seed=0)
    earlier = ExtractConfig(model="timm:test_vit2", data=f"cub:{data}", split="train",
                            out=out / "caches" / "test-vit" / "needles-train", random_init=True, workers=0,
                            device="cpu")  # fmt: skip
    extract(earlier)
    config = DemoConfig(out=str(out), n=16, classes=2, size=32, device="cpu")
    with pytest.raises(VitprobeError) as info:
        run_demo(config, say=lambda _: None)
    assert "demo's settings changed" in info.value.message
    assert "--overwrite" not in (info.value.hint or "") and "new --out" in (info.value.hint or "")
