"""Condensing what a run stored: its events into a timeline, its checkpoints into a list."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from .._json import loads_object, loads_or_text
from ..kinds import ApprovalDecision
from ..store.base import CheckpointRow, EventRow
from ..tools import CallStatus
from .budgets import format_budget_diff
from .format import STORED_STYLE, format_duration, format_nodes, format_timestamp, plain_value
from .requests import format_answer, format_call

__all__ = (
    "CheckpointInfo",
    "TimelineEntry",
    "checkpoint_info",
    "checkpoint_json",
    "checkpoints_table",
    "event_data",
    "timeline",
    "timeline_table",
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


def event_data(row: EventRow) -> dict[str, Any]:
    """Return a stored event's data as a dict (data that is not an object, under ``data``)."""
    data = loads_or_text(row.data)
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
            style=f"bold {STORED_STYLE.get(status, '')}".strip(),
        )
    if row.kind == "abort_requested":
        return TimelineEntry(
            at=row.at, step=step, what="abort requested", notes=str(data.get("reason")), style="red"
        )
    if row.kind == "request_answered":
        said = format_answer(loads_object(str(data.get("answer"))))
        return TimelineEntry(
            at=row.at,
            step=step,
            what=f"operator answered {data.get('request_kind')} request",
            notes=f"{data.get('request_id')} ({data.get('node')}): {said}",
            style="bold",
        )
    if row.kind == "approval_decided":
        return _approval_entry(row, data)
    if row.kind == "conflict_arbitrated":
        return _arbitration_entry(row, data)
    if row.kind == "budget_raised":
        after = data.get("after")
        changed = format_budget_diff(data.get("before"), after if isinstance(after, dict) else {})
        reason = f" ({data['reason']})" if data.get("reason") else ""
        return TimelineEntry(
            at=row.at,
            step=step,
            what="operator changed the budget",
            notes=changed + reason,
            style="bold",
        )
    if row.kind == "run_forked":
        return TimelineEntry(
            at=row.at,
            step=step,
            what=f"forked from {data.get('from_run')} at step {data.get('from_step')}",
            style="bold",
        )
    notes = " ".join(f"{k}={plain_value(k, v)}" for k, v in data.items() if k != "step")
    return TimelineEntry(at=row.at, step=step, what=row.kind, notes=notes)


def _approval_entry(row: EventRow, data: Mapping[str, Any]) -> TimelineEntry:
    """A held call met its approval: approved, edited (approved, changed), rejected or
    expired; which request held it, and why a call did not run."""
    decision = str(data.get("decision"))
    what = f"{data.get('tool')} call {_DECISIONS.get(decision, decision)}"
    notes = f"{data.get('request_id')} ({data.get('node')})"
    if data.get("reason"):
        notes += f": {data['reason']}"
    return TimelineEntry(
        at=row.at,
        step=data.get("step", row.step),
        what=what,
        notes=notes,
        style="bold"
        if decision in (ApprovalDecision.APPROVED, ApprovalDecision.EDITED)
        else "yellow",
    )


_DECISIONS: dict[str, str] = {
    ApprovalDecision.EDITED: "approved with changed arguments",
    ApprovalDecision.EXPIRED: "not approved in time",
}


def _arbitration_entry(row: EventRow, data: Mapping[str, Any]) -> TimelineEntry:
    """Calls conflicted over resources: the policy that settled it, the calls that ran (in
    order) and those that lost."""
    try:
        calls = {str(c.get("key")): c for c in json.loads(str(data.get("calls")))}
        lost = json.loads(str(data.get("lost")))
    except (ValueError, AttributeError, TypeError):
        calls, lost = {}, {}

    def named(key: str) -> str:
        call = calls.get(key)
        if not isinstance(call, dict):
            return key
        return f"{key} {format_call(str(call.get('tool')), call.get('arguments'))}"

    ran = [named(str(key)) for key in data.get("run") or ()]
    notes = [f"ran {', '.join(ran)}" if ran else "no call ran"]
    if isinstance(lost, dict) and lost:
        notes.append(f"lost {', '.join(named(str(key)) for key in lost)}")
    if data.get("policy") == "escalate":  # always settled by a choice recorded before
        notes.insert(0, "an operator chose")
    elif data.get("replayed"):
        notes.append("decided before: replayed from the ledger")
    resources = ", ".join(map(str, data.get("resources") or ()))
    return TimelineEntry(
        at=row.at,
        step=data.get("step", row.step),
        what=f"conflict over {resources} settled: {data.get('policy')}",
        notes="; ".join(notes),
        style="yellow" if lost else "",
    )


# how a tool call's status shows: a call that did not run is a warning, one that failed an
# error, one in doubt needs an operator
_TOOL_STATUS_STYLE: dict[str, str] = {
    CallStatus.OK: "",
    CallStatus.DENIED: "yellow",
    CallStatus.INVALID_ARGUMENTS: "yellow",
    CallStatus.REJECTED: "yellow",
    CallStatus.CONFLICT: "yellow",
}
_IN_DOUBT_STYLE = "bold red"


def _call_entry(row: EventRow, data: Mapping[str, Any]) -> TimelineEntry:
    """One entry for a model or tool call: who called what, how long, what came of it."""
    node = data.get("node", "?")
    replayed = bool(data.get("replayed"))
    if row.kind == "model_called":
        what = f"{node} \N{RIGHTWARDS ARROW} model {data.get('model')}"
        notes = [f"{data.get('input_tokens', 0):,} tokens in, {data.get('output_tokens', 0):,} out"]
        finish = data.get("finish_reason")
        if finish not in (None, "stop", "tool_calls"):  # e.g. "length": the answer was cut
            notes.append(f"finish: {finish}")
        style = ""
    else:
        status = str(data.get("status"))
        what = f"{node} \N{RIGHTWARDS ARROW} tool {data.get('tool')}"
        notes = [f"{status}: {data['error']}" if data.get("error") else status]
        in_doubt = status == CallStatus.IN_DOUBT
        style = _IN_DOUBT_STYLE if in_doubt else _TOOL_STATUS_STYLE.get(status, "red")
    if replayed:
        notes.append("replayed from the ledger")
    return TimelineEntry(
        at=row.at,
        step=data.get("step", row.step),
        what=what,
        duration=None if replayed else data.get("duration"),
        notes="; ".join(notes),
        style=style,
    )


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
    fields, and any retries and errors; each model and tool call is one entry (caller, model
    or tool, tokens or status, replayed); the run's own events (started, finished, abort
    requested, an operator's answer, an approval decided, a conflict arbitrated, budget
    changed, forked, or kinds this version does not know) are one entry each.
    """
    entries: list[TimelineEntry] = []
    steps: dict[int, _StepEvents] = {}
    for row in events:
        data = event_data(row)
        if row.kind in ("model_called", "tool_called"):
            entries.append(_call_entry(row, data))
            continue
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
