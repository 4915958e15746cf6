"""Formatting stored runs: status and lease, owners, the runs table, usage, summaries, abort,
prune and run counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from cli.support import NOW, event, render
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
from orchestra.store import RunRecord

pytestmark = pytest.mark.usefixtures("_isolated")


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
    """Only an owner of this host, boot and PID namespace whose process has ended counts as
    gone; an id of the older host:pid:tag form is waited out even when its pid is gone."""
    code = "from orchestra.store.records import new_owner_id; print(new_owner_id())"
    ended = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    host, pid, *_ = ended.split(":")
    assert host == socket.gethostname()
    if os.path.exists("/proc/self/stat"):
        assert owner_gone(ended)
    assert not owner_gone(f"{host}:{pid}:abc")
    assert not owner_gone(f"{host}:{os.getpid()}:abc")
    assert not owner_gone(ended.replace(host, "elsewhere", 1))
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


def test_format_abort_when_the_owner_has_ended() -> None:
    """An abort request for a run whose owner died says nobody acts on it until expiry."""
    asked = running(10, abort_requested="x")
    assert format_abort(asked, "running (owner gone)", NOW, gone=True) == (
        "abort requested, but run r1's owner host:1:abc has ended: once its lease expires "
        "(in 10s) `orchestra abort` marks it aborted at once; --wait does that for you"
    )
