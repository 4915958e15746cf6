"""What a store keeps, as records: runs, checkpoints, pending writes, ledger entries,
requests and events; the enums of their stored kinds and statuses; ids; and the checks on
them that every store shares (one copy each)."""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from ..errors import LeaseHeldError, RunStatusError, StoreError
from ..kinds import LedgerKind, LedgerStatus, RequestKind, RequestStatus, expired
from ..outcome import RunStatus

__all__ = (
    "STEP_EVENT_DEFAULTS",
    "CheckpointRow",
    "EventRow",
    "LedgerEntry",
    "LedgerKind",
    "LedgerStatus",
    "PendingWrite",
    "RequestKind",
    "RequestRow",
    "RequestStatus",
    "RunRecord",
    "StepCommit",
    "budget_event",
    "expired",
    "merge_events",
    "new_owner_id",
    "new_run_id",
    "owner_gone",
    "refuse_unless_at_rest",
    "stored_member",
)


def new_run_id() -> str:
    """Return a new random run id (16 hex digits)."""
    return secrets.token_hex(8)


def new_owner_id() -> str:
    """Name this process as a run owner: ``host:pid:start:place:tag``. ``start`` is the
    process's start time and ``place`` names this boot of this machine and this PID
    namespace, so :func:`owner_gone` can tell a reused pid, or a pid of a container or of
    another machine with the same host name, from the owner's own process."""
    import socket  # (with select and selectors: loaded when a run first needs an owner)

    pid = os.getpid()
    process = _process(pid)
    start = process[1] if process is not None else "-"
    return f"{socket.gethostname()}:{pid}:{start}:{_place() or '-'}:{secrets.token_hex(3)}"


