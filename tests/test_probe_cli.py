"""`vitprobe probe` and `vitprobe knn` on small token caches written with the cache module's writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vitprobe.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    open_cache,
    shard_entries,
    write_final_norm,
    write_manifest,
    write_shard,
)
from vitprobe.cli import app
from vitprobe.knn import knn_evaluate

runner = CliRunner()
GRID, DIM, CLASSES = (2, 2), 8, ["ant", "bee", "cat"]


def write_cache(
    path: Path,
    *,
    n: int = 60,
    seed: int = 0,
    tokens: str = "all",
    layers: tuple[int, ...] = (11,),
    has_cls: bool = True,
    reg: int = 0,
    timm_name: str = "vit_toy",
    checkpoint: str = "random-init",
    class_names: list[str] = CLASSES,
    complete: bool = True,
    shard_size: int = 16,
    extract_seed: int = 0,
    depth: int | None = None,
    layer_noise: tuple[float, ...] | None = None,
) -> Path:
    """A cache of Gaussian class blobs: every token = class mean + noise, so all read-outs can learn;
    `layer_noise` scales the noise of each stored block (a multi-block cache)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(len(class_names), DIM, generator=torch.Generator().manual_seed(7)) * 3
    labels = torch.arange(n) % len(class_names)
    num_layers, num_patches = len(layers), GRID[0] * GRID[1]
    lead = (num_layers,) if num_layers > 1 else ()

    def noisy(*shape: int) -> torch.Tensor:
        base = means[labels].view(n, *([1] * (len(lead) + len(shape) - 1)), DIM)
        noise = torch.randn(n, *lead, *shape, generator=g)
        if layer_noise is not None:
            noise = noise * torch.tensor(layer_noise).view(1, -1, *([1] * len(shape)))  # per block
        return (base + noise).half()

    rows: dict[str, torch.Tensor] = {}
    if tokens == "all":
        rows["patches"] = noisy(num_patches, DIM)  # (n, [L,] P, D)
        if has_cls:
            rows["cls"] = noisy(DIM)
        if reg:
            rows["reg"] = noisy(reg, DIM)
    elif tokens == "pooled":
        if has_cls:
            rows["cls"] = noisy(DIM)
        rows["mean"] = noisy(DIM)
    else:
        rows["cls"] = noisy(DIM)
    rows["labels"] = labels.long()
    rows["indices"] = torch.arange(n).long() * 3
    written = n if complete else shard_size
    shards = [
        write_shard(path, i, s, {k: v[s : min(s + shard_size, written)] for k, v in rows.items()})
        for i, s in enumerate(range(0, written, shard_size))
    ]
    norm = torch.nn.LayerNorm(DIM, eps=1e-6)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {
            "spec": f"timm:{timm_name}",
            "timm_name": timm_name,
            "checkpoint": checkpoint,
            "random_init": checkpoint == "random-init",
            "source": checkpoint,
        },
        "layers": list(layers),
        "grid": list(GRID),
        "dim": DIM,
        "num_prefix_tokens": int(has_cls) + reg,
        "has_cls": has_cls,
        "num_reg_tokens": reg,
        "tokens": tokens,
        "store_dtype": "fp16",
        "views": 0,
        "seed": extract_seed,
        "dataset": {
            "spec": "imagefolder:toy",
            "split": "train",
            "fingerprint": f"{seed:064x}",  # the noise seed stands for the split: train 0, test 1
            "class_names": class_names,
            "num_classes": len(class_names),
        },
        "num_samples": n,
        "shard_size": shard_size,
        "shards": shard_entries(shards),
        "final_norm": write_final_norm(path, norm),
        "complete": complete,
    }
    if depth is not None:
        manifest["depth"] = depth
    write_manifest(path, manifest)
    return path


FAST = [
    "--epochs",
    "3",
    "--min-steps",
    "0",
    "--batch-size",
    "16",
    "--warmup-epochs",
    "1",
    "--lr-grid",
    "0.5,2",
    "--optimizer",
    "sgd",
    "--weight-decay",
    "0",
]


class Invoked:
    """A CliRunner result with its output's line wrapping undone (rich wraps long error lines)."""

    def __init__(self, args: list[str]) -> None:
        result = runner.invoke(app, args)
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.split())


def invoke(*args: str | Path) -> Invoked:
    return Invoked([str(a) for a in args])


