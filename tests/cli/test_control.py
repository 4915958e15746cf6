"""The operator CLI: version, the demo command, one-line errors, and the formatters."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from apps import cli_app
from click.testing import CliRunner, Result
from pydantic import BaseModel
from rich.console import Console

from orchestra import GraphValidationError, RunOutcome, RunStatus, Usage, __version__
from orchestra.cli import main
from orchestra.cli.format import (
    ProgressView,
    format_age,
    format_ago,
    format_bytes,
    format_duration,
    format_error,
    format_event,
    format_nodes,
    format_resumed,
    format_state,
    parse_duration,
    summary_panel,
)
from orchestra.cli.history import (
    checkpoint_info,
    checkpoint_json,
    checkpoints_table,
    timeline,
    timeline_table,
)
from orchestra.cli.loading import AppLoadError, load_app, resume_store
from orchestra.cli.records import (
    format_abort,
    format_owner,
    format_prune,
    format_run_counts,
    format_usage,
    owner_gone,
    run_json,
    run_status,
    run_summary,
    runs_table,
)
from orchestra.errors import (
    InputValidationError,
    NodeError,
    RunNotFoundError,
    StopAllActiveError,
)
from orchestra.events import (
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from orchestra.store import CheckpointRow, EventRow, RunRecord, SQLiteStore

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


def test_demo_checkpoints_into_the_default_database(tmp_path: Path) -> None:
    """Without --db the demo run is stored in ./orchestra-demo.db, where `runs` finds it."""
    result = invoke(*FAST)
    assert result.exit_code == 0, result.output
    assert "orchestra --db orchestra-demo.db show" in result.stdout
    listed = CliRunner().invoke(main, ["--db", "orchestra-demo.db", "runs", "--json"])
    assert listed.exit_code == 0, listed.output
    (run,) = json.loads(listed.stdout)
    assert run["status"] == "completed"
    assert run["graph"] == "demo"


def test_demo_no_store_writes_no_database(tmp_path: Path) -> None:
    """`demo --no-store` runs without checkpoints and leaves no file behind."""
    result = invoke(*FAST, "--no-store")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "orchestra-demo.db").exists()
    assert "checkpointed" not in result.stdout


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


# -- the operator commands on a run database --------------------------------------------------

RUN_COMMANDS = [
    ["runs"],
    ["show", "r"],
    ["resume", "r"],
    ["abort", "r", "--reason", "x"],
    ["stop-all", "--yes"],
    ["checkpoints", "r"],
    ["fork", "r", "--step", "1"],
    ["prune", "--older-than", "1d", "--yes"],
    ["db", "check"],
]


def cli(db: Path, *args: str, input: str | None = None) -> Result:
    """Invoke the CLI on ``db`` (ORCHESTRA_DB unset, so only --db counts)."""
    return CliRunner().invoke(
        main, ["--db", str(db), *args], input=input, env={"ORCHESTRA_DB": None}
    )


async def start(db: Path, run_id: str | None = None, **input: Any) -> RunOutcome[Any]:
    """Run the test graph on ``db`` to its end (on the current async backend)."""
    store = cli_app.store_at(str(db))
    try:
        return await cli_app.app.with_store(store).run(input, run_id=run_id)
    finally:
        await store.aclose()


def start_sync(db: Path, run_id: str | None = None, **input: Any) -> RunOutcome[Any]:
    return anyio.run(lambda: start(db, run_id, **input))


async def record_of(db: Path, run_id: str) -> RunRecord:
    store = cli_app.store_at(str(db))
    try:
        return await store.get_run(run_id)
    finally:
        await store.aclose()


def load_state(db: Path, run_id: str) -> Any:
    async def load() -> Any:
        store = cli_app.store_at(str(db))
        try:
            return await cli_app.app.with_store(store).load_state(run_id)
        finally:
            await store.aclose()

    return anyio.run(load)


def only_line(result: Result) -> str:
    (line,) = result.stderr.splitlines()
    return line


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
def filled(db: Path) -> Path:
    """A database with a completed run ("done", retried once) and a failed one ("failed")."""
    assert start_sync(db, "done", limit=3, flaky_at=2).status is RunStatus.COMPLETED
    assert start_sync(db, "failed", limit=3, fail_at=2).status is RunStatus.FAILED
    return db


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forget which ticks failed once; `orchestra resume` puts the app's directory on
    sys.path: keep the test process clean; `orchestra demo` writes ./orchestra-demo.db:
    run in a temporary directory."""
    monkeypatch.setattr(cli_app, "_failed", set())
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_run_commands_need_a_database(command: list[str]) -> None:
    """Without --db or ORCHESTRA_DB every run command says so in one line, exit code 1."""
    result = CliRunner().invoke(main, command, env={"ORCHESTRA_DB": None})
    assert result.exit_code == 1
    assert only_line(result) == "Error: no run database: pass --db PATH or set ORCHESTRA_DB"


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_run_commands_refuse_a_missing_database_file(db: Path, command: list[str]) -> None:
    """A --db path with no file is an error, not a new empty database."""
    result = cli(db, *command)
    assert result.exit_code == 1
    assert only_line(result).startswith(f"Error: {db}: no such database")
    assert not db.exists()


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_run_commands_have_help(command: list[str]) -> None:
    """Every command explains itself with --help."""
    result = CliRunner().invoke(main, [*command[: 2 if command[0] == "db" else 1], "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: main {' '.join(command[:1])}")


def test_a_file_that_is_not_a_database_is_one_line(db: Path) -> None:
    """A foreign file is named in one error line, no traceback."""
    db.write_text("hello")
    result = cli(db, "runs")
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: {db}: not a SQLite database (or it is encrypted or corrupted)"
    )


