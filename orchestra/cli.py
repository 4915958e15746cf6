"""The operator CLI: the demo, and the commands that watch and steer stored runs.

``orchestra demo`` runs a demo graph live. On a run database (``--db`` or ``ORCHESTRA_DB``):
``runs``, ``show``, ``checkpoints`` read it; ``resume``, ``abort``, ``stop-all``, ``fork`` and
``prune`` change it; ``db check`` looks after the file.

Formatting is kept apart from printing: ``format_*`` functions turn events, outcomes, records
and errors into strings, :class:`ProgressView`, :func:`progress_table`, :func:`summary_panel`,
:func:`runs_table`, :func:`run_summary`, :func:`timeline_table` and
:func:`checkpoints_table` into rich renderables, :func:`timeline` and
:func:`checkpoint_info` condense stored events and checkpoints; only the ``watch_*``
functions and the commands print. click, rich and the logging setup load here only;
``import orchestra`` never imports this module.

Exit codes: 0 when the command did its job (for ``demo`` and ``resume``: the run
completed), 1 when it did not or an error stopped it (one line on stderr, no traceback
unless ``--verbose``), 2 for a usage error.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import socket
import sqlite3
import sys
import time
import traceback
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

import anyio
import click
import structlog
from pydantic import BaseModel
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.pretty import Pretty
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ._version import __version__
from .compile import CompiledGraph
from .compile import new_run_id as _new_run_id
from .demo import DEFAULT_TOPIC, build_app
from .errors import (
    GraphValidationError,
    LeaseHeldError,
    OrchestraError,
    RunNotFoundError,
    RunStatusError,
    StopAllActiveError,
)
from .events import (
    Event,
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from .graph import Graph
from .outcome import RunOutcome, RunStatus
from .runs import fork_run
from .store.base import ACTIVE, CheckpointRow, EventRow, RunRecord, Store
from .store.sqlite import SQLiteStore

__all__ = (
    "RUN_STATUSES",
    "AppLoadError",
    "CheckpointInfo",
    "ProgressView",
    "Settings",
    "TimelineEntry",
    "checkpoint_info",
    "checkpoint_json",
    "checkpoints_table",
    "find_run",
    "format_abort",
    "format_age",
    "format_ago",
    "format_bytes",
    "format_duration",
    "format_error",
    "format_event",
    "format_nodes",
    "format_owner",
    "format_prune",
    "format_resumed",
    "format_run_counts",
    "format_state",
    "format_stop_all",
    "format_timestamp",
    "format_usage",
    "load_app",
    "main",
    "open_store",
    "owner_gone",
    "parse_duration",
    "progress_table",
    "resume_store",
    "run_json",
    "run_status",
    "run_summary",
    "runs_table",
    "summary_panel",
    "timeline",
    "timeline_table",
    "vacuum",
    "wait_until_stopped",
)

T = TypeVar("T")

# -- formatting: pure functions, no printing ------------------------------------------------

_STATUS_STYLE = {
    RunStatus.RUNNING: "yellow",
    RunStatus.COMPLETED: "green",
    RunStatus.INTERRUPTED: "yellow",
    RunStatus.ABORTED: "red",
    RunStatus.BUDGET_EXCEEDED: "yellow",
    RunStatus.LOOP_DETECTED: "yellow",
    RunStatus.FAILED: "red",
}
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
    reason = f": {outcome.stop_reason}" if outcome.stop_reason else ""
    return f"run {outcome.run_id} stopped at step {outcome.steps}: {outcome.status}{reason}"


def _plain_value(key: str, value: Any) -> str:
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
        parts.append(f"{key}={_plain_value(key, value)}")
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


# -- formatting stored runs: pure functions of records, events and checkpoints ---------------

RUN_STATUSES = (*(str(status) for status in RunStatus), "pending")
"""Every status a stored run can have (a fork waits as ``pending`` until it is resumed)."""

_STORED_STYLE = {str(status): style for status, style in _STATUS_STYLE.items()}
_STALE = "running (stale lease)"
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


def run_status(record: RunRecord, now: float, *, gone: bool = False) -> str:
    """Return a run's status as an operator needs it.

    A ``running`` run whose lease expired has no live owner (it crashed or hung): it shows as
    ``running (stale lease)`` and can be resumed. One whose owner process is known to have
    ended (``gone``) but whose lease has not expired yet shows ``(owner gone)``; one asked to
    abort shows ``(aborting)``.
    """
    if record.status == ACTIVE:
        if not record.lease_live(now):
            return _STALE
        if gone:
            return "running (owner gone)"
        if record.abort_requested is not None:
            return "running (aborting)"
    return record.status


def owner_gone(owner: str | None) -> bool:
    """Tell whether a run owner (``host:pid:tag``) was a process of this host that ended.

    Only a local, certainly dead process counts; on another host, or when unsure, False.
    """
    if owner is None or sys.platform == "win32":  # os.kill(pid, 0) terminates on Windows
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists but belongs to someone else
        return False
    return False


def format_owner(record: RunRecord, now: float, *, gone: bool = False) -> str:
    """Name a run's owner and the state of its lease, or "" for a run at rest."""
    if record.owner is None:
        return ""
    if record.lease_expires_at is None:
        return f"{record.owner} (process ended)" if gone else record.owner
    ended = "process ended; " if gone else ""
    left = record.lease_expires_at - now
    if left > 0:
        return f"{record.owner} ({ended}lease {format_age(left)} left)"
    return f"{record.owner} ({ended}lease expired {format_age(-left)} ago)"