def probe(train: Path, test: Path, out: Path, *args: str | Path) -> Invoked:
    """`vitprobe probe --train TRAIN --test TEST --out OUT ARGS...`."""
    return invoke("probe", "--train", train, "--test", test, "--out", out, *args)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    train = write_cache(root / "train", n=90, layers=(5, 11), reg=1)
    test = write_cache(root / "test", n=30, seed=1, layers=(5, 11), reg=1)
    out = root / "run"
    result = probe(
        train,
        test,
        out,
        *FAST,
        "--pool",
        "cls",
        "--pool",
        "mean",
        "--pool",
        "abmilp",
        "--pool",
        "attentive",
        "--pool",
        "cls+mean",
        "--layer",
        "5",
        "--final-norm",
        "--queries",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "abmilp" in result.output and "top-1" in result.output
    assert "holdout: 27 of 90 train rows (0.3: --holdout raised to hold --min-holdout images)" in " ".join(
        result.output.split()
    )
    return {"train": train, "test": test, "out": out, "root": root}


def test_probe_writes_results_and_heads(run: dict[str, Path]) -> None:
    results = json.loads((run["out"] / "results.json").read_text())
    assert results["format"] == "vitprobe-probe-results" and results["layer"] == 5 and results["final_norm"]
    assert set(results["readouts"]) == {"cls", "mean", "abmilp", "attentive", "cls+mean"}
    for name, r in results["readouts"].items():
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
        assert r["top1"] > 0.9, (name, r["top1"])  # separable blobs
        assert set(r["per_class"]) == set(CLASSES)
        assert r["blr"] in (0.5, 2.0) and r["lr"] == pytest.approx(r["blr"] * 16 / 256)
        assert 1 <= r["epoch"] <= 3
        assert set(r["curves"]) == {"0.5", "2"} and r["curves"]["0.5"]["epoch"] == [1, 2, 3]
        assert len(r["curves"]["2"]["holdout_top1"]) == len(r["curves"]["2"]["test_top1"]) == 3
        head = run["out"] / r["head"]
        meta = json.loads(head.with_suffix(".json").read_text())
        assert meta["backbone"]["timm_name"] == "vit_toy" and meta["backbone"]["checkpoint"] == "random-init"
        assert meta["layer"] == 5 and meta["final_norm"] is True and meta["pool"] == name
        assert meta["class_names"] == CLASSES and meta["dim"] == DIM and meta["grid"] == list(GRID)
        assert load_file(head)["linear.weight"].shape == (3, 2 * DIM if name == "cls+mean" else DIM)
    assert results["readouts"]["attentive"]["options"] == {"queries": 2}
    assert results["config"]["epochs"] == 3 and results["config"]["lr_grid"] == [0.5, 2.0]
    assert results["selection"]["split"] == "holdout" and not results["selection"]["optimistic"]
    # 10 % of 90 images is 9: --min-holdout (30) raises the fraction to its cap, 0.3 of each class's 30
    assert results["selection"]["holdout_rows"] == 27 and results["selection"]["train_rows"] == 63
    assert results["selection"]["holdout_fraction"] == 0.3 and results["config"]["min_holdout"] == 30
    assert results["random_init"] is True and any("randomly initialised" in w for w in results["warnings"])
    assert results["train_cache"]["provenance"]["timm_name"] == "vit_toy"
    assert results["test_cache"]["provenance"]["split"] == "train"


def test_predict_reproduces_test_accuracy_and_exports_maps(run: dict[str, Path]) -> None:
    maps_file, pred_dir = run["root"] / "maps.safetensors", run["root"] / "pred"
    head = run["out"] / "heads" / "abmilp.safetensors"
    result = invoke("predict", head, "--cache", run["test"], "--export-maps", maps_file, "--out", pred_dir)
    assert result.exit_code == 0, result.output
    predictions = json.loads((pred_dir / "predictions.json").read_text())
    results = json.loads((run["out"] / "results.json").read_text())
    assert predictions["top1"] == pytest.approx(results["readouts"]["abmilp"]["top1"])
    assert predictions["num_samples"] == 30 and len(predictions["predictions"]) == 30
    maps = load_file(maps_file)
    assert maps["maps"].shape == (30, *GRID)
    torch.testing.assert_close(maps["maps"].sum(dim=(1, 2)), torch.ones(30))  # softmax over the patches
    assert torch.equal(maps["indices"], open_cache(run["test"]).indices())


def test_predict_refuses_a_cache_from_another_checkpoint_or_layer(run: dict[str, Path]) -> None:
    head = run["out"] / "heads" / "cls.safetensors"
    other = write_cache(run["root"] / "other-ckpt", n=20, layers=(5, 11), reg=1, checkpoint="a" * 64)
    result = invoke("predict", head, "--cache", other)
    assert result.exit_code == 1 and "different checkpoints" in result.output
    wrong_layer = write_cache(run["root"] / "layer11", n=20, layers=(11,), reg=1)
    result = invoke("predict", head, "--cache", wrong_layer)
    assert result.exit_code == 1 and "block 5" in result.output
    pooled = write_cache(run["root"] / "pooled", n=20, layers=(5, 11), reg=1, tokens="pooled")
    result = invoke("predict", run["out"] / "heads" / "abmilp.safetensors", "--cache", pooled)
    assert result.exit_code == 1
    assert f"cache {pooled} (--tokens pooled) holds only" in result.output
    assert "evaluate the head on a cache extracted with --tokens all" in result.output
    reseeded = write_cache(run["root"] / "other-seed", n=20, layers=(5, 11), reg=1, extract_seed=3)
    result = invoke("predict", head, "--cache", reseeded)
    assert result.exit_code == 1 and "random-init seeds 0 vs 3" in result.output
    result = invoke("predict", head, "--cache", run["test"], "--export-maps", run["root"] / "m.st")
    assert result.exit_code == 1 and "attention read-out" in result.output


@pytest.mark.parametrize(
    "change,message",
    [
        ({"timm_name": "vit_other"}, "different backbones"),
        ({"checkpoint": "b" * 64}, "different checkpoints"),
        ({"extract_seed": 1}, "different random weights"),
        ({"class_names": ["ant", "bee", "dog"]}, "class sets differ"),
        ({"layers": (3,)}, "not the test cache"),
        ({"complete": False}, "incomplete"),
    ],
)
def test_probe_refuses_mismatched_or_incomplete_caches(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    train = write_cache(tmp_path / "train", n=30)
    test = write_cache(tmp_path / "test", n=30, seed=1, **change)
    result = probe(train, test, tmp_path / "run", *FAST)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not (tmp_path / "run" / "results.json").exists()


def test_pooled_cache_skips_abmilp_by_default_and_refuses_it_when_asked(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=45, tokens="pooled")
    test = write_cache(tmp_path / "test", n=15, seed=1, tokens="pooled")
    result = probe(train, test, tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["readouts"]) == {"cls", "mean"}
    assert any("skipped abmilp" in note for note in results["notes"])
    result = probe(train, test, tmp_path / "run2", *FAST, "--pool", "abmilp")
    assert result.exit_code == 1 and "--tokens all" in result.output
    assert f"train cache {train} (--tokens pooled) and test cache {test} (--tokens pooled)" in result.output
    full_test = write_cache(tmp_path / "test-all", n=15, seed=1)
    result = probe(train, full_test, tmp_path / "run3", *FAST, "--pool", "abmilp")
    assert result.exit_code == 1, result.output
    assert f"the abmilp read-out needs patch tokens, and train cache {train} (--tokens pooled) holds" in (
        result.output
    )


def test_model_without_cls_skips_cls_with_a_note(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=45, has_cls=False)
    test = write_cache(tmp_path / "test", n=15, seed=1, has_cls=False)
    result = probe(train, test, tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["readouts"]) == {"mean", "abmilp"}
    assert any("no [cls]" in note for note in results["notes"])
    assert "no [cls]" in result.output


def test_knn_command_writes_knn_json_matching_the_library(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=60, layers=(5, 11))
    test = write_cache(tmp_path / "test", n=21, seed=1, layers=(5, 11))
    result = invoke(
        "knn", "--train", train, "--test", test, "--k", "1,5,20", "--pool", "mean", "--out", tmp_path
    )
    assert result.exit_code == 0, result.output
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["layer"] == 11 and knn["pool"] == "mean" and set(knn["knn"]) == {"1", "5", "20"}
    tr, te = open_cache(train), open_cache(test)
    feats = [
        torch.cat([s["patches"][:, 1].float().mean(1) for s in c.iter_shards(["patches"])]) for c in (tr, te)
    ]
    expected = knn_evaluate(
        feats[0], tr.labels(), feats[1], te.labels(), num_classes=3, ks=(1, 5, 20), temperature=0.07
    )
    for k in (1, 5, 20):
        assert knn["knn"][str(k)]["top1"] == pytest.approx(expected[k]["top1"])
    assert knn["knn"]["20"]["top1"] > 0.9
    other = write_cache(tmp_path / "other", n=21, timm_name="vit_other")
    result = invoke("knn", "--train", train, "--test", other)
    assert result.exit_code == 1 and "different backbones" in result.output


def test_knn_command_records_and_warns_when_k_exceeds_the_train_rows(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=30)
    test = write_cache(tmp_path / "test", n=12, seed=1)
    result = invoke("knn", "--train", train, "--test", test, "--k", "5,500", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["knn"]["5"]["k_used"] == 5 and knn["knn"]["500"]["k_used"] == 30
    warning = "--k 500 is more than the 30 train rows: k = 30 was used"
    assert [w for w in knn["warnings"] if "--k" in w] == [warning + " (every train sample votes)"]
    assert f"warning: {warning}" in result.output and "500 (used 30)" in result.output


def test_end_to_end_from_vitprobe_extract(tmp_path: Path) -> None:
    """A tiny random-init timm ViT over a generated imagefolder, then probe, predict with maps, and k-NN."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        folder = tmp_path / "data" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            pixels = (torch.tensor(color) + 30 * torch.randn(32, 32, 3, generator=g)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    cache = tmp_path / "cache"
    result = invoke(
        "extract",
        "--model",
        "timm:test_vit",
        "--random-init",
        "--data",
        f"imagefolder:{tmp_path / 'data'}",
        "--split",
        "train",
        "--out",
        cache,
        "--workers",
        "0",
        "--batch-size",
        "6",
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    result = probe(cache, cache, out, *FAST, "--holdout", "0.34", "--final-norm")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["readouts"]) == {"cls", "mean", "abmilp"}
    assert results["train_cache"]["provenance"]["timm_name"] == "test_vit" and results["random_init"]
    maps = tmp_path / "maps.safetensors"
    result = invoke("predict", out / "heads" / "abmilp.safetensors", "--cache", cache, "--export-maps", maps)
    assert result.exit_code == 0, result.output
    grid = tuple(open_cache(cache).grid)
    assert load_file(maps)["maps"].shape == (12, *grid)
    result = invoke("knn", "--train", cache, "--test", cache, "--k", "1")
    assert result.exit_code == 0 and "100.00" in result.output  # each image is its own nearest neighbour


def test_negative_layer_counts_from_the_models_last_block_as_in_extract(tmp_path: Path) -> None:
    # `vitprobe extract --layers -1,-7` of a 12-block model stores blocks 11 and 5.
    train = write_cache(tmp_path / "train", n=30, layers=(11, 5), depth=12)
    test = write_cache(tmp_path / "test", n=15, seed=1, layers=(11, 5), depth=12)
    common = ("--train", train, "--test", test, *FAST, "--pool", "mean")
    for given, block in (("-7", 5), ("-1", 11), ("5", 5)):
        result = invoke("probe", *common, "--out", tmp_path / given, "--layer", given)
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / given / "results.json").read_text())["layer"] == block
    result = invoke("probe", *common, "--out", tmp_path / "bad", "--layer", "-2")
    assert result.exit_code == 1
    assert "layer -2 (block 10 of 12) is not in the cache" in result.output and "[11, 5]" in result.output


@pytest.mark.parametrize("command", ["probe", "knn"])
def test_a_shard_whose_bytes_changed_is_refused_before_training_on_it(tmp_path: Path, command: str) -> None:
    train = write_cache(tmp_path / "train", n=45)
    test = write_cache(tmp_path / "test", n=15, seed=1)
    shard = train / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # a flipped bit in the tensor data: the header still parses
    shard.write_bytes(bytes(data))
    extra = FAST if command == "probe" else ["--k", "3"]
    result = invoke(command, "--train", train, "--test", test, "--out", tmp_path / "run", *extra)
    assert result.exit_code == 1, result.output
    assert f"shard {shard} is corrupt: its sha256 differs from the manifest" in result.output
    assert "re-run the `vitprobe extract` command" in result.output
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "knn.json").exists()


def test_refit_with_select_on_test_is_refused_before_training(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=30)
    test = write_cache(tmp_path / "test", n=12, seed=1)
    out = tmp_path / "run"
    result = probe(train, test, out, *FAST, "--refit", "--select-on", "test")
    assert result.exit_code == 1, result.output
    assert "error: --refit with --select-on test" in result.output
    assert "chosen on a train holdout, and with --select-on test there is no holdout" in result.output
    assert "drop --refit" in result.output and not out.exists()


def test_a_holdout_that_rounds_to_no_image_is_refused_not_selected_on(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=12)  # 4 images per class: 10 % of 4 rounds to 0
    test = write_cache(tmp_path / "test", n=12, seed=1)
    result = probe(train, test, tmp_path / "run", *FAST, "--min-holdout", "0")
    assert result.exit_code == 1, result.output
    assert "--holdout 0.1 holds out no image: the train cache has 12 images in 3 classes" in result.output
    assert "--select-on test" in result.output and not (tmp_path / "run" / "results.json").exists()
    result = probe(train, test, tmp_path / "run", *FAST, "--holdout", "0.25", "--min-holdout", "0")
    assert result.exit_code == 0, result.output
    selection = json.loads((tmp_path / "run" / "results.json").read_text())["selection"]
    assert selection["holdout_rows"] == 3 and selection["holdout_fraction"] == 0.25
    # by default --min-holdout raises 0.1 to 0.3 (one image of each class's 4), so the run goes ahead
    result = probe(train, test, tmp_path / "run2", *FAST)
    assert result.exit_code == 0, result.output
    selection = json.loads((tmp_path / "run2" / "results.json").read_text())["selection"]
    assert selection["holdout_rows"] == 3 and selection["holdout_fraction"] == 0.3


@pytest.mark.parametrize("command", ["probe", "knn"])
def test_testing_on_the_training_images_is_flagged(tmp_path: Path, command: str) -> None:
    train = write_cache(tmp_path / "train", n=30)
    extra = FAST if command == "probe" else ["--k", "3"]
    result = invoke(command, "--train", train, "--test", train, "--out", tmp_path / "run", *extra)
    assert result.exit_code == 0, result.output
    name = "results.json" if command == "probe" else "knn.json"
    warnings = json.loads((tmp_path / "run" / name).read_text())["warnings"]
    assert any("the train and test caches hold the same images" in w for w in warnings), warnings
    assert "the test accuracy is a training accuracy" in result.output
    test = write_cache(tmp_path / "test", n=15, seed=1)
    result = invoke(command, "--train", train, "--test", test, "--out", tmp_path / "run2", *extra)
    assert result.exit_code == 0 and "same images" not in result.output


def test_ctrl_c_during_probe_says_nothing_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vitprobe.probe.gradient as train_mod

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    train = write_cache(tmp_path / "train", n=30)
    test = write_cache(tmp_path / "test", n=15, seed=1)
    monkeypatch.setattr(train_mod, "fit", interrupted)
    result = probe(train, test, tmp_path / "run", *FAST)
    assert result.exit_code == 130
    assert f"error: probe interrupted: nothing new was written to {tmp_path / 'run'}" in result.output
    assert not (tmp_path / "run").exists()


def test_wrong_paths_give_one_line_errors_with_the_fix(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=30)
    missing = tmp_path / "nope"
    cases = [
        (
            ["probe", "--train", train, "--test", missing, "--out", tmp_path / "run"],
            f"token cache {missing} does not exist — fix: run `vitprobe extract ... --out {missing}` first",
        ),
        (["knn", "--train", missing, "--test", train], f"token cache {missing} does not exist"),
        (
            ["probe", "--train", train, "--test", train / "manifest.json", "--out", tmp_path / "run"],
            f"{train / 'manifest.json'} is a file, not a token cache directory",
        ),
        (
            ["predict", tmp_path / "heads" / "cls.safetensors", "--cache", train],
            "not found — fix: pass RUN_DIR/heads/<pool>.safetensors",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and message in " ".join(result.output.split())
        assert "╭" not in result.output  # not a usage-error panel


def test_an_earlier_probe_run_is_never_replaced_by_accident(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=45)
    test = write_cache(tmp_path / "test", n=15, seed=1)
    out = tmp_path / "run"
    caches = ("--train", train, "--test", test, "--out", out, *FAST)
    first = invoke("probe", *caches, "--pool", "cls", "--pool", "mean")
    assert first.exit_code == 0, first.output
    before = (out / "results.json").read_bytes()

    again = invoke("probe", *caches, "--pool", "cls")
    assert again.exit_code == 1
    assert "already holds results.json" in again.output and "--overwrite" in again.output
    assert (out / "results.json").read_bytes() == before  # refused before training, nothing touched

    replaced = invoke("probe", *caches, "--pool", "cls", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["readouts"]) == {"cls"}
    # heads/ holds exactly this run's heads: the earlier run's mean head is gone, no staging dirs remain
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["cls.json", "cls.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["heads", "results.json"]


def test_min_holdout_help_states_the_librarys_values() -> None:
    """The CLI is torch-free, so its help spells the default and the cap: they must be the library's."""
    import typing

    from vitprobe.commands.probe import probe as probe_command
    from vitprobe.probe import ProbeConfig
    from vitprobe.probe.selection import MAX_AUTO_HOLDOUT, MIN_HOLDOUT_ROWS

    option = typing.get_type_hints(probe_command, include_extras=True)["min_holdout"].__metadata__[0]
    assert f"(up to {MAX_AUTO_HOLDOUT:g})" in option.help and f"[default: {MIN_HOLDOUT_ROWS}]" in option.help
    assert ProbeConfig().min_holdout == MIN_HOLDOUT_ROWS