def test_runs_lists_runs_newest_first(filled: Path) -> None:
    """`runs` shows id, graph, status and step of every run, newest first."""
    result = cli(filled, "runs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "run", "id", "graph", "status", "step", "age", "updated", "owner", "/", "lease",
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["failed", "count", "failed", "3"]
    assert lines[3].split()[:4] == ["done", "count", "completed", "5"]
    assert result.stderr == ""


def test_runs_filters_by_status_and_limits(filled: Path) -> None:
    """--status keeps the runs with that status; --limit says when more were left out."""
    result = cli(filled, "runs", "--status", "completed")
    assert [line.split()[0] for line in result.stdout.splitlines()[2:]] == ["done"]
    result = cli(filled, "runs", "--limit", "1")
    assert "failed" in result.stdout
    assert " done " not in result.stdout
    assert result.stdout.splitlines()[-1] == "(newest 1 shown; --limit shows more)"
    result = cli(filled, "runs", "--status", "aborted")
    assert result.stdout == f"no runs with status aborted in {filled}\n"


def test_runs_refuses_an_unknown_status(filled: Path) -> None:
    """A status that does not exist is a usage error."""
    result = cli(filled, "runs", "--status", "done")
    assert result.exit_code == 2
    assert "Invalid value for '--status'" in result.stderr


def test_runs_json_is_machine_readable(filled: Path) -> None:
    """--json prints the stored records plus their lease state."""
    result = cli(filled, "runs", "--json")
    records = json.loads(result.stdout)
    assert [r["run_id"] for r in records] == ["failed", "done"]
    failed = records[0]
    assert failed["status"] == "failed"
    assert failed["app_ref"] == "apps.cli_app:app"
    assert failed["error"].startswith("run failed, step 4, node 'tick': node failed")
    assert (failed["lease"], failed["stale"], failed["owner_gone"]) == (None, False, False)


def test_show_summarizes_a_run_and_its_steps(filled: Path) -> None:
    """`show` gives status, app and usage, then one timeline row per step with its changes."""
    result = cli(filled, "show", "done")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for fact in ("run      done", "graph    count (structure ", "status   completed", "step     5"):
        assert fact in text
    assert "app      apps.cli_app:app" in text
    assert "usage    5 steps, 6 tasks, wall " in text
    rows = [line.split()[1:] for line in text.splitlines() if line[:2].isdigit()]
    assert rows[0] == ["0", "run", "started", "next:", "plan"]
    assert rows[2][:3] == ["2", "work", "\u00d72"]
    assert rows[2][-1] == "work"
    assert rows[3][-2:] == ["log,", "n"]
    retried = "tick retried after attempt 1: ConnectionError: tick 2 lost its connection"
    assert " ".join(rows[4]).endswith(retried)
    assert rows[-1] == ["5", "run", "completed"]


def test_show_a_failed_run_names_its_error_and_next_node(filled: Path) -> None:
    """A failed run shows its error and the node it would run next."""
    text = cli(filled, "show", "failed").stdout
    assert (
        "error    run failed, step 4, node 'tick': node failed: RuntimeError: tick 2 broke" in text
    )
    assert "next     tick" in text
    assert "run failed" in text.splitlines()[-1]


def test_show_accepts_a_unique_prefix(filled: Path) -> None:
    """A run id can be shortened to a unique prefix; an ambiguous one is refused."""
    assert "status   failed" in cli(filled, "show", "fa").stdout
    start_sync(filled, "fable", limit=1)
    result = cli(filled, "show", "fa")
    assert result.exit_code == 1
    assert only_line(result) == (
        "Error: run id 'fa' is ambiguous: 2 runs start with it (fable, failed)"
    )


def test_show_unknown_run_is_one_line(filled: Path) -> None:
    """An unknown run id is one error line."""
    result = cli(filled, "show", "nope")
    assert result.exit_code == 1
    assert only_line(result) == "Error: run nope not found"


def test_show_json_has_the_record_timeline_and_events(filled: Path) -> None:
    """--json prints the run, the condensed timeline and the raw events."""
    data = json.loads(cli(filled, "show", "done", "--json").stdout)
    assert data["run"]["status"] == "completed"
    assert [e["step"] for e in data["timeline"]] == [0, 1, 2, 3, 4, 5, 5]
    kinds = [e["kind"] for e in data["events"]]
    assert kinds[0] == "run_started"
    assert kinds[-1] == "run_finished"
    assert "node_retried" in kinds
    assert data["events"][0]["data"]["next"] == ["plan"]


def test_checkpoints_lists_kinds_sizes_and_changes(filled: Path) -> None:
    """`checkpoints` shows each step's kind, size, changed fields and next tasks."""
    result = cli(filled, "checkpoints", "done")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert rows[0].startswith("0 snapshot ")
    assert " (input) plan " in rows[0]
    assert " (no change) work \u00d72 " in rows[1]
    assert rows[2].split()[:5] == ["2", "delta", "18", "work", "tick"]
    assert " n, log +1 tick " in rows[3]
    assert " (end) " in rows[5]
    assert result.stdout.splitlines()[-1].startswith("6 checkpoints of run done, ")


def test_checkpoints_json(filled: Path) -> None:
    """--json gives each checkpoint's fields set and items appended."""
    data = json.loads(cli(filled, "checkpoints", "done", "--json").stdout)
    assert [c["step"] for c in data] == list(range(6))
    assert data[3]["set"] == ["n"]
    assert data[3]["appended"] == {"log": 1}
    assert data[3]["kind"] == "delta"
    assert data[3]["bytes"] > 0
    assert data[1]["next"] == ["work[0]", "work[1]"]


def test_checkpoints_of_an_unknown_run(filled: Path) -> None:
    """An unknown run is one error line."""
    result = cli(filled, "checkpoints", "nope")
    assert (result.exit_code, only_line(result)) == (1, "Error: run nope not found")


def test_resume_continues_a_failed_run(filled: Path) -> None:
    """`resume` imports the stored app_ref, continues from the last checkpoint, completes."""
    result = cli(filled, "resume", "failed")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "resuming run failed (graph count) at step 3 with apps.cli_app:app",
        "status  completed",
        result.stdout.splitlines()[2],
    ]
    assert result.stdout.splitlines()[2].startswith("steps   5 (2 in this resume, ")
    assert load_state(filled, "failed").log == ["tick 1", "tick 2", "tick 3"]


