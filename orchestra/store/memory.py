"""MemoryStore: both store contracts in process memory, for tests and examples.

Same semantics as SQLiteStore (leases, epochs, fencing, stop-all), nothing survives the
process. Checkpoints, deltas and snapshots are kept exactly as SQLiteStore keeps them, so
tests of resume and forking exercise the same code. Rows are kept with their kinds and
statuses as enum members (a bare value is turned into its member as it comes in, and one that
is not a member is refused like a damaged database row).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..errors import (
    AnswerError,
    LeaseLostError,
    RunNotFoundError,
    RunStatusError,
    StopAllActiveError,
    StoreError,
)
from ..outcome import RunStatus
from .records import (
    CheckpointRow,
    EventRow,
    LedgerEntry,
    LedgerKind,
    LedgerStatus,
    PendingWrite,
    RequestKind,
    RequestRow,
    RequestStatus,
    RunRecord,
    StepCommit,
    budget_event,
    merge_events,
    refuse_unless_at_rest,
    stored_member,
)

__all__ = ("MemoryStore",)


class MemoryStore:
    """Runs kept in memory (see the module doc)."""

    def __init__(self, *, lease_seconds: float = 30.0, poll_seconds: float = 0.2) -> None:
        if lease_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("lease_seconds and poll_seconds must be positive")
        if poll_seconds > lease_seconds / 3:
            raise ValueError(
                f"poll_seconds ({poll_seconds:g}) must be at most a third of lease_seconds "
                f"({lease_seconds:g}): the lease is renewed on a poll, and must not lapse "
                f"between two"
            )
        self.path = ":memory:"
        self.lease_seconds = float(lease_seconds)
        self.poll_seconds = float(poll_seconds)
        self._runs: dict[str, RunRecord] = {}
        self._checkpoints: dict[str, dict[int, CheckpointRow]] = {}
        self._pending: dict[str, dict[tuple[int, str], PendingWrite]] = {}
        self._events: dict[str, list[EventRow]] = {}
        self._ledger: dict[str, dict[tuple[int, str, int], LedgerEntry]] = {}
        self._requests: dict[str, dict[str, RequestRow]] = {}
        self._stop_all: str | None = None

    def __repr__(self) -> str:
        return f"MemoryStore(runs={len(self._runs)})"

    def _get(self, run_id: str) -> RunRecord:
        try:
            record = self._runs[run_id]
        except KeyError:
            raise RunNotFoundError(run_id) from None
        # like SQLiteStore: a run's step is its latest checkpoint, whatever renew said
        steps = self._checkpoints.get(run_id)
        if steps and max(steps) != record.step:
            record = replace(record, step=max(steps))
        return record

    def _fenced(self, run_id: str, epoch: int, step: int | None) -> RunRecord:
        record = self._runs.get(run_id)
        if record is None or record.epoch != epoch:
            raise LeaseLostError(run_id=run_id, step=step, epoch=epoch)
        return record

    async def create_run(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        if self._stop_all is not None:
            raise StopAllActiveError(self._stop_all)
        await self.fork(record, checkpoint, events)

    async def fork(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        if record.run_id in self._runs:
            raise StoreError(f"run {record.run_id} already exists in {self.path}")
        self._runs[record.run_id] = _run_row(record)
        self._checkpoints[record.run_id] = {checkpoint.step: _sized(checkpoint)}
        self._pending[record.run_id] = {}
        self._events[record.run_id] = list(events)
        self._ledger[record.run_id] = {}
        self._requests[record.run_id] = {}

    async def set_budget(
        self, run_id: str, budget: dict[str, Any], *, reason: str | None = None
    ) -> RunRecord:
        now = time.time()
        stored = json.loads(json.dumps(budget))  # a copy, refused alike if not JSON
        event = budget_event(self._get(run_id), stored, reason, now)
        self._runs[run_id] = replace(self._runs[run_id], budget=stored, updated_at=now)
        self._events[run_id].append(event)
        return self._get(run_id)

    async def commit_step(self, run_id: str, epoch: int, commit: StepCommit) -> None:
        record = self._fenced(run_id, epoch, commit.step)
        self._runs[run_id] = replace(record, step=commit.step)
        self._checkpoints[run_id][commit.step] = _sized(commit.checkpoint)
        if commit.had_pending:
            pending = self._pending[run_id]
            for key in [k for k in pending if k[0] <= commit.step]:
                del pending[key]

    async def put_pending_write(self, run_id: str, epoch: int, write: PendingWrite) -> None:
        self._fenced(run_id, epoch, write.step)
        self._pending[run_id][(write.step, write.task)] = write

    async def discard_pending_writes(self, run_id: str, epoch: int, step: int) -> None:
        self._fenced(run_id, epoch, step)
        pending = self._pending[run_id]
        for key in [k for k in pending if k[0] == step]:
            del pending[key]

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
        record = self._fenced(run_id, epoch, None)
        kept = self._requests[run_id]
        for request in requests:
            # like SQLiteStore: open stays as it is, answered is asked again
            known = kept.get(request.request_id)
            if known is None or known.status is not RequestStatus.OPEN:
                kept[request.request_id] = _request_row(request)
        if status is RunStatus.COMPLETED:  # nothing is left to ask: what is still open is moot
            for request_id, row in list(kept.items()):
                if row.status is RequestStatus.OPEN:
                    kept[request_id] = replace(row, status=RequestStatus.CLOSED)
        self._runs[run_id] = replace(
            record,
            status=stored_member(RunStatus, status, run_id=run_id, table="runs", column="status"),
            reason=reason,
            error=error,
            usage=dict(usage),
            owner=None,
            lease_expires_at=None,
            abort_requested=None,
            updated_at=time.time(),
        )
        self._events[run_id].extend(events)

    async def put_ledger(self, run_id: str, epoch: int, entry: LedgerEntry) -> None:
        self._fenced(run_id, epoch, entry.step)
        self._ledger[run_id][(entry.step, entry.task, entry.seq)] = _ledger_entry(run_id, entry)

    async def delete_ledger(self, run_id: str, epoch: int, step: int, task: str, seq: int) -> None:
        self._fenced(run_id, epoch, step)
        self._ledger[run_id].pop((step, task, seq), None)

    async def ledger(self, run_id: str, step: int | None = None) -> list[LedgerEntry]:
        entries = self._ledger.get(run_id, {})
        return [entries[k] for k in sorted(entries) if step is None or k[0] == step]

    async def requests(
        self,
        run_id: str | None = None,
        *,
        statuses: Sequence[RequestStatus] = (RequestStatus.OPEN,),
    ) -> list[RequestRow]:
        runs = [run_id] if run_id is not None else list(self._requests)
        rows = [
            row
            for name in runs
            for row in self._requests.get(name, {}).values()
            if not statuses or row.status in statuses
        ]
        return sorted(rows, key=lambda r: (r.created_at, r.request_id))

    async def answer_request(
        self,
        run_id: str,
        epoch: int,
        request_id: str,
        answer: str,
        status: RequestStatus = RequestStatus.ANSWERED,
        expected: RequestStatus = RequestStatus.OPEN,
    ) -> None:
        new = stored_member(RequestStatus, status, run_id=run_id, table="requests", column="status")
        self._fenced(run_id, epoch, None)
        row = self._requests[run_id].get(request_id)
        if row is None or row.status != expected:
            raise StoreError(f"run {run_id} has no {expected} request {request_id}")
        self._requests[run_id][request_id] = replace(
            row, status=new, answer=answer, answered_at=time.time()
        )

    async def record_answers(
        self, run_id: str, answers: Sequence[tuple[str, str]], events: Sequence[EventRow]
    ) -> None:
        if self._stop_all is not None:
            raise StopAllActiveError(self._stop_all)
        record = self._get(run_id)
        now = time.time()
        refuse_unless_at_rest(record, now, "answer its requests")
        kept = self._requests[run_id]
        for request_id, _ in answers:
            row = kept.get(request_id)
            if row is None or row.status is not RequestStatus.OPEN:
                raise AnswerError(run_id, request_id, "no longer open (answered meanwhile)")
        for request_id, answer in answers:
            kept[request_id] = replace(
                kept[request_id], status=RequestStatus.ANSWERED, answer=answer, answered_at=now
            )
        self._events[run_id].extend(events)

    async def acquire(self, run_id: str, owner: str) -> RunRecord:
        if self._stop_all is not None:
            raise StopAllActiveError(self._stop_all)
        record = self._get(run_id)
        now = time.time()
        refuse_unless_at_rest(record, now, "resume it")
        record = replace(
            record,
            owner=owner,
            epoch=record.epoch + 1,
            lease_expires_at=now + self.lease_seconds,
            status=RunStatus.RUNNING,
            abort_requested=None,
            updated_at=now,
        )
        self._runs[run_id] = record
        return record

    async def renew(self, run_id: str, epoch: int, *, step: int, usage: dict[str, Any]) -> bool:
        record = self._runs.get(run_id)
        if record is None or record.epoch != epoch or record.status is not RunStatus.RUNNING:
            return False
        now = time.time()
        self._runs[run_id] = replace(
            record,
            lease_expires_at=now + self.lease_seconds,
            step=step,
            usage=dict(usage),
            updated_at=now,
        )
        return True

    async def abort_requested(self, run_id: str) -> str | None:
        record = self._runs.get(run_id)
        return None if record is None else record.abort_requested

    async def request_abort(self, run_id: str, reason: str) -> RunRecord:
        self._abort(self._get(run_id), reason, time.time())
        return self._runs[run_id]

    def _abort(self, record: RunRecord, reason: str, now: float) -> None:
        if record.status is RunStatus.COMPLETED:
            raise RunStatusError(record.run_id, record.status, "abort it")
        if record.status is RunStatus.ABORTED:
            return  # already at rest as aborted: keep its reason and history
        if record.status is RunStatus.RUNNING and record.owned(now):
            record = replace(record, abort_requested=reason)
        else:
            record = replace(
                record,
                status=RunStatus.ABORTED,
                reason=reason,
                owner=None,
                lease_expires_at=None,
                abort_requested=None,
                updated_at=now,
                epoch=record.epoch + 1,  # fence off an owner whose lease lapsed
            )
        self._runs[record.run_id] = record
        self._events[record.run_id].append(
            EventRow(
                step=record.step,
                kind="abort_requested",
                at=now,
                data=json.dumps({"reason": reason}),
            )
        )

    async def stop_all(self, reason: str) -> list[str]:
        self._stop_all = reason
        now = time.time()
        affected = [r for r in self._runs.values() if r.status is RunStatus.RUNNING]
        for record in affected:
            self._abort(record, reason, now)
        return [r.run_id for r in affected]

    async def release_stop_all(self) -> bool:
        was, self._stop_all = self._stop_all is not None, None
        return was

    async def stop_all_reason(self) -> str | None:
        return self._stop_all

    async def get_run(self, run_id: str) -> RunRecord:
        return self._get(run_id)

    async def list_runs(
        self, *, statuses: Sequence[RunStatus] = (), limit: int | None = None
    ) -> list[RunRecord]:
        runs = [
            self._get(r) for r in self._runs if not statuses or self._runs[r].status in statuses
        ]
        runs.sort(key=lambda r: (-r.created_at, r.run_id))
        return runs if limit is None else runs[:limit]

    async def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        self._get(run_id)
        rows = self._checkpoints[run_id]
        return [rows[step] for step in sorted(rows)]

    async def checkpoint_chain(self, run_id: str, step: int | None = None) -> list[CheckpointRow]:
        rows = await self.checkpoints(run_id)
        if step is None:
            step = rows[-1].step
        upto = [r for r in rows if r.step <= step]
        if not upto or upto[-1].step != step:
            raise StoreError(f"run {run_id} has no checkpoint at step {step}")
        base = max((i for i, r in enumerate(upto) if r.snapshot is not None), default=None)
        if base is None:
            raise StoreError(f"run {run_id} has no checkpoint at or before step {step}")
        return upto[base:]

    async def pending_writes(self, run_id: str, step: int) -> list[PendingWrite]:
        pending = self._pending.get(run_id, {})
        return [pending[k] for k in sorted(pending) if k[0] == step]

    async def events(self, run_id: str) -> list[EventRow]:
        steps = [
            (row.step, row.events, row.tasks)
            for row in (await self.checkpoints(run_id))
            if row.events is not None
        ]
        return merge_events(self._events.get(run_id, ()), steps)

    async def prune(self, *, older_than: float, statuses: Sequence[RunStatus]) -> int:
        doomed = [
            r.run_id
            for r in self._runs.values()
            if r.updated_at < older_than and r.status in statuses
        ]
        for run_id in doomed:
            for table in (
                self._runs,
                self._checkpoints,
                self._pending,
                self._events,
                self._ledger,
                self._requests,
            ):
                table.pop(run_id, None)
        return len(doomed)

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _run_row(record: RunRecord) -> RunRecord:
    """``record`` as kept: its status a member."""
    status = stored_member(
        RunStatus, record.status, run_id=record.run_id, table="runs", column="status"
    )
    return record if status is record.status else replace(record, status=status)


def _request_row(row: RequestRow) -> RequestRow:
    """``row`` as kept: its kind and status members."""
    where = {"run_id": row.run_id, "table": "requests"}
    kind = stored_member(RequestKind, row.kind, **where, column="kind")
    status = stored_member(RequestStatus, row.status, **where, column="status")
    if kind is row.kind and status is row.status:
        return row
    return replace(row, kind=kind, status=status)


def _ledger_entry(run_id: str, entry: LedgerEntry) -> LedgerEntry:
    """``entry`` as kept: its kind and status members."""
    kind = stored_member(LedgerKind, entry.kind, run_id=run_id, table="ledger", column="kind")
    status = stored_member(
        LedgerStatus, entry.status, run_id=run_id, table="ledger", column="status"
    )
    if kind is entry.kind and status is entry.status:
        return entry
    return replace(entry, kind=kind, status=status)


def _sized(row: CheckpointRow) -> CheckpointRow:
    return replace(row, size=len((row.snapshot or row.delta or "").encode()))
