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
    assert (result["format"], result["version"], result["kind"]) == ("vitprobe-attention", 3, "attention")
    assert result["n_images"] == 5 and result["data"]["n_images"] == 5 and result["data"]["size"] == 6
    assert result["data"]["fingerprint"] and result["data"]["split"] == "val"
    assert result["random_init"] is True and result["model"]["random_init"] is True
    assert "random weights" in result["label"]
    assert result["backbone"]["grid"] == [10, 10] and result["backbone"]["depth"] == 6
    assert result["definitions"]["eps"] == 1e-6 and "cls_self" in result["definitions"]
    assert result["config"]["rollout"] is True and result["blocks"] == [0, 1, 2, 3, 4, 5]
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
    assert result["layers"] == ["patch_embed"] + [f"block{i}" for i in range(6)]
    assert result["blocks"] == [None, 0, 1, 2, 3, 4, 5] and result["source"] == "backbone"
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

    from vitprobe.analysis.attention import analyze_attention
    from vitprobe.analysis.frequency import analyze_frequency
    from vitprobe.analysis.passes import explicit_attention
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


# ----------------------------------------------------------------------------------------------------
# --cache: the cache names model, weights, data and split; frequency reads its tokens


def extract(data: str, out: Path, *extra: str) -> Path:
    args = ["extract", "--model", "timm:test_vit", "--data", data, "--split", "val", "--out", str(out),
            "--workers", "0", "--batch-size", "3", *extra]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


ALL_BLOCKS = ("--layers", "0,1,2,3,4,5")  # test_vit has 6 blocks


