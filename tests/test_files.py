"""Atomic writes, hashes and JSON helpers; device and dtype resolution."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from vitprobe.devices import loader_workers, resolve_device, resolve_dtype
from vitprobe.errors import VitprobeError
from vitprobe.files import atomic_path, read_json, sha256_file, write_json


def test_failed_write_keeps_the_earlier_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json(target, {"top1": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a fil")
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"top1": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_files_get_umask_permissions(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", [1])
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_sha256_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin", chunk_size=1024) == hashlib.sha256(data).hexdigest()


def test_json_handles_paths_tuples_and_tensors(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"p": Path("/a/b"), "t": (1, 2), "x": torch.tensor([0.5, 1.5])})
    assert read_json(tmp_path / "x.json") == {"p": "/a/b", "t": [1, 2], "x": [0.5, 1.5]}


def test_auto_device_and_dtype_follow_cuda_availability() -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_falls_back_to_fp16_without_bf16(monkeypatch, bf16: bool, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(VitprobeError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(VitprobeError, match="--device cuda:1 was asked for"):
        resolve_device("cuda:1")


def test_unknown_device_and_dtype_are_refused() -> None:
    with pytest.raises(VitprobeError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(VitprobeError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_loader_workers_never_exceed_the_usable_cores(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(4) == 2
    assert loader_workers(1) == 1
    assert loader_workers(0) == 0
