"""Token caches without a model: layout, writing, lazy reading, validation and the lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitprobe.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    ShardInfo,
    TokenCache,
    bytes_per_sample,
    lock_cache,
    open_cache,
    shard_entries,
    shard_layout,
    write_final_norm,
    write_manifest,
    write_shard,
)
from vitprobe.errors import CacheError
from vitprobe.files import sha256_file
from vitprobe.verified import VERIFIED_FILE, HashRecord

GRID, DIM, LAYERS = (2, 3), 4, [5, 3]


def _manifest(num_samples: int, shards: list[ShardInfo], *, complete: bool, tokens: str = "all") -> dict:
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "model": {"spec": "timm:toy", "timm_name": "toy", "checkpoint": "random-init", "random_init": True,
                  "source": "random-init"},
        "layers": LAYERS, "grid": list(GRID), "dim": DIM, "num_prefix_tokens": 2, "has_cls": True,
        "num_reg_tokens": 1, "tokens": tokens, "store_dtype": "fp16", "views": 0, "seed": 0,
        "dataset": {"spec": "imagefolder:x", "split": "train", "fingerprint": "f" * 64,
                    "class_names": ["a", "b", "c"], "num_classes": 3},
        "num_samples": num_samples, "shard_size": 4, "shards": shard_entries(shards),
        "final_norm": {"file": None, "type": "Identity", "eps": None}, "complete": complete,
    }


def _rows(start: int, stop: int) -> dict[str, torch.Tensor]:
    """Tensors of rows [start, stop) whose values encode (row, layer, token, channel), exact in fp16."""
    n, (h, w), L = stop - start, GRID, len(LAYERS)
    rows = torch.arange(start, stop, dtype=torch.float32)
    base = rows.view(n, 1, 1, 1) * 200 + torch.arange(L).view(1, L, 1, 1) * 100  # (n, L, 1, 1)
    patches = base + torch.arange(h * w).view(1, 1, h * w, 1) * 10 + torch.arange(DIM).view(1, 1, 1, DIM)
    return {
        "patches": patches.half(),  # (n, L, P, D)
        "cls": (base[:, :, 0] - 1 + torch.zeros(DIM)).half(),  # (n, L, D)
        "reg": (base - 2 + torch.zeros(1, 1, 1, DIM)).half(),  # (n, L, 1, D)
        "labels": (torch.arange(start, stop) % 3).long(),
        "indices": torch.arange(start, stop).long() * 7,
    }


def _write_cache(path: Path, num_samples: int = 10, shard_size: int = 4, *, complete: bool = True
                 ) -> TokenCache:
    shards = [write_shard(path, i, s, _rows(s, min(s + shard_size, num_samples)))
              for i, s in enumerate(range(0, num_samples, shard_size))]
    norm = torch.nn.LayerNorm(DIM, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(DIM) + 1.0)
    manifest = _manifest(num_samples, shards, complete=complete)
    manifest["final_norm"] = write_final_norm(path, norm)
    write_manifest(path, manifest)
    return open_cache(path, require_complete=complete)


def test_layout_shapes_for_every_token_mode() -> None:
    common = dict(grid=(14, 14), dim=768, has_cls=True, store_dtype="fp16", views=0)
    all_one = shard_layout(tokens="all", num_layers=1, num_reg_tokens=0, **common)
    assert {k: s.shape for k, s in all_one.items()} == {
        "patches": (196, 768), "cls": (768,), "labels": (), "indices": ()}
    # ImageNet train x ViT-B/16 in fp16 is about 388 GB, as the issue says
    assert bytes_per_sample(all_one) == 197 * 768 * 2 + 16
    assert round(1_281_167 * bytes_per_sample(all_one) / 1e9) == 388
    several = shard_layout(tokens="all", num_layers=2, num_reg_tokens=4, **{**common, "views": 2})
    assert several["patches"].shape == (2, 196, 768) and several["reg"].shape == (2, 4, 768)
    assert several["cls"].shape == (2, 768) and several["views"].dtype == torch.int64
    cls_only = shard_layout(tokens="cls", num_layers=1, num_reg_tokens=4, **common)
    assert set(cls_only) == {"cls", "labels", "indices"}
    pooled = shard_layout(tokens="pooled", num_layers=1, num_reg_tokens=0, **{**common, "has_cls": False})
    assert set(pooled) == {"mean", "labels", "indices"}
    with pytest.raises(CacheError, match="no.*cls|has none"):
        shard_layout(tokens="cls", num_layers=1, num_reg_tokens=0, **{**common, "has_cls": False})


def test_write_then_read_rows_keys_and_order(tmp_path: Path) -> None:
    cache = _write_cache(tmp_path)
    assert [(s.start, s.stop) for s in cache.shards] == [(0, 4), (4, 8), (8, 10)]
    assert cache.num_samples == 10 and cache.layers == LAYERS and cache.grid == GRID and cache.dim == DIM
    assert cache.has_cls and cache.num_reg_tokens == 1 and cache.num_classes == 3 and cache.complete
    assert cache.keys == ["patches", "cls", "reg", "labels", "indices"]
    torch.testing.assert_close(cache.labels(), torch.arange(10) % 3, rtol=0, atol=0)
    torch.testing.assert_close(cache.indices(), torch.arange(10) * 7, rtol=0, atol=0)
    part = cache.read_shard(1, ["patches", "indices"], rows=slice(1, 3))
    assert set(part) == {"patches", "indices"}
    assert part["patches"].shape == (2, 2, 6, 4) and part["patches"].dtype == torch.float16
    # row 5 (shard 1, row 1), layer 1, token 4, channel 3 holds 5*200 + 100 + 40 + 3
    assert part["patches"][0, 1, 4, 3].item() == 1143
    torch.testing.assert_close(part["indices"], torch.tensor([35, 42]))
    order = [e["indices"][0].item() // 7 for e in cache.iter_shards(["indices"], order=[2, 0, 1])]
    assert order == [8, 0, 4]
    norm = cache.final_norm_state()
    torch.testing.assert_close(norm["weight"], torch.arange(4) + 1.0)
    assert cache.manifest["final_norm"] == {"file": "final_norm.safetensors", "type": "LayerNorm",
                                            "eps": 1e-6}
    prov = cache.provenance()
    assert prov["checkpoint"] == "random-init" and prov["layers"] == LAYERS
    assert prov["fingerprint"] == "f" * 64 and prov["dataset"] == "imagefolder:x"
    with pytest.raises(CacheError, match="no tensor 'mean'"):
        cache.read_shard(0, ["mean"])
    with pytest.raises(CacheError, match="shard 3 does not exist"):
        cache.read_shard(3)


def test_same_tensors_give_the_same_bytes(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a", 0, 0, _rows(0, 3))
    b = write_shard(tmp_path / "b", 0, 0, _rows(0, 3))
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / a.file).read_bytes() == (tmp_path / "b" / b.file).read_bytes()


def test_open_cache_refuses_missing_incomplete_and_foreign(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist") as info:
        open_cache(tmp_path / "nope")
    assert "vitprobe extract" in info.value.hint
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CacheError, match="has no manifest.json"):
        open_cache(tmp_path / "empty")

    partial = tmp_path / "partial"
    _write_cache(partial, complete=False)
    with pytest.raises(CacheError, match=r"incomplete \(10 of 10|incomplete") as info:
        open_cache(partial)
    assert "resume" in info.value.hint
    manifest = json.loads((partial / MANIFEST_FILE).read_text())
    manifest["shards"] = manifest["shards"][:2]
    write_manifest(partial, manifest)
    with pytest.raises(CacheError, match="8 of 10 samples written"):
        open_cache(partial)
    assert open_cache(partial, require_complete=False).num_written == 8

    newer = tmp_path / "newer"
    _write_cache(newer)
    manifest = json.loads((newer / MANIFEST_FILE).read_text())
    write_manifest(newer, {**manifest, "format_version": FORMAT_VERSION + 1})  # 2 is spelt `version`
    with pytest.raises(CacheError, match="format version 2") as info:
        open_cache(newer)
    v1 = {k: v for k, v in manifest.items() if k not in ("version", "kind")}
    write_manifest(newer, {**v1, "format": FORMAT_NAME, "version": 3, "kind": "cache"})
    with pytest.raises(CacheError, match="format version 3") as info:
        open_cache(newer)
    assert "upgrade" in info.value.hint
    write_manifest(newer, {**v1, "version": 2})  # version 2 without `kind`
    with pytest.raises(CacheError, match="format version 2"):
        open_cache(newer)
    write_manifest(newer, {**manifest, "format": "something-else"})
    with pytest.raises(CacheError, match="not a vitprobe token-cache manifest"):
        open_cache(newer)


def test_open_cache_checks_files_shapes_and_hashes(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    write_manifest(tmp_path, {**manifest, "dim": 5})  # the shards hold D = 4
    with pytest.raises(CacheError, match="does not match the manifest"):
        open_cache(tmp_path)
    write_manifest(tmp_path, manifest)
    # flip one byte of tensor data: the header still parses, only verify=True notices
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_cache(tmp_path)
    with pytest.raises(CacheError, match="corrupt"):
        open_cache(tmp_path, verify=True)
    shard.unlink()
    with pytest.raises(CacheError, match="shard-00001.safetensors listed in the manifest is missing"):
        open_cache(tmp_path)


def test_open_cache_checks_shard_ranges(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["shards"][1]["start"] = 5
    write_manifest(tmp_path, manifest)
    with pytest.raises(CacheError, match="rows start at 4"):
        open_cache(tmp_path)


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path: Path) -> None:
    with lock_cache(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(CacheError, match=f"being written by pid {os.getpid()}") as info:
            with lock_cache(tmp_path):
                pass
        assert "--break-lock" in info.value.hint
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    notes: list[str] = []
    with lock_cache(tmp_path, say=notes.append) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert notes == [f"took over the stale lock {tmp_path / LOCK_FILE}: pid {int(dead.stdout)} on "
                     f"{socket.gethostname()} (started ?) is no longer running"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_a_stale_lock_and_a_foreign_host_needs_break_lock(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_FILE
    # this process's pid, but recorded with another start time: the pid was reused after the owner died
    record = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": -1}
    lock.write_text(json.dumps(record))
    notes: list[str] = []
    with lock_cache(tmp_path, say=notes.append):
        pass
    assert len(notes) == 1 and "is no longer running" in notes[0]
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00Z"}))
    with pytest.raises(CacheError, match="being written by pid 1 on elsewhere .* cannot tell") as info:
        with lock_cache(tmp_path):
            pass
    assert "--break-lock" in info.value.hint and lock.exists()
    with lock_cache(tmp_path, break_lock=True, say=notes.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert notes[-1].startswith(f"broke the lock {lock} of pid 1 on elsewhere") and not lock.exists()
    lock.write_text("")  # what an older vitprobe left when the disk filled while creating it
    with pytest.raises(CacheError, match="empty or unreadable") as info:
        with lock_cache(tmp_path):
            pass
    assert "--break-lock" in info.value.hint
    with lock_cache(tmp_path, break_lock=True):
        pass
    assert not lock.exists()


def test_a_broken_lock_is_not_removed_by_the_run_that_lost_it(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_FILE
    with lock_cache(tmp_path):
        lock.unlink()  # another run breaks the lock (--break-lock) and takes it
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "nonce": "theirs"}))
    assert json.loads(lock.read_text())["nonce"] == "theirs"


def test_a_full_disk_or_unwritable_directory_is_a_cache_error_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vitprobe.lock as lock_mod
    import vitprobe.shards as shards_mod

    def disk_full(path, tensors, metadata=None):  # noqa: ANN001, ANN202 - write_safetensors' signature
        Path(path).write_bytes(b"half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards_mod, "write_safetensors", disk_full)
    rows = {"labels": torch.zeros(2, dtype=torch.long), "indices": torch.arange(2)}
    needs = r"no space left to write shard-00000.safetensors in .* \(it needs 32 B;"
    with pytest.raises(CacheError, match=needs) as info:
        write_shard(tmp_path, 0, 0, rows)
    assert "re-run the same command: it resumes" in info.value.hint
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def read_only(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lock_mod, "open", read_only, raising=False)
    with pytest.raises(CacheError, match="cannot create .*extract.lock: .*Read-only") as info:
        with lock_cache(tmp_path):
            pass
    assert "writable --out" in info.value.hint

    def no_space(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lock_mod, "open", no_space, raising=False)
    with pytest.raises(CacheError, match="no space left to create .*extract.lock"):
        with lock_cache(tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []  # no empty lock to block the next run


def test_a_shard_is_hashed_once_then_trusted_while_its_size_mtime_and_inode_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vitprobe.cache as cache_mod

    _write_cache(tmp_path)
    time.sleep(0.05)  # past the clock tick of the writes: a record as old as a file proves nothing (racy)
    record = json.loads((tmp_path / VERIFIED_FILE).read_text())
    assert set(record["shards"]) == {"shard-00000.safetensors", "shard-00001.safetensors",
                                     "shard-00002.safetensors"}
    entry = record["shards"]["shard-00001.safetensors"]
    assert entry["sha256"] == sha256_file(tmp_path / "shard-00001.safetensors")
    assert entry["size"] == (tmp_path / "shard-00001.safetensors").stat().st_size
    hashed: list[str] = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    # the writer recorded each shard as it wrote it: at most the racy ones (same clock tick) are re-hashed
    for i in range(3):
        open_cache(tmp_path).verify_shard(i)
    for i in range(3):
        open_cache(tmp_path).verify_shard(i)  # a second reader: nothing left to hash
    assert len(hashed) <= 3 and len(set(hashed)) == len(hashed)
    hashed.clear()
    cache = open_cache(tmp_path)
    for i in range(3):
        cache.verify_shard(i)
    assert hashed == []
    # an edit changes mtime (and here the bytes): the shard is hashed again and refused
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001.safetensors is corrupt"):
        open_cache(tmp_path).verify_shard(1)
    assert hashed == ["shard-00001.safetensors"]
    hashed.clear()
    with pytest.raises(CacheError, match="corrupt"):
        open_cache(tmp_path, verify=True)  # an explicit verify re-hashes every shard
    assert "shard-00000.safetensors" in hashed


def test_a_change_within_the_clock_tick_of_the_record_is_not_trusted(tmp_path: Path) -> None:
    """git's racy-clean rule: a file whose mtime is not older than the record is hashed again."""
    _write_cache(tmp_path)
    shard = tmp_path / "shard-00000.safetensors"
    record = HashRecord.load(tmp_path)
    entry = record.entries[shard.name]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, record.written_ns))  # as if written in the record's own tick
    record = HashRecord.load(tmp_path)
    record.entries[shard.name] = {**entry, "mtime_ns": shard.stat().st_mtime_ns,
                                  "ctime_ns": shard.stat().st_ctime_ns}
    assert not record.matches(shard, entry["sha256"])
    record.written_ns = max(shard.stat().st_mtime_ns, shard.stat().st_ctime_ns) + 1
    assert record.matches(shard, entry["sha256"])
    assert not record.matches(shard, "0" * 64)


