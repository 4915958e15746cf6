"""`orchestra runs`, `show` and `checkpoints` on a run database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.support import cli, only_line, start_sync, table_rows

pytestmark = pytest.mark.usefixtures("_isolated")


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
