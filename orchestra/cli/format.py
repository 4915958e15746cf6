"""Pure formatting of values, events and outcomes: durations, error lines, the live table."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import BaseModel
from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.pretty import Pretty
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..errors import GraphValidationError, OrchestraError
from ..events import (
    Event,
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from ..outcome import RunOutcome, RunStatus

__all__ = (
    "STORED_STYLE",
    "ProgressView",
    "StepRow",
    "format_age",
    "format_ago",
    "format_bytes",
    "format_duration",
    "format_error",
    "format_event",
    "format_nodes",
    "format_outcome_error",
    "format_resumed",
    "format_state",
    "format_stopped",
    "format_timestamp",
    "parse_duration",
    "plain_value",
    "progress_table",
    "summary_panel",
)

_STATUS_STYLE = {
    RunStatus.RUNNING: "yellow",
    RunStatus.COMPLETED: "green",
    RunStatus.INTERRUPTED: "yellow",
    RunStatus.ABORTED: "red",
    RunStatus.BUDGET_EXCEEDED: "yellow",
    RunStatus.LOOP_DETECTED: "yellow",
    RunStatus.FAILED: "red",
}
STORED_STYLE = {str(status): style for status, style in _STATUS_STYLE.items()}
_SECONDS_FIELDS = frozenset({"duration", "delay"})
_UNPRINTED = frozenset({"run_id", "at", "outcome"})
_KIND_WIDTH = 15
_TIMES = "\N{MULTIPLICATION SIGN}"


def format_duration(seconds: float) -> str:
    """Return a duration for people: ``0.25s``, ``12.40s``, ``3m 07s``, ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_nodes(labels: Sequence[str]) -> str:
    """Name a step's tasks briefly: ``research[0], research[1]`` becomes "research \u00d72"."""
    counts: dict[str, int] = {}
    for label in labels:
        name = label.rsplit("[", 1)[0] if label.endswith("]") else label
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(name if n == 1 else f"{name} {_TIMES}{n}" for name, n in counts.items())


def format_error(error: BaseException) -> str:
    """Return an error as one line: its message, with any line breaks folded."""
    if isinstance(error, GraphValidationError):
        count = len(error.problems)
        noun = "problem" if count == 1 else "problems"
        return f"graph {error.graph!r} has {count} {noun}: " + "; ".join(error.problems)
    text = str(error) if isinstance(error, OrchestraError) else f"{type(error).__name__}: {error}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def format_outcome_error(outcome: RunOutcome[Any]) -> str | None:
    """Say in one line why a run did not complete, or return None if it did."""
    if outcome.ok:
        return None
    if outcome.error is not None:
        return format_error(outcome.error)
    return format_stopped(outcome.run_id, outcome.steps, outcome.status, outcome.stop_reason)


def format_stopped(run_id: str, step: int, status: RunStatus, reason: str | None) -> str:
    """Say where a run stopped, and why: ``run R stopped at step 3: aborted: too slow``."""
    why = f": {reason}" if reason else ""
    return f"run {run_id} stopped at step {step}: {status}{why}"


def plain_value(key: str, value: Any) -> str:
    """Return an event field's value as ``key=value`` prints it: seconds, lists, quoted text."""
    if key in _SECONDS_FIELDS and isinstance(value, int | float):
        return f"{value:.2f}s"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_event(event: Event) -> str:
    """Return one log line for an event: its kind, then ``key=value`` for what it says.

    The run id is shown once, on ``run_started``; timestamps are left out (the lines are
    printed as they happen); defaults (task 0, one attempt, nothing changed, false flags)
    are omitted.
    """
    parts = [f"run={event.run_id}"] if isinstance(event, RunStarted) else []
    for item in fields(event):
        key = item.name
        value = getattr(event, key)
        if key in _UNPRINTED or value is None or value is False or value == ():
            continue
        if (key, value) in (("task", 0), ("attempts", 1)):
            continue
        parts.append(f"{key}={plain_value(key, value)}")
    kind = event.kind
    if isinstance(event, RunFinished) and event.outcome is not None:
        parts.append(f"wall={format_duration(event.outcome.usage.wall_seconds)}")
    return f"{kind:<{_KIND_WIDTH}} {' '.join(parts)}".rstrip()


def format_state(state: BaseModel) -> list[str]:
    """Return one ``state  field=<json>`` line per field of a (final) state."""
    data = state.model_dump(mode="json")
    return [
        f"{'state':<{_KIND_WIDTH}} {name}={json.dumps(value, ensure_ascii=False)}"
        for name, value in data.items()
    ]


@dataclass(slots=True)
class StepRow:
    """What the progress table knows about one step."""

    step: int
    began: float
    nodes: list[str] = field(default_factory=list)
    known: bool = False  # nodes came from the previous step's ``next``
    status: str = "running"
    duration: float | None = None
    retries: int = 0
    changed: tuple[str, ...] = ()


