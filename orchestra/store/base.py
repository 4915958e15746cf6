"""The Store contract: a small async interface with a run-status lifecycle.

A store keeps runs (one row each, written before the first step), their checkpoints (one per
step: a full snapshot every so often, per-field deltas in between), the pending writes of an
unfinished step, and the events. Every write by a run's owner carries the owner's lease
*epoch*; a write whose epoch is no longer current is refused (:class:`LeaseLostError`), so a
stale owner that wakes up can never fork a run's history.

Serialization is the caller's: the store moves JSON text. Implementations: ``SQLiteStore``
(embedded, durable) and ``MemoryStore`` (tests, same contract).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from ..errors import LeaseHeldError, RunStatusError

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
    "Store",
    "budget_event",
    "expired",
    "merge_events",
    "new_owner_id",
    "new_run_id",
)

ACTIVE = "running"
"""The only status with an owner; every other status is at rest."""


def new_run_id() -> str:
    """Return a new random run id (16 hex digits)."""
    return secrets.token_hex(8)


def new_owner_id() -> str:
    """Name this process as a run owner: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class RequestStatus(StrEnum):
    """Where a request stands: ``open`` until answered, then ``answered``; ``used`` once a
    resume applied it (in-doubt calls, breakpoints, loops); ``expired`` if nobody answered it
    in time; ``closed`` if the run completed without asking it again."""

    OPEN = "open"
    ANSWERED = "answered"
    USED = "used"
    EXPIRED = "expired"
    CLOSED = "closed"


class RequestKind(StrEnum):
    """What a request asks a person (see :mod:`orchestra.safeguards.interrupts`)."""

    APPROVAL = "approval"
    QUESTION = "question"
    CONFLICT = "conflict"
    BEFORE = "before"
    AFTER = "after"
    LOOP = "loop"
    IN_DOUBT = "in_doubt"


class LedgerStatus(StrEnum):
    """A ledger entry is ``started`` (an irreversible call, written before it runs) or
    ``done`` (its result is recorded)."""

    STARTED = "started"
    DONE = "done"


class LedgerKind(StrEnum):
    """What a ledger entry records: a model call, a tool call, or an arbitration decision."""

    MODEL = "model"
    TOOL = "tool"
    ARBITRATION = "arbitration"


