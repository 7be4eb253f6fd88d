"""Checkpoint files: safe reading (no code runs), offline-aware downloads, clear errors."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitprobe.checkpoints import (
    cache_dir,
    download_url,
    fetch_checkpoint,
    hf_hub_file,
    is_offline,
    read_checkpoint,
    sha256_file,
    url_cache_path,
)
from vitprobe.errors import CheckpointError, WeightsUnavailableError


class CreatesMarker:
    """Unpickling this object would create a file: the payload of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1 and an empty vitprobe cache (hub files and URLs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITPROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_safetensors_round_trip(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 4), "b.c": torch.arange(5)}
    save_file(sd, tmp_path / "w.safetensors")
    got = read_checkpoint(tmp_path / "w.safetensors")
    assert sorted(got) == ["a", "b.c"] and all(torch.equal(got[k], sd[k]) for k in sd)


def test_safetensors_with_a_torch_suffix_is_read_not_called_unsafe(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 4)}
    save_file(sd, tmp_path / "pytorch_model.bin")  # misnamed: the content decides
    got = read_checkpoint(tmp_path / "pytorch_model.bin")
    assert list(got) == ["a"] and torch.equal(got["a"], sd["a"])


def test_training_checkpoint_with_argparse_namespace_is_allowed(tmp_path: Path) -> None:
    args = argparse.Namespace(lr=1.5e-4, model="mae_vit_base_patch16", betas=[0.9, 0.95], output_dir="/out")
    torch.save(
        {"model": {"w": torch.ones(2)}, "args": args, "epoch": 799, "optimizer": {"state": {}}},
        tmp_path / "checkpoint-799.pth",
    )
    got = read_checkpoint(tmp_path / "checkpoint-799.pth")
    assert got["args"] == args and got["epoch"] == 799 and torch.equal(got["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"model": {"w": torch.ones(1)}, "evil": CreatesMarker(marker)}, path)
    else:  # a plain pickle (tensors in plain pickles need another global, so none here)
        path.write_bytes(pickle.dumps({"epoch": 1, "evil": CreatesMarker(marker)}, protocol=int(writer[-1])))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused") as info:
        read_checkpoint(path)
    assert not marker.exists()
    if writer != "pickle protocol 4":  # torch's unpickler stops at protocol 4's framing before any global
        assert "open" in info.value.message  # names the global the file asked for
    assert "safetensors" in info.value.hint


def test_corrupt_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "bad.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a safetensors file: it is an unknown binary format"):
        read_checkpoint(tmp_path / "bad.safetensors")


HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Sign in - Google Accounts</title></head>"
    "<body>" + "x" * 4000 + "</body></html>\n"
)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (HTML_PAGE.encode(), "an HTML page: 'Sign in - Google Accounts'"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 3462718\n", "a Git LFS pointer"),
        (b"", "an empty file (0 bytes)"),
        (b'{"error": "Repository not found"}', "a JSON/text file"),
        (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "an XML document"),
        ((96).to_bytes(8, "little") + b'{"w": {"dtype": "F32"', "a truncated safetensors file"),
    ],
    ids=["html", "git-lfs", "empty", "json", "xml", "truncated"],
)
def test_a_safetensors_name_on_something_else_says_what_it_is(
    tmp_path: Path, content: bytes, what: str
) -> None:
    """Issue 11: an HTML page saved as model.safetensors was reported only as 'header too large'."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = info.value.message
    assert message.startswith(f"{path} is not a safetensors file: it is {what}"), message
    assert "header too large" not in message and "\n" not in message
    assert "re-download model.safetensors" in (info.value.hint or "")


def test_a_torch_file_named_safetensors_is_read_safely(tmp_path: Path) -> None:
    sd = {"w": torch.randn(2, 2)}
    torch.save(sd, tmp_path / "model.safetensors")  # misnamed the other way round: the content decides
    got = read_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(got["w"], sd["w"])


def test_unknown_suffix_and_non_mapping_are_refused(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a checkpoint format"):
        read_checkpoint(tmp_path / "w.npz")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        read_checkpoint(tmp_path / "tensor.pt")


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin", chunk_size=1 << 16) == hashlib.sha256(data).hexdigest()


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        fetch_checkpoint(str(tmp_path / "nope.pth"))


def test_a_folder_is_not_called_missing_and_its_weights_files_are_named(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a folder") as info:
        fetch_checkpoint(str(tmp_path))
    assert str(tmp_path / "model.safetensors") in info.value.hint and "config.json" not in info.value.hint


def test_offline_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_offline()


def test_offline_url_not_cached_names_the_file_and_the_fix(offline_cache: Path) -> None:
    url = "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"
    with pytest.raises(WeightsUnavailableError) as info:
        download_url(url)
    assert "IN1K-vit.h.14-300e.pth.tar" in info.value.message and "HF_HUB_OFFLINE" in info.value.message
    assert "--checkpoint" in info.value.hint and url in info.value.hint


def test_offline_url_already_cached_is_used(offline_cache: Path) -> None:
    assert cache_dir() == offline_cache / "checkpoints"
    cached = offline_cache / "checkpoints" / "example.org" / "models" / "weights.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(1)}, cached)
    assert fetch_checkpoint("https://example.org/models/weights.pth") == cached


def test_urls_with_the_same_file_name_are_cached_apart(offline_cache: Path) -> None:
    """iBOT ViT-S and ViT-B backbones are both `checkpoint_teacher.pth`: one must not replace the other."""
    ibot = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/"
    small = url_cache_path(f"{ibot}vits_16/checkpoint_teacher.pth")
    small.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(1)}}, small)
    assert fetch_checkpoint(f"{ibot}vits_16/checkpoint_teacher.pth") == small
    with pytest.raises(WeightsUnavailableError) as info:  # not cached: offline, so it must fail, not reuse
        fetch_checkpoint(f"{ibot}vitb_16/checkpoint_teacher.pth")
    want = url_cache_path(f"{ibot}vitb_16/checkpoint_teacher.pth")
    assert want != small and want.name == small.name == "checkpoint_teacher.pth"
    assert str(want) in info.value.hint  # says exactly where to copy the file


def test_offline_hub_not_cached_names_the_file_and_the_fix(offline_cache: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        hf_hub_file("timm/vit_base_patch16_224.mae")
    assert "model.safetensors from hf-hub:timm/vit_base_patch16_224.mae" in info.value.message
    assert "--checkpoint" in info.value.hint
    assert "huggingface.co/timm/vit_base_patch16_224.mae/resolve/main/model.safetensors" in info.value.hint


def test_hf_hub_spec_with_filename(offline_cache: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="pytorch_model.bin from hf-hub:org/repo"):
        fetch_checkpoint("hf-hub:org/repo:pytorch_model.bin")


def test_a_text_file_named_pth_is_explained_not_a_bare_keyerror(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    path.write_text("<html>404 not found</html>\n")
    with pytest.raises(CheckpointError, match="neither a torch.save zip nor a pickle") as info:
        read_checkpoint(path)
    assert str(path) in info.value.message and "re-download" in (info.value.hint or "")
    assert "it is an HTML page" in info.value.message