class ProgressView:
    """Follow a run's events and render them as a table of steps (a rich renderable).

    Events arrive after each step's barrier; the step in flight is known from the previous
    step's ``next``, so it shows as running, with its time so far from ``clock``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rows: dict[int, StepRow] = {}
        self.run_id = ""
        self.graph = ""
        self.outcome: RunOutcome[Any] | None = None

    def update(self, event: Event) -> None:
        """Take in one event."""
        now = self.clock()
        if isinstance(event, RunStarted):
            self.run_id, self.graph = event.run_id, event.graph
            self._row(event.step + 1, now)
        elif isinstance(event, NodeStarted):
            row = self._row(event.step, now)
            if not row.known:
                row.nodes.append(event.node)
        elif isinstance(event, NodeRetried):
            self._row(event.step, now).retries += 1
        elif isinstance(event, NodeFinished):
            row = self._row(event.step, now)
            if event.error is not None:
                row.status, row.duration = "failed", now - row.began
        elif isinstance(event, StepCommitted):
            row = self._row(event.step, now)
            row.nodes, row.known = list(event.nodes), True
            row.status, row.duration, row.changed = "done", event.duration, event.changed
            if event.next:
                following = self._row(event.step + 1, now)
                following.nodes, following.known = list(event.next), True
        elif isinstance(event, RunFinished):
            self.outcome = event.outcome
            for row in self.rows.values():
                if row.status == "running":
                    # a step that never passed its barrier: it failed, or a safeguard stopped
                    # the run before it started
                    failed = event.status == RunStatus.FAILED
                    row.status = "failed" if failed else event.status
                    row.duration = now - row.began if failed else None

    def _row(self, step: int, now: float) -> StepRow:
        row = self.rows.get(step)
        if row is None:
            row = self.rows[step] = StepRow(step=step, began=now)
        return row

    def __rich__(self) -> Table:
        return progress_table(self, self.clock())


def _status_cell(row: StepRow) -> RenderableType:
    if row.status == "running":
        return Spinner("dots", text=Text("running", style="yellow"), style="yellow")
    if row.status == "done":
        text = Text("✓ done", style="green")
        if row.retries:
            text.append(f" ({row.retries} {'retry' if row.retries == 1 else 'retries'})", "yellow")
        return text
    if row.status == "failed":
        return Text("✗ failed", style="red")
    return Text(f"■ {row.status}", style="yellow")


def progress_table(view: ProgressView, now: float) -> Table:
    """Build the table of a run's steps: step, node(s), status, time and changed fields."""
    title = f"run {view.run_id} · graph {view.graph}" if view.run_id else None
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("step", justify="right", style="bold")
    table.add_column("node(s)")
    table.add_column("status", no_wrap=True, min_width=16)
    table.add_column("time", justify="right")
    table.add_column("changed", style="dim")
    for row in sorted(view.rows.values(), key=lambda r: r.step):
        duration = now - row.began if row.status == "running" else row.duration
        table.add_row(
            str(row.step),
            format_nodes(row.nodes) or "…",
            _status_cell(row),
            "" if duration is None else format_duration(duration),
            ", ".join(row.changed),
        )
    return table


def summary_panel(outcome: RunOutcome[Any]) -> Panel:
    """Build the panel shown when a run ends: status, steps, wall time, final state."""
    style = _STATUS_STYLE.get(outcome.status, "yellow")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    facts.add_row("status", Text(str(outcome.status), style=f"bold {style}"))
    facts.add_row("steps", str(outcome.steps))
    facts.add_row("wall time", format_duration(outcome.usage.wall_seconds))
    if outcome.error is not None:
        facts.add_row("error", Text(format_error(outcome.error), style="red"))
    if outcome.stop_reason:
        facts.add_row("reason", outcome.stop_reason)
    if outcome.next:
        facts.add_row("next", ", ".join(outcome.next))
    state = Table.grid(padding=(0, 2))
    state.add_column(style="cyan", no_wrap=True)
    state.add_column()
    for name, value in outcome.state:
        state.add_row(name, Pretty(value, max_string=200, max_length=20))
    return Panel(
        Group(facts, Text(""), Text("final state", style="bold"), state),
        title=f"run {outcome.run_id}",
        title_align="left",
        border_style=style,
        expand=False,
    )


_DURATION_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")


def parse_duration(text: str) -> float:
    """Return the seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or ``1h30m``.

    Raises ValueError for anything else (a bare number is refused: its unit is a guess).
    """
    spec = text.strip().lower()
    parts = _DURATION_PART.findall(spec)
    if not spec or "".join(number + unit for number, unit in parts) != spec:
        raise ValueError(f"{text!r} is not a duration; use e.g. 30d, 12h, 90m or 45s")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def format_age(seconds: float) -> str:
    """Return a time span in its largest unit: ``0.4s``, ``45s``, ``12m``, ``3h``, ``2d``."""
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_ago(at: float, now: float) -> str:
    """Say how long ago ``at`` was: ``just now``, ``45s ago``, ``3h ago``."""
    return "just now" if now - at < 1 else f"{format_age(now - at)} ago"


def format_timestamp(at: float, *, date: bool = True) -> str:
    """Return a local time: ``2025-03-01 14:05:09``, or ``14:05:09`` without the date."""
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(at))


def format_bytes(size: float) -> str:
    """Return a size for people: ``512 B``, ``12.3 KiB``, ``4.0 MiB``."""
    if abs(size) < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if abs(size) < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def format_resumed(outcome: RunOutcome[Any], from_step: int) -> list[str]:
    """Return the lines ``orchestra resume`` prints once the resumed run stops."""
    ran = outcome.steps - from_step
    lines = [
        f"status  {outcome.status}",
        f"steps   {outcome.steps} ({ran} in this resume, "
        f"{format_duration(outcome.usage.wall_seconds)} wall time in all)",
    ]
    if outcome.stop_reason:
        lines.append(f"reason  {outcome.stop_reason}")
    if outcome.error is not None:
        lines.append(f"error   {format_error(outcome.error)}")
    if outcome.next:
        lines.append(f"next    {', '.join(outcome.next)}")
    for request in outcome.pending:  # what it waits for, and where to answer it
        lines.append(f"waits   {request.id} ({request.kind}): {request.describe()}")
    if outcome.pending:
        lines.append(f"answer  see `orchestra pending --run {outcome.run_id}`")
    return lines
