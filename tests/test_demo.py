"""`vitprobe demo` end to end on a small needles set: every step runs offline and says weights are random."""

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
    args = ["demo", "--out", str(out), "--n", "80", "--epochs", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("RANDOM WEIGHTS") >= 9  # the banner and every step line say so
    for step in ("[1/9]", "[5/9]", "[9/9]"):
        assert step in text
    run = out / "run"
    for name in ("results.json", "knn.json", "attention.json", "frequency.json", "localization.json"):
        saved = json.loads((run / name).read_text())
        assert saved["random_init"] is True, name
    results = json.loads((run / "results.json").read_text())
    assert set(results["readouts"]) == {"cls", "mean", "abmilp"}
    loc = json.loads((run / "localization.json").read_text())
    assert set(loc["maps"]) == {"cls_attention", "abmilp"}
    assert loc["maps"]["abmilp"]["num_images"] == 40  # the whole test half
    html = (out / "report.html").read_text()
    assert '<table id="accuracy">' in html and "RANDOM WEIGHTS" in html and "data:image/png;base64," in html
    for readout in ("cls", "mean", "abmilp"):
        assert f"<td>{readout}</td>" in html


def test_demo_refuses_data_made_with_other_settings(tmp_path: Path) -> None:
    from vitprobe.demo import DemoConfig, run_demo
    from vitprobe.errors import VitprobeError
    from vitprobe.synthetic import make_synthetic

    out = tmp_path / "demo"
    make_synthetic(out / "data", n=8, classes=2, size=32, seed=0)  # an earlier demo's needles
    said: list[str] = []
    config = DemoConfig(out=str(out), n=16, classes=2, size=32, device="cpu")
    with pytest.raises(VitprobeError, match=r"n=8.*n=16") as info:
        run_demo(config, say=said.append)
    assert "another --out" in (info.value.hint or "")
    assert not (out / "caches").exists()  # refused before extracting anything from the wrong data


def test_demo_on_an_out_made_with_another_model_says_what_works_for_the_demo(tmp_path: Path) -> None:
    from vitprobe.demo import DemoConfig, run_demo
    from vitprobe.errors import CacheError
    from vitprobe.extract import ExtractConfig, extract
    from vitprobe.synthetic import make_synthetic

    out = tmp_path / "demo"
    make_synthetic(out / "data", n=16, classes=2, size=32, seed=0)
    earlier = ExtractConfig(model="timm:test_vit", data=f"cub:{out / 'data'}", split="train",
                            out=out / "caches" / "train", random_init=True, workers=0, device="cpu")
    extract(earlier)
    config = DemoConfig(out=str(out), model="timm:test_vit2", random_init=True, n=16, classes=2, size=32,
                        device="cpu")
    with pytest.raises(CacheError) as info:
        run_demo(config, say=lambda _: None)
    assert "other settings" in info.value.message
    assert "--overwrite" not in (info.value.hint or "") and "new --out" in (info.value.hint or "")