def test_resume_a_completed_run_is_refused(filled: Path) -> None:
    """A completed run cannot be resumed: one line, exit code 1."""
    result = cli(filled, "resume", "done")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert only_line(result) == "Error: run done is completed; cannot resume it"


def test_resume_an_unknown_run_is_refused(filled: Path) -> None:
    """An unknown run is one error line."""
    result = cli(filled, "resume", "nope")
    assert (result.exit_code, only_line(result)) == (1, "Error: run nope not found")


def test_resume_with_app_from_a_file_path(filled: Path) -> None:
    """--app takes path/to/file.py:attribute, imported without running its main block."""
    path = Path(cli_app.__file__).resolve()
    cli(filled, "fork", "done", "--step", "3", "--run-id", "copy")
    result = cli(filled, "resume", "copy", "--app", f"{path}:app")
    assert result.exit_code == 0, result.output
    assert "status  completed" in result.stdout


def test_resume_without_a_stored_app_ref_needs_app(db: Path) -> None:
    """A run whose graph was no module attribute asks for --app; with it, it resumes."""

    async def started() -> RunOutcome[Any]:
        store = cli_app.store_at(str(db))
        try:
            app = cli_app.unreferenced().with_store(store)
            return await app.run({"limit": 3, "fail_at": 1}, run_id="anon")
        finally:
            await store.aclose()

    assert anyio.run(started).status is RunStatus.FAILED
    result = cli(db, "resume", "anon")
    assert result.exit_code == 1
    assert only_line(result) == (
        "Error: run anon has no stored app reference (its graph was not a module-level "
        "attribute); pass --app module:attribute"
    )
    result = cli(db, "resume", "anon", "--app", "apps.cli_app:app")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("apps.cli_app", "app reference 'apps.cli_app' must look like module:attribute or "),
        ("no_such_module:app", "cannot import app 'no_such_module:app': ModuleNotFoundError: "),
        (
            "apps.cli_app:nothing",
            "cannot import app 'apps.cli_app:nothing': apps.cli_app has no attribute ",
        ),
        (
            "apps.cli_app:graph",
            "'apps.cli_app:graph' is a Graph, not a compiled graph: point at the ",
        ),
        ("apps.cli_app:not_an_app", "'apps.cli_app:not_an_app' is a int, not a CompiledGraph"),
        ("apps.cli_app:Count", "'apps.cli_app:Count' is the class Count, not a CompiledGraph"),
        ("/no/such/file.py:app", "cannot import app from /no/such/file.py: no such file"),
    ],
)
def test_resume_with_a_bad_app_is_one_line(filled: Path, ref: str, error: str) -> None:
    """Every way --app can be wrong is one clear line, and nothing runs."""
    result = cli(filled, "resume", "failed", "--app", ref)
    assert result.exit_code == 1
    assert only_line(result).startswith(f"Error: {error}")
    assert anyio.run(record_of, filled, "failed").status == "failed"


def test_resume_an_app_whose_import_fails(filled: Path, tmp_path: Path) -> None:
    """An app module that raises while importing is one line naming the error."""
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no API key')\n")
    result = cli(filled, "resume", "failed", "--app", f"{broken}:app")
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: cannot import app '{broken}:app': RuntimeError: no API key"
    )


def test_resume_with_a_changed_graph_needs_permission(filled: Path) -> None:
    """A graph whose structure changed is refused unless --allow-graph-change."""
    result = cli(filled, "resume", "failed", "--app", "apps.cli_app:changed")
    assert result.exit_code == 1
    line = only_line(result)
    assert line.startswith("Error: run failed was started by a graph with structure ")
    assert line.endswith("(--allow-graph-change) to resume anyway")
    result = cli(
        filled, "resume", "failed", "--app", "apps.cli_app:changed", "--allow-graph-change"
    )
    assert result.exit_code == 0, result.output


