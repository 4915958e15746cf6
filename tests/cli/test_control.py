"""`orchestra resume`, `abort` and `stop-all`, on runs at rest, crashed runs and live runs."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from apps import cli_app
from click.testing import Result

from cli.support import cli, load_state, only_line, record_of, start, start_sync
from orchestra import RunOutcome, RunStatus
from orchestra.errors import RunNotFoundError, StopAllActiveError
from orchestra.store import SQLiteStore

pytestmark = pytest.mark.usefixtures("_isolated")


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


def _crash(db: Path) -> Path:
    """Run cli_app until it dies at step 3 (a real process, ended by a fault point) holding
    a 30 s lease."""
    script = Path(cli_app.__file__).resolve()
    env = {**os.environ, "ORCHESTRA_FAULTS": "before_commit@3"}
    crash = subprocess.run(
        [sys.executable, str(script), str(db), "5", "30"],
        env=env,
        capture_output=True,
        check=False,
    )
    assert crash.returncode == 137, crash.stderr
    return script


def test_crashed_run_shows_owner_gone_and_is_taken_over_at_once(db: Path) -> None:
    """A run whose owner died shows as running with its owner gone; resume takes it over at
    once, while the dead owner's lease would still hold (no waiting it out)."""
    script = _crash(db)
    (line,) = [line for line in cli(db, "runs").stdout.splitlines() if "crashy" in line]
    assert " running (owner gone) " in line
    dead = anyio.run(record_of, db, "crashy")
    assert dead.lease_expires_at is not None
    result = cli(db, "resume", "crashy")
    assert result.exit_code == 0, result.output
    assert time.time() < dead.lease_expires_at  # done before the lease lapsed: taken over
    assert result.stdout.splitlines()[0] == (
        f"resuming run crashy (graph count) at step 2 with {script}:app"
    )
    assert result.stdout.splitlines()[2].startswith("steps   7 (5 in this resume, ")
    assert anyio.run(record_of, db, "crashy").epoch > dead.epoch  # the dead owner is fenced


def test_abort_of_a_run_whose_owner_died_is_at_once(db: Path) -> None:
    """Aborting a run whose owner died marks it aborted at once (well under a second), not
    after its lease runs out."""
    _crash(db)
    began = time.monotonic()
    result = cli(db, "abort", "crashy", "--reason", "owner died", "--wait")
    took = time.monotonic() - began
    assert result.exit_code == 0, result.output
    assert "marked aborted at once" in result.stdout
    assert took < 1.0, took
    record = anyio.run(record_of, db, "crashy")
    assert (record.status, record.reason) == ("aborted", "owner died")


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


async def _collect(into: list[RunOutcome[Any]], run: Any) -> None:
    into.append(await run)


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


def test_abort_wait_marks_a_crashed_run_aborted_once_its_lease_expires(db: Path) -> None:
    """Nobody acts on an abort for an owner on another host that died: --wait marks the run
    aborted when its lease expires (an owner elsewhere cannot be seen to have ended)."""
    script = Path(cli_app.__file__).resolve()
    env = {**os.environ, "ORCHESTRA_FAULTS": "before_commit@3"}
    crash = subprocess.run(
        [sys.executable, str(script), str(db), "5", "1"], env=env, capture_output=True, check=False
    )
    assert crash.returncode == 137, crash.stderr
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE runs SET owner = 'elsewhere.example:1:-:abcdef'")
    result = cli(db, "abort", "crashy", "--reason", "crashed", "--wait", "--timeout", "5")
    assert result.exit_code == 0, result.output
    first, last = result.stdout.splitlines()
    assert first.startswith("abort requested: run crashy is owned by elsewhere.example:1:-:")
    assert last == "run crashy stopped at step 2: aborted: crashed"
