"""Formatting stored runs: status, owner and lease, usage, the runs table, what commands did."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from ..outcome import RunStatus
from ..store.base import EventRow, RunRecord
from ..store.records import owner_gone as owner_gone
from .budgets import budget_used, format_budget
from .format import (
    STORED_STYLE,
    format_age,
    format_ago,
    format_bytes,
    format_duration,
    format_nodes,
    format_timestamp,
)
from .history import event_data

__all__ = (
    "RUN_STATUSES",
    "budget_by_agent",
    "format_abort",
    "format_owner",
    "format_prune",
    "format_run_counts",
    "format_stop_all",
    "format_usage",
    "owner_gone",
    "run_json",
    "run_status",
    "run_summary",
    "runs_table",
    "usage_by_node",
)

RUN_STATUSES = tuple(str(status) for status in RunStatus)
"""Every status a stored run can have (a fork waits as ``pending`` until it is resumed), as
the CLI's ``--status`` choices."""

_STALE = "running (stale lease)"


def run_status(record: RunRecord, now: float, *, gone: bool = False) -> str:
    """Return a run's status as an operator needs it.

    A ``running`` run whose lease expired has no live owner (it crashed or hung): it shows as
    ``running (stale lease)`` and can be resumed. One whose owner process is known to have
    ended (``gone``) but whose lease has not expired yet shows ``(owner gone)``; one asked to
    abort shows ``(aborting)``.
    """
    if record.status == RunStatus.RUNNING:
        if not record.lease_live(now):
            return _STALE
        if gone:
            return "running (owner gone)"
        if record.abort_requested is not None:
            return "running (aborting)"
    return record.status


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


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _spend(usage: Mapping[str, Any]) -> list[str]:
    """Tokens, cost, model and tool calls of a usage dict, each when there is any."""
    parts = []
    tokens_in, tokens_out = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    if tokens_in or tokens_out:
        parts.append(f"{tokens_in + tokens_out:,} tokens ({tokens_in:,} in, {tokens_out:,} out)")
    if usage.get("cost_usd"):
        parts.append(f"${usage['cost_usd']:.4f}")
    if usage.get("model_calls"):
        parts.append(_count(usage["model_calls"], "model call"))
    if usage.get("tool_calls"):
        parts.append(_count(usage["tool_calls"], "tool call"))
    return parts


def format_usage(usage: Mapping[str, Any]) -> str:
    """Summarize a stored usage dict: steps, tasks, tokens and cost when any, model and tool
    calls when any, wall time."""
    parts = [f"{usage.get('steps', 0)} steps", f"{usage.get('tasks', 0)} tasks"]
    parts += _spend(usage)
    parts.append(f"wall {format_duration(float(usage.get('wall_seconds', 0.0)))}")
    return ", ".join(parts)


def usage_by_node(usage: Mapping[str, Any]) -> Table | None:
    """Build the per-agent lines of a usage dict (tokens, model and tool calls), or None
    when it has none."""
    by_node = usage.get("by_node") or {}
    if not by_node:
        return None
    table = Table.grid(padding=(0, 2))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column()
    for node, counts in by_node.items():
        table.add_row(node, ", ".join(_spend(counts)) or "nothing used")
    return table


def budget_by_agent(record: RunRecord) -> Table | None:
    """Build the lines of the agents' own budgets (limits set, with use), or None when no
    agent has one."""
    agents = (record.budget or {}).get("agents") or {}
    lines = [
        (name, format_budget(limits, budget_used(record, name))) for name, limits in agents.items()
    ]
    lines = [(name, text) for name, text in lines if text]
    if not lines:
        return None
    table = Table.grid(padding=(0, 2))
    table.add_column(style="cyan", no_wrap=True)
    table.add_column()
    for name, text in lines:
        table.add_row(name, text)
    return table


def run_json(record: RunRecord, now: float, *, gone: bool = False) -> dict[str, Any]:
    """Return a run as a JSON-ready dict: the stored record plus its lease state."""
    data = asdict(record)
    live = record.lease_live(now)
    data["lease"] = None if record.owner is None else ("live" if live else "expired")
    data["stale"] = record.status == RunStatus.RUNNING and not live
    data["owner_gone"] = gone
    return data


def _status_text(status: str) -> Text:
    if status in (_STALE, "running (owner gone)"):
        return Text(status, style="bold red")
    return Text(status, style=STORED_STYLE.get(status.split(" ")[0], ""))


def _tokens(record: RunRecord) -> int:
    return int(record.usage.get("input_tokens", 0)) + int(record.usage.get("output_tokens", 0))


def runs_table(records: Sequence[RunRecord], now: float, *, gone: Collection[str] = ()) -> Table:
    """Build the ``orchestra runs`` table; tokens and cost show when some run used any (a
    run that used none shows ``-`` tokens).

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
            tokens = _tokens(record)
            cells += [f"{tokens:,}" if tokens else "-", f"${cost:.4f}" if cost else ""]
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


def _next_nodes(events: Sequence[EventRow]) -> str:
    following: Sequence[str] = ()
    for row in events:
        if row.kind in ("run_started", "step_committed"):
            following = event_data(row).get("next") or ()
    return format_nodes(following)


def run_summary(
    record: RunRecord, events: Sequence[EventRow], now: float, *, gone: bool = False
) -> Table:
    """Build the facts of ``orchestra show``: status, why, where, who, when, usage, and the
    budget's limits that are set, each with its use."""
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
    if record.abort_requested and record.status == RunStatus.RUNNING:
        facts.add_row("abort", Text(f"requested: {record.abort_requested}", style="red"))
    facts.add_row("step", str(record.step))
    if record.status != RunStatus.COMPLETED:
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
        agents = usage_by_node(record.usage)
        if agents is not None:
            facts.add_row("by agent", agents)
    if record.budget is not None:
        limits = format_budget(record.budget.get("run") or {}, budget_used(record, None))
        if limits:
            facts.add_row("budget", limits)
        own = budget_by_agent(record)
        if own is not None:
            facts.add_row("agent budgets", own)
    return facts


def format_abort(record: RunRecord, previous: str, now: float, *, gone: bool = False) -> str:
    """Say what an abort request did: told a live owner, or marked the run aborted at once.

    ``gone``: the owner holding the lease is known to have ended, so nobody will act on the
    request until the lease expires.
    """
    if record.status == RunStatus.RUNNING and record.abort_requested is not None:
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
        RunStatus.RUNNING: "no live owner",
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