def format_usage(usage: Mapping[str, Any]) -> str:
    """Summarize a stored usage dict: steps, tasks, tokens and cost when any, wall time."""
    parts = [f"{usage.get('steps', 0)} steps", f"{usage.get('tasks', 0)} tasks"]
    tokens_in, tokens_out = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    if tokens_in or tokens_out:
        parts.append(f"{tokens_in + tokens_out:,} tokens ({tokens_in:,} in, {tokens_out:,} out)")
    if usage.get("cost_usd"):
        parts.append(f"${usage['cost_usd']:.4f}")
    if usage.get("tool_calls"):
        parts.append(f"{usage['tool_calls']} tool calls")
    parts.append(f"wall {format_duration(float(usage.get('wall_seconds', 0.0)))}")
    return ", ".join(parts)


def run_json(record: RunRecord, now: float, *, gone: bool = False) -> dict[str, Any]:
    """Return a run as a JSON-ready dict: the stored record plus its lease state."""
    data = asdict(record)
    live = record.lease_live(now)
    data["lease"] = None if record.owner is None else ("live" if live else "expired")
    data["stale"] = record.status == ACTIVE and not live
    data["owner_gone"] = gone
    return data


def _status_text(status: str) -> Text:
    if status in (_STALE, "running (owner gone)"):
        return Text(status, style="bold red")
    return Text(status, style=_STORED_STYLE.get(status.split(" ")[0], ""))


def _tokens(record: RunRecord) -> int:
    return int(record.usage.get("input_tokens", 0)) + int(record.usage.get("output_tokens", 0))


def runs_table(records: Sequence[RunRecord], now: float, *, gone: Collection[str] = ()) -> Table:
    """Build the ``orchestra runs`` table; tokens and cost show when some run used any.

    ``gone``: the owners known to have ended (see :func:`owner_gone`).
    """
    spend = any(_tokens(r) or r.usage.get("cost_usd") for r in records)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("run id", no_wrap=True, style="bold")
    table.add_column("graph")
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right")
    if spend:
        table.add_column("tokens", justify="right")
        table.add_column("cost", justify="right")
    table.add_column("age", justify="right")
    table.add_column("updated", justify="right")
    table.add_column("owner / lease", style="dim")
    for record in records:
        cells: list[RenderableType] = [
            record.run_id,
            record.graph,
            _status_text(run_status(record, now, gone=record.owner in gone)),
            str(record.step),
        ]
        if spend:
            cost = float(record.usage.get("cost_usd", 0.0))
            cells += [f"{_tokens(record):,}", f"${cost:.4f}" if cost else ""]
        cells += [
            format_age(now - record.created_at),
            format_ago(record.updated_at, now),
            format_owner(record, now, gone=record.owner in gone),
        ]
        table.add_row(*cells)
    return table


def format_run_counts(records: Sequence[RunRecord], now: float) -> str:
    """Count runs by status: ``5: completed 3, running 1, running (stale lease) 1``."""
    counts = Counter(run_status(r, now) for r in records)
    parts = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
    return f"{len(records)}: {parts}" if records else "0"


