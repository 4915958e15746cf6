"""The CLI entry point: version, one-line errors (unexpected, from a task group, Ctrl-C), usage
errors, logging, and a light `import orchestra`."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import structlog

from cli.support import FAST, invoke
from orchestra import __version__
from orchestra.errors import InputValidationError

pytestmark = pytest.mark.usefixtures("_isolated")


# -- commands -------------------------------------------------------------------------------


def test_version_prints_name_and_version() -> None:
    """`orchestra --version` prints the package version."""
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"orchestra {__version__}\n"


def test_unexpected_error_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug surfaces as one line on stderr, exit code 1, and no traceback."""

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("orchestra.cli.demo.build_app", broken)
    result = invoke(*FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: internal error: RuntimeError: boom (--verbose shows the traceback)"
    ]


def test_error_from_a_task_group_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An orchestra error wrapped in an exception group still prints as its own one line."""

    def broken(**kwargs: Any) -> Any:
        raise ExceptionGroup("task group", [InputValidationError("Report", "topic: missing")])

    monkeypatch.setattr("orchestra.cli.demo.build_app", broken)
    result = invoke(*FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: input does not fit state model Report: topic: missing"
    ]


def test_ctrl_c_in_several_tasks_aborts_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C seen by several tasks (as trio reports it) is a plain abort, no traceback."""

    def interrupted(**kwargs: Any) -> Any:
        raise BaseExceptionGroup("task group", [KeyboardInterrupt(), KeyboardInterrupt()])

    monkeypatch.setattr("orchestra.cli.demo.build_app", interrupted)
    result = invoke(*FAST)
    assert result.exit_code == 1
    assert result.stderr.strip() == "Aborted!"


def test_usage_error_exits_2() -> None:
    """A bad option value is a usage error (exit code 2)."""
    result = invoke("demo", "--speed", "-1")
    assert result.exit_code == 2
    assert "Invalid value for '--speed'" in result.stderr


def test_logs_are_quiet_by_default_and_verbose_shows_debug() -> None:
    """Debug events stay off stderr unless --verbose, which logs them as JSON lines."""
    assert invoke(*FAST).stderr == ""
    result = invoke("--verbose", *FAST)
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"run_started", "node_started", "step_committed", "run_finished"} <= {
        r["event"] for r in records
    }
    assert any(r["event"] == "angle_researched" and r["level"] == "debug" for r in records)


def test_cli_restores_the_logging_configuration() -> None:
    """Invoking the CLI in-process leaves structlog configured as it was."""
    before = structlog.get_config()
    invoke("--verbose", *FAST)
    assert structlog.get_config() == before


def test_import_orchestra_does_not_load_the_cli() -> None:
    """`import orchestra` loads neither the CLI nor click."""
    code = "import sys, orchestra; print(sorted({'click', 'orchestra.cli'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
