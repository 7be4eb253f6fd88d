"""`vitprobe analyze attention|frequency` via the CLI: JSON, maps and figures are written and consistent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vitprobe.analysis.plots import load_maps
from vitprobe.cli import app

runner = CliRunner()
ATTENTION_FILES = ("attention.json", "attention_maps.safetensors") + tuple(
    f"{stem}.{ext}" for stem in ("attention_curves", "attention_maps") for ext in ("png", "svg")
)
FREQUENCY_FILES = ("frequency.json",) + tuple(
    f"{stem}.{ext}" for stem in ("frequency_spectrum", "frequency_headline") for ext in ("png", "svg")
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An imagefolder with a `val` split: 2 classes x 3 generated images of odd sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / "val" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (70 + 10 * i, 90, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / label / f"{i}.png")
    return f"imagefolder:{root}"


def invoke(*args: str) -> str:
    result = runner.invoke(app, ["analyze", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def common(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--random-init", "--data", data, "--split", "val", "--out", str(out),
            "--workers", "0", "--batch-size", "2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def attention_run(data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("att")
    output = invoke(
        "attention", *common("timm:test_vit", data, out, "--rollout", "--limit", "5", "--maps", "3")
    )
    assert "attention.json" in output and "cls_self" in output
    return out


def test_attention_writes_json_maps_and_figures(attention_run: Path) -> None:
    out = attention_run
    for name in ATTENTION_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    result = json.loads((out / "attention.json").read_text())
    assert result["kind"] == "attention" and result["schema_version"] == 1
    assert result["n_images"] == 5 and result["data"]["n_images"] == 5 and result["data"]["size"] == 6
    assert result["data"]["fingerprint"] and result["data"]["split"] == "val"
    assert result["random_init"] is True and result["model"]["random_init"] is True
    assert "random weights" in result["label"]
    assert result["backbone"]["grid"] == [10, 10] and result["backbone"]["depth"] == 6
    assert result["definitions"]["eps"] == 1e-6 and "cls_self" in result["definitions"]
    assert result["config"]["rollout"] is True and result["blocks"] == [1, 2, 3, 4, 5, 6]
    assert set(result["versions"]) >= {"vitprobe", "torch", "timm"}
    for name in ("cls_self", "cls_self_adj", "cls_to_patch", "patch_to_cls", "cls_entropy", "patch_self",
                 "patch_self_adj", "patch_entropy", "attention_distance"):  # fmt: skip
        per_head = np.asarray(result["stats"][name]["per_head"])
        assert per_head.shape == (6, 2), name  # test_vit: 6 blocks x 2 heads
        np.testing.assert_allclose(result["stats"][name]["mean"], per_head.mean(1))
    for name in ("magnitude_cls", "magnitude_patch"):
        assert len(result["stats"][name]["mean"]) == 6 and result["stats"][name]["per_head"] is None
    entropy = np.asarray(result["stats"]["patch_entropy"]["per_head"])
    assert ((entropy > 0) & (entropy <= math.log(100) + 1e-6)).all()
    assert sorted(result["figures"]) == sorted(n for n in ATTENTION_FILES if n.endswith(("png", "svg")))
    maps = load_maps(out / "attention_maps.safetensors")
    assert sorted(result["maps"]["keys"]) == sorted(maps)
    assert maps["cls_attention_last"].shape == (3, 10, 10) and maps["rollout"].shape == (3, 10, 10)
    assert maps["images"].shape == (3, 3, 160, 160) and maps["images"].dtype == np.uint8
    assert maps["cls_attention_last_mean"].shape == (10, 10)
    # the mean map's patch average is the last block's cls_to_patch (heads and images averaged)
    last_cls_to_patch = result["stats"]["cls_to_patch"]["mean"][-1]
    assert maps["cls_attention_last_mean"].mean() == pytest.approx(last_cls_to_patch, rel=1e-5)


def test_attention_is_deterministic(data: str, attention_run: Path, tmp_path: Path) -> None:
    """Same command, same numbers (random-init weights are seeded)."""
    invoke("attention", *common("timm:test_vit", data, tmp_path, "--rollout", "--limit", "5", "--maps", "3"))
    again = json.loads((tmp_path / "attention.json").read_text())
    first = json.loads((attention_run / "attention.json").read_text())
    assert again["stats"] == first["stats"]
    assert load_maps(tmp_path / "attention_maps.safetensors")["rollout"].tolist() == (
        load_maps(attention_run / "attention_maps.safetensors")["rollout"].tolist()
    )


def test_attention_without_cls_compared_with_an_earlier_run(
    data: str, attention_run: Path, tmp_path: Path
) -> None:
    """test_vit2 (no [cls], one register): patch statistics only, no maps; overlaid on the test_vit run."""
    invoke("attention", *common("timm:test_vit2", data, tmp_path, "--limit", "2", "--rollout", "--maps", "0",
                                "--compare", str(attention_run)))  # fmt: skip
    result = json.loads((tmp_path / "attention.json").read_text())
    assert result["backbone"]["has_cls"] is False and result["backbone"]["num_reg_tokens"] == 1
    assert set(result["stats"]) == {
        "patch_self", "patch_self_adj", "patch_entropy", "attention_distance", "patch_to_reg",
        "magnitude_patch",
    }  # fmt: skip
    assert result["maps"] is None and not (tmp_path / "attention_maps.safetensors").exists()
    assert result["notes"] == ["rollout skipped: the model has no [cls] token"]
    assert result["config"]["compare"] == [str(attention_run)]
    assert (tmp_path / "attention_curves.png").is_file() and (tmp_path / "attention_curves.svg").is_file()


def test_frequency_writes_json_and_figures_and_compares(data: str, tmp_path: Path) -> None:
    first, second = tmp_path / "f1", tmp_path / "f2"
    invoke("frequency", *common("timm:test_vit", data, first, "--limit", "4"))
    for name in FREQUENCY_FILES:
        assert (first / name).is_file(), name
    result = json.loads((first / "frequency.json").read_text())
    assert result["kind"] == "frequency" and result["n_images"] == 4 and result["random_init"] is True
    assert result["layers"] == ["patch_embed"] + [f"block{i}" for i in range(1, 7)]
    assert result["frequency"] == [0.0, 0.2, 0.4, 0.6, 0.8]  # 10x10 grid: 2k/10
    delta = np.asarray(result["delta_log_amplitude"])
    assert delta.shape == (7, 5) and (delta[:, 0] == 0).all()
    np.testing.assert_allclose(result["headline"], delta[:, -1])
    assert np.asarray(result["log_amplitude_2d"]).shape == (7, 10, 10)
    ratio = np.asarray(result["high_freq_energy_ratio"])
    assert ratio.shape == (7,) and ((ratio > 0) & (ratio < 1)).all()
    invoke("frequency", *common("timm:test_vit2", data, second, "--limit", "2", "--compare", str(first)))
    assert json.loads((second / "frequency.json").read_text())["config"]["compare"] == [str(first)]
    assert (second / "frequency_headline.png").is_file()


def test_compare_with_a_missing_run_is_a_readable_error(data: str, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["analyze", "frequency", *common("timm:test_vit", data, tmp_path / "x", "--compare", str(tmp_path))],
    )
    assert result.exit_code == 1
    assert "no frequency.json" in result.output


@pytest.mark.slow
def test_vit_base_architecture_runs_both_analyses() -> None:
    """ViT-B/16 at 224 px, random weights, 2 images: both analyses on one model build, real-size shapes."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from vitprobe.analysis.attention import analyze_attention, explicit_attention
    from vitprobe.analysis.frequency import analyze_frequency
    from vitprobe.models import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("timm:vit_base_patch16_224", random_init=True)
    x = torch.randn(2, 3, 224, 224)  # (B, 3, H, W)
    loader = DataLoader(TensorDataset(x, torch.zeros(2), torch.arange(2)), batch_size=2)
    acc = analyze_attention(backbone, loader, torch.device("cpu"), rollout=True)
    att = acc.result()
    assert np.asarray(att["stats"]["cls_self"]["per_head"]).shape == (12, 12) and att["n_images"] == 2
    assert acc.maps()["rollout"].shape == (2, 14, 14)
    freq = analyze_frequency(backbone, loader, torch.device("cpu")).result()
    assert np.asarray(freq["delta_log_amplitude"]).shape == (13, 7)
    assert freq["frequency"][-1] == pytest.approx(12 / 14)
    tokens = torch.randn(2, 197, 768)  # (B, T, D)
    attn = backbone.model.blocks[5].attn
    with torch.no_grad():
        torch.testing.assert_close(explicit_attention(attn, tokens)[1], attn(tokens), atol=1e-5, rtol=1e-5)
