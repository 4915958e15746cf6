"""`orchestra fork`, `prune` and `db check`."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from cli.support import cli, load_state, only_line, record_of, start_sync

pytestmark = pytest.mark.usefixtures("_isolated")


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