def test_resume_a_run_another_process_owns_is_refused(filled: Path) -> None:
    """A live lease held by another owner is one line naming that owner."""

    async def take() -> None:
        store = SQLiteStore(filled, lease_seconds=60)
        try:
            await store.acquire("failed", "elsewhere:1:abc")
        finally:
            await store.aclose()

    anyio.run(take)
    result = cli(filled, "resume", "failed")
    assert result.exit_code == 1
    assert only_line(result).startswith(
        "Error: run failed is owned by elsewhere:1:abc (lease valid for "
    )


def test_crashed_run_shows_stale_and_resumes(db: Path) -> None:
    """A run killed at step 3 shows as running with a stale lease, then resumes to the end."""
    script = Path(cli_app.__file__).resolve()
    env = {**os.environ, "ORCHESTRA_FAULTS": "before_commit@3"}
    crash = subprocess.run(
        [sys.executable, str(script), str(db), "5", "1.5"],
        env=env,
        capture_output=True,
        check=False,
    )
    assert crash.returncode == 137, crash.stderr
    result = cli(db, "resume", "crashy")
    assert result.exit_code == 1
    assert only_line(result).startswith("Error: run crashy: its owner ")
    assert "has ended, but its lease holds for " in result.stderr
    (line,) = [line for line in cli(db, "runs").stdout.splitlines() if "crashy" in line]
    assert " running (owner gone) " in line
    expires = anyio.run(record_of, db, "crashy").lease_expires_at
    assert expires is not None
    time.sleep(max(expires - time.time(), 0) + 0.05)
    (line,) = [line for line in cli(db, "runs").stdout.splitlines() if "crashy" in line]
    assert line.split()[:6] == ["crashy", "count", "running", "(stale", "lease)", "2"]
    assert "(process ended; lease expired " in line
    result = cli(db, "resume", "crashy")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"resuming run crashy (graph count) at step 2 with {script}:app"
    )
    assert result.stdout.splitlines()[2].startswith("steps   7 (5 in this resume, ")


def test_abort_marks_a_run_at_rest_aborted_at_once(filled: Path) -> None:
    """A run with no live owner is marked aborted at once, with the reason."""
    result = cli(filled, "abort", "failed", "--reason", "not needed", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout == "run failed marked aborted at once (it was failed)\n"
    record = anyio.run(record_of, filled, "failed")
    assert (record.status, record.reason) == ("aborted", "not needed")
    assert "abort requested" in cli(filled, "show", "failed").stdout
    again = cli(filled, "abort", "failed", "--reason", "twice")
    assert again.stdout == "run failed is already aborted: not needed\n"


def test_abort_needs_a_reason(filled: Path) -> None:
    """--reason is required: the audit trail says why."""
    result = cli(filled, "abort", "failed")
    assert result.exit_code == 2
    assert "Missing option '--reason'" in result.stderr


def test_abort_a_completed_run_is_refused(filled: Path) -> None:
    """A completed run cannot be aborted."""
    result = cli(filled, "abort", "done", "--reason", "x")
    assert (result.exit_code, only_line(result)) == (
        1,
        "Error: run done is completed; cannot abort it",
    )


def test_fork_starts_a_pending_run_that_resumes(filled: Path) -> None:
    """`fork` copies a step's state into a new run; resuming it replays the same ending."""
    result = cli(filled, "fork", "done", "--step", "4", "--run-id", "again")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "forked run done at step 4 into again (status pending)",
        f"resume it with: orchestra --db {filled} resume again",
    ]
    text = cli(filled, "show", "again").stdout
    assert "forked from  done at step 4" in text
    assert "status       pending" in text
    assert cli(filled, "resume", "again").exit_code == 0
    assert load_state(filled, "again") == load_state(filled, "done")


def test_fork_picks_a_random_id_by_default(filled: Path) -> None:
    """Without --run-id the new run gets a fresh id."""
    result = cli(filled, "fork", "done", "--step", "0")
    new = result.stdout.split(" into ")[1].split()[0]
    assert len(new) == 16
    assert anyio.run(record_of, filled, new).status == "pending"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["nope", "--step", "1"], "Error: run nope not found"),
        (
            ["done", "--step", "40"],
            "Error: run done has no checkpoint at step 40: its last is step 5 "
            "(`orchestra checkpoints done` lists them)",
        ),
        (["done", "--step", "1", "--run-id", "failed"], "Error: run failed already exists in "),
    ],
)
def test_fork_errors_are_one_line(filled: Path, args: list[str], error: str) -> None:
    """An unknown run, a step past the end, or a taken id: one line each."""
    result = cli(filled, "fork", *args)
    assert result.exit_code == 1
    assert only_line(result).startswith(error)


def test_stop_all_asks_first(filled: Path) -> None:
    """Without --yes, stop-all asks; declining changes nothing."""
    result = cli(filled, "stop-all", input="n\n")
    assert result.exit_code == 1
    assert "Abort every running run in " in result.stdout
    assert "Warning" not in cli(filled, "runs").stderr