def format_stop_all(reason: str) -> str:
    """Warn that stop-all is in force."""
    return (
        f"stop-all is in force ({reason}): no run may start or resume until "
        f"`orchestra stop-all --release`"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TimelineEntry:
    """One row of a run's timeline: a committed step, or an event of the run itself."""

    at: float
    step: int | None
    what: str
    duration: float | None = None
    changed: tuple[str, ...] = ()
    notes: str = ""
    style: str = ""


def _event_data(row: EventRow) -> dict[str, Any]:
    try:
        data = json.loads(row.data)
    except ValueError:
        return {"data": row.data}
    return data if isinstance(data, dict) else {"data": data}


def _run_event_entry(row: EventRow, data: Mapping[str, Any]) -> TimelineEntry:
    step = data.get("step", row.step)
    if row.kind == "run_started":
        following = format_nodes(data.get("next") or ())
        return TimelineEntry(
            at=row.at,
            step=step,
            what="run resumed" if data.get("resumed") else "run started",
            notes=f"next: {following}" if following else "",
            style="bold",
        )
    if row.kind == "run_finished":
        status = str(data.get("status"))
        return TimelineEntry(
            at=row.at,
            step=data.get("steps", step),
            what=f"run {status}",
            notes=str(data.get("error") or data.get("reason") or ""),
            style=f"bold {_STORED_STYLE.get(status, '')}".strip(),
        )
    if row.kind == "abort_requested":
        return TimelineEntry(
            at=row.at, step=step, what="abort requested", notes=str(data.get("reason")), style="red"
        )
    if row.kind == "run_forked":
        return TimelineEntry(
            at=row.at,
            step=step,
            what=f"forked from {data.get('from_run')} at step {data.get('from_step')}",
            style="bold",
        )
    notes = " ".join(f"{k}={_plain_value(k, v)}" for k, v in data.items() if k != "step")
    return TimelineEntry(at=row.at, step=step, what=row.kind, notes=notes)


@dataclass(slots=True)
class _StepEvents:
    step: int
    at: float = 0.0
    nodes: list[str] = field(default_factory=list)
    duration: float | None = None
    changed: tuple[str, ...] = ()
    committed: bool = False
    notes: list[str] = field(default_factory=list)
    failed: bool = False


def timeline(events: Sequence[EventRow]) -> list[TimelineEntry]:
    """Condense a run's stored events into a timeline, oldest first.

    The node and step events of a step become one entry: its nodes, duration, changed
    fields, and any retries and errors; the run's own events (started, finished, abort
    requested, forked, or kinds this version does not know) are one entry each.
    """
    entries: list[TimelineEntry] = []
    steps: dict[int, _StepEvents] = {}
    for row in events:
        data = _event_data(row)
        if row.kind not in ("node_finished", "node_retried", "step_committed"):
            entries.append(_run_event_entry(row, data))
            continue
        number = int(data.get("step", row.step or 0))
        item = steps.setdefault(number, _StepEvents(step=number))
        item.at = max(item.at, row.at)
        node = str(data.get("node"))
        if row.kind == "step_committed":
            item.nodes = list(data.get("nodes") or ())
            item.duration = data.get("duration")
            item.changed = tuple(data.get("changed") or ())
            item.committed = True
        elif row.kind == "node_retried":
            item.notes.append(
                f"{node} retried after attempt {data.get('attempt')}: {data.get('error')}"
            )
        else:
            if not item.committed:
                item.nodes.append(node)
            if data.get("error"):
                item.notes.append(f"{node} failed: {data['error']}")
                item.failed = True
    for item in steps.values():
        notes = list(item.notes)
        if not item.committed:
            notes.append("not committed")
        entries.append(
            TimelineEntry(
                at=item.at,
                step=item.step,
                what=format_nodes(item.nodes) or "…",
                duration=item.duration,
                changed=item.changed,
                notes="; ".join(notes),
                style="red" if item.failed else ("yellow" if notes else ""),
            )
        )
    entries.sort(key=lambda e: e.at)
    return entries


def timeline_table(entries: Sequence[TimelineEntry]) -> Table:
    """Build the step timeline of ``orchestra show``."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("time", style="dim", no_wrap=True)
    table.add_column("step", justify="right", style="bold")
    table.add_column("node(s) / event")
    table.add_column("took", justify="right")
    table.add_column("changed", style="cyan")
    table.add_column("notes")
    for entry in entries:
        table.add_row(
            format_timestamp(entry.at, date=False),
            "" if entry.step is None else str(entry.step),
            Text(entry.what, style=entry.style),
            "" if entry.duration is None else format_duration(entry.duration),
            ", ".join(entry.changed),
            Text(entry.notes, style="red" if "red" in entry.style else ""),
        )
    return table


def _next_nodes(events: Sequence[EventRow]) -> str:
    following: Sequence[str] = ()
    for row in events:
        if row.kind in ("run_started", "step_committed"):
            following = _event_data(row).get("next") or ()
    return format_nodes(following)


def run_summary(
    record: RunRecord, events: Sequence[EventRow], now: float, *, gone: bool = False
) -> Table:
    """Build the facts of ``orchestra show``: status, why, where, who, when, usage."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    facts.add_row("run", Text(record.run_id, style="bold"))
    facts.add_row("graph", f"{record.graph} (structure {record.structure_hash})")
    facts.add_row("status", _status_text(run_status(record, now, gone=gone)))
    if record.reason:
        facts.add_row("reason", record.reason)
    if record.error:
        facts.add_row("error", Text(record.error, style="red"))
    if record.abort_requested and record.status == ACTIVE:
        facts.add_row("abort", Text(f"requested: {record.abort_requested}", style="red"))
    facts.add_row("step", str(record.step))
    if record.status != "completed":
        following = _next_nodes(events)
        if following:
            facts.add_row("next", following)
    facts.add_row(
        "created", f"{format_timestamp(record.created_at)} ({format_ago(record.created_at, now)})"
    )
    facts.add_row(
        "updated", f"{format_timestamp(record.updated_at)} ({format_ago(record.updated_at, now)})"
    )
    if record.owner:
        facts.add_row("owner", format_owner(record, now, gone=gone))
    facts.add_row(
        "app",
        record.app_ref or Text("unknown (resume needs --app module:attribute)", style="yellow"),
    )
    if record.parent_run_id:
        facts.add_row("forked from", f"{record.parent_run_id} at step {record.parent_step}")
    if record.usage:  # a running run's usage is stored when its lease is renewed
        facts.add_row("usage", format_usage(record.usage))
    return facts


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """What ``orchestra checkpoints`` says about one stored checkpoint."""

    step: int
    kind: str  # snapshot | delta
    size: int
    set: tuple[str, ...]
    appended: dict[str, int]
    next: tuple[str, ...]
    created_at: float

    @property
    def changed(self) -> str:
        """The changed fields: ``n, log +2`` (a set field; two items appended to a list)."""
        parts = [*self.set, *(f"{name} +{count}" for name, count in self.appended.items())]
        return ", ".join(parts)


def checkpoint_info(row: CheckpointRow) -> CheckpointInfo:
    """Describe a checkpoint: its delta's set and appended fields, or for a snapshot the
    fields its step changed (from its ``step_committed`` event)."""
    fields_set: tuple[str, ...] = ()
    appended: dict[str, int] = {}
    if row.delta:
        delta = json.loads(row.delta)
        fields_set = tuple(delta.get("set", {}))
        appended = {name: len(items) for name, items in delta.get("append", {}).items()}
    elif row.events:
        for item in json.loads(row.events):
            if item.get("event") == "step_committed":
                fields_set = tuple(item.get("changed") or ())
    tasks = json.loads(row.tasks) if row.tasks else []
    return CheckpointInfo(
        step=row.step,
        kind="snapshot" if row.snapshot is not None else "delta",
        size=row.size or len(row.snapshot or row.delta or ""),
        set=fields_set,
        appended=appended,
        next=tuple(str(task.get("label", task.get("node"))) for task in tasks),
        created_at=row.created_at,
    )


def checkpoint_json(info: CheckpointInfo) -> dict[str, Any]:
    """Return a checkpoint's description as a JSON-ready dict."""
    return {
        "step": info.step,
        "kind": info.kind,
        "bytes": info.size,
        "set": list(info.set),
        "appended": info.appended,
        "next": list(info.next),
        "created_at": info.created_at,
    }


def checkpoints_table(infos: Sequence[CheckpointInfo]) -> Table:
    """Build the ``orchestra checkpoints`` table."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("step", justify="right", style="bold")
    table.add_column("kind")
    table.add_column("bytes", justify="right")
    table.add_column("changed", style="cyan")
    table.add_column("next")
    table.add_column("time", style="dim", no_wrap=True)
    for info in infos:
        changed = info.changed or ("(input)" if info.step == 0 else "(no change)")
        table.add_row(
            str(info.step),
            Text(info.kind, style="yellow" if info.kind == "snapshot" else ""),
            f"{info.size:,}",
            changed,
            format_nodes(info.next) or "(end)",
            format_timestamp(info.created_at),
        )
    return table


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
    return lines


def format_abort(record: RunRecord, previous: str, now: float, *, gone: bool = False) -> str:
    """Say what an abort request did: told a live owner, or marked the run aborted at once.

    ``gone``: the owner holding the lease is known to have ended, so nobody will act on the
    request until the lease expires.
    """
    if record.status == ACTIVE and record.abort_requested is not None:
        if gone and record.lease_expires_at is not None:
            return (
                f"abort requested, but run {record.run_id}'s owner {record.owner} has ended: "
                f"once its lease expires (in {format_age(record.lease_expires_at - now)}) "
                f"`orchestra abort` marks it aborted at once; --wait does that for you"
            )
        return (
            f"abort requested: run {record.run_id} is owned by {record.owner}, a live process, "
            f"which stops it at its next check and keeps the last checkpoint"
        )
    why = {
        _STALE: "its owner's lease had expired, so no process was running it",
        ACTIVE: "no live owner",
    }.get(previous, f"it was {previous}")
    return f"run {record.run_id} marked aborted at once ({why})"


def format_prune(removed: int, before: int, after: int | None, *, checkpointed: bool = True) -> str:
    """Say what ``orchestra prune`` removed and what the file gave back."""
    runs = f"deleted {removed} run{'' if removed == 1 else 's'} with their checkpoints and events"
    if after is None:
        return f"{runs}; not vacuumed (the free pages are reused by new runs)"
    reclaimed = before - after
    text = (
        f"{runs}; vacuumed {format_bytes(before)} -> {format_bytes(after)} "
        f"({format_bytes(max(reclaimed, 0))} reclaimed)"
    )
    if not checkpointed:
        text += "; another process is reading, so the write-ahead log shrinks later"
    return text


# -- printing -------------------------------------------------------------------------------


async def watch_plain(events: AsyncIterator[Event], echo: Callable[[str], None]) -> RunOutcome[Any]:
    """Print one line per event as the run goes, then the final state; return the outcome."""
    outcome: RunOutcome[Any] | None = None
    async for event in events:
        echo(format_event(event))
        if isinstance(event, RunFinished):
            outcome = event.outcome
    if outcome is None:  # pragma: no cover - a stream always ends with RunFinished
        raise RuntimeError("the run ended without a run_finished event")
    for line in format_state(outcome.state):
        echo(line)
    return outcome


async def watch_live(
    events: AsyncIterator[Event], console: Console, *, refresh: float = 0.1
) -> RunOutcome[Any]:
    """Show a live table of the run's steps, then its summary panel; return the outcome."""
    view = ProgressView()

    async def tick(live: Live) -> None:
        while True:
            await anyio.sleep(refresh)
            live.refresh()

    # auto_refresh would render from rich's own thread while events mutate the view;
    # refreshing from a task of our own keeps everything on the event loop
    failure: Exception | None = None
    with Live(view, console=console, auto_refresh=False) as live:
        async with anyio.create_task_group() as group:
            group.start_soon(tick, live)
            try:
                async for event in events:
                    view.update(event)
                    live.refresh()
            except Exception as exc:  # re-raised below, not wrapped in an exception group
                failure = exc
            group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if view.outcome is None:  # pragma: no cover - a stream always ends with RunFinished
        raise RuntimeError("the run ended without a run_finished event")
    console.print(summary_panel(view.outcome))
    return view.outcome


async def _run_demo(
    input: Mapping[str, Any],
    *,
    speed: float,
    failures: int,
    live: bool,
    db: Path | None = None,
) -> RunOutcome[Any]:
    app = build_app(speed=speed, failures=failures)
    if db is not None:
        app = app.with_store(SQLiteStore(db))
    app.validate_input(input)  # bad input is one error line, before any display starts
    stream = cast(AsyncGenerator[Event, None], app.stream(input))
    async with aclosing(stream) as events:
        if live:
            return await watch_live(events, Console())
        return await watch_plain(events, click.echo)


# -- logging --------------------------------------------------------------------------------


class _StderrLogger:
    """Write each log line to ``sys.stderr`` as it is at that moment (rich's Live swaps it)."""

    def msg(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def _stderr_logger(*args: Any) -> _StderrLogger:
    return _StderrLogger()


def _drop_run_events(logger: Any, method: str, event_dict: Any) -> Any:
    """Drop the run events the CLI displays itself (``--verbose`` keeps them)."""
    if event_dict.get("event") in _DISPLAYED:
        raise structlog.DropEvent
    return event_dict


_DISPLAYED = frozenset(
    cls.kind
    for cls in (RunStarted, NodeStarted, NodeRetried, NodeFinished, StepCommitted, RunFinished)
)


@contextmanager
def logging_configured(*, verbose: bool) -> Iterator[None]:
    """Route structlog to stderr: warnings and up, or everything with ``verbose``.

    Only the CLI configures logging (a library never does), and it puts the previous
    configuration back on the way out, so invoking the CLI in-process leaves no trace.
    """
    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        renderer,
    ]
    if not verbose:
        processors.insert(0, _drop_run_events)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.WARNING
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


# -- commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The global options, stored on the click context (``ctx.obj``) for every command."""

    db: Path | None = None
    verbose: bool = False


class _Group(click.Group):
    """A command group that reports any error as one line on stderr and exits with 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (Exception, BaseExceptionGroup) as exc:
            verbose = isinstance(ctx.obj, Settings) and ctx.obj.verbose
            error = _cli_error(exc, verbose=verbose)
            if error is exc:
                raise
            raise error from None


def _cli_error(exc: BaseException, *, verbose: bool) -> BaseException:
    """Translate what escaped a command into what click should show (one line, or Abort)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # task groups wrap even a lone error
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(KeyboardInterrupt)
        if rest is None:  # Ctrl-C reached several tasks at once
            return click.Abort()
    if isinstance(exc, KeyboardInterrupt):
        return click.Abort()
    if isinstance(exc, click.ClickException | click.exceptions.Exit | click.Abort):
        return exc
    if isinstance(exc, OrchestraError):
        return click.ClickException(format_error(exc))
    if verbose or not isinstance(exc, Exception):
        return exc
    return click.ClickException(
        f"internal error: {format_error(exc)} (--verbose shows the traceback)"
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="orchestra", message="%(prog)s %(version)s"
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ORCHESTRA_DB",
    show_envvar=True,
    help="The run database (SQLite) the run commands read and write.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Log everything (debug up) to stderr; show tracebacks."
)
@click.pass_context
def main(ctx: click.Context, db: Path | None, verbose: bool) -> None:
    """Run multi-agent graphs, and watch, approve, resume and abort their runs."""
    ctx.obj = Settings(db=db, verbose=verbose)
    ctx.with_resource(logging_configured(verbose=verbose))


DEMO_DB = "orchestra-demo.db"


@main.command()
@click.option(
    "--topic", default=DEFAULT_TOPIC, show_default=True, help="What the demo team writes about."
)
@click.option(
    "--plain",
    is_flag=True,
    help="One line per event instead of the live table (automatic when stdout is no terminal).",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    envvar="ORCHESTRA_DEMO_SPEED",
    show_envvar=True,
    help="Run the simulated work this many times faster; 0 skips every pause.",
)
@click.option(
    "--failures",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Transient errors publishing hits; 3 or more use up its retries and fail the run.",
)
@click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    show_default=True,
    help="The async library to run on.",
)
@click.option(
    "--no-store",
    is_flag=True,
    help="Do not checkpoint the run (by default it goes to --db, or ./orchestra-demo.db).",
)
@click.pass_obj
def demo(
    settings: Settings,
    topic: str,
    plain: bool,
    speed: float,
    failures: int,
    backend: str,
    no_store: bool,
) -> None:
    """Run a demo graph and watch it: no model or API key needed.

    A planner fans out to three researchers working concurrently, a reviewer sends the draft
    back once, and publishing fails once and succeeds on retry. Every step is checkpointed in
    the embedded SQLite store (--db, default ./orchestra-demo.db), so the operator commands
    work on it afterwards. The same graph, with comments, is examples/quickstart.py.
    """
    if backend == "trio" and find_spec("trio") is None:
        raise click.BadParameter("trio is not installed (pip install trio)", param_hint="--backend")
    live = not plain and Console().is_terminal
    db = None if no_store else (settings.db or Path(DEMO_DB))
    outcome = anyio.run(
        lambda: _run_demo({"topic": topic}, speed=speed, failures=failures, live=live, db=db),
        backend=backend,
    )
    if db is not None:
        click.echo(
            f"\nthe run is checkpointed in {db}; look at it with:\n"
            f"  orchestra --db {db} runs\n"
            f"  orchestra --db {db} show {outcome.run_id}\n"
            f"  orchestra --db {db} checkpoints {outcome.run_id}"
        )
    problem = format_outcome_error(outcome)
    if problem is not None:
        if settings.verbose and outcome.error is not None:
            click.echo("".join(traceback.format_exception(outcome.error)), err=True, nl=False)
        raise click.ClickException(problem)


