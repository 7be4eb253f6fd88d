"""The output layer: one JSON object on stdout, diagnostics on stderr, no hard wrap outside a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

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


# ------------------------------------------------------------------------------------------------------------
# Every command honours --format json: one object on stdout, diagnostics on stderr


def _leaf_commands() -> list[str]:
    """Every command of the CLI, as typed ("models list", "extract", ...)."""
    import typer

    from vitprobe.cli import app

    def walk(cmd: Any, prefix: str) -> list[str]:  # typer's own click (typer._click) or click's
        if hasattr(cmd, "commands"):
            return [n for name, sub in cmd.commands.items() for n in walk(sub, f"{prefix} {name}".strip())]
        return [prefix]

    return walk(typer.main.get_command(app), "")


def _format_choices(command: str) -> list[str]:
    import typer

    from vitprobe.cli import app

    cmd = typer.main.get_command(app)
    for part in command.split():
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    option = next(p for p in cmd.params if "--format" in getattr(p, "opts", ()))
    return [m.value for m in option.type_descriptor.annotation]  # the option's str Enum


def test_every_command_has_a_format_option_with_json() -> None:
    commands = _leaf_commands()
    assert len(commands) == 16 and "analyze localization" in commands and "data make-synthetic" in commands
    for command in commands:
        choices = _format_choices(command)
        assert "json" in choices, command
        if command != "report":  # report's --format is the document's: html, md, json, github, csv, latex
            assert choices == ["human", "json"], command


# `run` and `demo` are run with --format json by tests/test_study.py and tests/test_demo.py
ELSEWHERE = {"run": "test_study.py", "demo": "test_demo.py"}


@pytest.fixture(scope="module")
def json_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, str]]:
    """Each command run once with --format json on the session's real study: command -> (stdout, stderr)."""
    from typer.testing import CliRunner

    from report_fixtures import session_runs
    from vitprobe.cli import app

    real = session_runs(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("json")
    train, test = (str(real.caches["ckpt-a"][s]) for s in ("train", "test"))
    run = real.runs["ckpt-a"]
    cache = ["--cache", test, "--limit", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    invocations = {
        "models list": ["models", "list"],
        "models show": ["models", "show", "timm:test_vit", "--random-init"],
        "data kinds": ["data", "kinds"],
        "data show": ["data", "show", real.data],
        "data check": ["data", "check", real.data, "--split", "test", "--workers", "0"],
        "data make-synthetic": ["data", "make-synthetic", str(tmp / "needles"), "--n", "8", "--classes", "2",
                                "--size", "32"],
        "extract": ["extract", "--model", "timm:test_vit", "--checkpoint", str(real.checkpoints["ckpt-a"]),
                    "--data", real.data, "--split", "test", "--limit", "6", "--batch-size", "6",
                    "--workers", "0", "--device", "cpu", "--out", str(tmp / "cache")],
        "probe": ["probe", "--train", train, "--test", test, "--out", str(tmp / "probe"), "--pool", "cls",
                  "--epochs", "1", "--min-steps", "0", "--batch-size", "8", "--lr-grid", "0.1",
                  "--weight-decay", "0", "--device", "cpu"],
        "predict": ["predict", str(run / "heads" / "cls.safetensors"), "--cache", test, "--device", "cpu"],
        "knn": ["knn", "--train", train, "--test", test, "--k", "5", "--out", str(tmp / "knn"),
                "--device", "cpu"],
        "analyze attention": ["analyze", "attention", *cache, "--maps", "0", "--out", str(tmp / "att")],
        "analyze frequency": ["analyze", "frequency", *cache, "--out", str(tmp / "freq")],
        "analyze localization": ["analyze", "localization", *cache, "--figures", "0",
                                 "--out", str(tmp / "loc")],
        "report": ["report", str(real.runs["ckpt-a"]), str(real.runs["ckpt-b"]), "--format", "json"],
    }  # fmt: skip
    runner = CliRunner()
    results = {}
    for command, args in invocations.items():
        if "--format" not in args:
            args = [*args, "--format", "json"]
        done = runner.invoke(app, args)
        assert done.exit_code == 0, (command, done.output)
        results[command] = (json.loads(done.stdout), done.stderr)  # the whole of stdout is one object
    return results


def test_every_command_prints_one_json_object(json_outputs: dict[str, tuple[dict, str]]) -> None:
    assert set(json_outputs) | set(ELSEWHERE) == set(_leaf_commands())
    for command, (payload, _) in json_outputs.items():
        assert isinstance(payload, dict) and payload, command
    out = {command: payload for command, (payload, _) in json_outputs.items()}
    assert [p["name"] for p in out["models list"]["presets"]][:2] == ["mae-b16", "mae-l16"]
    assert out["models show"]["random_init"] is True and out["models show"]["depth"] == 6
    assert "cub" in [k["kind"] for k in out["data kinds"]["kinds"]]
    assert out["data show"]["splits"]["test"]["num_images"] == 24
    assert out["data check"]["ok"] is True and out["data check"]["splits"]["test"]["num_images"] == 24
    assert out["data make-synthetic"]["config"]["n"] == 8
    assert out["extract"]["num_samples"] == 6 and out["extract"]["skipped"] is False
    assert set(out["probe"]["readouts"]) == {"cls"} and out["probe"]["kind"] == "probe"
    assert 0.0 <= out["predict"]["top1"] <= 1.0 and out["predict"]["num_samples"] == 24
    assert out["knn"]["knn"]["5"]["k_used"] == 5 and out["knn"]["kind"] == "knn"
    for name in ("attention", "frequency", "localization"):
        payload = out[f"analyze {name}"]
        assert payload["kind"] == name and payload["written"][0].endswith(f"{name}.json")
    assert out["report"]["format"] == "vitprobe-report" and len(out["report"]["runs"]) == 2


def test_diagnostics_go_to_stderr(json_outputs: dict[str, tuple[dict, str]]) -> None:
    stderr = {command: err for command, (_, err) in json_outputs.items()}
    assert "random weights" in stderr["models show"]
    assert "wrote" in stderr["analyze attention"] and "results:" in stderr["probe"]
    assert "done" in stderr["extract"]
