"""Faults an extraction survives without a hand (issue 11): kills, SIGTERM, stale and foreign locks, debris,
full disks, errors in DataLoader workers and torchrun ranks, lost manifests, fsync order, reproducible bytes.

Real processes and real signals: `python -m vitprobe extract` in a subprocess on timm's tiny `test_vit` with
random weights and a generated folder of JPEGs. Every test here failed before the fix it guards.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitprobe.cache import (
    LOCK_FILE,
    MANIFEST_FILE,
    open_cache,
    remove_temp_files,
    write_manifest,
    write_shard,
)

NUM_IMAGES = 12
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                      os.environ.get("PYTHONPATH", "")])}


def _image_folder(root: Path, count: int) -> Path:
    """`count` JPEGs in 3 classes (sizes differ)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % 3}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (40 + 4 * (i % 4), 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 12 JPEGs in 3 classes (sizes differ)."""
    return _image_folder(tmp_path_factory.mktemp("images"), NUM_IMAGES)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 JPEGs: 24 shards of 2, so a kill after the first shard lands with most of the work to go."""
    return _image_folder(tmp_path_factory.mktemp("many-images"), 48)


def _args(data: Path, out: Path, *extra: str, workers: int = 0, shard_size: int = 2) -> list[str]:
    return [sys.executable, "-m", "vitprobe", "extract", "--model", "timm:test_vit", "--random-init",
            "--data", f"imagefolder:{data}", "--split", "all", "--out", str(out), "--workers", str(workers),
            "--shard-size", str(shard_size), "--batch-size", "2", *extra]


def _run(args: list[str], *, fsize: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def _text(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())  # rich may wrap the line at the terminal width


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The output holds exactly one `error:` line and no traceback; returns the whole output, unwrapped."""
    text = _text(result)
    assert "Traceback" not in text and "Original Traceback" not in text, text
    assert text.count("error:") == 1, text
    return text


@dataclass
class _Result:
    exit_code: int
    text: str


def _cli(args: list[str], *, ok: bool = False) -> _Result:
    """The CLI in this process (CliRunner); `args` as for a subprocess. Checks one error line or success."""
    from typer.testing import CliRunner

    from vitprobe.cli import app

    result = CliRunner().invoke(app, args[3:])  # drop `python -m vitprobe`
    text = " ".join(result.output.split())
    if ok:
        assert result.exit_code == 0, text
    else:
        assert "Traceback" not in text and text.count("error:") == 1, text
    return _Result(result.exit_code, text)


def _start_and_wait(args: list[str], out: Path, ready: Callable[[], bool]) -> subprocess.Popen:
    """Start the CLI in its own process group and wait until `ready()` (a shard written, ...)."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("not ready in 120 s")
        time.sleep(0.02)
    return proc


def _shards_recorded(out: Path, n: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return len(json.loads((out / MANIFEST_FILE).read_text())["shards"]) >= n
        except (OSError, ValueError, KeyError):
            return False

    return ready


@pytest.fixture(scope="module")
def clean(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of an uninterrupted run, to compare every resumed one with."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    result = _run(_args(images, out))
    assert result.returncode == 0, _text(result)
    return out


def _assert_same_cache(a: Path, b: Path, shards: int = 6) -> None:
    x, y = open_cache(a, verify=True), open_cache(b, verify=True)
    assert [s.sha256 for s in x.shards] == [s.sha256 for s in y.shards] and len(x.shards) == shards
    assert (a / "final_norm.safetensors").read_bytes() == (b / "final_norm.safetensors").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_or_terminated_run_resumes_by_itself(images: Path, clean: Path, tmp_path: Path, sig) -> None:
    out = tmp_path / "cache"
    args = _args(images, out, workers=2)
    proc = _start_and_wait(args, out, _shards_recorded(out, 2))
    os.killpg(proc.pid, sig)  # the whole group, as Slurm and `timeout` do: the workers get it too
    output, _ = proc.communicate(timeout=60)
    text = " ".join(output.split())
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, text
        assert "interrupted (" in text and "by SIGTERM" in text and "re-run the same command" in text
        assert "Traceback" not in text and text.count("error:") == 1, text
        assert not (out / LOCK_FILE).exists()
    else:
        assert proc.returncode == -signal.SIGKILL and (out / LOCK_FILE).exists()  # nothing could clean up
    again = _run(args)
    text = _text(again)
    assert again.returncode == 0, text
    if sig == signal.SIGKILL:
        assert f"took over the stale lock {out / LOCK_FILE}: pid {proc.pid} on {socket.gethostname()}" in text
    assert "resuming" in text and not (out / LOCK_FILE).exists()
    _assert_same_cache(clean, out)


def test_a_live_or_foreign_lock_is_refused_with_a_hint_and_break_lock_overrides_it(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        refused = _cli(_args(images, out))
        assert refused.exit_code == 1 and f"is being written by pid {holder.pid}" in refused.text
        assert "--break-lock" in refused.text
    finally:
        holder.kill()
        holder.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "another-node"}))
    refused = _cli(_args(images, out))
    assert "pid 4242 on another-node" in refused.text and "cannot tell" in refused.text
    assert "--break-lock" in refused.text
    broken = _cli(_args(images, out, "--break-lock"), ok=True)
    assert "broke the lock" in broken.text and not (out / LOCK_FILE).exists()


def test_debris_of_a_kill_mid_write_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL while a large shard is being written: only vitprobe's own temp names are left, and the next
    run removes them (safetensors' own `.tmpXXXXXX`, which earlier versions left, too)."""
    out = tmp_path / "cache"
    out.mkdir()
    code = (
        "import torch, sys\n"
        "from pathlib import Path\n"
        "from vitprobe.cache import write_shard\n"
        "rows = {'patches': torch.ones(4096, 4096, dtype=torch.float16), 'labels': torch.zeros(4096).long(),"
        " 'indices': torch.arange(4096)}\n"
        "while True:\n"
        "    write_shard(Path(sys.argv[1]), 0, 0, rows)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".") for p in out.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    debris = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert debris and all(name.startswith(".shard-00000.safetensors.") for name in debris), debris
    (out / ".tmpAb12Cd").write_bytes(b"what safetensors >= 0.6 left when vitprobe was killed while saving")
    removed = remove_temp_files(out)
    assert sorted(p.name for p in removed) == sorted([*debris, ".tmpAb12Cd"])
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_a_full_disk_is_one_line_loses_nothing_and_resumes_once_space_is_freed(
    images: Path, clean: Path, tmp_path: Path
) -> None:
    """`ulimit -f` just below the size of the lock, the final norm, the manifest and a shard in turn: each
    write fails (EFBIG; SIGXFSZ is ignored) with one line, leaves no lock and no temp file, and the next run
    (finally without a limit) goes on from there."""
    norm, shard = (clean / name for name in ("final_norm.safetensors", "shard-00000.safetensors"))
    sizes = {"extract.lock": 100, norm.name: norm.stat().st_size, "manifest.json": 2000,
             shard.name: shard.stat().st_size}
    out = tmp_path / "cache"
    args = _args(images, out)
    for name, size in sizes.items():
        result = _run(args, fsize=size - 1)
        text = _one_error_line(result)
        what = f"create {out / name}" if name == LOCK_FILE else f"write {name} in {out}"
        assert result.returncode == 1 and f"no space left to {what}" in text, text
        assert str(out) in text and "free disk space" in text, text
        assert not (out / LOCK_FILE).exists()  # no empty lock blocks the next run
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind
    again = _run(args)
    assert again.returncode == 0, _text(again)
    _assert_same_cache(clean, out)


def test_a_full_disk_after_some_shards_keeps_them(images: Path, tmp_path: Path) -> None:
    """The manifest outgrows the file-size limit after a few shards (of [cls] tokens only, smaller than the
    manifest): those shards are kept, and the same command resumes after them."""
    reference = tmp_path / "reference"
    assert _run(_args(images, reference, "--tokens", "cls")).returncode == 0
    out = tmp_path / "cache"
    args = _args(images, out, "--tokens", "cls")
    size = (reference / MANIFEST_FILE).stat().st_size  # the complete manifest, with 6 shard entries
    result = _run(args, fsize=size - 400)  # about two entries short
    text = _one_error_line(result)
    assert result.returncode == 1 and "no space left to write manifest.json" in text
    kept = open_cache(out, require_complete=False, verify=True)
    assert 0 < len(kept.shards) < 6
    again = _run(args)
    text = _text(again)
    assert again.returncode == 0 and "resuming" in text, text
    assert int(text.split("resuming")[1].split(": ")[1].split(" of ")[0]) >= len(kept.shards)
    _assert_same_cache(reference, out)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-an-image"])
def test_a_bad_image_in_a_dataloader_worker_is_one_line_naming_the_file(
    images: Path, tmp_path: Path, damage: str
) -> None:
    import shutil

    data = tmp_path / "images"
    shutil.copytree(images, data)
    bad = data / "c1" / "07.jpg"
    content = bad.read_bytes()
    damaged = {"truncated": content[: len(content) // 3], "empty": b"", "not-an-image": b"<html>"}
    bad.write_bytes(damaged[damage])
    result = _cli(_args(data, tmp_path / "cache", workers=2))  # 2 DataLoader worker processes
    assert result.exit_code == 1 and str(bad) in result.text, result.text
    assert "replace or remove the corrupt file" in result.text


@pytest.mark.slow
def test_torchrun_an_error_on_rank_1_is_printed_once_naming_rank_file_and_fix(
    images: Path, tmp_path: Path
) -> None:
    import shutil

    data = tmp_path / "images"
    shutil.copytree(images, data)
    from vitprobe.data import open_dataset

    paths = open_dataset(f"imagefolder:{data}", "all").paths
    bad = next(p for row, p in enumerate(paths) if (row // 2) % 2 == 1)  # shard s goes to rank s % 2
    bad.write_bytes(b"")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = _run([*launcher, *_args(data, tmp_path / "cache")[1:]], timeout=300)
    text = _text(result)
    assert result.returncode != 0
    assert text.count(f"error: rank 1 of 2: imagefolder:{data}: cannot read image {bad}") == 1, text
    assert "replace or remove the corrupt file" in text and "Connection closed by peer" not in text
    assert not (tmp_path / "cache" / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["rank 1 SIGKILL", "torchrun SIGTERM"])
def test_torchrun_a_killed_rank_or_a_preempted_job_leaves_no_lock_and_resumes(
    many_images: Path, tmp_path: Path, kill: str
) -> None:
    """A rank killed (torchrun then stops the others with SIGTERM), or the whole job preempted (Slurm and
    Kubernetes send SIGTERM to torchrun, which passes it to every rank): no lock is left behind."""
    clean = tmp_path / "clean"
    assert _run(_args(many_images, clean)).returncode == 0
    out = tmp_path / "cache"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*launcher, *_args(many_images, out)[1:]]
    proc = _start_and_wait(args, out, _shards_recorded(out, 1))  # 23 of 24 shards to go
    if kill == "torchrun SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        # freeze the whole job first, so the ranks cannot finish while their pids are looked up
        os.killpg(proc.pid, signal.SIGSTOP)
        rank0 = json.loads((out / LOCK_FILE).read_text())["pid"]
        ranks = [p for p in _children(proc.pid) if p != rank0]  # the ranks are children of torchrun's agent
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGCONT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / LOCK_FILE).exists(), output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert not manifest["complete"], "the kill landed after the last shard: nothing to resume"
    again = _run(_args(many_images, out))
    assert again.returncode == 0 and "resuming" in _text(again), _text(again)
    _assert_same_cache(clean, out, shards=24)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("loss", ["empty", "missing", "no-sha256"])
def test_a_lost_manifest_is_rebuilt_from_the_intact_shards(
    images: Path, clean: Path, tmp_path: Path, loss: str
) -> None:
    """After a power loss (an empty manifest.json) the same command keeps the intact shards."""
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    for i in (3, 4, 5):  # a run stopped after three shards
        (out / f"shard-{i:05d}.safetensors").unlink()
    manifest = out / MANIFEST_FILE
    if loss == "empty":
        manifest.write_text("")
    elif loss == "missing":
        manifest.unlink()
    else:
        m = json.loads(manifest.read_text())
        del m["shards"][0]["sha256"]
        manifest.write_text(json.dumps(m))
        refused = _cli([*_args(images, out)[:3], "probe", "--train", str(out), "--test", str(out),
                        "--out", str(tmp_path / "run")])
        assert "shard entry 0 lacks a valid sha256" in refused.text, refused.text
        assert "rebuilds the manifest" in refused.text
    again = _run(_args(images, out))
    text = _text(again)
    assert again.returncode == 0, text
    if loss != "missing":
        assert "rebuilt it from the 3 intact shards" in text, text
    assert f"resuming {out}: 3 of 6 shards already written" in text
    _assert_same_cache(clean, out)


def test_shards_of_another_extraction_are_not_adopted_without_a_manifest(
    images: Path, clean: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    (out / MANIFEST_FILE).unlink()
    refused = _run(_args(images, out, "--seed", "1"))  # another extraction: other random weights
    text = _one_error_line(refused)
    assert "are not this extraction's" in text and "--overwrite" in text
    assert len(list(out.glob("shard-*"))) == 6  # nothing overwritten


def test_shards_and_manifests_are_fsynced_before_they_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:  # noqa: ANN001
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rows = {"labels": torch.zeros(2, dtype=torch.long), "indices": torch.arange(2)}
    write_shard(tmp_path, 0, 0, rows)
    write_manifest(tmp_path, {"shards": []})
    for name in ("shard-00000.safetensors", MANIFEST_FILE):
        i = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f"/{name}"))
        tmp = events[i][1].split(" -> ")[0]
        assert ("fsync", tmp) in events[:i], events  # the bytes are on the device before the name exists
        assert ("fsync", str(tmp_path)) in events[i + 1 :], events  # and so is the new name


def test_every_file_of_an_extraction_is_byte_reproducible(images: Path, clean: Path, tmp_path: Path) -> None:
    """The same command again: identical shards and final norm; the manifest differs only in its created and
    updated timestamps and the recorded --out (in `config` and in the provenance's command line; verified.json
    is local state: inodes and mtimes)."""
    out = tmp_path / "cache"
    result = _run(_args(images, out))
    assert result.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for p in out.iterdir():
        if p.name.startswith("shard-") or p.name == "final_norm.safetensors":
            assert p.read_bytes() == (clean / p.name).read_bytes(), p.name
    a, b = (json.loads((d / MANIFEST_FILE).read_text()) for d in (clean, out))
    for m in (a, b):
        del m["created"], m["updated"], m["config"]["out"]
        del m["provenance"]["created"], m["provenance"]["command"]
    assert json.dumps(a) == json.dumps(b)


def test_nan_weights_at_fp32_are_named_as_such_not_as_an_overflow(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vitprobe.extract as extract_mod
    from vitprobe.errors import CacheError
    from vitprobe.extract import ExtractConfig

    real = extract_mod.build_backbone

    def nan_weights(config, **kwargs):  # noqa: ANN001, ANN202 - a checkpoint with a NaN in block 0
        backbone = real(config, **kwargs)
        with torch.no_grad():
            backbone.model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        return backbone

    monkeypatch.setattr(extract_mod, "build_backbone", nan_weights)
    config = ExtractConfig(model="timm:test_vit", data=f"imagefolder:{images}", split="all",
                           out=tmp_path / "c", random_init=True, workers=0, store="fp32", limit=2)
    with pytest.raises(CacheError) as info:
        extract_mod.extract(config)
    assert "NaN or inf already in its fp32 forward pass" in info.value.message
    assert "not an overflow of the store dtype" in info.value.message
    assert "--store" not in info.value.hint and "checkpoint" in info.value.hint
