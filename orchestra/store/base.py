"""The store contracts: two small async protocols with a run-status lifecycle.

A store keeps runs (one row each, written before the first step), their checkpoints (one per
step: a full snapshot every so often, per-field deltas in between), the pending writes of an
unfinished step, the ledger of model and tool calls, the requests for a human, and the events.

:class:`RunStore` is what a run's owner needs (create or claim a run under a lease, commit
steps, pending writes, the ledger, poll the abort flag, renew and release the lease);
:class:`OperatorStore` is what an operator needs (list and inspect runs, answer their
requests, abort, stop-all, budgets, fork, prune). :class:`Store` is both: every
implementation is one, and an operation spanning the two (a resume) takes one. Every write
by a run's owner carries the owner's lease *epoch*; a write whose epoch is no longer current
is refused (:class:`LeaseLostError`), so a stale owner that wakes up can never fork a run's
history.

Serialization is the caller's: the store moves JSON text. Stored kinds and statuses are the
enums below (and :class:`~orchestra.outcome.RunStatus`); a store builds the members when it
reads rows and refuses a value that is not one with a :class:`StoreError`. Implementations:
``SQLiteStore`` (embedded, durable) and ``MemoryStore`` (tests, same contract).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

from ..errors import LeaseHeldError, RunStatusError, StoreError
from ..outcome import RunStatus

__all__ = (
    "STEP_EVENT_DEFAULTS",
    "CheckpointRow",
    "EventRow",
    "LedgerEntry",
    "LedgerKind",
    "LedgerStatus",
    "OperatorStore",
    "PendingWrite",
    "RequestKind",
    "RequestRow",
    "RequestStatus",
    "RunRecord",
    "RunStore",
    "StepCommit",
    "Store",
    "budget_event",
    "expired",
    "merge_events",
    "new_owner_id",
    "new_run_id",
    "stored_member",
)


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
    # `| str` while the runtime's ledger (runtime/ledger.py) builds entries from bare
    # values; every store reads back members
    kind: LedgerKind | str
    name: str
    request_hash: str
    status: LedgerStatus | str
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
    # `| str` while the gateway marks a copy expired with the bare value; every store reads
    # back members
    status: RequestStatus | str
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


class _StoreHandle(Protocol):
    """What both contracts share: where the store lives and its lifecycle."""

    path: str
    """Where the store lives (a file path, ``":memory:"``, a DSN), for messages."""

    async def aclose(self) -> None:
        """Release the store's resources; the store may be opened again by using it."""
        ...

    async def __aenter__(self) -> Self:
        """Open the store (``async with store:``); raise StoreFileError for a file that is
        not a usable orchestra database."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the store (like :meth:`aclose`)."""
        ...


