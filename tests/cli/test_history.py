"""A run's history: the timeline of its steps and its checkpoints."""

from __future__ import annotations

import pytest

from cli.support import NOW, event, render, table_rows
from orchestra.cli.history import (
    checkpoint_info,
    checkpoint_json,
    checkpoints_table,
    timeline,
    timeline_table,
)
from orchestra.store import CheckpointRow

pytestmark = pytest.mark.usefixtures("_isolated")


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