# -- commands on the run database ------------------------------------------------------------

_DB_HELP = "Needs --db PATH or ORCHESTRA_DB."


def _console() -> Console:
    """A console for tables: off a terminal (a pipe, a file), wide enough for one row a line."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)
    return console


def _print(*renderables: RenderableType) -> None:
    console = _console()
    if console.is_terminal:
        console.print(*renderables)
        return
    # off a terminal, drop the padding rich leaves at the end of table rows
    with console.capture() as capture:
        console.print(*renderables)
    click.echo("\n".join(line.rstrip() for line in capture.get().splitlines()))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _db_path(settings: Settings) -> Path:
    if settings.db is None:
        raise click.ClickException("no run database: pass --db PATH or set ORCHESTRA_DB")
    if not settings.db.exists():
        raise click.ClickException(
            f"{settings.db}: no such database (a graph compiled with store={str(settings.db)!r} "
            f"creates it on its first run)"
        )
    return settings.db


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[SQLiteStore]:
    """Open the ``--db`` store (a missing, foreign or corrupted file is one error line)."""
    store = SQLiteStore(_db_path(settings))
    try:
        store.conn  # noqa: B018 - open now, so a bad file fails before anything else
        yield store
    finally:
        await store.aclose()


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


async def find_run(store: Store, run_id: str) -> RunRecord:
    """Return the run ``run_id``, or the one run whose id starts with it (like git)."""
    try:
        return await store.get_run(run_id)
    except RunNotFoundError:
        if not run_id:
            raise
        matches = [r for r in await store.list_runs() if r.run_id.startswith(run_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise
        names = ", ".join(r.run_id for r in matches[:5])
        more = ", ..." if len(matches) > 5 else ""
        raise click.ClickException(
            f"run id {run_id!r} is ambiguous: {len(matches)} runs start with it ({names}{more})"
        ) from None


_run_id_argument = click.argument("run_id", metavar="RUN")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")


@main.command()
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(RUN_STATUSES),
    help="Only runs with this status (repeat for several).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Show at most this many runs, newest first.",
)
@_json_option
@click.pass_obj
def runs(settings: Settings, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List runs, newest first: status, step, age and who owns them.

    A running run whose owner's lease expired shows as "running (stale lease)": its process
    crashed or hangs, and `orchestra resume RUN` takes it over.
    """

    async def work() -> tuple[list[RunRecord], str | None]:
        async with open_store(settings) as store:
            records = await store.list_runs(statuses=statuses, limit=limit + 1)
            return records, await store.stop_all_reason()

    records, stopped = _run(work)
    now = time.time()
    more = len(records) > limit
    records = records[:limit]
    if stopped is not None:
        click.echo(f"Warning: {format_stop_all(stopped)}", err=True)
    gone = {r.owner for r in records if r.owner is not None and owner_gone(r.owner)}
    if as_json:
        _echo_json([run_json(r, now, gone=r.owner in gone) for r in records])
        return
    if not records:
        which = f" with status {' or '.join(statuses)}" if statuses else ""
        click.echo(f"no runs{which} in {settings.db}")
        return
    _print(runs_table(records, now, gone=gone))
    if more:
        click.echo(f"(newest {limit} shown; --limit shows more)")