def test_a_read_only_cache_is_verified_without_a_record(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    (tmp_path / VERIFIED_FILE).unlink()
    os.chmod(tmp_path, 0o555)
    try:
        cache = open_cache(tmp_path)
        for i in range(3):
            cache.verify_shard(i)  # hashed, the record cannot be written: no error
    finally:
        os.chmod(tmp_path, 0o755)


@pytest.mark.parametrize("store", ["fp8", "int8"])
def test_quantised_shards_store_codes_and_scales_and_read_back_as_floats(tmp_path: Path, store: str) -> None:
    from vitprobe.quant import QUANTS, dequantise, quantise

    common = dict(tokens="all", num_layers=2, grid=GRID, dim=DIM, has_cls=True, num_reg_tokens=1, views=0)
    layout = shard_layout(store_dtype=store, **common)
    assert layout["patches"].dtype == QUANTS[store].dtype and layout["patches"].scale == "patches_scale"
    assert layout["patches_scale"].shape == (2, 6) and layout["patches_scale"].dtype == torch.float32
    assert layout["cls_scale"].shape == (2,) and layout["reg_scale"].shape == (2, 1)
    big = dict(common, grid=(14, 14), dim=768, num_layers=1, num_reg_tokens=0)
    per_row = bytes_per_sample(shard_layout(store_dtype=store, **big))
    assert per_row == 197 * 768 + 197 * 4 + 16  # 0.50x of fp16 at ViT-B/16 (codes + one fp32 scale per token)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 6, DIM, generator=g) * torch.logspace(-3, 3, 6).view(1, 1, 6, 1)  # (n, L, P, D)
    x[0, 0, 0] = 0  # an all-zero token: scale 0, codes 0
    codes, scale = quantise(x, store)
    # the reference definition: s = max|x| / qmax per token, q = x / s on the store's grid, x' = q * s
    qmax = QUANTS[store].qmax
    s_ref = x.abs().amax(-1) / qmax
    torch.testing.assert_close(scale, s_ref, rtol=0, atol=0)
    y = x / torch.where(s_ref > 0, s_ref, 1).unsqueeze(-1)
    q_ref = y.round().to(torch.int8) if store == "int8" else y.to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), q_ref.view(torch.uint8))
    back = dequantise(codes, scale)
    assert torch.equal(back[0, 0, 0], torch.zeros(DIM))
    err = (back - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert float(err.max()) <= (0.5 / 127 + 1e-6 if store == "int8" else 1 / 16 + 1e-6)  # half a step at most

    rows = {"patches": x, "cls": x[:, :, 0], "reg": x[:, :, :1], "labels": torch.arange(5) % 3,
            "indices": torch.arange(5)}
    stored: dict[str, torch.Tensor] = {}
    for key in ("patches", "cls", "reg"):
        stored[key], stored[key + "_scale"] = quantise(rows[key], store)
    stored.update(labels=rows["labels"], indices=rows["indices"])
    info = write_shard(tmp_path, 0, 0, stored)
    manifest = _manifest(5, [info], complete=True)
    manifest["store_dtype"] = store
    write_manifest(tmp_path, manifest)
    cache = open_cache(tmp_path, verify=True)
    assert cache.quantised and cache.keys == ["patches", "cls", "reg", "labels", "indices"]
    part = cache.read_shard(0, ["patches", "labels"], rows=slice(1, 4))
    assert set(part) == {"patches", "labels"} and part["patches"].dtype == torch.float32
    torch.testing.assert_close(part["patches"], back[1:4], rtol=0, atol=0)
    half = cache.read_shard(0, ["cls"], dtype=torch.float16)["cls"]
    assert half.dtype == torch.float16
    raw = cache.read_shard(0, ["patches"], dequantise=False)
    assert set(raw) == {"patches", "patches_scale"} and raw["patches"].dtype == QUANTS[store].dtype
    torch.testing.assert_close(dequantise(raw["patches"], raw["patches_scale"]), back, rtol=0, atol=0)