@pytest.fixture(scope="module")
def all_blocks_cache(data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every block of test_vit (random weights, seed 4), stored in fp32 so the tokens are the fp32 pass's."""
    out = tmp_path_factory.mktemp("caches") / "all-fp32"
    return extract(data, out, "--random-init", "--seed", "4", *ALL_BLOCKS, "--store", "fp32")


def test_attention_from_a_cache_equals_the_run_with_its_flags(
    data: str, all_blocks_cache: Path, tmp_path: Path
) -> None:
    """--cache alone gives model, random weights (the cache's seed), data and split: the same numbers."""
    from vitprobe.analysis.attention import AttentionConfig, run_attention

    invoke("attention", "--cache", str(all_blocks_cache), "--out", str(tmp_path / "c"), "--workers", "0",
           "--limit", "4", "--maps", "0")  # fmt: skip
    from_cache = json.loads((tmp_path / "c" / "attention.json").read_text())
    same = dict(model="timm:test_vit", random_init=True, data=data, split="val", limit=4, num_workers=0)
    same["n_maps"] = 0
    flags = run_attention(AttentionConfig(out=str(tmp_path / "f"), seed=4, **same)).result
    assert from_cache["stats"] == flags["stats"] and from_cache["n_images"] == 4
    assert from_cache["inputs"] == {**flags["inputs"], "cache": str(all_blocks_cache)}
    assert from_cache["inputs"]["seed"] == 4 and from_cache["cache"]["layers"] == list(range(6))
    other_seed = run_attention(AttentionConfig(out=str(tmp_path / "s"), **same)).result  # seed 0
    assert other_seed["stats"] != from_cache["stats"]  # so equal stats above say the weights are the cache's


def test_frequency_reads_a_cache_with_every_block_instead_of_running_the_backbone(
    data: str, all_blocks_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vitprobe.analysis.runs as runs

    backbone = tmp_path / "backbone"
    invoke("frequency", "--cache", str(all_blocks_cache), "--out", str(backbone), "--workers", "0",
           "--source", "backbone")  # fmt: skip
    ran = json.loads((backbone / "frequency.json").read_text())
    assert ran["source"] == "backbone" and ran["blocks"] == [None, 0, 1, 2, 3, 4, 5]

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(runs, "load_pass_backbone", no_model)
    monkeypatch.setattr("vitprobe.models.load_backbone", no_model)
    output = invoke("frequency", "--cache", str(all_blocks_cache), "--out", str(tmp_path / "cache"))
    read = json.loads((tmp_path / "cache" / "frequency.json").read_text())
    assert read["source"] == "cache" and "(cache)" in output and "patch embedding is not cached" in output
    assert read["layers"] == [f"block{b}" for b in range(6)] and read["blocks"] == list(range(6))
    assert read["n_images"] == ran["n_images"] == 6
    assert read["data"]["fingerprint"] == ran["data"]["fingerprint"]
    for key in ("delta_log_amplitude", "headline", "high_freq_energy_ratio", "log_amplitude_2d"):
        np.testing.assert_allclose(read[key], ran[key][1:], rtol=1e-5, atol=1e-5)  # fp32 tokens: the same
    assert np.ptp(np.asarray(read["headline"])) > 1e-3  # layers differ, so the comparison can fail
    few = tmp_path / "few"
    invoke("frequency", "--cache", str(all_blocks_cache), "--out", str(few), "--blocks", "1,-1")
    assert json.loads((few / "frequency.json").read_text())["layers"] == ["block1", "block5"]


def test_frequency_falls_back_to_the_backbone_and_says_so(data: str, tmp_path: Path) -> None:
    last_only = extract(data, tmp_path / "last", "--random-init")  # --layers -1: block 5 only
    output = invoke("frequency", "--cache", str(last_only), "--out", str(tmp_path / "o"), "--workers", "0")
    result = json.loads((tmp_path / "o" / "frequency.json").read_text())
    assert result["source"] == "backbone" and result["layers"][0] == "patch_embed"
    assert "holds blocks [5], not [0, 1, 2, 3, 4]" in result["notes"][0] and "ran the backbone" in output
    args = ["analyze", "frequency", "--cache", str(last_only), "--out", str(tmp_path / "x")]
    refused = runner.invoke(app, [*args, "--source", "cache"])
    assert refused.exit_code == 1 and "--layers 0,1,2,3,4,5 --tokens all" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_flags_that_contradict_the_cache_are_refused(data: str, tmp_path: Path) -> None:
    import torch

    from vitprobe.models import load_backbone

    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    torch.save(load_backbone("timm:test_vit", random_init=True).model.state_dict(), weights)
    cache = extract(data, tmp_path / "trained", "--checkpoint", str(weights), "--limit", "2")
    other_weights = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(load_backbone("timm:test_vit", random_init=True).model.state_dict(), other_weights)
    other_images = tmp_path / "other-images"
    for label in ("cat", "dog"):
        (other_images / "val" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(other_images / "val" / label / "x.png")

    def refused(*flags: str) -> str:
        args = ["analyze", "attention", "--cache", str(cache), "--out", str(tmp_path / "o"), "--workers", "0"]
        result = runner.invoke(app, [*args, *flags])
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        return result.output

    assert "is test_vit2, but the cache" in refused("--model", "timm:test_vit2")
    assert "are not those of the cache" in refused("--checkpoint", str(other_weights))
    assert "--random-init, but the cache" in refused("--random-init")
    assert "another image list" in refused("--data", f"imagefolder:{other_images}")
    assert not (tmp_path / "o").exists()
    invoke("attention", "--cache", str(cache), "--out", str(tmp_path / "ok"), "--workers", "0", "--model",
           "timm:test_vit", "--checkpoint", str(weights), "--data", data, "--split", "val")  # fmt: skip
    result = json.loads((tmp_path / "ok" / "attention.json").read_text())
    assert result["random_init"] is False and result["model"]["sha256"] == result["cache"]["checkpoint"]
    assert result["n_images"] == 2  # the cache's images (extract --limit 2), not the whole split
    weights.rename(tmp_path / "moved.pth")
    assert "which is not there now" in refused()


def test_an_earlier_result_is_kept_unless_overwrite(data: str, tmp_path: Path) -> None:
    """Refused before any work (no model is loaded), the earlier file untouched; --overwrite replaces it."""
    for kind in ("attention", "frequency", "localization"):
        (tmp_path / f"{kind}.json").write_text('{"earlier": true}')
        again = runner.invoke(app, ["analyze", kind, *common("timm:test_vit", data, tmp_path)])
        assert again.exit_code == 1 and f"already holds {kind}.json" in again.output
        assert "--overwrite" in again.output and len(again.output.strip().splitlines()) == 1
        assert (tmp_path / f"{kind}.json").read_text() == '{"earlier": true}'
    invoke("frequency", *common("timm:test_vit", data, tmp_path, "--limit", "2", "--overwrite"))
    assert json.loads((tmp_path / "frequency.json").read_text())["n_images"] == 2


@pytest.mark.parametrize("kind", ["attention", "frequency", "localization"])
def test_a_corrupt_image_read_by_workers_is_one_line(tmp_path: Path, kind: str) -> None:
    """With DataLoader workers, a corrupt image stops the pass with the worker's one-line DatasetError."""
    from vitprobe.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "needles", n=8, classes=2, size=48, seed=0)
    test_images = sorted((root / "images").rglob("*.png"))
    test_images[1].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["analyze", kind, "--model", "timm:test_vit", "--random-init", "--data", f"cub:{root}", "--split",
            "all", "--out", str(tmp_path / "out"), "--workers", "2", "--batch-size", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert f"cannot read image {test_images[1]}" in lines[0]
    assert "replace or remove the corrupt file" in lines[0]