@main.command()
@_run_id_argument
@_json_option
@click.pass_obj
def show(settings: Settings, run_id: str, as_json: bool) -> None:
    """Show a run: status, owner, usage and a timeline of its steps."""

    async def work() -> tuple[RunRecord, list[EventRow]]:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            return record, await store.events(record.run_id)

    record, events = _run(work)
    now = time.time()
    gone = owner_gone(record.owner)
    entries = timeline(events)
    if as_json:
        _echo_json(
            {
                "run": run_json(record, now, gone=gone),
                "timeline": [asdict(entry) for entry in entries],
                "events": [
                    {"step": e.step, "kind": e.kind, "at": e.at, "data": _event_data(e)}
                    for e in events
                ],
            }
        )
        return
    _print(
        run_summary(record, events, now, gone=gone),
        "",
        timeline_table(entries) if entries else "no events stored",
    )


@main.command()
@_run_id_argument
@click.option(
    "--app",
    "app_ref",
    metavar="MODULE:ATTR",
    help="Load the graph from here (module:attribute or path/to/file.py:attribute) instead "
    "of the reference stored with the run.",
)
@click.option(
    "--allow-graph-change",
    is_flag=True,
    help="Resume even if the graph's structure changed since the run started.",
)
@click.pass_obj
def resume(settings: Settings, run_id: str, app_ref: str | None, allow_graph_change: bool) -> None:
    """Continue a stopped or crashed run from its last checkpoint.

    The graph is imported from the module:attribute stored with the run (run from the
    directory the app ran in) or from --app, bound to --db, and resumed. A crashed run's
    lease must expire first. Exits 1 unless the run completes.
    """
    path = _db_path(settings)

    async def work() -> tuple[RunOutcome[Any], int]:
        # the store refuses all of these too; checking first keeps the app unimported
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            stopped = await store.stop_all_reason()
        if record.status == "completed":
            raise RunStatusError(record.run_id, record.status, "resume it")
        if stopped is not None:
            raise StopAllActiveError(stopped)
        _refuse_live_owner(record, time.time())
        ref = app_ref or record.app_ref
        if ref is None:
            raise click.ClickException(
                f"run {record.run_id} has no stored app reference (its graph was not a "
                f"module-level attribute); pass --app module:attribute"
            )
        app = load_app(ref, stored=app_ref is None)
        click.echo(
            f"resuming run {record.run_id} (graph {record.graph}) at step {record.step} with {ref}"
        )
        store = resume_store(app, path)
        try:
            outcome = await app.with_store(store).resume(
                record.run_id, allow_graph_change=allow_graph_change
            )
        finally:
            await store.aclose()
        return outcome, record.step

    outcome, from_step = _run(work)
    for line in format_resumed(outcome, from_step):
        click.echo(line)
    problem = format_outcome_error(outcome)
    if problem is not None:
        if settings.verbose and outcome.error is not None:
            click.echo("".join(traceback.format_exception(outcome.error)), err=True, nl=False)
        raise click.ClickException(problem)