def test_stop_all_refuses_runs_until_released(filled: Path) -> None:
    """After stop-all no run starts or resumes; `runs` warns; --release lifts it."""
    result = cli(filled, "stop-all", "--reason", "incident 7", input="y\n")
    assert result.exit_code == 0, result.output
    assert "stop-all in force (incident 7): 0 running runs told to stop" in result.stdout
    listing = cli(filled, "runs")
    assert listing.stderr == (
        "Warning: stop-all is in force (incident 7): no run may start or resume until "
        "`orchestra stop-all --release`\n"
    )
    with pytest.raises(StopAllActiveError):
        start_sync(filled, limit=1)
    result = cli(filled, "resume", "failed")
    assert result.exit_code == 1
    assert only_line(result) == (
        "Error: stop-all is in force (incident 7); no run may start until "
        "`orchestra stop-all --release`"
    )
    assert "stop-all   incident 7" in cli(filled, "db", "check").stdout
    assert (
        cli(filled, "stop-all", "--release").stdout == "stop-all released: runs may start again\n"
    )
    assert cli(filled, "stop-all", "--release").stdout == "stop-all was not in force\n"
    assert start_sync(filled, limit=1).status is RunStatus.COMPLETED
    assert cli(filled, "resume", "failed").exit_code == 0


def test_prune_dry_run_deletes_nothing(filled: Path) -> None:
    """--dry-run lists the runs it would delete."""
    result = cli(filled, "prune", "--older-than", "0s", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        "would delete 1 run (status completed, not updated for 0.0s):"
    )
    assert len(json.loads(cli(filled, "runs", "--json").stdout)) == 2


def test_prune_deletes_old_runs_and_vacuums(filled: Path) -> None:
    """prune deletes completed runs by default, VACUUMs, and says what it reclaimed."""
    for _ in range(3):
        start_sync(filled, limit=50)
    result = cli(filled, "prune", "--older-than", "0s", "--yes")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith("deleted 4 runs with their checkpoints and events; vacuumed ")
    assert line.endswith(" reclaimed)")
    assert " 0 B reclaimed" not in line
    assert [r["run_id"] for r in json.loads(cli(filled, "runs", "--json").stdout)] == ["failed"]
    assert "integrity  ok" in cli(filled, "db", "check").stdout


def test_prune_by_status_without_vacuum(filled: Path) -> None:
    """--status picks other statuses; --no-vacuum skips the VACUUM."""
    result = cli(filled, "prune", "--older-than", "0s", "--status", "failed", "-y", "--no-vacuum")
    assert result.stdout == (
        "deleted 1 run with their checkpoints and events; not vacuumed (the free pages are "
        "reused by new runs)\n"
    )


def test_prune_asks_first_and_finds_nothing_new(filled: Path) -> None:
    """Without --yes prune asks; runs newer than the cutoff are left alone."""
    assert cli(filled, "prune", "--older-than", "0s", input="n\n").exit_code == 1
    result = cli(filled, "prune", "--older-than", "30d", "--yes")
    assert result.stdout == "no runs to prune (status completed, not updated for 30d)\n"
    assert len(json.loads(cli(filled, "runs", "--json").stdout)) == 2


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--older-than", "30x"], "'30x' is not a duration; use e.g. 30d, 12h, 90m or 45s"),
        (["--older-than", "30"], "'30' is not a duration"),
        (["--older-than", "1d", "--status", "running"], "Invalid value for '--status'"),
        ([], "Missing option '--older-than'"),
    ],
)
def test_prune_usage_errors(filled: Path, args: list[str], error: str) -> None:
    """A bad duration or status is a usage error (exit code 2)."""
    result = cli(filled, "prune", *args, "--yes")
    assert result.exit_code == 2
    assert error in result.stderr


def test_db_check_reports_schema_integrity_and_runs(filled: Path) -> None:
    """`db check` names the schema version, the integrity result and runs by status."""
    result = cli(filled, "db", "check")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"database   {filled} (")
    assert lines[1:] == [
        "schema     m003_budgets",
        "integrity  ok",
        "stop-all   not in force",
        "runs       2: completed 1, failed 1",
    ]


# -- live runs: the CLI in a worker thread, the run on the test's backend ----------------------


@pytest.fixture
def quiet_runs() -> Iterator[None]:
    """Keep the log lines of the test's own runs out of the output CliRunner captures."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.reset_defaults()


async def cli_async(db: Path, *args: str, input: str | None = None) -> Result:
    return await anyio.to_thread.run_sync(lambda: cli(db, *args, input=input))


async def wait_for_step(db: Path, run_id: str, step: int) -> None:
    with anyio.fail_after(5):
        while True:
            try:
                if (await record_of(db, run_id)).step >= step:
                    return
            except RunNotFoundError:
                pass
            await anyio.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.usefixtures("quiet_runs")
async def test_abort_wait_stops_a_live_run(db: Path) -> None:
    """abort --wait asks the live owner to stop and reports the final status."""
    outcomes: list[RunOutcome[Any]] = []
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: _collect(outcomes, start(db, "live", limit=1000, delay=0.02)))
        await wait_for_step(db, "live", 3)
        shown = await cli_async(db, "runs")
        assert " running " in shown.stdout
        assert "(lease " in shown.stdout
        result = await cli_async(db, "abort", "live", "--reason", "runaway", "--wait")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("abort requested: run live is owned by ")
    assert lines[1].startswith("run live stopped at step ")
    assert lines[1].endswith(": aborted: runaway")
    (outcome,) = outcomes
    assert outcome.status is RunStatus.ABORTED
    assert outcome.stop_reason == "runaway"


@pytest.mark.anyio
@pytest.mark.usefixtures("quiet_runs")
async def test_stop_all_stops_a_live_run_and_refuses_new_ones(db: Path) -> None:
    """stop-all tells a live run's owner to stop; new runs are refused until --release."""
    outcomes: list[RunOutcome[Any]] = []
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: _collect(outcomes, start(db, "live", limit=1000, delay=0.02)))
        await wait_for_step(db, "live", 3)
        result = await cli_async(db, "stop-all", "--yes", "--reason", "incident")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [
        "stop-all in force (incident): 1 running run told to stop",
        result.stdout.splitlines()[1],
    ]
    assert result.stdout.splitlines()[1].startswith("  abort requested: run live is owned by ")
    assert outcomes[0].status is RunStatus.ABORTED
    with pytest.raises(StopAllActiveError):
        await start(db, limit=1)
    assert (await cli_async(db, "stop-all", "--release")).exit_code == 0
    assert (await start(db, limit=1)).status is RunStatus.COMPLETED


