"""Data-config overrides (issue 13): image size, mean/std, crop and interpolation as timm's
`resolve_data_config` takes them, for presets and timm:NAME; a new image size resamples the file's positions
the way timm's `dynamic_img_size` (or the method's own rule) does; bad values are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import resize_rel_pos_bias_table
from typer.testing import CliRunner

from layout_writers import random_state_dict, tiny, write_simmim
from vitprobe.cli import app
from vitprobe.dataconfig import DataOverrides
from vitprobe.errors import KeyMismatchError, ModelError
from vitprobe.models import IMAGENET_MEAN, LoadConfig, load_backbone, load_backbone_from_config

runner = CliRunner()


def test_overrides_reach_timms_data_config_and_the_transform() -> None:
    data = DataOverrides(mean=(0.5,), std=(0.25, 0.5, 0.75), crop_pct=1.0, interpolation="bilinear")
    backbone = load_backbone("dino-s16", random_init=True, device="meta", data=data)
    cfg = backbone.data_config()
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.25, 0.5, 0.75)
    assert (
        cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear" and cfg["input_size"] == (3, 224, 224)
    )
    assert resolve_data_config({}, model=backbone.model) == cfg  # timm's own reader sees the same
    steps = {type(t).__name__: t for t in backbone.transform().transforms}
    assert steps["Resize"].size == 224 and steps["Resize"].interpolation.value == "bilinear"
    assert steps["Normalize"].mean.tolist() == [0.5, 0.5, 0.5]
    assert backbone.report.data_overrides == {
        "mean": [0.5],
        "std": [0.25, 0.5, 0.75],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }


def test_no_override_keeps_the_preset_config() -> None:
    cfg = load_backbone("mae-b16", random_init=True, device="meta", data=DataOverrides()).data_config()
    assert cfg["mean"] == IMAGENET_MEAN and cfg["crop_pct"] == 224 / 256 and cfg["interpolation"] == "bicubic"


def test_img_size_builds_the_model_for_it_and_equals_timms_dynamic_img_size(tmp_path: Path) -> None:
    """Resampling `pos_embed` once at load (timm's resample_abs_pos_embed) gives the tokens timm's own
    `dynamic_img_size=True` model computes for the larger image from the file's 2x2 grid."""
    overrides = tiny("dino-s16")  # 32 px, 2x2 patches
    want = random_state_dict("dino-s16", overrides, seed=0)
    torch.save(want, tmp_path / "w.pth")
    arch = {k: v for k, v in overrides.items() if k != "img_size"}
    data = DataOverrides(img_size=64)
    backbone = load_backbone("dino-s16", checkpoint=str(tmp_path / "w.pth"), arch_overrides=arch, data=data)
    assert backbone.grid == (4, 4) and backbone.data_config()["input_size"] == (3, 64, 64)
    assert any(
        "pos_embed resampled from 2x2 to 4x4" in n and "dynamic_img_size" in n for n in backbone.report.notes
    )
    dynamic = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **overrides
    ).eval()
    dynamic.load_state_dict(want, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(backbone.model.forward_features(x), dynamic.forward_features(x))


def test_without_img_size_another_grid_still_fails_strictly(tmp_path: Path) -> None:
    want = random_state_dict("dino-s16", tiny("dino-s16"), seed=0)
    torch.save(want, tmp_path / "w.pth")
    arch = {**tiny("dino-s16"), "img_size": 64}  # an architecture override is not a request to resample
    with pytest.raises(KeyMismatchError) as info:
        load_backbone("dino-s16", checkpoint=str(tmp_path / "w.pth"), arch_overrides=arch)
    assert "--img-size resamples them" in info.value.message


def test_dinov2_img_size_uses_dinov2s_rule(tmp_path: Path) -> None:
    overrides = tiny("dinov2-s14")
    want = random_state_dict("dinov2-s14", overrides, seed=1)
    torch.save({**want, "mask_token": torch.zeros(1, 32)}, tmp_path / "w.pth")
    arch = {k: v for k, v in overrides.items() if k != "img_size"}
    backbone = load_backbone(
        "dinov2-s14", checkpoint=str(tmp_path / "w.pth"), arch_overrides=arch, data=DataOverrides(img_size=56)
    )
    assert backbone.grid == (4, 4)
    assert any("as the method's own model does" in n for n in backbone.report.notes)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's chatter inside timm's interpolation
def test_beit_img_size_resizes_the_shared_relative_position_bias(tmp_path: Path) -> None:
    overrides = tiny("simmim-b16")  # 32 px: a 2x2 window, (2*2-1)^2 + 3 = 12 relative positions
    want = random_state_dict("simmim-b16", overrides, seed=2)
    write_simmim(want, want, tmp_path / "simmim.pth")
    arch = {k: v for k, v in overrides.items() if k != "img_size"}
    backbone = load_backbone(
        "simmim-b16",
        checkpoint=str(tmp_path / "simmim.pth"),
        arch_overrides=arch,
        data=DataOverrides(img_size=48),
    )
    table = backbone.model.state_dict()["rel_pos_bias.relative_position_bias_table"]
    expected = resize_rel_pos_bias_table(want["rel_pos_bias.relative_position_bias_table"], (3, 3), (28, 2))
    assert table.shape == (28, 2) and torch.equal(table, expected)
    assert any("relative position bias table(s) resized to a 3x3 window" in n for n in backbone.report.notes)
    (tokens,) = backbone.intermediates(torch.randn(1, 3, 48, 48))
    assert tokens.shape == (1, 1 + 9, 32)


def test_timm_name_takes_overrides() -> None:
    config = LoadConfig(
        model="timm:test_vit", random_init=True, img_size=80, crop_pct=0.5, interpolation="nearest"
    )
    backbone = load_backbone_from_config(config)
    cfg = backbone.data_config()
    assert backbone.grid == (5, 5) and cfg["input_size"] == (3, 80, 80) and cfg["crop_pct"] == 0.5
    assert cfg["interpolation"] == "nearest"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (DataOverrides(mean=(0.5, 0.5)), "--mean 0.5,0.5 is not 1 or 3 finite numbers"),
        (DataOverrides(std=(0.2, 0.0, 0.2)), "--std 0.2,0.0,0.2 has a value <= 0"),
        (DataOverrides(mean=(float("nan"),)), "--mean nan is not 1 or 3 finite numbers"),
        (DataOverrides(crop_pct=1.5), r"--crop-pct 1.5 is not in \(0, 1\]"),
        (DataOverrides(interpolation="cubic"), "--interpolation 'cubic' is not one of timm's resize modes"),
        (DataOverrides(img_size=100), "--img-size 100 is not a multiple of the patch size 16"),
        (DataOverrides(img_size=0), "--img-size 0 is not a positive size"),
    ],
)
def test_bad_overrides_are_one_line_model_errors(data: DataOverrides, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        load_backbone("dino-s16", random_init=True, device="meta", data=data)
    assert info.value.hint and "\n" not in info.value.message


def test_img_size_hint_names_the_nearest_valid_sizes() -> None:
    with pytest.raises(ModelError) as info:
        load_backbone("dino-s16", random_init=True, device="meta", data=DataOverrides(img_size=100))
    assert info.value.hint == "use --img-size 96 or 112"


def test_cli_show_takes_the_overrides() -> None:
    result = runner.invoke(
        app,
        [
            "models",
            "show",
            "dino-s16",
            "--random-init",
            "--img-size",
            "448",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.5",
            "--crop-pct",
            "1",
            "--interpolation",
            "bilinear",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["image_size"] == [448, 448] and info["grid"] == [28, 28]
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]
    assert info["crop_pct"] == 1.0 and info["interpolation"] == "bilinear"
    assert info["data_overrides"]["img_size"] == 448


def test_cli_bad_mean_is_one_line() -> None:
    result = runner.invoke(app, ["models", "show", "dino-s16", "--random-init", "--mean", "0.5,x"])
    assert (
        result.exit_code == 1 and "--mean '0.5,x' is not a comma-separated list of numbers" in result.output
    )


def test_extract_records_the_overrides_in_the_manifest(tmp_path: Path) -> None:
    """`vitprobe extract --img-size/--mean/--std/--crop-pct/--interpolation`: the cache is made at that size
    and its manifest records the overrides (config) and the resolved values (transform)."""
    import numpy as np
    from PIL import Image

    for name in ("ant", "bee"):
        folder = tmp_path / "images" / "train" / name
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "cache"
    args = [
        "extract",
        "--model",
        "timm:test_vit",
        "--random-init",
        "--data",
        f"imagefolder:{tmp_path / 'images'}",
        "--split",
        "train",
        "--out",
        str(out),
        "--workers",
        "0",
        "--img-size",
        "96",
        "--mean",
        "0.5",
        "--std",
        "0.5,0.25,0.5",
        "--crop-pct",
        "1.0",
        "--interpolation",
        "bilinear",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["grid"] == [6, 6]
    transform = manifest["transform"]
    assert transform["input_size"] == [3, 96, 96] and transform["crop_pct"] == 1.0
    assert transform["mean"] == [0.5, 0.5, 0.5] and transform["std"] == [0.5, 0.25, 0.5]
    assert transform["interpolation"] == "bilinear"
    config = manifest["config"]
    assert config["img_size"] == 96 and config["mean"] == [0.5] and config["interpolation"] == "bilinear"
