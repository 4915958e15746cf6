"""SQLiteStore: the embedded default store, one database file, WAL mode.

Durability (``durability=``):

``"full"`` (default)
    ``PRAGMA synchronous=FULL``: every commit fsyncs the write-ahead log before it returns.
    A committed step survives a process kill *and* a power loss or OS crash, on storage that
    honours fsync. Costs one fsync per step (~150 µs on this machine class).
``"normal"``
    ``PRAGMA synchronous=NORMAL``: commits reach the operating system but the WAL is fsynced
    only at checkpoints. A committed step survives the process being killed (SIGKILL, OOM,
    a crash); after a power loss or OS crash the last few steps may be lost (never corrupted:
    the run resumes from an earlier checkpoint).

sqlite-utils owns the schema and its migrations (``Migrations("orchestra")``). Writes use
``BEGIN IMMEDIATE`` on the store's one connection: a deferred transaction that reads before
it writes can fail at once with "database is locked" when another process commits in
between, without waiting for ``busy_timeout``; an immediate one waits its turn.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..errors import (
    LeaseLostError,
    StoreError,
)
from ..outcome import RunStatus
from .records import (
    CheckpointRow,
    EventRow,
    LedgerEntry,
    PendingWrite,
    RequestRow,
    RequestStatus,
    RunRecord,
    StepCommit,
    refuse_unless_at_rest,
    stored_member,
)
from .schema import (
    INSERT_CHECKPOINT,
    LEDGER_COLUMNS,
    REQUEST_COLUMNS,
    checkpoint_values,
    ledger_from_row,
)
from .sqlite_db import request_values
from .sqlite_operator import SQLiteOperations

__all__ = ("SQLiteStore",)


class SQLiteStore(SQLiteOperations):
    """Runs, checkpoints and events in one SQLite file (see the module doc for durability).

    ``SQLiteStore(path, durability="full", lease_seconds=30, poll_seconds=0.2,
    busy_timeout=10)``; the run contract is here, the operator contract in
    :class:`~orchestra.store.sqlite_operator.SQLiteOperations`, the connection and schema in
    :class:`~orchestra.store.sqlite_db.SQLiteDatabase`.
    """

    async def create_run(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        with self._write() as conn:
            self._refuse_if_stopped(conn)
            self._insert_run(conn, record, checkpoint, events)

    async def commit_step(self, run_id: str, epoch: int, commit: StepCommit) -> None:
        # fenced: the row goes in only while this owner's epoch is current
        insert = INSERT_CHECKPOINT + " AND epoch = ?"
        values = (*checkpoint_values(run_id, commit.checkpoint), epoch)
        if not commit.had_pending:
            # one statement is one transaction: no BEGIN/COMMIT round trips on the hot path
            try:
                cursor = self.conn.execute(insert, values)
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc
            if cursor.rowcount != 1:
                raise LeaseLostError(run_id=run_id, step=commit.step, epoch=epoch)
            return
        with self._write() as conn:
            if conn.execute(insert, values).rowcount != 1:
                raise LeaseLostError(run_id=run_id, step=commit.step, epoch=epoch)
            conn.execute(
                "DELETE FROM pending_writes WHERE run_id = ? AND step <= ?",
                (run_id, commit.step),
            )

    async def put_pending_write(self, run_id: str, epoch: int, write: PendingWrite) -> None:
        # A pending write only saves redoing a task after a crash; it need not survive a
        # power loss, so it is committed without an fsync of its own even at "full" (the
        # step's commit fsyncs it along with the step). A fan-out of 100 tasks would
        # otherwise cost 100 fsyncs.
        relaxed = self.durability == "full"
        if relaxed:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._write() as conn:
                cursor = conn.execute(
                    "INSERT OR REPLACE INTO pending_writes (run_id, step, task, result) "
                    "SELECT ?, ?, ?, ? WHERE EXISTS "
                    "(SELECT 1 FROM runs WHERE run_id = ? AND epoch = ?)",
                    (run_id, write.step, write.task, write.result, run_id, epoch),
                )
                if cursor.rowcount != 1:
                    raise LeaseLostError(run_id=run_id, step=write.step, epoch=epoch)
        finally:
            if relaxed:
                self.conn.execute("PRAGMA synchronous=FULL")

    async def discard_pending_writes(self, run_id: str, epoch: int, step: int) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM pending_writes WHERE run_id = ? AND step = ? AND EXISTS "
                "(SELECT 1 FROM runs WHERE run_id = ? AND epoch = ?)",
                (run_id, step, run_id, epoch),
            )
            if cursor.rowcount == 0 and (await self.get_run(run_id)).epoch != epoch:
                raise LeaseLostError(run_id=run_id, step=step, epoch=epoch)

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
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE runs SET status = ?, reason = ?, error = ?, usage = ?, owner = NULL, "
                "lease_expires_at = NULL, abort_requested = NULL, updated_at = ?, "
                "step = coalesce((SELECT max(id) FROM checkpoints WHERE id BETWEEN "
                "runs.run_no << 32 AND (runs.run_no << 32) + 4294967295) & 4294967295, step) "
                "WHERE run_id = ? AND epoch = ?",
                (status, reason, error, json.dumps(usage), time.time(), run_id, epoch),
            )
            if cursor.rowcount != 1:
                raise LeaseLostError(run_id=run_id, step=None, epoch=epoch)
            self._insert_events(conn, run_id, events)
            # a request asked again while open stays as it is (one id, one row); one asked
            # again after its answer was used (an abort, then a resume) is open again: the
            # answer stays in the run's events
            conn.executemany(
                f"INSERT INTO requests ({REQUEST_COLUMNS}) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (run_id, request_id) DO UPDATE SET status = ?, "
                f"answer = NULL, answered_at = NULL, created_at = excluded.created_at, "
                f"expires_at = excluded.expires_at WHERE requests.status != ?",
                [(*request_values(r), RequestStatus.OPEN, RequestStatus.OPEN) for r in requests],
            )
            if status is RunStatus.COMPLETED:  # nothing is left to ask: what is still open is moot
                conn.execute(
                    "UPDATE requests SET status = ? WHERE run_id = ? AND status = ?",
                    (RequestStatus.CLOSED, run_id, RequestStatus.OPEN),
                )

    async def put_ledger(self, run_id: str, epoch: int, entry: LedgerEntry) -> None:
        with self._write() as conn:
            cursor = conn.execute(
                f"INSERT OR REPLACE INTO ledger (run_id, {LEDGER_COLUMNS}) "
                f"SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS "
                f"(SELECT 1 FROM runs WHERE run_id = ? AND epoch = ?)",
                (
                    run_id,
                    entry.step,
                    entry.task,
                    entry.seq,
                    entry.kind,
                    entry.name,
                    entry.request_hash,
                    entry.status,
                    entry.result,
                    entry.created_at,
                    entry.finished_at,
                    run_id,
                    epoch,
                ),
            )
            if cursor.rowcount != 1:
                raise LeaseLostError(run_id=run_id, step=entry.step, epoch=epoch)

    async def delete_ledger(self, run_id: str, epoch: int, step: int, task: str, seq: int) -> None:
        with self._write() as conn:
            self._fence(conn, run_id, epoch, step)
            conn.execute(
                "DELETE FROM ledger WHERE run_id = ? AND step = ? AND task = ? AND seq = ?",
                (run_id, step, task, seq),
            )

    async def ledger(self, run_id: str, step: int | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE run_id = ?"
        params: list[Any] = [run_id]
        if step is not None:
            sql += " AND step = ?"
            params.append(step)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY step, task, seq", params).fetchall()
        return [ledger_from_row(run_id, row) for row in rows]

    async def answer_request(
        self,
        run_id: str,
        epoch: int,
        request_id: str,
        answer: str,
        status: RequestStatus = RequestStatus.ANSWERED,
        expected: RequestStatus = RequestStatus.OPEN,
    ) -> None:
        status = stored_member(
            RequestStatus, status, run_id=run_id, table="requests", column="status"
        )
        with self._write() as conn:
            self._fence(conn, run_id, epoch, None)
            cursor = conn.execute(
                "UPDATE requests SET status = ?, answer = ?, answered_at = ? "
                "WHERE run_id = ? AND request_id = ? AND status = ?",
                (status, answer, time.time(), run_id, request_id, expected),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"run {run_id} has no {expected} request {request_id}")

    async def acquire(self, run_id: str, owner: str) -> RunRecord:
        now = time.time()
        with self._write() as conn:
            self._refuse_if_stopped(conn)
            record = self._get(conn, run_id)
            refuse_unless_at_rest(record, now, "resume it")
            conn.execute(
                "UPDATE runs SET owner = ?, epoch = epoch + 1, lease_expires_at = ?, "
                "status = ?, abort_requested = NULL, updated_at = ? WHERE run_id = ?",
                (owner, now + self.lease_seconds, RunStatus.RUNNING, now, run_id),
            )
            return self._get(conn, run_id)

    async def renew(self, run_id: str, epoch: int, *, step: int, usage: dict[str, Any]) -> bool:
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE runs SET lease_expires_at = ?, step = ?, usage = ?, updated_at = ? "
                "WHERE run_id = ? AND epoch = ? AND status = ?",
                (
                    now + self.lease_seconds,
                    step,
                    json.dumps(usage),
                    now,
                    run_id,
                    epoch,
                    RunStatus.RUNNING,
                ),
            )
            return cursor.rowcount == 1

    async def abort_requested(self, run_id: str) -> str | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT abort_requested FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return None if row is None else row[0]

    async def pending_writes(self, run_id: str, step: int) -> list[PendingWrite]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT step, task, result FROM pending_writes WHERE run_id = ? AND step = ? "
                "ORDER BY task",
                (run_id, step),
            ).fetchall()
        return [PendingWrite(step=r[0], task=r[1], result=r[2]) for r in rows]
