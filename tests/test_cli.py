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
    for command in (
        "models",
        "data",
        "extract",
        "probe",
        "predict",
        "knn",
        "analyze",
        "report",
        "run",
        "demo",
    ):
        assert command in result.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from vitprobe.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "vitprobe", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("vitprobe ")


def test_version_option() -> None:
    from vitprobe import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"vitprobe {__version__}"


def _missing_cub_error(tmp_path, env: dict[str, str] | None = None):
    return runner.invoke(app, ["data", "show", f"cub:{tmp_path / 'nowhere'}"], env=env)


def test_vitprobe_error_is_one_line_with_the_fix_and_exit_code_1(tmp_path) -> None:
    result = _missing_cub_error(tmp_path)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert str(tmp_path / "nowhere") in lines[0]
    assert "— fix: " in lines[0]
    assert "Traceback" not in result.output


def test_debug_env_shows_the_traceback(tmp_path) -> None:
    result = _missing_cub_error(tmp_path, env={"VITPROBE_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.output
    assert "DatasetError" in result.output
    assert "error: " in result.output


def test_only_rank_zero_prints_under_torchrun(tmp_path) -> None:
    result = _missing_cub_error(tmp_path, env={"RANK": "1"})
    assert result.exit_code == 1
    assert result.output.strip() == ""


def test_error_messages_keep_brackets_literal(tmp_path) -> None:
    from vitprobe.cli import format_error
    from vitprobe.errors import VitprobeError

    text = format_error(VitprobeError("bad [cls] token in [red]x", "use --pool mean"))
    assert "\\[cls]" in text and "\\[red]x" in text  # escaped, so rich prints them as written


def test_error_lines_are_not_wrapped_in_logs(tmp_path) -> None:  # noqa: ANN001
    long = tmp_path / ("x" * 120)
    cmd = [sys.executable, "-m", "vitprobe", "data", "show", f"cub:{long}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(long) in lines[0]  # one line however long, when stderr is not a terminal
