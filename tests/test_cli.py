"""The operator CLI: version, the demo command, one-line errors, and the formatters."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result
from pydantic import BaseModel
from rich.console import Console

from orchestra import GraphValidationError, RunOutcome, RunStatus, Usage, __version__
from orchestra.cli import (
    ProgressView,
    format_duration,
    format_error,
    format_event,
    format_nodes,
    format_state,
    main,
    summary_panel,
)
from orchestra.errors import InputValidationError, NodeError
from orchestra.events import (
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)

FAST = ["demo", "--plain", "--speed", "0"]


def invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env or None)


def render(renderable: Any, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def table_rows(text: str) -> dict[int, str]:
    """Return a rendered table's rows by step, whitespace collapsed."""
    rows = [line.split() for line in text.splitlines()]
    return {int(row[0]): " ".join(row) for row in rows if row and row[0].isdigit()}


# -- commands -------------------------------------------------------------------------------


def test_version_prints_name_and_version() -> None:
    """`orchestra --version` prints the package version."""
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"orchestra {__version__}\n"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_plain_completes(backend: str) -> None:
    """The demo runs to completion on both backends, one line per event, then its state."""
    result = invoke(*FAST, "--backend", backend)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run_started ")
    finished = next(line for line in lines if line.startswith("run_finished "))
    assert "status=completed steps=7" in finished
    assert any(line.startswith("node_retried ") and "node=publish" in line for line in lines)
    assert 'state           published="reports/structured-concurrency-r2.md"' in lines
    assert result.stderr == ""


def test_demo_is_plain_when_stdout_is_not_a_terminal() -> None:
    """Without --plain, a non-terminal stdout still gets plain lines, not a live table."""
    result = invoke("demo", "--speed", "0")
    assert result.exit_code == 0, result.output
    assert "run_finished    status=completed" in result.stdout
    assert "\x1b[" not in result.stdout


def test_demo_speed_is_read_from_the_environment() -> None:
    """ORCHESTRA_DEMO_SPEED=0 makes the demo skip its pauses."""
    result = invoke("demo", "--plain", ORCHESTRA_DEMO_SPEED="0")
    assert result.exit_code == 0, result.output
    assert "delay=0.00s" in result.stdout


def test_demo_failed_run_exits_1_with_one_line() -> None:
    """A run that fails exits with 1 and says why in one stderr line naming step and node."""
    result = invoke(*FAST, "--failures", "3")
    assert result.exit_code == 1
    assert "run_finished    status=failed steps=6" in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: run ")
    assert "step 7, node 'publish': node failed after 3 attempts: ConnectionError" in line


def test_demo_invalid_input_exits_1_with_one_line() -> None:
    """Input the state model refuses is one error line, before anything runs."""
    result = invoke(*FAST, "--topic", "")
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: input does not fit state model Report: topic")


def test_unexpected_error_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug surfaces as one line on stderr, exit code 1, and no traceback."""

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("orchestra.cli.build_app", broken)
    result = invoke(*FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: internal error: RuntimeError: boom (--verbose shows the traceback)"
    ]


def test_error_from_a_task_group_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An orchestra error wrapped in an exception group still prints as its own one line."""

    def broken(**kwargs: Any) -> Any:
        raise ExceptionGroup("task group", [InputValidationError("Report", "topic: missing")])

    monkeypatch.setattr("orchestra.cli.build_app", broken)
    result = invoke(*FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: input does not fit state model Report: topic: missing"
    ]


