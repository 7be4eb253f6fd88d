"""CLI wiring: help is fast and torch-free, errors are formatted in one place."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from vitprobe.cli import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "data", "extract", "probe", "knn", "analyze", "report", "demo"):
        assert command in result.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from vitprobe.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "vitprobe", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("vitprobe ")
