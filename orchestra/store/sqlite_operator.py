"""The operator contract over SQLite: what an operator reads of runs and does to them (see
:class:`~orchestra.store.base.OperatorStore`); mixed into :class:`SQLiteStore`."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..errors import (
    AnswerError,
    RunStatusError,
    StoreError,
)
from ..outcome import RunStatus
from .records import (
    CheckpointRow,
    EventRow,
    RequestRow,
    RequestStatus,
    RunRecord,
    budget_event,
    merge_events,
    refuse_unless_at_rest,
)
from .schema import (
    CHECKPOINT_COLUMNS,
    READ_COLUMNS,
    REQUEST_COLUMNS,
    checkpoint_from_row,
    record_from_row,
    request_from_row,
)
from .sqlite_db import SQLiteDatabase

__all__ = ("SQLiteOperations",)


class SQLiteOperations(SQLiteDatabase):
    """The operator contract: list, inspect, answer, abort, stop all, budget, fork, prune."""

    async def fork(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        with self._write() as conn:
            self._insert_run(conn, record, checkpoint, events)

    async def set_budget(
        self, run_id: str, budget: dict[str, Any], *, reason: str | None = None
    ) -> RunRecord:
        now = time.time()
        text = json.dumps(budget)
        with self._write() as conn:
            record = self._get(conn, run_id)
            event = budget_event(record, budget, reason, now)
            conn.execute(
                "UPDATE runs SET budget = ?, updated_at = ? WHERE run_id = ?",
                (text, now, run_id),
            )
            self._insert_events(conn, run_id, [event])
            return self._get(conn, run_id)

    async def requests(
        self,
        run_id: str | None = None,
        *,
        statuses: Sequence[RequestStatus] = (RequestStatus.OPEN,),
    ) -> list[RequestRow]:
        sql = f"SELECT {REQUEST_COLUMNS} FROM requests WHERE 1"
        params: list[Any] = []
        if run_id is not None:
            sql += " AND run_id = ?"
            params.append(run_id)
        if statuses:
            # one run's requests by its key, whatever the other runs hold open (`+status`
            # keeps SQLite from walking the status index over every run)
            column = "+status" if run_id is not None else "status"
            sql += f" AND {column} IN ({', '.join('?' for _ in statuses)})"
            params.extend(statuses)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at, request_id", params).fetchall()
        return [request_from_row(row) for row in rows]

    async def record_answers(
        self, run_id: str, answers: Sequence[tuple[str, str]], events: Sequence[EventRow]
    ) -> None:
        now = time.time()
        with self._write() as conn:
            # what would refuse the resume refuses the answers too: nothing is half done
            self._refuse_if_stopped(conn)
            record = self._get(conn, run_id)
            refuse_unless_at_rest(record, now, "answer its requests")
            for request_id, answer in answers:
                cursor = conn.execute(
                    "UPDATE requests SET status = ?, answer = ?, answered_at = ? "
                    "WHERE run_id = ? AND request_id = ? AND status = ?",
                    (RequestStatus.ANSWERED, answer, now, run_id, request_id, RequestStatus.OPEN),
                )
                if cursor.rowcount != 1:  # the transaction rolls back: nothing recorded
                    raise AnswerError(run_id, request_id, "no longer open (answered meanwhile)")
            self._insert_events(conn, run_id, events)

    async def request_abort(self, run_id: str, reason: str) -> RunRecord:
        now = time.time()
        with self._write() as conn:
            record = self._get(conn, run_id)
            self._abort(conn, record, reason, now)
            return self._get(conn, run_id)

    def _abort(self, conn: sqlite3.Connection, record: RunRecord, reason: str, now: float) -> None:
        if record.status is RunStatus.COMPLETED:
            raise RunStatusError(record.run_id, record.status, "abort it")
        event = EventRow(
            step=record.step,
            kind="abort_requested",
            at=now,
            data=json.dumps({"reason": reason}),
        )
        if record.status is RunStatus.ABORTED:
            return  # already at rest as aborted: keep its reason and history
        if record.status is RunStatus.RUNNING and record.owned(now):
            conn.execute(
                "UPDATE runs SET abort_requested = ? WHERE run_id = ?", (reason, record.run_id)
            )
        else:
            # the epoch moves on: an owner whose lease lapsed (but that still runs) is
            # fenced off, so it cannot overwrite the abort with its own commits
            conn.execute(
                "UPDATE runs SET status = ?, reason = ?, owner = NULL, "
                "lease_expires_at = NULL, abort_requested = NULL, updated_at = ?, "
                "epoch = epoch + 1 WHERE run_id = ?",
                (RunStatus.ABORTED, reason, now, record.run_id),
            )
        self._insert_events(conn, record.run_id, [event])

    async def stop_all(self, reason: str) -> list[str]:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO control (key, value) VALUES ('stop_all', ?)",
                (json.dumps({"reason": reason, "at": now}),),
            )
            rows = conn.execute(
                f"SELECT {READ_COLUMNS} FROM runs WHERE status = ?", (RunStatus.RUNNING,)
            ).fetchall()
            records = [record_from_row(row) for row in rows]
            for record in records:
                self._abort(conn, record, reason, now)
        return [r.run_id for r in records]

    async def release_stop_all(self) -> bool:
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM control WHERE key = 'stop_all'")
            return cursor.rowcount == 1

    async def stop_all_reason(self) -> str | None:
        with self._read() as conn:
            return self._stop_reason(conn)

    async def get_run(self, run_id: str) -> RunRecord:
        with self._read() as conn:
            return self._get(conn, run_id)

    async def list_runs(
        self, *, statuses: Sequence[RunStatus] = (), limit: int | None = None
    ) -> list[RunRecord]:
        sql = f"SELECT {READ_COLUMNS} FROM runs"
        params: list[Any] = []
        if statuses:
            sql += f" WHERE status IN ({', '.join('?' for _ in statuses)})"
            params.extend(statuses)
        sql += " ORDER BY created_at DESC, run_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as conn:
            return [record_from_row(row) for row in conn.execute(sql, params)]

    async def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        with self._read() as conn:
            low, high = self._bounds(conn, run_id)
            rows = conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id BETWEEN ? AND ? "
                f"ORDER BY id",
                (low, high),
            ).fetchall()
        return [checkpoint_from_row(row) for row in rows]

    async def checkpoint_chain(self, run_id: str, step: int | None = None) -> list[CheckpointRow]:
        with self._read() as conn:
            low, high = self._bounds(conn, run_id)
            if step is not None:
                high = low + step
            top = conn.execute(
                "SELECT max(id) FROM checkpoints WHERE id BETWEEN ? AND ?", (low, high)
            ).fetchone()[0]
            if top is None or (step is not None and top != high):
                at = "" if step is None else f" at step {step}"
                raise StoreError(f"run {run_id} has no checkpoint{at} in {self.path}")
            base = conn.execute(
                "SELECT id FROM checkpoints WHERE id BETWEEN ? AND ? AND snapshot IS NOT NULL "
                "ORDER BY id DESC LIMIT 1",
                (low, top),
            ).fetchone()
            if base is None:
                raise StoreError(f"run {run_id} has no snapshot at or before step {top - low}")
            rows = conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id BETWEEN ? AND ? "
                f"ORDER BY id",
                (base[0], top),
            ).fetchall()
        return [checkpoint_from_row(row) for row in rows]

    async def events(self, run_id: str) -> list[EventRow]:
        with self._read() as conn:
            own = conn.execute(
                "SELECT step, kind, at, data FROM events WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
            low, high = self._bounds(conn, run_id)
            steps = conn.execute(
                "SELECT step, events, tasks FROM checkpoints WHERE id BETWEEN ? AND ? "
                "AND events IS NOT NULL ORDER BY id",
                (low, high),
            ).fetchall()
        rows = [EventRow(step=r[0], kind=r[1], at=r[2], data=r[3]) for r in own]
        return merge_events(rows, steps)

    async def prune(self, *, older_than: float, statuses: Sequence[RunStatus]) -> int:
        if not statuses:
            return 0
        marks = ", ".join("?" for _ in statuses)
        with self._write() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT run_id FROM runs WHERE updated_at < ? AND status IN ({marks})",
                    (older_than, *statuses),
                )
            ]
            for run_id in ids:
                low, high = self._bounds(conn, run_id)
                conn.execute("DELETE FROM checkpoints WHERE id BETWEEN ? AND ?", (low, high))
            for table in ("pending_writes", "events", "ledger", "requests", "runs"):
                conn.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in ids])
        return len(ids)