@pytest.mark.anyio
@pytest.mark.usefixtures("quiet_runs")
async def test_resume_refuses_a_run_a_live_process_owns(db: Path) -> None:
    """Resuming a run whose owner is alive and running it names the owner."""
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: start(db, "live", limit=1000, delay=0.02))
        await wait_for_step(db, "live", 3)
        result = await cli_async(db, "resume", "live")
        await cli_async(db, "abort", "live", "--reason", "done testing", "--wait")
    assert result.exit_code == 1
    assert only_line(result).startswith("Error: run live is owned by ")


async def _collect(into: list[RunOutcome[Any]], run: Any) -> None:
    into.append(await run)


# -- formatting stored runs ---------------------------------------------------------------------

NOW = 1_700_000_000.0


def stored(**kwargs: Any) -> RunRecord:
    values: dict[str, Any] = {
        "run_id": "r1",
        "graph": "g",
        "structure_hash": "h",
        "app_ref": "m:app",
        "status": "completed",
        "step": 4,
        "owner": None,
        "epoch": 1,
        "lease_expires_at": None,
        "created_at": NOW - 750,
        "updated_at": NOW - 45,
    }
    values.update(kwargs)
    return RunRecord(**values)


def running(lease_left: float, **kwargs: Any) -> RunRecord:
    return stored(status="running", owner="host:1:abc", lease_expires_at=NOW + lease_left, **kwargs)


