"""Extraction on CPU with tiny timm ViTs and generated images: cached tokens equal timm's own
`forward_intermediates(..., norm=False)`, resume equals a clean run, refusals, views, the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models import register_model
from typer.testing import CliRunner

import vitprobe.extract as extract_mod
import vitprobe.rows as rows_mod
import vitprobe.shardfill as shardfill_mod
from vitprobe.cache import LOCK_FILE, MANIFEST_FILE, open_cache
from vitprobe.cli import app
from vitprobe.data import open_dataset, stratified_subset
from vitprobe.errors import CacheError, VitprobeError
from vitprobe.extract import ExtractConfig, build_backbone, extract, view_seed, view_transform
from vitprobe.files import sha256_file


@register_model
def vitprobe_test_beit(pretrained: bool = False, **kwargs):  # noqa: ANN201 - timm's registry signature
    """A 3-block BEiT (relative position bias, layer scale, no abs pos emb) at 32 px, patch 8: grid 4 x 4."""
    from timm.models.beit import _create_beit

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    kwargs.setdefault("pretrained_cfg_overlay", dict(input_size=(3, 32, 32)))
    return _create_beit("beitv2_base_patch16_224", pretrained=pretrained, **dict(args, **kwargs))


NUM_IMAGES = 9


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """imagefolder with a train split: 3 classes x 3 images of different sizes (one grayscale)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ant", "bee", "cow"]):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (48 + 16 * i, 64 - 8 * c, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            (image.convert("L") if (c, i) == (1, 1) else image).save(folder / f"{i}.png")
    return f"imagefolder:{root}"


def _config(spec: str, out: Path, **overrides) -> ExtractConfig:
    base = ExtractConfig(model="timm:test_vit", data=spec, split="train", out=out, random_init=True,
                         workers=0, batch_size=4, shard_size=4, store="fp32")
    return replace(base, **overrides)