def test_ctrl_c_in_several_tasks_aborts_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C seen by several tasks (as trio reports it) is a plain abort, no traceback."""

    def interrupted(**kwargs: Any) -> Any:
        raise BaseExceptionGroup("task group", [KeyboardInterrupt(), KeyboardInterrupt()])

    monkeypatch.setattr("orchestra.cli.build_app", interrupted)
    result = invoke(*FAST)
    assert result.exit_code == 1
    assert result.stderr.strip() == "Aborted!"


def test_usage_error_exits_2() -> None:
    """A bad option value is a usage error (exit code 2)."""
    result = invoke("demo", "--speed", "-1")
    assert result.exit_code == 2
    assert "Invalid value for '--speed'" in result.stderr


def test_db_option_is_read_from_the_environment(tmp_path: Path) -> None:
    """--db defaults to $ORCHESTRA_DB; the option on the command line wins."""
    db = tmp_path / "runs.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCHESTRA_DB", str(db))
        assert main.make_context("orchestra", ["demo"]).params["db"] == db
        other = main.make_context("orchestra", ["--db", "other.db", "demo"])
        assert other.params["db"] == Path("other.db")


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


# -- formatters -----------------------------------------------------------------------------


class State(BaseModel):
    topic: str = "t"
    notes: list[str] = []


def outcome(status: RunStatus = RunStatus.COMPLETED, **kwargs: Any) -> RunOutcome[State]:
    return RunOutcome(
        run_id="r1",
        status=status,
        state=State(notes=["a", "b"]),
        steps=3,
        usage=Usage(steps=3, wall_seconds=1.5),
        **kwargs,
    )


def test_format_event_node_started() -> None:
    """A node event shows step and node; task 0 is left out, other tasks shown."""
    first = NodeStarted(run_id="r1", at=1.0, step=2, node="research", task=0)
    second = NodeStarted(run_id="r1", at=1.0, step=2, node="research", task=1)
    assert format_event(first) == "node_started    step=2 node=research"
    assert format_event(second) == "node_started    step=2 node=research task=1"


def test_format_event_run_started_names_the_run() -> None:
    """run_started carries the run id; other lines leave it out."""
    event = RunStarted(run_id="r1", at=1.0, graph="demo", step=0)
    assert format_event(event) == "run_started     run=r1 graph=demo step=0"


def test_format_event_step_committed() -> None:
    """Tuples are comma-joined, durations in seconds, empty fields left out."""
    event = StepCommitted(
        run_id="r1",
        at=1.0,
        step=2,
        nodes=("research[0]", "research[1]"),
        changed=("findings",),
        next=(),
        duration=0.6012,
    )
    assert format_event(event) == (
        "step_committed  step=2 nodes=research[0],research[1] changed=findings duration=0.60s"
    )


def test_format_event_quotes_text_with_spaces() -> None:
    """Values with spaces are JSON-quoted so each line stays one key=value list."""
    event = NodeRetried(
        run_id="r1", at=1.0, step=7, node="p", task=0, attempt=1, error="E: a b", delay=0.3
    )
    assert format_event(event) == (
        'node_retried    step=7 node=p attempt=1 error="E: a b" delay=0.30s'
    )


def test_format_event_run_finished_shows_wall_time() -> None:
    """run_finished adds the run's wall time from its outcome."""
    event = RunFinished(run_id="r1", at=1.0, status="completed", steps=3, outcome=outcome())
    assert format_event(event) == "run_finished    status=completed steps=3 wall=1.50s"


def test_format_state_one_json_line_per_field() -> None:
    """The final state prints one line per field, values as JSON."""
    assert format_state(State(notes=["a b"])) == [
        'state           topic="t"',
        'state           notes=["a b"]',
    ]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (("plan",), "plan"),
        (("research[0]", "research[1]", "research[2]"), "research \u00d73"),
        (("a", "b[0]", "b[1]", "c"), "a, b \u00d72, c"),
        ((), ""),
    ],
)
def test_format_nodes_condenses_fan_out(labels: tuple[str, ...], expected: str) -> None:
    """A node's Send tasks are counted, not listed."""
    assert format_nodes(labels) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.04, "0.04s"), (12.345, "12.35s"), (187, "3m 07s"), (7500, "2h 05m")],
)
def test_format_duration(seconds: float, expected: str) -> None:
    """Durations read naturally at every scale."""
    assert format_duration(seconds) == expected


