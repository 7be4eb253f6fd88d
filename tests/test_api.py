"""The public API as docs/api.md shows it: the doc's code blocks run, in order, in an empty folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102 - our own doc
    # what the doc promises, checked on what it made
    import vitprobe as vp

    assert namespace["model"].training  # the training loop's model was given back in training mode
    assert (tmp_path / "runs" / "test-vit" / "results.json").is_file() and (
        tmp_path / "report.html"
    ).is_file()
    results = vp.load_results(tmp_path / "runs" / "test-vit" / "results.json")
    assert set(results.readouts) == {"cls", "mean", "abmilp"}
    run = namespace["run"]
    assert set(run.flagged) == {n for n, r in run.readouts.items() if r.verdict != "ok"}


def test_import_is_lazy_and_torch_free() -> None:
    code = "import sys, vitprobe as vp; print('torch' in sys.modules, callable(vp.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]  # `vp.load` resolves without importing torch


def test_public_names_survive_importing_every_module() -> None:
    """Importing vitprobe.extract binds `vitprobe.extract` to the module: no API name may be a module's."""
    import importlib
    import pkgutil

    import vitprobe as vp

    for info in pkgutil.walk_packages(vp.__path__, "vitprobe."):
        if info.name != "vitprobe.__main__":
            importlib.import_module(info.name)
    assert set(vp.__all__) - {"__version__"} == set(vp._EXPORTS)
    for name in vp._EXPORTS:
        value = getattr(vp, name)
        assert not isinstance(value, type(vp)), f"vp.{name} is a module"


def test_a_module_keeps_its_mode_and_its_weights_name_it() -> None:
    import timm
    import torch

    import vitprobe as vp

    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    model.train()
    first = vp.load(model, name="mine")
    assert first.report.model == "mine" and first.report.sha256 and not first.report.random_init
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1e-3)
    assert vp.load(model).report.sha256 != first.report.sha256  # another epoch's weights, another identity
    wrapped = torch.nn.parallel.DataParallel(model)  # .module unwrapped
    assert vp.load(wrapped).model is model
    with pytest.raises(vp.VitprobeError, match="has no `forward_intermediates`"):
        vp.load(torch.nn.Linear(2, 2))
    with pytest.raises(vp.VitprobeError, match="does not say its architecture"):
        vp.load("weights.pth")
