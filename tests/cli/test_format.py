"""The formatters: events, state, nodes, durations and errors, the progress view and the summary
panel, parsing durations and ages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from cli.support import NOW, render, table_rows
from orchestra import GraphValidationError, RunOutcome, RunStatus, Usage
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
from orchestra.errors import NodeError
from orchestra.events import (
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)

pytestmark = pytest.mark.usefixtures("_isolated")


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


def test_format_resumed_outcome() -> None:
    """Resume reports status, steps run this time, and why a run stopped."""
    stopped = outcome(RunStatus.BUDGET_EXCEEDED, stop_reason="step budget exhausted", next=("p",))
    assert format_resumed(stopped, 1) == [
        "status  budget_exceeded",
        "steps   3 (2 in this resume, 1.50s wall time in all)",
        "reason  step budget exhausted",
        "next    p",
    ]
