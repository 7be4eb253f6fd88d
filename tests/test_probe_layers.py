"""Per-layer sweeps (`probe --layer all` / a list) and multi-block read-outs (cls-cat, fusion) from caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.test_probe_cli import CLASSES, FAST, invoke, probe, write_cache

LAYERS = (3, 7, 11)
NOISE = (12.0, 4.0, 0.5)  # block 3 is mostly noise, block 11 nearly clean


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layers")
    common = {"layers": LAYERS, "layer_noise": NOISE, "depth": 12}
    return (
        write_cache(root / "train", n=90, **common),
        write_cache(root / "test", n=45, seed=1, **common),
    )


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_a_sweep_equals_one_run_per_block_and_says_accuracy_by_depth(
    caches: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = caches
    sweep = probe(
        train,
        test,
        tmp_path / "sweep",
        "--layer",
        "all",
        "--pool",
        "cls",
        "--pool",
        "mean",
        *FAST,
    )
    assert sweep.exit_code == 0, sweep.output
    results = _results(tmp_path / "sweep")
    assert results["layers"] == list(LAYERS) and results["layer"] is None
    names = [f"{pool}@{b}" for pool in ("cls", "mean") for b in LAYERS]
    assert list(results["readouts"]) == names
    assert results["per_layer"]["cls"]["layers"] == list(LAYERS)
    assert "test top-1 by block" in sweep.output and "cls@7" in sweep.output

    for block in LAYERS:  # the sweep trains the same heads as a run on that block alone
        single = tmp_path / f"single{block}"
        result = probe(
            train,
            test,
            single,
            "--layer",
            str(block),
            "--pool",
            "cls",
            "--pool",
            "mean",
            *FAST,
        )
        assert result.exit_code == 0, result.output
        one = _results(single)
        assert one["layer"] == block and one["layers"] == [block] and one["per_layer"] is None
        for pool in ("cls", "mean"):
            swept = results["readouts"][f"{pool}@{block}"]
            assert swept["layer"] == block
            assert swept["top1"] == one["readouts"][pool]["top1"]
            assert (swept["blr"], swept["epoch"]) == (
                one["readouts"][pool]["blr"],
                one["readouts"][pool]["epoch"],
            )
            a = load_file(tmp_path / "sweep" / swept["head"])
            b = load_file(single / one["readouts"][pool]["head"])
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the noise the cache was written with: accuracy rises with depth
    top1 = results["per_layer"]["cls"]["top1"]
    assert top1[0] < top1[2] and top1[2] > 0.9, top1


def test_a_sweep_of_listed_blocks_counts_negatives_from_the_last_block(
    caches: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = caches
    result = probe(
        train,
        test,
        tmp_path / "run",
        "--layer",
        "-1,7",
        "--pool",
        "abmilp",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    results = _results(tmp_path / "run")
    assert results["layers"] == [7, 11] and list(results["readouts"]) == ["abmilp@7", "abmilp@11"]
    head = json.loads((tmp_path / "run" / "heads" / "abmilp@11.json").read_text())
    assert head["layer"] == 11 and head["blocks"] is None

    bad = probe(train, test, tmp_path / "bad", "--layer", "5", *FAST)
    assert (
        bad.exit_code != 0
        and "layer 5 is not in the cache" in bad.output
        and "(it holds blocks [3, 7, 11])" in bad.output
    )
    twice = probe(train, test, tmp_path / "b2", "--layer", "11,-1", *FAST)
    assert twice.exit_code != 0 and "names a block twice" in twice.output


def test_multi_block_read_outs_train_from_the_cache_and_predict_reads_their_blocks(
    caches: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = caches
    out = tmp_path / "multi"
    result = probe(
        train,
        test,
        out,
        "--pool",
        "cls",
        "--pool",
        "cls-cat",
        "--pool",
        "fusion",
        "--n-last-blocks",
        "2",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    results = _results(out)
    assert results["layer"] == 11  # cls reads the deepest block; the multi-block read-outs read them all
    assert results["readouts"]["cls"]["layer"] == 11
    assert results["readouts"]["cls-cat"]["blocks"] == list(LAYERS)
    assert results["readouts"]["cls-cat"]["options"] == {"n_last_blocks": 2}
    fusion = load_file(out / results["readouts"]["fusion"]["head"])
    assert fusion["readout.weights"].shape == (3,)  # one weight per stored block
    # the fused weights learn to favour the clean block
    assert int(fusion["readout.weights"].argmax()) == 2, fusion["readout.weights"]
    cat = load_file(out / results["readouts"]["cls-cat"]["head"])
    assert cat["linear.weight"].shape == (len(CLASSES), 2 * 8)  # [cls] of blocks 7 and 11

    for name in ("cls-cat", "fusion"):
        predicted = invoke(
            "predict",
            out / results["readouts"][name]["head"],
            "--cache",
            test,
            "--out",
            tmp_path / name,
        )
        assert predicted.exit_code == 0, predicted.output
        preds = json.loads((tmp_path / name / "predictions.json").read_text())
        assert preds["blocks"] == list(LAYERS)
        assert preds["top1"] == pytest.approx(results["readouts"][name]["top1"], abs=1e-6)


def test_multi_block_read_outs_on_a_one_block_cache_are_refused_before_training(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=30)
    test = write_cache(tmp_path / "test", n=15, seed=1)
    result = probe(train, test, tmp_path / "run", "--pool", "fusion", *FAST)
    assert result.exit_code != 0
    assert "the fusion read-out needs 2 or more stored blocks" in result.output
    assert "--layers -2,-1" in result.output and not (tmp_path / "run").exists()


def test_logreg_fits_the_concatenated_cls_of_the_last_blocks(
    caches: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = caches
    out = tmp_path / "lr"
    result = probe(
        train,
        test,
        out,
        "--protocol",
        "logreg",
        "--pool",
        "cls-cat",
        "--n-last-blocks",
        "3",
        "--layer",
        "all",
        "--pool",
        "cls",
    )
    assert result.exit_code == 0, result.output
    results = _results(out)
    assert set(results["readouts"]) == {"cls@3", "cls@7", "cls@11", "cls-cat"}
    head = load_file(out / results["readouts"]["cls-cat"]["head"])
    assert head["norm.running_mean"].shape == (3 * 8,)
    # BatchNorm statistics = the standardisation of the [cls] of blocks 3, 7, 11 concatenated in that order:
    # per-block variance = the noise the cache was written with (σ² = 144, 16, 0.25) + the class means' spread
    var = head["norm.running_var"].view(3, 8).mean(dim=1)  # (3 blocks)
    means = torch.randn(len(CLASSES), 8, generator=torch.Generator().manual_seed(7)) * 3  # write_cache's
    spread = float(means[torch.arange(90) % 3].var(dim=0).mean())
    for got, sigma in zip(var.tolist(), NOISE, strict=True):
        assert got == pytest.approx(sigma**2 + spread, rel=0.35), (var, spread)


def test_extract_every_block_then_sweep_them_on_real_digits(tmp_path: Path) -> None:
    """scikit-learn's digits as images → `extract --layers all` of a tiny ViT → `probe --layer all`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from typer.testing import CliRunner

    from vitprobe.cache import open_cache
    from vitprobe.cli import app

    digits = load_digits()
    for split, (start, count) in {"train": (0, 12), "test": (600, 6)}.items():
        for c in range(3):
            folder = tmp_path / "digits" / split / str(c)
            folder.mkdir(parents=True)
            rows = np.flatnonzero(digits.target[start:] == c)[:count] + start
            for i in rows:
                pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(folder / f"{i}.png")
    runner = CliRunner()
    for split in ("train", "test"):
        result = runner.invoke(
            app,
            [
                "extract",
                "--model",
                "timm:test_vit",
                "--random-init",
                "--data",
                f"imagefolder:{tmp_path / 'digits'}",
                "--split",
                split,
                "--layers",
                "all",
                "--workers",
                "0",
                "--out",
                str(tmp_path / split),
            ],
        )
        assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "train")
    depth = cache.manifest["depth"]
    assert list(cache.layers) == list(range(depth)) and cache.manifest["config"]["layers"] == "all"
    result = runner.invoke(
        app,
        [
            "probe",
            "--train",
            str(tmp_path / "train"),
            "--test",
            str(tmp_path / "test"),
            "--out",
            str(tmp_path / "run"),
            "--layer",
            "all",
            "--pool",
            "cls",
            "--pool",
            "fusion",
            "--holdout",
            "0.25",
            *map(str, FAST),
        ],
    )
    assert result.exit_code == 0, result.output
    results = _results(tmp_path / "run")
    assert results["per_layer"]["cls"]["layers"] == list(range(depth))
    assert len(results["per_layer"]["cls"]["top1"]) == depth
    assert results["readouts"]["fusion"]["blocks"] == list(range(depth))
    assert all(0.0 <= t <= 1.0 for t in results["per_layer"]["cls"]["top1"])