def _refuse_live_owner(record: RunRecord, now: float) -> None:
    """Refuse to resume a run whose owner holds its lease, before importing its app."""
    if not record.lease_live(now):
        return
    assert record.owner is not None
    assert record.lease_expires_at is not None
    left = record.lease_expires_at - now
    if owner_gone(record.owner):
        raise click.ClickException(
            f"run {record.run_id}: its owner {record.owner} has ended, but its lease holds "
            f"for {left:.1f}s more; resume it after that"
        )
    raise LeaseHeldError(record.run_id, record.owner, left)


@main.command()
@_run_id_argument
@click.option("--reason", required=True, help="Why: recorded with the run and its events.")
@click.option("--wait", is_flag=True, help="Wait until the run has stopped; print its status.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="With --wait: give up after this many seconds (exit 1).",
)
@click.pass_obj
def abort(settings: Settings, run_id: str, reason: str, wait: bool, timeout: float) -> None:
    """Stop one run (the kill switch).

    A run with a live owner is asked to stop: its owner cancels the step in flight, keeps
    the last checkpoint and records "aborted". Any other run (crashed, interrupted, failed,
    forked) is marked aborted at once. Either way it can be resumed later.
    """

    async def work() -> None:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            if record.status == "aborted":
                why = f": {record.reason}" if record.reason else ""
                click.echo(f"run {record.run_id} is already aborted{why}")
                return
            gone = owner_gone(record.owner)
            previous = run_status(record, time.time(), gone=gone)
            record = await store.request_abort(record.run_id, reason)
            click.echo(format_abort(record, previous, time.time(), gone=gone))
            if wait and record.status == ACTIVE:
                with anyio.move_on_after(timeout):
                    record = await wait_until_stopped(store, record.run_id, reason)
                if record.status == ACTIVE:
                    raise click.ClickException(
                        f"run {record.run_id} is still running after {timeout:g}s: its owner "
                        f"has not stopped it (`orchestra show {record.run_id}` tells more)"
                    )
                problem = f": {record.reason}" if record.reason else ""
                click.echo(
                    f"run {record.run_id} stopped at step {record.step}: {record.status}{problem}"
                )

    _run(work)


