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

from collections.abc import Sequence
from typing import Any, Protocol, Self, runtime_checkable

from ..outcome import RunStatus
from .records import STEP_EVENT_DEFAULTS as STEP_EVENT_DEFAULTS
from .records import CheckpointRow as CheckpointRow
from .records import EventRow as EventRow
from .records import LedgerEntry as LedgerEntry
from .records import LedgerKind as LedgerKind
from .records import LedgerStatus as LedgerStatus
from .records import PendingWrite as PendingWrite
from .records import RequestKind as RequestKind
from .records import RequestRow as RequestRow
from .records import RequestStatus as RequestStatus
from .records import RunRecord as RunRecord
from .records import StepCommit as StepCommit
from .records import budget_event as budget_event
from .records import expired as expired
from .records import merge_events as merge_events
from .records import new_owner_id as new_owner_id
from .records import new_run_id as new_run_id
from .records import stored_member as stored_member

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
        status: RequestStatus = RequestStatus.ANSWERED,
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