def event(kind: str, at: float, row_step: int | None, /, **data: Any) -> EventRow:
    return EventRow(step=row_step, kind=kind, at=at, data=json.dumps(data))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86_400),
        ("12h", 12 * 3_600),
        ("90m", 5_400),
        ("45s", 45),
        ("2w", 14 * 86_400),
        ("1h30m", 5_400),
        ("1.5h", 5_400),
        (" 7D ", 7 * 86_400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations take d, h, m, s (and w), combined or with decimals."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "3x", "d", "-5d", "1h 30m", "5 days"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    """A bare number or an unknown unit is refused, with an example in the message."""
    with pytest.raises(ValueError, match=r"is not a duration; use e\.g\. 30d, 12h, 90m or 45s"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(-1, "0.0s"), (0.42, "0.4s"), (45, "45s"), (750, "12m"), (3 * 3_600 + 5, "3h"), (2e5, "2d")],
)
def test_format_age(seconds: float, expected: str) -> None:
    """A span shows in its largest unit; sub-10-second spans keep a decimal."""
    assert format_age(seconds) == expected


def test_format_ago() -> None:
    """A moment in the last second is "just now"; older ones say how long ago."""
    assert format_ago(NOW - 0.5, NOW) == "just now"
    assert format_ago(NOW - 90, NOW) == "1m ago"


@pytest.mark.parametrize(
    ("size", "expected"),
    [(512, "512 B"), (12_595, "12.3 KiB"), (4 * 1024**2, "4.0 MiB"), (3 * 1024**4, "3072.0 GiB")],
)
def test_format_bytes(size: int, expected: str) -> None:
    """Sizes are in binary units."""
    assert format_bytes(size) == expected


@pytest.mark.parametrize(
    ("record", "gone", "expected"),
    [
        (stored(status="failed"), False, "failed"),
        (running(12), False, "running"),
        (running(-3), False, "running (stale lease)"),
        (running(-3), True, "running (stale lease)"),
        (running(12), True, "running (owner gone)"),
        (running(12, abort_requested="stop"), False, "running (aborting)"),
    ],
)
def test_run_status_flags_runs_without_a_live_owner(
    record: RunRecord, gone: bool, expected: str
) -> None:
    """A running run whose lease expired is stale; a dead local owner or an abort shows."""
    assert run_status(record, NOW, gone=gone) == expected


def test_format_owner_says_how_long_the_lease_holds() -> None:
    """The owner column names the owner and its lease, live or expired."""
    assert format_owner(stored(), NOW) == ""
    assert format_owner(running(12), NOW) == "host:1:abc (lease 12s left)"
    assert format_owner(running(-180), NOW) == "host:1:abc (lease expired 3m ago)"
    assert format_owner(running(5), NOW, gone=True) == (
        "host:1:abc (process ended; lease 5.0s left)"
    )


def test_owner_gone_only_for_a_local_process_that_ended() -> None:
    """Only an owner on this host whose process has ended counts as gone."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    host = socket.gethostname()
    assert owner_gone(f"{host}:{ended}:abc")
    assert not owner_gone(f"{host}:{os.getpid()}:abc")
    assert not owner_gone(f"elsewhere:{ended}:abc")
    assert not owner_gone(None)
    assert not owner_gone("not an owner")


def test_run_json_adds_the_lease_state() -> None:
    """JSON records say whether the lease is live and whether the run is stale."""
    data = run_json(running(-1), NOW)
    assert (data["lease"], data["stale"], data["owner_gone"]) == ("expired", True, False)
    assert data["run_id"] == "r1"
    json.dumps(data)


def test_runs_table_rows() -> None:
    """A row gives id, graph, status, step, age, last update and owner."""
    text = render(runs_table([running(-3, run_id="r2"), stored()], NOW, gone={"host:1:abc"}))
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert lines[0] == "run id graph status step age updated owner / lease"
    assert lines[2] == (
        "r2 g running (stale lease) 4 12m 45s ago host:1:abc (process ended; lease expired "
        "3.0s ago)"
    )
    assert lines[3] == "r1 g completed 4 12m 45s ago"


def test_runs_table_shows_tokens_and_cost_when_spent() -> None:
    """Token and cost columns appear only when some run used a model."""
    spent = stored(usage={"input_tokens": 1000, "output_tokens": 234, "cost_usd": 0.0123})
    text = render(runs_table([spent, stored(run_id="r2")], NOW))
    assert "tokens" in text.splitlines()[0]
    assert "1,234   $0.0123" in text
    assert "tokens" not in render(runs_table([stored()], NOW))


def test_format_usage() -> None:
    """Usage names steps, tasks, tokens and cost when any, tool calls, wall time."""
    assert format_usage({"steps": 3, "tasks": 4, "wall_seconds": 1.5}) == (
        "3 steps, 4 tasks, wall 1.50s"
    )
    usage = {"steps": 1, "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.5, "tool_calls": 2}
    assert format_usage(usage) == (
        "1 steps, 0 tasks, 15 tokens (10 in, 5 out), $0.5000, 2 tool calls, wall 0.00s"
    )


def test_timeline_condenses_each_step_into_one_entry() -> None:
    """A step's node events become one entry: nodes, duration, changes, retries, errors."""
    events = [
        event("run_started", 1.0, 0, graph="g", step=0, resumed=False, next=["a"]),
        event("node_retried", 2.0, 1, step=1, node="a", task=0, attempt=1, error="E: x", delay=0),
        event("node_finished", 2.1, 1, step=1, node="a", task=0, duration=0.2, attempts=2),
        event("step_committed", 2.2, 1, step=1, nodes=["a"], changed=["n"], next=["b[0]"],
              duration=0.25),
        event("abort_requested", 2.5, 1, reason="enough"),
        event("run_finished", 3.0, 1, status="aborted", steps=1, error=None, reason="enough"),
        event("budget_warned", 3.5, 1, step=1, limit="tokens", used=0.8),  # a kind not known
    ]  # fmt: skip
    entries = timeline(events)
    assert [(e.step, e.what, e.notes) for e in entries] == [
        (0, "run started", "next: a"),
        (1, "a", "a retried after attempt 1: E: x"),
        (1, "abort requested", "enough"),
        (1, "run aborted", "enough"),
        (1, "budget_warned", "limit=tokens used=0.8"),
    ]
    assert entries[1].duration == 0.25
    assert entries[1].changed == ("n",)


def test_timeline_marks_failures_resumes_and_forks() -> None:
    """A node error and a step without commit show; resumed and forked runs say so."""
    events = [
        event("run_forked", 1.0, 2, from_run="r0", from_step=2),
        event("run_started", 2.0, 2, graph="g", step=2, resumed=True, next=[]),
        event("node_finished", 3.0, 3, step=3, node="b", task=0, duration=0.1, attempts=1,
              error="boom"),
    ]  # fmt: skip
    entries = timeline(events)
    assert [e.what for e in entries] == ["forked from r0 at step 2", "run resumed", "b"]
    assert entries[2].notes == "b failed: boom; not committed"
    assert entries[2].style == "red"
    text = render(timeline_table(entries))
    assert "forked from r0 at step 2" in text
    assert "b failed: boom" in text


def test_run_summary_facts() -> None:
    """The summary of a failed fork names its error, parent, next node and app."""
    record = stored(
        status="failed",
        error="run r1, step 5, node 'b': node failed",
        parent_run_id="r0",
        parent_step=2,
        app_ref=None,
        usage={"steps": 4},
    )
    events = [event("step_committed", 1.0, 4, step=4, nodes=["a"], changed=[], next=["b"],
                    duration=0.1)]  # fmt: skip
    lines = [
        " ".join(line.split()) for line in render(run_summary(record, events, NOW)).splitlines()
    ]
    assert "status failed" in lines
    assert "error run r1, step 5, node 'b': node failed" in lines
    assert "next b" in lines
    assert "forked from r0 at step 2" in lines
    assert "app unknown (resume needs --app module:attribute)" in lines
    assert "usage 4 steps, 0 tasks, wall 0.00s" in lines


def test_checkpoint_info_reads_deltas_and_snapshots() -> None:
    """A delta's set and appended fields are its changes; a snapshot's come from its event."""
    delta = CheckpointRow(
        step=3,
        snapshot=None,
        delta='{"set":{"n":1,"m":2},"append":{"log":["a","b"]}}',
        tasks='[{"node":"t","index":0,"label":"t"}]',
        created_at=NOW,
        size=51,
    )
    info = checkpoint_info(delta)
    assert (info.kind, info.size, info.set, info.appended) == ("delta", 51, ("n", "m"), {"log": 2})
    assert info.changed == "n, m, log +2"
    assert info.next == ("t",)
    snapshot = CheckpointRow(
        step=4,
        snapshot='{"n":2}',
        delta=None,
        tasks="[]",
        created_at=NOW,
        events='[{"event":"step_committed","at":1,"step":4,"changed":["n"]}]',
    )
    info = checkpoint_info(snapshot)
    assert (info.kind, info.size, info.changed, info.next) == ("snapshot", 7, "n", ())
    assert checkpoint_json(info)["bytes"] == 7
    rows = table_rows(render(checkpoints_table([checkpoint_info(delta), info])))
    assert rows[3].startswith("3 delta 51 n, m, log +2 t ")
    assert rows[4].startswith("4 snapshot 7 n (end) ")


def test_format_resumed_outcome() -> None:
    """Resume reports status, steps run this time, and why a run stopped."""
    stopped = outcome(RunStatus.BUDGET_EXCEEDED, stop_reason="step budget exhausted", next=("p",))
    assert format_resumed(stopped, 1) == [
        "status  budget_exceeded",
        "steps   3 (2 in this resume, 1.50s wall time in all)",
        "reason  step budget exhausted",
        "next    p",
    ]


def test_format_abort_says_who_stops_the_run() -> None:
    """An abort either reaches a live owner or marks the run aborted at once."""
    asked = running(10, abort_requested="x")
    assert format_abort(asked, "running", NOW).startswith(
        "abort requested: run r1 is owned by host:1:abc, a live process, which stops it"
    )
    done = stored(status="aborted")
    assert format_abort(done, "running (stale lease)", NOW) == (
        "run r1 marked aborted at once (its owner's lease had expired, so no process was "
        "running it)"
    )
    assert format_abort(done, "interrupted", NOW) == (
        "run r1 marked aborted at once (it was interrupted)"
    )


def test_format_prune() -> None:
    """Prune says how many runs went and what VACUUM gave back."""
    assert format_prune(2, 3 * 1024**2, 1024**2) == (
        "deleted 2 runs with their checkpoints and events; vacuumed 3.0 MiB -> 1.0 MiB "
        "(2.0 MiB reclaimed)"
    )
    assert format_prune(1, 10, None).startswith("deleted 1 run with their checkpoints")
    assert format_prune(1, 10, 10, checkpointed=False).endswith(
        "another process is reading, so the write-ahead log shrinks later"
    )


def test_format_run_counts() -> None:
    """db check counts runs by their operator status."""
    records = [stored(), stored(), running(-1), stored(status="failed")]
    assert format_run_counts(records, NOW) == ("4: completed 2, failed 1, running (stale lease) 1")
    assert format_run_counts([], NOW) == "0"


def test_load_app_from_module_and_file() -> None:
    """load_app finds module:attribute and path.py:attribute, and refuses non-apps."""
    assert load_app("apps.cli_app:app") is cli_app.app
    by_path = load_app(f"{Path(cli_app.__file__).resolve()}:app")
    assert by_path.structure_hash == cli_app.app.structure_hash
    with pytest.raises(AppLoadError, match="is a Graph, not a compiled graph"):
        load_app("apps.cli_app:graph")


def test_resume_store_keeps_the_apps_store_settings(tmp_path: Path) -> None:
    """Resume binds --db with the durability and lease of the app's own SQLite store."""
    store = resume_store(cli_app.app, tmp_path / "x.db")
    assert (store.path, store.lease_seconds, store.durability) == (
        str(tmp_path / "x.db"),
        cli_app.LEASE_SECONDS,
        "full",
    )
    assert resume_store(cli_app.changed, tmp_path / "x.db").lease_seconds == 30.0


def test_format_abort_when_the_owner_has_ended() -> None:
    """An abort request for a run whose owner died says nobody acts on it until expiry."""
    asked = running(10, abort_requested="x")
    assert format_abort(asked, "running (owner gone)", NOW, gone=True) == (
        "abort requested, but run r1's owner host:1:abc has ended: once its lease expires "
        "(in 10s) `orchestra abort` marks it aborted at once; --wait does that for you"
    )


def test_abort_wait_marks_a_crashed_run_aborted_once_its_lease_expires(db: Path) -> None:
    """Nobody acts on an abort for a dead owner: --wait marks the run aborted at expiry."""
    script = Path(cli_app.__file__).resolve()
    env = {**os.environ, "ORCHESTRA_FAULTS": "before_commit@3"}
    crash = subprocess.run(
        [sys.executable, str(script), str(db), "5", "1"], env=env, capture_output=True, check=False
    )
    assert crash.returncode == 137, crash.stderr
    result = cli(db, "abort", "crashy", "--reason", "crashed", "--wait", "--timeout", "5")
    assert result.exit_code == 0, result.output
    first, last = result.stdout.splitlines()
    assert first.startswith("abort requested, but run crashy's owner ")
    assert last == "run crashy stopped at step 2: aborted: crashed"