@runtime_checkable
class RunStore(_StoreHandle, Protocol):
    """The run contract: what a run's owner (the runtime's Recorder, a resume under its
    lease) writes and reads.

    Every write takes the owner's lease ``epoch`` and is refused with
    :class:`~orchestra.errors.LeaseLostError` once another owner took the run over (or the
    run is gone), so a stale owner can never fork a run's history.
    """

    lease_seconds: float
    """How long a lease lasts unless renewed."""
    poll_seconds: float
    """How often the owner polls the abort flag and renews its lease (at most a third of
    ``lease_seconds``)."""

    async def create_run(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        """Write a new run row, owned by ``record.owner`` at epoch 1, with checkpoint 0 and
        ``events``, in one transaction; raise StopAllActiveError while stop-all is in force
        and StoreError if the run id exists."""
        ...

    async def acquire(self, run_id: str, owner: str) -> RunRecord:
        """Take the lease of a run at rest or whose owner's lease expired, bump its epoch and
        set it running; return the run. Raise RunNotFoundError, RunStatusError (completed),
        LeaseHeldError (a live owner) or StopAllActiveError."""
        ...

    async def commit_step(self, run_id: str, epoch: int, commit: StepCommit) -> None:
        """Commit one step atomically (its checkpoint, with its events; the pending writes
        up to it dropped); raise LeaseLostError if ``epoch`` was fenced off."""
        ...

    async def put_pending_write(self, run_id: str, epoch: int, write: PendingWrite) -> None:
        """Store one finished task of the step in flight; raise LeaseLostError if fenced."""
        ...

    async def discard_pending_writes(self, run_id: str, epoch: int, step: int) -> None:
        """Forget the pending writes of ``step``; raise LeaseLostError if fenced."""
        ...

    async def pending_writes(self, run_id: str, step: int) -> list[PendingWrite]:
        """Return the finished tasks stored for ``step``, by task (none for an unknown
        run)."""
        ...

    async def put_ledger(self, run_id: str, epoch: int, entry: LedgerEntry) -> None:
        """Record (or replace) one call in the ledger, durably; raise LeaseLostError if
        fenced."""
        ...

    async def delete_ledger(self, run_id: str, epoch: int, step: int, task: str, seq: int) -> None:
        """Forget one ledger entry (an in-doubt call an operator chose to retry); raise
        LeaseLostError if fenced."""
        ...

    async def ledger(self, run_id: str, step: int | None = None) -> list[LedgerEntry]:
        """Return a run's ledger entries (of one step, or all), in (step, task, seq) order
        (none for an unknown run); raise StoreError for a stored kind or status that is not
        a member of its enum."""
        ...

    async def answer_request(
        self,
        run_id: str,
        epoch: int,
        request_id: str,
        answer: str,
        # `| str` while the executor expires a request with the bare value
        status: RequestStatus | str = RequestStatus.ANSWERED,
        expected: RequestStatus = RequestStatus.OPEN,
    ) -> None:
        """Move a request from status ``expected`` to ``status`` with ``answer`` (the owner
        marking it used or expired); raise LeaseLostError if fenced and StoreError if the
        request is not in status ``expected``."""
        ...

    async def abort_requested(self, run_id: str) -> str | None:
        """Return the reason if an abort (or stop-all) was requested for the run (None for
        none, or an unknown run); a cheap read, polled while the run runs."""
        ...

    async def renew(self, run_id: str, epoch: int, *, step: int, usage: dict[str, Any]) -> bool:
        """Extend the lease and refresh the run row's step and usage; return False (never
        raise LeaseLostError) if ``epoch`` was fenced off or the run is no longer running."""
        ...

    async def finish_run(
        self,
        run_id: str,
        epoch: int,
        *,
        status: RunStatus,
        reason: str | None,
        error: str | None,
        usage: dict[str, Any],
        events: Sequence[EventRow],
        requests: Sequence[RequestRow] = (),
    ) -> None:
        """Record the run's final status for now and release its lease; store ``requests``
        in the same transaction (one still open stays as it is; one already answered is
        open again, since it is asked again). A completed run's open requests are closed.
        Raise LeaseLostError if fenced."""
        ...


@runtime_checkable
class OperatorStore(_StoreHandle, Protocol):
    """The operator contract: what an operator (the CLI, ``app.abort``, ``app.pending``, a
    fork) reads and does to runs it does not own. No method takes a lease epoch."""

    async def get_run(self, run_id: str) -> RunRecord:
        """Return one run (its step: its latest checkpoint); raise RunNotFoundError, and
        StoreError for a stored status that is not a RunStatus."""
        ...

    async def list_runs(
        self, *, statuses: Sequence[RunStatus] = (), limit: int | None = None
    ) -> list[RunRecord]:
        """Return runs, newest first, optionally only those with the given statuses and at
        most ``limit``; raise StoreError like :meth:`get_run`."""
        ...

    async def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        """Return every checkpoint of a run, oldest first; raise RunNotFoundError."""
        ...

    async def checkpoint_chain(self, run_id: str, step: int | None = None) -> list[CheckpointRow]:
        """Return the rows needed to rebuild the state at ``step`` (default: the latest):
        the nearest snapshot at or before it and every delta after, oldest first. Raise
        RunNotFoundError, and StoreError if there is no checkpoint at ``step`` or no snapshot
        before it."""
        ...

    async def events(self, run_id: str) -> list[EventRow]:
        """Return a run's events in order: the steps' and the run's own (start, end,
        operator actions); raise RunNotFoundError."""
        ...

    async def requests(
        self,
        run_id: str | None = None,
        *,
        statuses: Sequence[RequestStatus] = (RequestStatus.OPEN,),
    ) -> list[RequestRow]:
        """Return requests (of one run, or of every run) with one of ``statuses`` (empty:
        any), oldest first (none for an unknown run); raise StoreError for a stored kind or
        status that is not a member of its enum."""
        ...

    async def record_answers(
        self, run_id: str, answers: Sequence[tuple[str, str]], events: Sequence[EventRow]
    ) -> None:
        """Record answers (request id, answer JSON) of open requests of a run at rest, all
        or none, with ``events``, in one transaction: refused (AnswerError) if one is not
        open, (LeaseHeldError) while a live process owns the run, and like ``acquire`` for a
        completed run or while stop-all is in force."""
        ...

    async def request_abort(self, run_id: str, reason: str) -> RunRecord:
        """Ask the run's owner to abort, or mark a run without a live owner aborted (an
        aborted run stays as it is), with an ``abort_requested`` event; return the run.
        Raise RunNotFoundError, and RunStatusError for a completed run."""
        ...

    async def stop_all(self, reason: str) -> list[str]:
        """Abort every running run (like :meth:`request_abort`) and refuse new runs and
        resumes until :meth:`release_stop_all`; return the affected run ids."""
        ...

    async def release_stop_all(self) -> bool:
        """Let runs start again; return whether stop-all was in force."""
        ...

    async def stop_all_reason(self) -> str | None:
        """Return why stop-all is in force, or None."""
        ...

    async def set_budget(
        self, run_id: str, budget: dict[str, Any], *, reason: str | None = None
    ) -> RunRecord:
        """Store a new budget for a run at rest, with a ``budget_raised`` event, in one
        transaction; return the updated run. Refuse a completed run (RunStatusError) and one
        whose owner holds a live lease (LeaseHeldError): it runs under the budget it loaded."""
        ...

    async def fork(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        """Write a new run at rest (status ``pending``) starting from ``checkpoint``, with
        ``events``; raise StoreError if the run id exists (stop-all does not refuse it)."""
        ...

    async def prune(self, *, older_than: float, statuses: Sequence[RunStatus]) -> int:
        """Delete runs last updated before ``older_than`` with one of ``statuses`` (none if
        empty), with everything they hold; return how many."""
        ...


@runtime_checkable
class Store(RunStore, OperatorStore, Protocol):
    """Both contracts: what every store implements, and what an operation that spans them
    takes (a resume reads and answers like an operator, then runs like an owner)."""


def budget_event(
    record: RunRecord, budget: dict[str, Any], reason: str | None, now: float
) -> EventRow:
    """Check that ``record``'s budget may change at ``now``; return the event recording it."""
    if record.status is RunStatus.COMPLETED:
        raise RunStatusError(record.run_id, record.status, "raise its budget")
    if record.status is RunStatus.RUNNING and record.lease_live(now):
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
    if record.lease_live(now):
        assert record.owner is not None
        assert record.lease_expires_at is not None
        raise LeaseHeldError(record.run_id, record.owner, record.lease_expires_at - now)
