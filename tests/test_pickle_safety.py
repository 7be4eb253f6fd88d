"""Malicious pickles never run: 18 payload variants, each proven live by an unsafe load in a child process,
are refused by `read_checkpoint`, and none creates its marker file. Also: the torch version floor, and the
allow-listed stand-in for yacs' `CfgNode` (SimMIM's `config`) that reads a config as plain data.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitprobe.checkpoints import read_checkpoint, torch_is_safe
from vitprobe.errors import CheckpointError


def _global(module: str, name: str) -> bytes:
    """Protocol 0-2 GLOBAL opcode."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    """Protocol 0 STRING opcode (a repr that unpickles to `text`)."""
    return b"S" + repr(text).encode() + b"\n"


def _ustr(text: str) -> bytes:
    """Protocol 2 BINUNICODE opcode (what pickle writes for a str; torch's weights-only reader knows it)."""
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _touch(marker: Path) -> str:
    return f"touch {marker}"


def _open_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


class Reduces:
    """An object whose pickle calls `func(*args)` when unpickled (what a malicious checkpoint embeds)."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (self.func, self.args)


def _torch_zip(path: Path, payload: object) -> None:
    torch.save({"model": {"w": torch.ones(2)}, "payload": payload}, path)


def _replace_data_pkl(path: Path, data: bytes) -> None:
    """A real torch.save zip whose `data.pkl` is swapped for `data` (the attack hides in a valid archive)."""
    torch.save({"w": torch.ones(1)}, path)
    with zipfile.ZipFile(path) as src:
        entries = {info.filename: src.read(info.filename) for info in src.infolist()}
    name = next(n for n in entries if n.endswith("/data.pkl"))
    entries[name] = data
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dst:
        for filename, blob in entries.items():
            dst.writestr(filename, blob)


def _getattr_chain(marker: Path) -> bytes:
    """Protocol 2: builtins.getattr(builtins.__import__('os'), 'system')('touch ...') by GLOBAL + REDUCE."""
    return (
        b"\x80\x02"
        + _global("builtins", "getattr")
        + b"("
        + _global("builtins", "__import__")
        + b"(" + _ustr("os") + b"tR"  # __import__('os')
        + _ustr("system")
        + b"tR"  # getattr(os, 'system')
        + b"(" + _ustr(_touch(marker)) + b"tR"  # system('touch ...')
        + b"."
    )


# name -> writer(path, marker): each writes one file whose unpickling would create `marker`
VARIANTS: dict[str, Callable[[Path, Path], None]] = {
    "reduce-os-system": lambda p, m: _torch_zip(p, Reduces(os.system, _touch(m))),
    "reduce-eval": lambda p, m: _torch_zip(p, Reduces(eval, _open_code(m))),
    "reduce-exec": lambda p, m: _torch_zip(p, Reduces(exec, _open_code(m))),
    "reduce-subprocess": lambda p, m: _torch_zip(p, Reduces(subprocess.call, ["touch", str(m)])),
    "reduce-open": lambda p, m: _torch_zip(p, Reduces(open, str(m), "w")),
    "reduce-pathlib": lambda p, m: _torch_zip(p, Reduces(Path.touch, m)),
    "nested-deep-in-zip": lambda p, m: torch.save(
        {"model": {"blocks": [{"w": torch.ones(1), "meta": (1, [Reduces(os.system, _touch(m))])}]}}, p
    ),
    "legacy-torch-save": lambda p, m: torch.save(
        {"w": torch.ones(1), "x": Reduces(os.system, _touch(m))}, p, _use_new_zipfile_serialization=False
    ),
    "getattr-chain-protocol-2": lambda p, m: p.write_bytes(_getattr_chain(m)),
    "getattr-chain-in-zip": lambda p, m: _replace_data_pkl(p, _getattr_chain(m)),
    "protocol-0-global": lambda p, m: p.write_bytes(pickle.dumps(Reduces(os.system, _touch(m)), protocol=0)),
    "protocol-0-inst": lambda p, m: p.write_bytes(b"(" + _str(_touch(m)) + b"ios\nsystem\n."),
    "protocol-1-obj": lambda p, m: p.write_bytes(b"(" + _global("os", "system") + _str(_touch(m)) + b"o."),
    "protocol-2-global": lambda p, m: p.write_bytes(pickle.dumps({"x": Reduces(os.system, _touch(m))}, 2)),
    "protocol-4-stack-global": lambda p, m: p.write_bytes(pickle.dumps([Reduces(os.system, _touch(m))], 4)),
    "protocol-5-stack-global": lambda p, m: p.write_bytes(pickle.dumps([Reduces(os.system, _touch(m))], 5)),
    "stack-global-in-zip": lambda p, m: _replace_data_pkl(p, pickle.dumps(Reduces(os.system, _touch(m)), 4)),
    "cfgnode-disguise": lambda p, m: p.write_bytes(  # the allow-listed name, fed a payload as its argument
        b"\x80\x02" + _global("yacs.config", "CfgNode") + b"(" + _global("os", "system")
        + b"(" + _ustr(_touch(m)) + b"tRtR."
    ),
}

UNSAFE_LOADER = """
import pickle, sys, types, torch
yacs = types.ModuleType('yacs.config')  # for the CfgNode disguise: a real CfgNode is just a dict subclass
yacs.CfgNode = type('CfgNode', (dict,), {})
sys.modules['yacs'], sys.modules['yacs.config'] = types.ModuleType('yacs'), yacs
for path in sys.argv[1:]:
    try:
        if open(path, 'rb').read(2) == b'PK' or path.endswith('legacy-torch-save.pth'):
            torch.load(path, weights_only=False)
        else:
            pickle.load(open(path, 'rb'))
    except Exception:
        pass  # a payload runs during loading; what follows it may fail
"""


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every variant written twice: one copy proven live by an unsafe load in a child process (its marker
    appears), one kept for vitprobe (its marker must never appear)."""
    root = tmp_path_factory.mktemp("payloads")
    made: dict[str, tuple[Path, Path]] = {}
    live = []
    for name, write in VARIANTS.items():
        for copy in ("live", "test"):
            path, marker = root / f"{copy}-{name}.pth", root / f"{copy}-{name}.ran"
            write(path, marker)
            if copy == "live":
                live.append((name, path, marker))
            else:
                made[name] = (path, marker)
    env = {**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    subprocess.run([sys.executable, "-c", UNSAFE_LOADER, *(str(p) for _, p, _ in live)], env=env, check=True)
    dead = [name for name, _, marker in live if not marker.exists()]
    assert not dead, f"payloads that would not run even when loaded unsafely: {dead}"
    return made


def test_at_least_12_distinct_variants() -> None:
    assert len(VARIANTS) >= 12


@pytest.mark.parametrize("name", list(VARIANTS))
def test_malicious_pickle_is_refused_and_never_runs(
    payloads: dict[str, tuple[Path, Path]], name: str
) -> None:
    path, marker = payloads[name]
    if name == "cfgnode-disguise":  # refused at `os.system`, the global inside the allow-listed call
        with pytest.raises(CheckpointError, match="refused") as info:
            read_checkpoint(path)
        assert "os.system" in info.value.message or "posix" in info.value.message
    else:
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert str(path) in info.value.message and "\n" not in info.value.message
    assert not marker.exists(), f"{name}: the payload ran"


def test_cfgnode_called_with_arguments_builds_plain_data(tmp_path: Path) -> None:
    """The stand-in ignores whatever a pickle passes it: `CfgNode('rm -rf /')` unpickles to an empty dict."""
    call = _global("yacs.config", "CfgNode") + b"(" + _ustr("rm -rf /") + b"tR"
    path = tmp_path / "odd.pth"
    _replace_data_pkl(path, b"\x80\x02}(" + _ustr("config") + call + b"u.")
    got = read_checkpoint(path)
    assert got == {"config": OrderedDict()} and type(got["config"]) is OrderedDict


class FakeCfgNode(dict):
    """yacs.config.CfgNode as rbgirshick/yacs `yacs/config.py:63-109` defines its state: a dict subclass
    whose `__init__` sets four `__dict__` entries and has no `__reduce__`, so its pickle is
    GLOBAL yacs.config CfgNode / NEWOBJ / SETITEMS / BUILD, like a real SimMIM `config`."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__({k: FakeCfgNode(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
        self.__dict__["__immutable__"] = False
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__renamed_keys__"] = {}
        self.__dict__["__new_allowed__"] = False


@pytest.fixture
def yacs_module(monkeypatch: pytest.MonkeyPatch) -> type[FakeCfgNode]:
    """Pickle `FakeCfgNode` under the name `yacs.config.CfgNode` (yacs is not installed here)."""
    module = types.ModuleType("yacs.config")
    FakeCfgNode.__module__, FakeCfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = FakeCfgNode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    yield FakeCfgNode
    FakeCfgNode.__module__, FakeCfgNode.__qualname__ = __name__, "FakeCfgNode"


def test_simmim_config_is_read_as_plain_data(
    tmp_path: Path, yacs_module: type[FakeCfgNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {"MODEL": {"TYPE": "vit", "VIT": {"DEPTH": 12, "USE_SHARED_RPB": True}}, "AMP_OPT_LEVEL": ""}
    path = tmp_path / "simmim.pth"
    torch.save({"model": {"w": torch.ones(2)}, "config": yacs_module(values), "epoch": 799}, path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert _global("yacs.config", "CfgNode") in data and b"__deprecated_keys__" in data  # the real opcodes
    monkeypatch.delitem(sys.modules, "yacs.config")  # the reader neither needs nor imports yacs
    got = read_checkpoint(path)
    assert got["config"] == values and type(got["config"]) is OrderedDict
    assert type(got["config"]["MODEL"]["VIT"]) is OrderedDict
    assert torch.equal(got["model"]["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("version", "safe"),
    [("2.2.0", False), ("2.5.1", False), ("2.9.1", False), ("2.10.0", True), ("2.14.1+cu130", True)],
)
def test_torch_version_floor(version: str, safe: bool) -> None:
    assert torch_is_safe(version) is safe


def test_pickles_are_refused_under_a_vulnerable_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pth")
    save_file({"w": torch.ones(1)}, tmp_path / "w.safetensors")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match="CVE-2025-32434") as info:
        read_checkpoint(tmp_path / "w.pth")
    assert "CVE-2026-24747" in info.value.message and "torch>=2.10" in (info.value.hint or "")
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["w"], torch.ones(1))  # no pickle: fine


def test_argparse_namespace_still_loads(tmp_path: Path) -> None:
    args = argparse.Namespace(arch="vit_base", lr=1.5e-4)
    torch.save({"args": args, "model": {"w": torch.ones(1)}}, tmp_path / "c.pth")
    assert read_checkpoint(tmp_path / "c.pth")["args"] == args