def _reference(config: ExtractConfig, layer: int, *, views: list[tuple[int, int]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own tokens of `layer` for the dataset's images: (patches (N, P, D), prefix (N, R, D)).

    With `views`, image i is transformed by the crop + flip seeded from (seed, i, v) for each (i, v).
    """
    backbone = build_backbone(config)
    dataset = open_dataset(config.data, config.split)
    if views is None:
        transform = backbone.transform()
        x = torch.stack([transform(dataset.load_image(i)) for i in range(len(dataset))])  # (N, 3, H, W)
    else:
        transform, xs = view_transform(backbone), []
        for i, v in views:
            random.seed(view_seed(config.seed, i, v))
            torch.manual_seed(view_seed(config.seed, i, v))
            xs.append(transform(dataset.load_image(i)))
        x = torch.stack(xs)  # (N * K, 3, H, W)
    idx = layer + backbone.depth if layer < 0 else layer
    with torch.no_grad():
        [(patches, prefix)] = backbone.model.forward_intermediates(
            x, indices=[idx], norm=False, output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=True,
        )
    return patches, prefix


@pytest.mark.parametrize(
    ("model", "layers", "store"),
    [
        ("timm:test_vit", (-1,), "fp16"),
        ("timm:test_vit", (-1, 2), "fp32"),  # several layers, kept in the requested order
        ("timm:test_vit2", (-1,), "fp32"),  # no [cls]; one register token
        ("timm:vitprobe_test_beit", (-1, 0), "fp16"),  # BEiT: relative position bias, no final norm
    ],
)
def test_cached_tokens_equal_timm_forward_intermediates(
    data_spec: str, tmp_path: Path, model: str, layers: tuple[int, ...], store: str
) -> None:
    config = _config(data_spec, tmp_path / "cache", model=model, layers=layers, store=store)
    result = extract(config)
    cache = open_cache(config.out, verify=True)
    assert result.num_samples == cache.num_samples == NUM_IMAGES and not result.skipped
    backbone = build_backbone(config)
    assert cache.layers == backbone.layer_indices(layers)
    assert (cache.has_cls, cache.num_prefix_tokens, cache.grid) == (
        backbone.has_cls, backbone.num_prefix_tokens, backbone.grid)
    tensors = {key: torch.cat([s[key] for s in cache.iter_shards([key])]) for key in cache.keys}
    tol = dict(rtol=2e-3, atol=2e-3) if store == "fp16" else dict(rtol=1e-5, atol=1e-5)
    for li, layer in enumerate(layers):
        patches, prefix = _reference(config, layer)

        def pick(t: torch.Tensor, li: int = li) -> torch.Tensor:
            return t[:, li] if len(layers) > 1 else t  # (N, L, ...) -> (N, ...)

        assert tensors["patches"].dtype == {"fp16": torch.float16, "fp32": torch.float32}[store]
        torch.testing.assert_close(pick(tensors["patches"]).float(), patches, **tol)
        if backbone.has_cls:
            torch.testing.assert_close(pick(tensors["cls"]).float(), prefix[:, 0], **tol)
        if prefix.shape[1] > int(backbone.has_cls):
            torch.testing.assert_close(pick(tensors["reg"]).float(), prefix[:, int(backbone.has_cls):], **tol)
        else:
            assert "reg" not in tensors
    dataset = open_dataset(data_spec, "train")
    assert cache.labels().tolist() == list(dataset.labels)
    assert cache.indices().tolist() == list(range(NUM_IMAGES))
    norm = backbone.final_norm
    state = cache.final_norm_state()
    if isinstance(norm, torch.nn.LayerNorm):
        torch.testing.assert_close(state["weight"], norm.weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(state["bias"], norm.bias.detach(), rtol=0, atol=0)
        assert cache.manifest["final_norm"]["eps"] == norm.eps
    else:
        assert state == {} and cache.manifest["final_norm"]["type"] == "Identity"


def test_test_vit2_has_registers_and_no_cls(data_spec: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "c"
    extract(_config(data_spec, cache_dir, model="timm:test_vit2", limit=2))
    cache = open_cache(cache_dir)
    assert not cache.has_cls and cache.num_reg_tokens == 1 and "cls" not in cache.keys
    assert cache.read_shard(0)["reg"].shape == (2, 1, 64)
    with pytest.raises(CacheError, match="has none"):
        extract(_config(data_spec, tmp_path / "d", model="timm:test_vit2", tokens="cls"))


def test_manifest_records_how_the_cache_was_made(data_spec: str, tmp_path: Path) -> None:
    config = _config(data_spec, tmp_path / "cache", layers=(-1, -4), store="fp16")
    extract(config)
    m = json.loads((tmp_path / "cache" / MANIFEST_FILE).read_text())
    assert (m["format"], m["version"], m["kind"]) == ("vitprobe-token-cache", 2, "cache") and m["complete"]
    assert "format_version" not in m  # version 1's spelling
    assert set(m["versions"]) >= {"vitprobe", "torch", "timm"}
    assert m["model"] == {"spec": "timm:test_vit", "timm_name": "test_vit", "checkpoint": "random-init",
                          "random_init": True, "source": "random-init"}
    assert m["layers"] == [5, 2] and m["grid"] == [10, 10] and m["dim"] == 64
    assert (m["num_prefix_tokens"], m["has_cls"], m["num_reg_tokens"]) == (1, True, 0)
    assert (m["tokens"], m["store_dtype"], m["views"], m["seed"]) == ("all", "fp16", 0, 0)
    assert m["transform"]["input_size"] == [3, 160, 160] and m["transform"]["crop_pct"] == 0.95
    assert m["transform"]["interpolation"] == "bicubic" and m["transform"]["mean"] == [0.5, 0.5, 0.5]
    dataset = open_dataset(data_spec, "train")
    assert m["dataset"]["spec"] == data_spec and m["dataset"]["split"] == "train"
    assert m["dataset"]["fingerprint"] == dataset.fingerprint
    assert m["dataset"]["class_names"] == ["ant", "bee", "cow"] and m["dataset"]["num_classes"] == 3
    assert m["num_samples"] == 9 and m["shard_size"] == 4
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 4), (4, 8), (8, 9)]
    for s in m["shards"]:
        assert s["sha256"] == sha256_file(tmp_path / "cache" / s["file"])
    assert m["final_norm"] == {"file": "final_norm.safetensors", "type": "LayerNorm", "eps": 1e-6}
    assert m["config"] == {**asdict(config), "out": str(config.out), "layers": [-1, -4]}
    assert m["keys"]["patches"] == {"shape": ["n", 2, 100, 64], "dtype": "float16"}
    assert m["bytes_per_sample"] == 2 * 101 * 64 * 2 + 16


def test_tokens_cls_and_pooled_caches(data_spec: str, tmp_path: Path) -> None:
    extract(_config(data_spec, tmp_path / "all"))
    extract(_config(data_spec, tmp_path / "cls", tokens="cls"))
    extract(_config(data_spec, tmp_path / "pooled", tokens="pooled"))
    full, cls, pooled = (open_cache(tmp_path / n) for n in ("all", "cls", "pooled"))
    assert cls.keys == ["cls", "labels", "indices"]
    assert pooled.keys == ["cls", "mean", "labels", "indices"]
    for a, c, p in zip(full.iter_shards(), cls.iter_shards(), pooled.iter_shards(), strict=True):
        torch.testing.assert_close(c["cls"], a["cls"], rtol=0, atol=0)
        torch.testing.assert_close(p["cls"], a["cls"], rtol=0, atol=0)
        torch.testing.assert_close(p["mean"], a["patches"].mean(dim=1), rtol=1e-5, atol=1e-6)  # (n, D)
    with pytest.raises(CacheError, match="no tensor 'patches'"):
        pooled.read_shard(0, ["patches"])
    sizes = {
        n: sum(f.stat().st_size for f in (tmp_path / n).glob("shard-*")) for n in ("all", "cls", "pooled")
    }
    assert sizes["cls"] < sizes["pooled"] < sizes["all"] / 20


def test_resume_after_a_crash_equals_a_clean_run(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = _config(data_spec, tmp_path / "clean", shard_size=2, store="fp16")
    extract(clean)
    crashed = replace(clean, out=tmp_path / "crashed")
    real_write, written = extract_mod.write_shard, []

    def crash_after_two(*args, **kwargs):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "write_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(crashed)
    monkeypatch.undo()
    assert not (crashed.out / LOCK_FILE).exists()
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(crashed.out)
    partial = open_cache(crashed.out, require_complete=False)
    assert [(s.start, s.stop) for s in partial.shards] == [(0, 2), (2, 4)] and partial.num_written == 4
    assert sorted(p.name for p in crashed.out.glob("shard-*")) == ["shard-00000.safetensors",
                                                                   "shard-00001.safetensors"]
    leftover = crashed.out / ".shard-00002.safetensors.abc123.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"partial")
    # as a vitprobe of cache format version 1 left it: `format_version` 1, no `version` / `kind`
    m = json.loads((crashed.out / MANIFEST_FILE).read_text())
    body = {k: v for k, v in m.items() if k not in ("format", "version", "kind")}
    v1 = {"format": m["format"], "format_version": 1, **body}
    (crashed.out / MANIFEST_FILE).write_text(json.dumps(v1))
    assert open_cache(crashed.out, require_complete=False).num_written == 4
    result = extract(crashed)
    assert result.new_samples == NUM_IMAGES - 4 and result.num_shards == 5 and not leftover.exists()
    resumed = json.loads((crashed.out / MANIFEST_FILE).read_text())
    assert (resumed["version"], resumed["kind"]) == (2, "cache") and "format_version" not in resumed
    a, b = open_cache(clean.out, verify=True), open_cache(crashed.out, verify=True)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for x, y in zip(a.iter_shards(), b.iter_shards(), strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_refuses_a_different_cache_in_out_and_keeps_a_finished_one(data_spec: str, tmp_path: Path) -> None:
    config = _config(data_spec, tmp_path / "c", limit=4)
    extract(config)
    shard = tmp_path / "c" / "shard-00000.safetensors"
    mtime = shard.stat().st_mtime_ns
    again = extract(config)
    assert again.skipped and again.new_samples == 0 and shard.stat().st_mtime_ns == mtime
    for change, field in [({"layers": (-2,)}, "layers"), ({"model": "timm:test_vit2"}, "model.spec"),
                          ({"tokens": "pooled"}, "tokens"), ({"limit": 5}, "num_samples"),
                          ({"seed": 1}, "seed")]:
        with pytest.raises(CacheError, match=field) as info:
            extract(replace(config, **change))
        assert "--overwrite" in info.value.hint
    redone = extract(replace(config, layers=(-2,), overwrite=True))
    assert not redone.skipped and open_cache(config.out).layers == [4]
    (tmp_path / "c" / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(CacheError, match="being written by pid 1 on elsewhere"):
        extract(replace(config, overwrite=True))


def test_no_resume_restarts_an_incomplete_cache(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(data_spec, tmp_path / "c", limit=4, shard_size=2)

    def crash(*args, **kwargs):
        raise RuntimeError("crash")

    monkeypatch.setattr(extract_mod, "write_shard", crash)
    with pytest.raises(RuntimeError):
        extract(config)
    monkeypatch.undo()
    assert open_cache(config.out, require_complete=False).num_written == 0
    with pytest.raises(CacheError, match="different extraction"):  # --no-resume never wipes another cache
        extract(replace(config, resume=False, seed=1))
    assert extract(replace(config, resume=False)).new_samples == 4


def test_views_are_deterministic_per_seed_index_and_view(data_spec: str, tmp_path: Path) -> None:
    config = _config(data_spec, tmp_path / "a", views=2, limit=3, shard_size=4)
    extract(config)
    extract(replace(config, out=tmp_path / "b", workers=2, batch_size=3))
    a, b = open_cache(tmp_path / "a"), open_cache(tmp_path / "b")
    rows = stratified_subset(open_dataset(data_spec, "train").labels, 3, seed=0)  # --limit 3: one per class
    assert a.num_samples == 6 and a.indices().tolist() == [i for i in rows for _ in range(2)]
    assert a.view_ids().tolist() == [0, 1, 0, 1, 0, 1]
    assert a.manifest["transform"]["train_augment"]["kind"] == "random-resized-crop+hflip"
    ta = torch.cat([s["patches"] for s in a.iter_shards(["patches"])])  # (6, P, D)
    tb = torch.cat([s["patches"] for s in b.iter_shards(["patches"])])
    torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-5)  # workers and batch size do not matter
    patches, _ = _reference(config, -1, views=[(i, v) for i in rows for v in range(2)])
    torch.testing.assert_close(ta, patches, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ta[0], ta[1], atol=1e-2)  # two views of one image differ
    other_seed = extract(replace(config, out=tmp_path / "s", seed=1))
    assert other_seed.num_samples == 6
    ts = torch.cat([s["patches"] for s in open_cache(tmp_path / "s").iter_shards(["patches"])])
    assert not torch.allclose(ts, ta, atol=1e-2)


def test_default_shard_size_and_disk_check(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(data_spec, tmp_path / "c", shard_size=None, limit=2)
    extract(config)
    m = open_cache(config.out).manifest
    assert m["shard_size"] == 1_000_000_000 // m["bytes_per_sample"]

    class Tiny:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Tiny)
    small = replace(config, out=tmp_path / "d")
    with pytest.raises(CacheError, match="only 1.0 kB is free") as info:
        extract(small)
    assert "--force" in info.value.hint
    assert extract(replace(small, force=True)).num_samples == 2


def test_cli_extract(data_spec: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["extract", "--model", "timm:test_vit", "--random-init", "--data", data_spec, "--split", "train",
            "--out", str(out), "--layers", "-1,-2", "--workers", "0", "--limit", "3", "--store", "bf16",
            "--batch-size", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert "images/s" in text and "estimated cache size" in text
    cache = open_cache(out)
    assert cache.layers == [5, 4] and cache.store_dtype == "bf16" and cache.num_samples == 3
    assert cache.read_shard(0)["patches"].dtype == torch.bfloat16
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already a complete cache" in " ".join(again.output.split())
    refused = runner.invoke(app, [*args[:-6], "--layers", "-3", "--workers", "0"])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "error:" in text and "different extraction" in text


def test_a_complete_cache_with_a_lost_or_broken_shard_is_repaired_not_reported_complete(
    data_spec: str, tmp_path: Path
) -> None:
    clean = _config(data_spec, tmp_path / "clean", shard_size=2, store="fp16")
    extract(clean)
    broken = replace(clean, out=tmp_path / "broken")
    extract(broken)
    (broken.out / "shard-00003.safetensors").unlink()  # what `open_cache` tells the user to do
    shard1 = broken.out / "shard-00001.safetensors"
    shard1.write_bytes(b"not a safetensors file")  # an unreadable header
    with pytest.raises(CacheError, match="shard-00001"):
        open_cache(broken.out)
    repaired = extract(broken)  # the same command: resumes from the first bad shard
    assert not repaired.skipped and repaired.new_samples == NUM_IMAGES - 2
    a, b = open_cache(clean.out, verify=True), open_cache(broken.out, verify=True)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_a_shard_with_corrupt_bytes_but_an_intact_header_is_repaired_only_once_deleted(
    data_spec: str, tmp_path: Path
) -> None:
    """What docs/cache-format.md says: extract checks headers, not bytes; deleting the shard repairs it."""
    config = _config(data_spec, tmp_path / "c", shard_size=2, store="fp16")
    extract(config)
    clean = [s.sha256 for s in open_cache(config.out, verify=True).shards]
    shard = config.out / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # tensor bytes, not the header
    shard.write_bytes(bytes(data))
    assert extract(config).skipped  # "already a complete cache": the corrupt shard stays
    with pytest.raises(CacheError, match="sha256 differs"):
        open_cache(config.out, verify=True)
    shard.unlink()
    repaired = extract(config)
    assert not repaired.skipped and repaired.new_samples == NUM_IMAGES - 4  # shard 2 and every later one
    assert [s.sha256 for s in open_cache(config.out, verify=True).shards] == clean


def test_cli_ctrl_c_says_where_the_extraction_stopped_and_how_to_resume(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, written = extract_mod.write_shard, []

    def interrupt_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "write_shard", interrupt_after_two)
    _assert_interrupted_then_resumed(data_spec, tmp_path / "cli", monkeypatch)


def _assert_interrupted_then_resumed(
    data_spec: str, out: Path, monkeypatch: pytest.MonkeyPatch, *, check: Callable[[str], None] | None = None
) -> None:
    """Run the CLI (with the interruption `monkeypatch` set up): one-line error, exit 130, lock gone; then
    undo the patch, re-run, and check the resumed cache is complete and verifies."""
    args = ["extract", "--model", "timm:test_vit", "--random-init", "--data", data_spec, "--split", "train",
            "--out", str(out), "--workers", "0", "--shard-size", "2", "--batch-size", "2"]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 130, text
    assert f"error: extraction into {out} interrupted (2 of 5 shards written)" in text
    assert "re-run the same command to resume" in text
    assert not (out / LOCK_FILE).exists()
    if check is not None:
        check(text)
    monkeypatch.undo()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "resuming" in again.output
    assert open_cache(out, verify=True).num_written == NUM_IMAGES


def _dying_workers(monkeypatch: pytest.MonkeyPatch, *, sigint: bool, message: str, at_row: int = 4) -> None:
    """Row `at_row` plays the race of Ctrl-C with DataLoader workers > 0, without real signals: SIGINT reaches
    the handler in place (its KeyboardInterrupt lost, as when raised inside the loader's cleanup), then the
    loader reports its dead workers as a RuntimeError."""
    real_getitem = rows_mod.CacheRows.__getitem__

    def getitem(self, row: int):
        if row == at_row:
            if sigint:
                with pytest.raises(KeyboardInterrupt):
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            raise RuntimeError(message)
        return real_getitem(self, row)

    monkeypatch.setattr(rows_mod.CacheRows, "__getitem__", getitem)


WORKERS_EXITED = "DataLoader worker (pid(s) 4242) exited unexpectedly"


def test_cli_ctrl_c_that_kills_the_dataloader_workers_first_is_still_an_interruption(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = signal.getsignal(signal.SIGINT)
    _dying_workers(monkeypatch, sigint=True, message=WORKERS_EXITED)

    def no_traceback_and_handler_restored(text: str) -> None:
        assert "RuntimeError" not in text
        assert signal.getsignal(signal.SIGINT) is before  # the extraction's handler is gone again

    _assert_interrupted_then_resumed(
        data_spec, tmp_path / "cli", monkeypatch, check=no_traceback_and_handler_restored
    )


@pytest.mark.parametrize(
    ("sigint", "message"),
    [(False, WORKERS_EXITED), (True, "CUDA error: an illegal memory access was encountered")],
    ids=["worker-crash-without-sigint", "other-error-after-sigint"],
)
def test_a_worker_crash_without_ctrl_c_is_an_error_not_an_interruption(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigint: bool, message: str
) -> None:
    before = signal.getsignal(signal.SIGINT)
    _dying_workers(monkeypatch, sigint=sigint, message=message)
    config = _config(data_spec, tmp_path / "c", shard_size=2, batch_size=2)
    with pytest.raises(RuntimeError) as info:
        extract(config)
    assert str(info.value) == message
    assert signal.getsignal(signal.SIGINT) is before
    assert not (config.out / LOCK_FILE).exists()
    monkeypatch.undo()
    assert extract(config).new_samples == NUM_IMAGES - 4  # resumes after the two shards written


def test_a_real_ctrl_c_to_the_process_group_with_workers_is_one_line_and_exit_130(
    data_spec: str, tmp_path: Path
) -> None:
    """SIGINT to the whole process group (what Ctrl-C and `timeout -s INT` do) once shards are written."""
    out, log = tmp_path / "cache", tmp_path / "log.txt"
    args = [sys.executable, "-m", "vitprobe", "extract", "--model", "timm:test_vit", "--random-init",
            "--data", data_spec, "--split", "train", "--out", str(out), "--workers", "2", "--views", "200",
            "--shard-size", "4", "--batch-size", "2"]  # 1,800 rows: far from done when the signal comes
    with log.open("w") as sink:
        proc = subprocess.Popen(  # SIGINT restored: a shell's background job would pass it on as ignored
            args, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 120
            while not (out / "shard-00001.safetensors").exists() and proc.poll() is None:  # shard 0 recorded
                assert time.monotonic() < deadline, "no shard written in 120 s"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = " ".join(log.read_text().split())
    assert rc == 130, text
    assert f"error: extraction into {out} interrupted" in text and "Traceback" not in text
    assert open_cache(out, require_complete=False, verify=True).num_written > 0


def test_tokens_that_overflow_the_store_dtype_are_refused_not_written_as_inf(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_split = shardfill_mod.split_tokens

    def huge(outs, **kwargs):  # residual streams with outliers beyond fp16's range (65504)
        return real_split([o * 1e5 for o in outs], **kwargs)

    monkeypatch.setattr(shardfill_mod, "split_tokens", huge)
    config = _config(data_spec, tmp_path / "c", store="fp16", limit=4)
    overflow = "finite in its fp32 forward pass but not once stored as fp16"
    with pytest.raises(CacheError, match=overflow) as info:
        extract(config)
    assert "--store bf16" in info.value.hint
    assert not list(config.out.glob("shard-*")) and not (config.out / LOCK_FILE).exists()
    assert extract(replace(config, store="fp32", overwrite=True)).num_samples == 4  # fp32 holds them


@pytest.mark.parametrize("store", ["fp8", "int8"])
def test_fp8_and_int8_stores_are_the_fp32_tokens_quantised_per_token(
    data_spec: str, tmp_path: Path, store: str
) -> None:
    from vitprobe.quant import dequantise, quantise

    exact = _config(data_spec, tmp_path / "fp32", store="fp32", limit=5)
    extract(exact)
    small = replace(exact, out=tmp_path / store, store=store)
    extract(small)
    a, q = open_cache(exact.out), open_cache(small.out, verify=True)
    assert q.store_dtype == store and q.manifest["keys"]["patches"]["scale"] == "patches_scale"
    assert q.manifest["keys"]["patches_scale"] == {"shape": ["n", 100], "dtype": "float32"}
    for x, y in zip(a.iter_shards(["patches", "cls"]), q.iter_shards(["patches", "cls"]), strict=True):
        for key in ("patches", "cls"):
            torch.testing.assert_close(y[key], dequantise(*quantise(x[key], store)), rtol=0, atol=0)
    size = {d: sum(f.stat().st_size for f in d.glob("shard-*")) for d in (exact.out, small.out)}
    assert size[small.out] < 0.3 * size[exact.out]  # 1 byte + 4/64 per value, against 4


def test_decode_on_the_device_is_close_to_pil_and_recorded_in_the_manifest(tmp_path: Path) -> None:
    """--decode gpu on a CPU device runs the same code path: torchvision decodes the JPEGs in a batch, the
    resize / crop / normalisation are tensor ops; tokens stay close to PIL's."""
    rng = np.random.default_rng(3)
    for i in range(4):
        (tmp_path / "jpg" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((120 + 8 * i, 90), Image.BILINEAR).save(
            tmp_path / "jpg" / f"c{i % 2}" / f"{i}.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(tmp_path / "jpg" / "c0" / "p.png")
    spec = f"imagefolder:{tmp_path / 'jpg'}"
    cpu = _config(spec, tmp_path / "cpu", split="all", workers=0)
    gpu = replace(cpu, out=tmp_path / "gpu", decode="gpu", workers=2)
    extract(cpu)
    extract(gpu)
    a, b = open_cache(cpu.out), open_cache(gpu.out)
    assert b.manifest["transform"]["decode"] == "gpu" and "decode" not in a.manifest["transform"]
    x = torch.cat([s["patches"] for s in a.iter_shards(["patches"])])  # (5, P, D)
    y = torch.cat([s["patches"] for s in b.iter_shards(["patches"])])
    rel = (x - y).norm(dim=-1) / x.norm(dim=-1)  # (5, P)
    assert float(rel.mean()) < 0.05, float(rel.mean())
    with pytest.raises(CacheError, match="different extraction .*transform"):
        extract(replace(gpu, out=cpu.out))
    with pytest.raises(VitprobeError, match="--decode gpu with --views"):
        extract(replace(gpu, views=2))


def test_device_transform_matches_timm_eval_transform_on_pixels() -> None:
    from torchvision.io import decode_jpeg

    from vitprobe.gpudecode import DeviceTransform
    from vitprobe.models import load_backbone

    backbone = load_backbone("timm:test_vit", random_init=True)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((90, 130), Image.BILINEAR)
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    pixels = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))  # (3, H, W)
    ours = DeviceTransform(backbone.data_config(), device=torch.device("cpu"))([pixels])[0]
    theirs = backbone.transform()(Image.fromarray(pixels.permute(1, 2, 0).numpy()))
    assert ours.shape == theirs.shape == (3, 160, 160)
    assert float((ours - theirs).abs().mean()) < 0.02  # antialiased bicubic vs PIL's bicubic, in std units


def test_compiled_forward_writes_the_same_tokens(data_spec: str, tmp_path: Path) -> None:
    """--compile runs the forward pass through torch.compile (the eager backend here: no C++ toolchain
    needed, the same graph capture) and stores the same tokens."""
    plain = _config(data_spec, tmp_path / "plain", limit=4)
    compiled = replace(plain, out=tmp_path / "compiled", compile=True, compile_backend="eager")
    extract(plain)
    result = extract(compiled)
    assert result.first_batch_size == 4 and 0 < result.first_batch_seconds <= result.seconds
    a, b = open_cache(plain.out), open_cache(compiled.out)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_compiled_forward_pads_a_short_last_batch_so_one_graph_serves_every_batch(
    data_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard's short last batch would be a compilation of its own (tens of seconds on a CPU): it is
    padded to the full batch with zero images, and its real images' tokens are those of an eager run."""
    shapes: list[tuple[int, ...]] = []

    def fake_compile(fn, **kwargs):  # noqa: ANN001, ANN202 - records what the compiled graph is given
        def run(images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
            shapes.append(tuple(images.shape))
            return fn(images, layers)

        return run

    plain = _config(data_spec, tmp_path / "plain", limit=6)  # batches of 4: 4 + 2 (shards of 4)
    extract(plain)
    monkeypatch.setattr(torch, "compile", fake_compile)
    extract(replace(plain, out=tmp_path / "compiled", compile=True))
    assert len(shapes) == 2 and {s[0] for s in shapes} == {4}  # the short batch ran padded to 4
    a, b = open_cache(plain.out), open_cache(tmp_path / "compiled")
    assert b.num_samples == 6
    for i in range(len(a.shards)):
        x, y = a.read_shard(i), b.read_shard(i)
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(y[key], x[key], atol=1e-5, rtol=1e-5)  # rows, not padding


def test_the_gpu_benchmark_runs_every_arm_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_extract.py runs unchanged without a GPU: every arm gives a figure, in JSON."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_extract.py"
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), "--quick", "--model", "timm:test_vit", "--workers", "0",
            "--compile-backend", "eager", "--json", str(out)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["errors"] == {} and report["skipped"] == []
    arms = {"model", "model+compile", "extract cpu-decode", "extract cpu-decode+compile",
            "extract gpu-decode", "extract gpu-decode+compile"}
    assert set(report["arms"]) == arms and all(a["images_per_s"] > 0 for a in report["arms"].values())
    assert report["arms"]["extract gpu-decode"]["images"] == 16
    assert "extract gpu-decode / extract cpu-decode" in report["ratios"]


def test_a_guarded_loader_raises_a_worker_error_as_itself() -> None:
    """vitprobe.loaders: a VitprobeError in a DataLoader worker comes back with its class, message and hint
    (PyTorch would re-raise its class with the worker's whole traceback as the message, and no hint)."""
    from vitprobe.errors import DatasetError
    from vitprobe.loaders import guarded_loader, iter_checked

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> torch.Tensor:
            if i == 5:
                raise DatasetError("cannot read image /data/5.jpg", "replace or remove the corrupt file")
            return torch.tensor(i)

    batches = []
    with pytest.raises(DatasetError) as info:
        for batch in iter_checked(guarded_loader(Items(), batch_size=2, num_workers=2)):
            batches.append(batch.tolist())
    assert str(info.value) == "cannot read image /data/5.jpg (replace or remove the corrupt file)"
    assert batches == [[0, 1], [2, 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_finiteness_check_of_extraction_finds_every_nan_and_inf(dtype: torch.dtype) -> None:
    from vitprobe.tokens import non_finite as _non_finite

    t = torch.randn(4, 9, 6).to(dtype)
    assert not bool(_non_finite(t))
    assert not bool(_non_finite(t[:0]))  # an empty part
    for value in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0, 0), (3, 8, 5), (2, 4, 1)):
            bad = t.clone()
            bad[where] = value
            assert bool(_non_finite(bad)), (value, where)