def owner_gone(owner: str | None) -> bool:
    """Tell whether a run owner was a process of this machine, this boot and this PID
    namespace that has ended: its pid is gone, is a zombie, or now names a process that
    started at another time (a reused pid).

    Only a certainly ended process counts. An owner elsewhere (another host, another boot,
    another container's PID namespace), an id without a start time or a place (such as the
    older ``host:pid:tag`` ids), or any doubt, is not gone: its lease is waited out."""
    if owner is None or sys.platform == "win32":  # os.kill(pid, 0) terminates on Windows
        return False
    import socket

    parts = owner.split(":")
    # (read back from a database file: anything but a plausible pid is not ours to judge)
    if len(parts) != 5 or parts[0] != socket.gethostname() or not _PID.fullmatch(parts[1]):
        return False
    place = _place()
    if place is None or parts[2] == "-" or parts[3] != place:
        return False
    pid = int(parts[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists but belongs to someone else
        return False
    process = _process(pid)
    if process is None:
        return False  # alive a moment ago, unreadable now: not certain
    state, start = process
    return state in ("Z", "X") or start != parts[2]


_PID = re.compile(r"[1-9][0-9]{0,6}")  # ASCII digits; Linux pids stay under 2**22


def _process(pid: int) -> tuple[str, str] | None:
    """The state and start time (clock ticks since boot) of process ``pid`` (Linux), or
    None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    # after the command name, fields[0] is proc(5)'s field 3 (state), fields[19] field 22
    if len(fields) <= 19:
        return None
    return fields[0].decode(), fields[19].decode()


def _place() -> str | None:
    """This boot of this machine and this PID namespace, as 8 hex digits (Linux), or None."""
    import hashlib

    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(f"{boot_id}:{namespace}".encode()).hexdigest()[:8]


_MemberT = TypeVar("_MemberT", bound=StrEnum)


def stored_member(
    enum: type[_MemberT], value: object, *, run_id: str, table: str, column: str
) -> _MemberT:
    """Return the member of ``enum`` a store holds as ``value``; a value that is not one (a
    row edited by hand, or written by a newer orchestra) is a StoreError naming the run, the
    table, the column and the value."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    known = ", ".join(member.value for member in enum)
    raise StoreError(
        f"run {run_id}: table {table} holds {column} {value!r}, which is not a "
        f"{enum.__name__} ({known})"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One run as stored."""

    run_id: str
    graph: str
    structure_hash: str
    app_ref: str | None
    status: RunStatus
    step: int
    owner: str | None
    epoch: int
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    usage: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    error: str | None = None
    abort_requested: str | None = None
    parent_run_id: str | None = None
    parent_step: int | None = None
    budget: dict[str, Any] | None = None
    """The limits the run runs under: ``{"run": {...}, "agents": {name: {...}}}``, each a
    ``Budget.to_dict()``; None for a run stored before budgets were."""

    def lease_live(self, now: float) -> bool:
        """Tell whether an owner holds an unexpired lease at time ``now``."""
        return (
            self.owner is not None
            and self.lease_expires_at is not None
            and self.lease_expires_at > now
        )

    def owned(self, now: float) -> bool:
        """Tell whether a process that may still be alive holds the run: an unexpired lease
        whose owner is not a process of this host that has ended (such a run is taken over
        at once; the epoch moves on, so the dead owner is fenced off all the same)."""
        return self.lease_live(now) and not owner_gone(self.owner)


@dataclass(slots=True, kw_only=True)
class CheckpointRow:
    """One step's checkpoint: a snapshot (full state JSON) or a delta, the next tasks, the
    step's events (a JSON array) and the run's usage after it, so a step is one row.
    ``size`` is the byte length of the snapshot or delta."""

    step: int
    snapshot: str | None
    delta: str | None
    tasks: str
    created_at: float
    events: str | None = None
    usage: str | None = None
    size: int = 0
    memory: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingWrite:
    """A finished task of a step that has not committed yet."""

    step: int
    task: str
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One model or tool call of a step, keyed by (step, task, seq).

    ``status`` is ``started`` (an irreversible tool call, written before it runs) or
    ``done`` (``result`` holds the call's outcome as JSON). ``request_hash`` fingerprints
    what was asked, so a replay that asks something else is caught.
    """

    step: int
    task: str
    seq: int
    kind: LedgerKind
    name: str
    request_hash: str
    status: LedgerStatus
    result: str | None
    created_at: float
    finished_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRow:
    """A request for a human: an in-doubt call, an approval, a question.

    ``payload`` and ``answer`` are JSON; ``schema`` the JSON schema of a valid answer.
    ``status`` is ``open`` until answered, then ``answered``; ``used`` once a resume has
    applied it (in-doubt calls, breakpoints, loops); ``expired`` if it was not answered in
    time; ``closed`` if the run completed without asking it again (a step that took
    another path).
    """

    run_id: str
    request_id: str
    step: int
    task: str
    kind: RequestKind
    payload: str
    schema: str | None
    status: RequestStatus
    created_at: float
    expires_at: float | None = None
    answer: str | None = None
    answered_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRow:
    step: int | None
    kind: str
    at: float
    data: str


@dataclass(slots=True, kw_only=True)
class StepCommit:
    """Everything one step writes, in one transaction: the checkpoint (with its events)."""

    step: int
    checkpoint: CheckpointRow
    had_pending: bool = False


def budget_event(
    record: RunRecord, budget: dict[str, Any], reason: str | None, now: float
) -> EventRow:
    """Check that ``record``'s budget may change at ``now``; return the event recording it."""
    if record.status is RunStatus.COMPLETED:
        raise RunStatusError(record.run_id, record.status, "raise its budget")
    if record.status is RunStatus.RUNNING and record.owned(now):
        assert record.owner is not None
        assert record.lease_expires_at is not None
        raise LeaseHeldError(record.run_id, record.owner, record.lease_expires_at - now)
    data = {"before": record.budget, "after": budget, "reason": reason}
    return EventRow(step=record.step, kind="budget_raised", at=now, data=json.dumps(data))


# fields the recorder leaves out of step events when they hold these values
STEP_EVENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "node_finished": {"task": 0, "attempts": 1, "error": None},
    "node_retried": {"task": 0},
}


def merge_events(own: Sequence[EventRow], steps: Sequence[tuple[int, str, str]]) -> list[EventRow]:
    """Merge a run's own events with the step events kept in its checkpoints (``(step,
    events, tasks)`` rows), by step then time."""
    rows = list(own)
    for step, text, tasks in steps:
        for item in json.loads(text):
            kind = item.pop("event")
            at = item.pop("at")
            data = {"step": step, **STEP_EVENT_DEFAULTS.get(kind, {}), **item}
            if kind == "step_committed" and "next" not in data:
                # not stored twice: the row's tasks are the step's next tasks
                data["next"] = [task["label"] for task in json.loads(tasks)]
            rows.append(EventRow(step=step, kind=kind, at=at, data=json.dumps(data)))
    # by step first: clocks of different processes (a resume elsewhere) may disagree
    rows.sort(key=lambda r: (r.step if r.step is not None else -1, r.at))
    return rows


def refuse_unless_at_rest(record: RunRecord, now: float, doing: str) -> None:
    """Refuse to ``doing`` a run that completed or that a live process owns (what both a
    resume and an answer are refused for)."""
    if record.status is RunStatus.COMPLETED:
        raise RunStatusError(record.run_id, record.status, doing)
    if record.owned(now):
        assert record.owner is not None
        assert record.lease_expires_at is not None
        raise LeaseHeldError(record.run_id, record.owner, record.lease_expires_at - now)
