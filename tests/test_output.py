"""The output layer: one JSON object on stdout, diagnostics on stderr, no hard wrap outside a terminal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_json_result_is_one_object_and_diagnostics_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    from vitprobe.output import Output

    out = Output("json")
    out.info("reading")
    out.warn("a warning")
    out.result({"top1": 0.5}, human=lambda console: console.print("not in json mode"))
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"top1": 0.5}
    assert "reading" in captured.err and "warning: a warning" in captured.err
    with pytest.raises(AssertionError, match="twice"):
        out.result({})
    with pytest.raises(ValueError):
        Output("json").result({"x": float("nan")})  # strict JSON


def test_long_lines_are_not_wrapped_at_80_columns_in_logs() -> None:
    code = (
        "from vitprobe.output import Output; o = Output('human'); o.warn('x' * 150 + ' end');"
        "o.result({}, human=lambda c: c.print('y' * 150 + ' end'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "warning: " + "x" * 150 + " end"  # one line: piped, not a terminal
    assert done.stdout.strip() == "y" * 150 + " end"


def test_a_library_error_in_json_mode_is_a_json_object_too(tmp_path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from vitprobe.cli import app

    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "none.safetensors"), "--cache", str(tmp_path), "--format", "json"]
    )
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "ProbeError" and "not found" in error["message"] and error["hint"]
    assert result.stderr.startswith("error: ")