async def wait_until_stopped(
    store: Store, run_id: str, reason: str, *, poll: float = 0.1
) -> RunRecord:
    """Poll until a run is no longer running (bound it with a cancel scope); if its owner
    dies before it notices the abort, mark the run aborted, since nobody else will."""
    while True:
        record = await store.get_run(run_id)
        if record.status != ACTIVE:
            return record
        if not record.lease_live(time.time()):
            return await store.request_abort(run_id, reason)
        await anyio.sleep(poll)


@main.command(name="stop-all")
@click.option("--reason", default="stop-all by operator", show_default=True, help="Why: recorded.")
@click.option("--release", is_flag=True, help="Lift stop-all: runs may start and resume again.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def stop_all(settings: Settings, reason: str, release: bool, yes: bool) -> None:
    """Abort every running run in the database and refuse new ones.

    Until `orchestra stop-all --release`, starting or resuming any run on this database
    fails with a clear error. Runs stopped this way can be resumed after the release.
    """
    path = _db_path(settings)
    if release:

        async def lift() -> bool:
            async with open_store(settings) as store:
                return await store.release_stop_all()

        was = _run(lift)
        click.echo(
            "stop-all released: runs may start again" if was else "stop-all was not in force"
        )
        return
    if not yes:
        click.confirm(
            f"Abort every running run in {path} and refuse new runs until --release?",
            abort=True,
        )

    async def work() -> list[tuple[RunRecord, str, bool]]:
        async with open_store(settings) as store:
            before = {r.run_id: r for r in await store.list_runs(statuses=[ACTIVE])}
            stopped = await store.stop_all(reason)
            now = time.time()
            results = []
            for run_id in stopped:
                previous = before.get(run_id)
                gone = previous is not None and owner_gone(previous.owner)
                status = ACTIVE if previous is None else run_status(previous, now, gone=gone)
                results.append((await store.get_run(run_id), status, gone))
            return results

    results = _run(work)
    now = time.time()
    click.echo(
        f"stop-all in force ({reason}): {len(results)} running "
        f"run{'' if len(results) == 1 else 's'} told to stop"
    )
    for record, previous, gone in results:
        click.echo(f"  {format_abort(record, previous, now, gone=gone)}")
    click.echo("new runs and resumes are refused until `orchestra stop-all --release`")


@main.command()
@_run_id_argument
@_json_option
@click.pass_obj
def checkpoints(settings: Settings, run_id: str, as_json: bool) -> None:
    """List a run's checkpoints: kind, size, changed fields, next tasks."""

    async def work() -> tuple[RunRecord, list[CheckpointRow]]:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            return record, await store.checkpoints(record.run_id)

    record, rows = _run(work)
    infos = [checkpoint_info(row) for row in rows]
    if as_json:
        _echo_json([checkpoint_json(info) for info in infos])
        return
    total = sum(info.size for info in infos)
    _print(checkpoints_table(infos))
    click.echo(f"{len(infos)} checkpoints of run {record.run_id}, {format_bytes(total)} in all")


@main.command()
@_run_id_argument
@click.option(
    "--step",
    type=click.IntRange(min=0),
    required=True,
    help="Start the new run from this step's checkpoint (see `orchestra checkpoints RUN`).",
)
@click.option("--run-id", "new_run_id", help="The new run's id (default: a random one).")
@click.pass_obj
def fork(settings: Settings, run_id: str, step: int, new_run_id: str | None) -> None:
    """Start a new run from an earlier checkpoint of a run.

    The new run (status pending) starts from a copy of the state at that step, the
    original is untouched: retry from before a bad decision, with a fixed graph and
    --allow-graph-change if needed. `orchestra resume NEW` runs it.
    """

    async def work() -> RunRecord:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            if step > record.step:
                raise click.ClickException(
                    f"run {record.run_id} has no checkpoint at step {step}: its last is step "
                    f"{record.step} (`orchestra checkpoints {record.run_id}` lists them)"
                )
            return await fork_run(store, record.run_id, step, new_run_id or _new_run_id())

    record = _run(work)
    click.echo(
        f"forked run {record.parent_run_id} at step {step} into {record.run_id} "
        f"(status {record.status})"
    )
    click.echo(f"resume it with: orchestra --db {settings.db} resume {record.run_id}")


class _Duration(click.ParamType):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@main.command()
@click.option(
    "--older-than",
    type=_Duration(),
    required=True,
    metavar="DURATION",
    help="Delete runs not updated for this long: 30d, 12h, 90m, 45s (or 1d12h).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s for s in RUN_STATUSES if s != ACTIVE]),
    default=("completed",),
    show_default=True,
    help="Only runs with this status (repeat for several). Abort a crashed run to prune it.",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-vacuum", is_flag=True, help="Skip VACUUM (faster; the file keeps its size).")
@click.pass_obj
def prune(
    settings: Settings,
    older_than: float,
    statuses: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    no_vacuum: bool,
) -> None:
    """Delete old runs with their checkpoints and events, then VACUUM the database."""
    cutoff = time.time() - older_than
    which = f"status {' or '.join(statuses)}, not updated for {format_age(older_than)}"

    async def candidates() -> list[RunRecord]:
        async with open_store(settings) as store:
            return [r for r in await store.list_runs(statuses=statuses) if r.updated_at < cutoff]

    doomed = _run(candidates)
    if not doomed:
        click.echo(f"no runs to prune ({which})")
        return
    count = f"{len(doomed)} run{'' if len(doomed) == 1 else 's'}"
    if dry_run:
        click.echo(f"would delete {count} ({which}):")
        _print(runs_table(doomed, time.time()))
        return
    if not yes:
        click.confirm(f"Delete {count} ({which}) from {settings.db}?", abort=True)

    async def work() -> str:
        async with open_store(settings) as store:
            before = store.file_size()
            removed = await store.prune(older_than=cutoff, statuses=statuses)
            if no_vacuum:
                return format_prune(removed, before, None)
            checkpointed = vacuum(store)
            return format_prune(removed, before, store.file_size(), checkpointed=checkpointed)

    click.echo(_run(work))


def vacuum(store: SQLiteStore) -> bool:
    """VACUUM the store, then fold the write-ahead log back into the file; return whether
    the log could be emptied (another process reading can delay that)."""
    store.vacuum()
    # in WAL mode VACUUM writes the new file through the log, which grows by the whole
    # database until a checkpoint; TRUNCATE empties it so the space is really given back
    try:
        busy, _, _ = store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.DatabaseError:
        return False
    return not busy


@main.group(name="db")
def db_group() -> None:
    """Look after the run database file."""


@db_group.command()
@click.pass_obj
def check(settings: Settings) -> None:
    """Check the database: schema, integrity, stop-all, runs by status.

    Exits 1 if the integrity check finds a problem.
    """

    async def work() -> tuple[str, str, str | None, list[RunRecord], int]:
        async with open_store(settings) as store:
            return (
                store.schema_version(),
                store.integrity_check(),
                await store.stop_all_reason(),
                await store.list_runs(),
                store.file_size(),
            )

    version, integrity, stopped, records, size = _run(work)
    now = time.time()
    click.echo(f"database   {settings.db} ({format_bytes(size)})")
    click.echo(f"schema     {version}")
    click.echo(f"integrity  {integrity.splitlines()[0] if integrity else '?'}")
    click.echo(f"stop-all   {stopped if stopped is not None else 'not in force'}")
    click.echo(f"runs       {format_run_counts(records, now)}")
    if integrity != "ok":
        raise click.ClickException(
            f"{settings.db}: integrity check failed: {'; '.join(integrity.splitlines()[:3])}"
        )


# -- loading an app for resume ---------------------------------------------------------------


class AppLoadError(click.ClickException):
    """The app of a run cannot be imported (a CLI error: one line, exit code 1)."""


def load_app(ref: str, *, stored: bool = False) -> CompiledGraph[Any]:
    """Import the compiled graph named by ``module:attribute`` or ``path/file.py:attribute``.

    For a module the current directory is put on ``sys.path`` first; a file is imported
    under a private module name, with its own directory on ``sys.path`` (as when it runs as
    a script), so its ``if __name__ == "__main__":`` block does not run.
    """
    origin = " (stored with the run; pass --app to load another)" if stored else ""
    target, sep, attribute = ref.rpartition(":")
    if not sep or not target or not all(part.isidentifier() for part in attribute.split(".")):
        raise AppLoadError(
            f"app reference {ref!r} must look like module:attribute or path/to/file.py:attribute"
        )
    try:
        module = _import_file(target) if _is_file_ref(target) else _import_module(target)
    except AppLoadError:
        raise
    except (Exception, SystemExit) as exc:
        raise AppLoadError(f"cannot import app {ref!r}{origin}: {format_error(exc)}") from exc
    app: Any = module
    for part in attribute.split("."):
        if not hasattr(app, part):
            raise AppLoadError(
                f"cannot import app {ref!r}{origin}: {target} has no attribute {part!r}"
            )
        app = getattr(app, part)
    if isinstance(app, Graph):
        raise AppLoadError(
            f"{ref!r} is a Graph, not a compiled graph: point at the result of graph.compile(...)"
        )
    if not isinstance(app, CompiledGraph):
        what = f"the class {app.__name__}" if isinstance(app, type) else f"a {type(app).__name__}"
        raise AppLoadError(f"{ref!r} is {what}, not a CompiledGraph (graph.compile(...))")
    return app


def _is_file_ref(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def _import_file(target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise AppLoadError(f"cannot import app from {target}: no such file")
    name = "_orchestra_app_" + re.sub(r"\W", "_", path.stem)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AppLoadError(f"cannot import app from {target}: not a Python file")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic and dataclasses look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resume_store(app: CompiledGraph[Any], path: Path) -> SQLiteStore:
    """Return the store ``orchestra resume`` binds the app to: ``--db``, with the settings
    (durability, lease, poll interval) of the app's own SQLite store if it has one."""
    own = app.store
    if isinstance(own, SQLiteStore):
        return SQLiteStore(
            path,
            durability=own.durability,
            lease_seconds=own.lease_seconds,
            poll_seconds=own.poll_seconds,
            busy_timeout=own.busy_timeout,
        )
    return SQLiteStore(path)
