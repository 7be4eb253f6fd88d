"""Probing under faults and bad input: NaN tokens, bad labels, interrupted swaps, corrupt heads (issue 11)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_probe_cli import FAST, invoke, probe, write_cache
from vitprobe.cache import open_cache, read_manifest, shard_entries, write_manifest, write_shard
from vitprobe.probe import rundir


def poison(cache: Path, rows: list[int], key: str = "cls", bad: float = math.nan) -> None:
    """Put NaN (or `bad`) into `rows` of shard 0 and re-record its checksum: the bytes match the manifest."""
    tensors = dict(load_file(cache / "shard-00000.safetensors"))
    value = tensors[key].clone()
    value[rows] = bad
    tensors[key] = value
    manifest = read_manifest(cache)
    shards = open_cache(cache).shards
    shards[0] = write_shard(cache, 0, 0, tensors)
    write_manifest(cache, {**manifest, "shards": shard_entries(shards)})


@pytest.mark.parametrize(
    ("load", "bad"), [("memory", math.nan), ("stream", math.nan), ("stream", math.inf), ("stream", -math.inf)]
)
def test_nan_tokens_are_refused_with_their_rows(tmp_path: Path, load: str, bad: float) -> None:
    train = write_cache(tmp_path / "train", n=30)
    poison(train, [2, 5], bad=bad)
    test = write_cache(tmp_path / "test", n=15, seed=1)
    result = probe(
        train,
        test,
        tmp_path / "run",
        *FAST,
        "--pool",
        "cls",
        "--pool",
        "abmilp",
        "--load",
        load,
    )
    assert result.exit_code == 1, result.output
    a, b = open_cache(train).indices()[[2, 5]].tolist()  # rows 2 and 5 hold these dataset indices
    assert f"error: cache {train} holds inf/NaN tokens in 2 rows (dataset indices {a}, {b})" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("grid", ["nan", "inf", "-0.1", "0.1,0.1"])
def test_impossible_learning_rates_are_refused_before_the_caches_are_read(tmp_path: Path, grid: str) -> None:
    result = probe(
        tmp_path / "missing",
        tmp_path / "missing",
        tmp_path / "run",
        "--lr-grid",
        grid,
    )
    assert result.exit_code == 1 and "--lr-grid" in result.output, result.output
    assert "does not exist" not in result.output  # refused before any cache was opened


def test_a_one_class_train_cache_is_refused(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=20, class_names=["ant"])
    test = write_cache(tmp_path / "test", n=10, seed=1, class_names=["ant"])
    result = probe(train, test, tmp_path / "run", *FAST)
    assert result.exit_code == 1 and "a single class ('ant')" in result.output, result.output


def test_results_json_is_strict_json(tmp_path: Path) -> None:
    """A class without test images has accuracy None, never a bare NaN that strict parsers reject."""
    train = write_cache(tmp_path / "train", n=30)
    test = write_cache(tmp_path / "test", n=2, seed=1)  # classes 0 and 1 only: class 2 has no test image
    out = tmp_path / "run"
    assert probe(train, test, out, *FAST, "--pool", "cls").exit_code == 0
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert results["readouts"]["cls"]["per_class"]["cat"] is None


def probe_run(tmp_path: Path, name: str, lr: str) -> Path:
    train = write_cache(tmp_path / "train", n=30) if not (tmp_path / "train").exists() else tmp_path / "train"
    test = (
        write_cache(tmp_path / "test", n=15, seed=1)
        if not (tmp_path / "test").exists()
        else tmp_path / "test"
    )
    out = tmp_path / name
    fast = [a if a != "0.5,2" else lr for a in FAST]
    assert probe(train, test, out, *fast, "--overwrite").exit_code == 0
    return out


def test_a_kill_between_the_heads_swap_and_results_json_is_rolled_back(tmp_path: Path) -> None:
    """Simulate each kill point of `rundir.commit`; the next run (or `recover`) restores a matching pair."""
    out = probe_run(tmp_path, "run", "0.5")
    old_results = (out / "results.json").read_text()
    # kill after the new heads were moved in but before results.json was replaced:
    new = probe_run(tmp_path, "other", "2")
    (out / "heads").rename(out / f"{rundir.RETIRED_PREFIX}x")
    shutil.copytree(new / "heads", out / "heads")
    (out / f"{rundir.STAGING_PREFIX}y").mkdir()  # and a staging folder from an earlier kill
    result = invoke("predict", out / "heads" / "cls.safetensors", "--cache", tmp_path / "test")
    assert result.exit_code == 1 and "does not belong to" in result.output, result.output
    notes = rundir.recover(out)
    assert any("restored" in n for n in notes) and len(notes) == 2
    assert (out / "results.json").read_text() == old_results
    rundir.verify_heads(out)  # the pair matches again
    assert not list(out.glob(".heads-*"))
    assert invoke("predict", out / "heads" / "cls.safetensors", "--cache", tmp_path / "test").exit_code == 0


def test_a_kill_before_the_swap_leaves_only_debris_that_the_next_run_removes(tmp_path: Path) -> None:
    out = probe_run(tmp_path, "run", "0.5")
    (out / f"{rundir.STAGING_PREFIX}abc").mkdir()
    (out / f"{rundir.STAGING_PREFIX}abc" / "cls.safetensors").write_bytes(b"half")
    out = probe_run(tmp_path, "run", "2")
    assert not list(out.glob(".heads-*")) and (out / "heads" / "cls.safetensors").is_file()
    assert any("removed .heads-new-abc" in n for n in json.loads((out / "results.json").read_text())["notes"])


@pytest.mark.parametrize("damage", ["json-garbage", "json-fields", "weights-garbage"])
def test_a_corrupt_saved_head_is_one_line(tmp_path: Path, damage: str) -> None:
    out = probe_run(tmp_path, "run", "0.5")
    head = tmp_path / "loose" / "cls.safetensors"  # outside heads/: no pair check, only the files
    head.parent.mkdir()
    shutil.copy(out / "heads" / "cls.safetensors", head)
    shutil.copy(out / "heads" / "cls.json", head.with_suffix(".json"))
    if damage == "json-garbage":
        head.with_suffix(".json").write_text("{not json")
    elif damage == "json-fields":
        meta = json.loads(head.with_suffix(".json").read_text())
        del meta["spec"]
        head.with_suffix(".json").write_text(json.dumps(meta))
    else:
        head.write_bytes(b"<html>not weights</html>")
    result = invoke("predict", head, "--cache", tmp_path / "test")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert str(head.with_suffix(".json") if damage.startswith("json") else head) in result.output


def test_saved_heads_are_byte_reproducible(tmp_path: Path) -> None:
    a, b = probe_run(tmp_path, "a", "0.5"), probe_run(tmp_path, "b", "0.5")
    for name in ("cls.safetensors", "cls.json", "abmilp.safetensors", "abmilp.json"):
        assert (a / "heads" / name).read_bytes() == (b / "heads" / name).read_bytes(), name
    assert not math.isnan(json.loads((a / "results.json").read_text())["readouts"]["cls"]["top1"])


def test_labels_outside_the_class_range_are_refused(tmp_path: Path) -> None:
    train = write_cache(tmp_path / "train", n=30)
    tensors = dict(load_file(train / "shard-00000.safetensors"))
    tensors["labels"] = tensors["labels"].clone()
    tensors["labels"][3] = 7
    manifest = read_manifest(train)
    shards = open_cache(train).shards
    shards[0] = write_shard(train, 0, 0, tensors)
    write_manifest(train, {**manifest, "shards": shard_entries(shards)})
    test = write_cache(tmp_path / "test", n=15, seed=1)
    result = probe(train, test, tmp_path / "run", *FAST)
    assert result.exit_code == 1 and "labels outside its 3 classes" in result.output, result.output
    assert "row 3, label 7" in result.output