def test_format_error_folds_validation_problems_into_one_line() -> None:
    """Every compile problem is in the one line."""
    error = GraphValidationError("g", ["node 'a' is unreachable", "START has no edge"])
    assert format_error(error) == (
        "graph 'g' has 2 problems: node 'a' is unreachable; START has no edge"
    )


def test_format_error_names_foreign_exceptions() -> None:
    """Errors from outside orchestra keep their type name."""
    assert format_error(ValueError("bad\nvalue")) == "ValueError: bad value"


def test_progress_view_shows_steps_and_the_one_in_flight() -> None:
    """Committed steps show done with time and changes; the next one shows running."""
    now = [100.0]
    view = ProgressView(clock=lambda: now[0])
    view.update(RunStarted(run_id="r1", at=1.0, graph="demo", step=0))
    view.update(NodeStarted(run_id="r1", at=1.0, step=1, node="plan", task=0))
    view.update(
        StepCommitted(
            run_id="r1",
            at=1.0,
            step=1,
            nodes=("plan",),
            changed=("topic",),
            next=("research[0]", "research[1]"),
            duration=0.15,
        )
    )
    now[0] = 100.5
    text = render(view)
    assert "run r1 · graph demo" in text
    rows = table_rows(text)
    assert rows[1] == "1 plan ✓ done 0.15s topic"
    assert rows[2].startswith("2 research \u00d72 ")
    assert rows[2].endswith(" running 0.50s")


def test_progress_view_marks_retries_and_failures() -> None:
    """A retried step says so; a step whose node failed shows failed."""
    view = ProgressView(clock=lambda: 0.0)
    view.update(RunStarted(run_id="r1", at=1.0, graph="demo", step=0))
    view.update(
        NodeRetried(run_id="r1", at=1.0, step=1, node="p", task=0, attempt=1, error="E", delay=0)
    )
    view.update(
        StepCommitted(
            run_id="r1", at=1.0, step=1, nodes=("p",), changed=(), next=("q",), duration=0.1
        )
    )
    view.update(NodeStarted(run_id="r1", at=1.0, step=2, node="q", task=0))
    failed = NodeFinished(
        run_id="r1", at=1.0, step=2, node="q", task=0, duration=0.1, attempts=1, error="boom"
    )
    view.update(failed)
    view.update(RunFinished(run_id="r1", at=1.0, status="failed", steps=1))
    text = render(view)
    assert "✓ done (1 retry)" in text
    assert "✗ failed" in text
    assert view.rows[2].nodes == ["q"]


def test_progress_view_marks_a_step_a_safeguard_stopped() -> None:
    """A step that never ran because a budget stopped the run shows the run's status."""
    view = ProgressView(clock=lambda: 0.0)
    view.update(RunStarted(run_id="r1", at=1.0, graph="demo", step=0))
    view.update(
        StepCommitted(
            run_id="r1", at=1.0, step=1, nodes=("p",), changed=(), next=("p",), duration=0.1
        )
    )
    view.update(RunFinished(run_id="r1", at=1.0, status="budget_exceeded", steps=1))
    assert view.rows[2].status == "budget_exceeded"
    assert "budget_exceeded" in render(view)


def test_summary_panel_shows_status_steps_and_state() -> None:
    """The summary names the run, its status, steps, wall time and every state field."""
    text = render(summary_panel(outcome()))
    assert "run r1" in text
    for part in ("status     completed", "steps      3", "wall time  1.50s"):
        assert part in text
    for part in ("topic  't'", "notes  ['a', 'b']"):
        assert part in text


def test_summary_panel_shows_the_error_of_a_failed_run() -> None:
    """A failed run's panel carries its error and the nodes that were next."""
    error = NodeError(run_id="r1", step=4, node="p", attempts=3, error=ConnectionError("down"))
    text = render(summary_panel(outcome(RunStatus.FAILED, error=error, next=("p",))))
    assert "failed" in text
    assert "run r1, step 4, node 'p': node failed after 3 attempts: ConnectionError: down" in text