def expired(expires_at: float | None, now: float) -> bool:
    """Tell whether something that expires at ``expires_at`` (None: never) has, at ``now``."""
    return expires_at is not None and expires_at <= now


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One run as stored."""

    run_id: str
    graph: str
    structure_hash: str
    app_ref: str | None
    status: str
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
    kind: str
    name: str
    request_hash: str
    status: str
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
    kind: str
    payload: str
    schema: str | None
    status: str
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


@runtime_checkable
class Store(Protocol):
    """The async contract every run store implements."""

    path: str
    lease_seconds: float
    poll_seconds: float

    async def create_run(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        """Write a new run row, owned by ``record.owner`` at epoch 1, with checkpoint 0."""
        ...

    async def commit_step(self, run_id: str, epoch: int, commit: StepCommit) -> None:
        """Commit one step atomically; raise LeaseLostError if ``epoch`` was fenced off."""
        ...

    async def put_pending_write(self, run_id: str, epoch: int, write: PendingWrite) -> None:
        """Store one finished task of the step in flight (fenced like a commit)."""
        ...

    async def discard_pending_writes(self, run_id: str, epoch: int, step: int) -> None:
        """Forget the pending writes of ``step`` (fenced like a commit)."""
        ...

    async def finish_run(
        self,
        run_id: str,
        epoch: int,
        *,
        status: str,
        reason: str | None,
        error: str | None,
        usage: dict[str, Any],
        events: Sequence[EventRow],
        requests: Sequence[RequestRow] = (),
    ) -> None:
        """Record the run's final status for now and release its lease; store ``requests``
        in the same transaction (one still open stays as it is; one already answered is
        open again, since it is asked again). A completed run's open requests are closed."""
        ...

    async def put_ledger(self, run_id: str, epoch: int, entry: LedgerEntry) -> None:
        """Record (or update) one call in the ledger, durably, fenced like a commit."""
        ...

    async def delete_ledger(self, run_id: str, epoch: int, step: int, task: str, seq: int) -> None:
        """Forget one ledger entry (an in-doubt call an operator chose to retry)."""
        ...

    async def ledger(self, run_id: str, step: int | None = None) -> list[LedgerEntry]:
        """Return a run's ledger entries (of one step, or all), in (step, task, seq) order."""
        ...

    async def requests(
        self, run_id: str | None = None, *, statuses: Sequence[str] = ("open",)
    ) -> list[RequestRow]:
        """Return requests (of one run, or of every run), oldest first."""
        ...

    async def answer_request(
        self,
        run_id: str,
        epoch: int,
        request_id: str,
        answer: str,
        status: str = "answered",
        expected: str = "open",
    ) -> None:
        """Move a request from status ``expected`` to ``status`` with ``answer``, fenced;
        refuse one not in status ``expected``."""
        ...

    async def record_answers(
        self, run_id: str, answers: Sequence[tuple[str, str]], events: Sequence[EventRow]
    ) -> None:
        """Record answers (request id, answer JSON) of open requests of a run at rest, all
        or none, with ``events``, in one transaction: refused (AnswerError) if one is not
        open, (LeaseHeldError) while a live process owns the run, and like ``acquire`` for a
        completed run or while stop-all is in force."""
        ...

    async def acquire(self, run_id: str, owner: str) -> RunRecord:
        """Take the lease of a run at rest or whose owner's lease expired; bump the epoch."""
        ...

    async def renew(self, run_id: str, epoch: int, *, step: int, usage: dict[str, Any]) -> bool:
        """Extend the lease and refresh the run row's step and usage; return False if
        ``epoch`` was fenced off."""
        ...

    async def abort_requested(self, run_id: str) -> str | None:
        """Return the reason if an abort (or stop-all) was requested for the run."""
        ...

    async def request_abort(self, run_id: str, reason: str) -> RunRecord:
        """Ask the run's owner to abort, or mark a run without a live owner aborted."""
        ...

    async def stop_all(self, reason: str) -> list[str]:
        """Abort every running run and refuse new runs; return the affected run ids."""
        ...

    async def release_stop_all(self) -> bool:
        """Let runs start again; return whether stop-all was in force."""
        ...

    async def stop_all_reason(self) -> str | None:
        """Return why stop-all is in force, or None."""
        ...

    async def get_run(self, run_id: str) -> RunRecord:
        """Return one run; raise RunNotFoundError."""
        ...

    async def list_runs(
        self, *, statuses: Sequence[str] = (), limit: int | None = None
    ) -> list[RunRecord]:
        """Return runs, newest first, optionally only those with the given statuses."""
        ...

    async def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        """Return every checkpoint of a run, oldest first."""
        ...

    async def checkpoint_chain(self, run_id: str, step: int | None = None) -> list[CheckpointRow]:
        """Return the rows needed to rebuild the state at ``step`` (default: the latest):
        the nearest snapshot at or before it and every delta after, oldest first."""
        ...

    async def pending_writes(self, run_id: str, step: int) -> list[PendingWrite]:
        """Return the finished tasks stored for ``step``."""
        ...

    async def events(self, run_id: str) -> list[EventRow]:
        """Return a run's events in order: the steps' and the run's own (start, end,
        operator actions)."""
        ...

    async def fork(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        """Write a new run at rest (status ``pending``) starting from ``checkpoint``."""
        ...

    async def set_budget(
        self, run_id: str, budget: dict[str, Any], *, reason: str | None = None
    ) -> RunRecord:
        """Store a new budget for a run at rest, with a ``budget_raised`` event, in one
        transaction; return the updated run. Refuse a completed run (RunStatusError) and one
        whose owner holds a live lease (LeaseHeldError): it runs under the budget it loaded."""
        ...

    async def prune(self, *, older_than: float, statuses: Sequence[str]) -> int:
        """Delete runs last updated before ``older_than`` with one of ``statuses``."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...

    async def __aenter__(self) -> Store:
        """Open the store (``async with store:``)."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the store."""
        ...


def budget_event(
    record: RunRecord, budget: dict[str, Any], reason: str | None, now: float
) -> EventRow:
    """Check that ``record``'s budget may change at ``now``; return the event recording it."""
    if record.status == "completed":
        raise RunStatusError(record.run_id, record.status, "raise its budget")
    if record.status == ACTIVE and record.lease_live(now):
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
    import json

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
    from ..errors import LeaseHeldError, RunStatusError

    if record.status == "completed":
        raise RunStatusError(record.run_id, record.status, doing)
    if record.lease_live(now):
        assert record.owner is not None
        assert record.lease_expires_at is not None
        raise LeaseHeldError(record.run_id, record.owner, record.lease_expires_at - now)
