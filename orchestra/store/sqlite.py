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
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from ..errors import (
    AnswerError,
    LeaseLostError,
    RunNotFoundError,
    RunStatusError,
    StopAllActiveError,
    StoreError,
    StoreFileError,
)
from ..outcome import RunStatus
from .base import (
    CheckpointRow,
    EventRow,
    LedgerEntry,
    PendingWrite,
    RequestRow,
    RequestStatus,
    RunRecord,
    StepCommit,
    budget_event,
    merge_events,
    refuse_unless_at_rest,
    stored_member,
)
from .schema import (
    CHECKPOINT_COLUMNS,
    INSERT_CHECKPOINT,
    KNOWN_MIGRATIONS,
    LEDGER_COLUMNS,
    MIGRATION_SET,
    READ_COLUMNS,
    REQUEST_COLUMNS,
    RUN_COLUMNS,
    RUN_VALUES,
    STEP_MASK,
    checkpoint_from_row,
    checkpoint_values,
    describe_error,
    ledger_from_row,
    migrations,
    record_from_row,
    request_from_row,
    run_values,
)

__all__ = ("SQLiteStore",)


class SQLiteStore:
    """Runs, checkpoints and events in one SQLite file (see the module doc for durability)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Literal["full", "normal"] = "full",
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.2,
        busy_timeout: float = 10.0,
    ) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        if lease_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("lease_seconds and poll_seconds must be positive")
        if poll_seconds > lease_seconds / 3:
            raise ValueError(
                f"poll_seconds ({poll_seconds:g}) must be at most a third of lease_seconds "
                f"({lease_seconds:g}): the lease is renewed on a poll, and must not lapse "
                f"between two"
            )
        self.path = os.fspath(path)
        self.durability = durability
        self.lease_seconds = float(lease_seconds)
        self.poll_seconds = float(poll_seconds)
        self.busy_timeout = float(busy_timeout)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, durability={self.durability!r})"

    # -- connection, schema ---------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections belong to the thread that made
        them; a compiled app used from several threads gets one per thread)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def _open(self) -> sqlite3.Connection:
        from sqlite_utils import Database

        path = self.path
        if Path(path).is_dir():
            raise StoreFileError(path, "is a directory, not a database file")
        try:
            conn = sqlite3.connect(path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreFileError(path, f"cannot open: {exc}") from exc
        try:
            conn.execute("PRAGMA schema_version").fetchone()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreFileError(path, f"cannot switch to WAL mode (got {mode})")
            sync = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
            db = Database(conn, execute_plugins=False)
            self._check_schema(conn)
            pending = migrations()
            if pending.pending(db):
                # under the write lock, so two processes opening a new file cannot both
                # migrate it; sqlite-utils nests its own transactions as savepoints
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._check_schema(conn)
                    pending.apply(db)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except StoreFileError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreFileError(path, describe_error(exc)) from exc
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return
        if "_sqlite_migrations" not in tables:
            raise StoreFileError(
                self.path, f"not an orchestra database (it holds tables {sorted(tables)})"
            )
        applied = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM _sqlite_migrations WHERE migration_set = ? ORDER BY rowid",
                [MIGRATION_SET],
            )
        ]
        if not applied and "runs" not in tables:
            raise StoreFileError(self.path, "not an orchestra database (no orchestra schema)")
        unknown = [name for name in applied if name not in KNOWN_MIGRATIONS]
        if unknown:
            raise StoreFileError(
                self.path,
                f"written by a newer orchestra (schema {unknown[-1]}); upgrade orchestra "
                f"to open it",
            )

    def schema_version(self) -> str:
        """Return the name of the newest migration applied to the file."""
        row = self.conn.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = ? "
            "ORDER BY rowid DESC LIMIT 1",
            [MIGRATION_SET],
        ).fetchone()
        return row[0] if row else "none"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._error(exc) from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._error(exc) from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self.conn
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: sqlite3.DatabaseError) -> StoreError:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
            return StoreError(
                f"{self.path}: database is locked after waiting {self.busy_timeout:g}s "
                f"(another process holds a long write transaction)"
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return StoreFileError(self.path, describe_error(exc))
        return StoreError(f"{self.path}: {type(exc).__name__}: {text}")

    async def aclose(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    async def __aenter__(self) -> SQLiteStore:
        self.conn  # noqa: B018 - open (and check) the file now
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check``; return "ok" or what is wrong."""
        with self._read() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    # -- runs -----------------------------------------------------------------------------

    async def create_run(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        with self._write() as conn:
            self._refuse_if_stopped(conn)
            self._insert_run(conn, record, checkpoint, events)

    async def fork(
        self, record: RunRecord, checkpoint: CheckpointRow, events: Sequence[EventRow]
    ) -> None:
        with self._write() as conn:
            self._insert_run(conn, record, checkpoint, events)

    def _insert_run(
        self,
        conn: sqlite3.Connection,
        record: RunRecord,
        checkpoint: CheckpointRow,
        events: Sequence[EventRow],
    ) -> None:
        try:
            conn.execute(
                f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({RUN_VALUES})",
                run_values(record),
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"run {record.run_id} already exists in {self.path}") from exc
        self._insert_checkpoint(conn, record.run_id, checkpoint)
        self._insert_events(conn, record.run_id, events)

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
                [(*_request_values(r), RequestStatus.OPEN, RequestStatus.OPEN) for r in requests],
            )
            if status is RunStatus.COMPLETED:  # nothing is left to ask: what is still open is moot
                conn.execute(
                    "UPDATE requests SET status = ? WHERE run_id = ? AND status = ?",
                    (RequestStatus.CLOSED, run_id, RequestStatus.OPEN),
                )

    # -- ledger, requests -----------------------------------------------------------------

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

    @staticmethod
    def _fence(conn: sqlite3.Connection, run_id: str, epoch: int, step: int | None) -> None:
        """Refuse a write by an owner whose epoch is not current (or of a run that is gone)."""
        row = conn.execute("SELECT epoch FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None or row[0] != epoch:
            raise LeaseLostError(run_id=run_id, step=step, epoch=epoch)

    async def ledger(self, run_id: str, step: int | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE run_id = ?"
        params: list[Any] = [run_id]
        if step is not None:
            sql += " AND step = ?"
            params.append(step)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY step, task, seq", params).fetchall()
        return [ledger_from_row(run_id, row) for row in rows]

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

    async def answer_request(
        self,
        run_id: str,
        epoch: int,
        request_id: str,
        answer: str,
        status: RequestStatus | str = RequestStatus.ANSWERED,
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
        if record.status is RunStatus.RUNNING and record.lease_live(now):
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

    def _stop_reason(self, conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT value FROM control WHERE key = 'stop_all'").fetchone()
        if row is None:
            return None
        return str(json.loads(row[0]).get("reason") or "stop-all")

    def _refuse_if_stopped(self, conn: sqlite3.Connection) -> None:
        reason = self._stop_reason(conn)
        if reason is not None:
            raise StopAllActiveError(reason)

    async def get_run(self, run_id: str) -> RunRecord:
        with self._read() as conn:
            return self._get(conn, run_id)

    def _get(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        row = conn.execute(
            f"SELECT {READ_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise RunNotFoundError(run_id)
        return record_from_row(row)

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

    # -- checkpoints, pending writes, events ----------------------------------------------

    @staticmethod
    def _insert_checkpoint(conn: sqlite3.Connection, run_id: str, row: CheckpointRow) -> None:
        conn.execute(INSERT_CHECKPOINT, checkpoint_values(run_id, row))

    @staticmethod
    def _bounds(conn: sqlite3.Connection, run_id: str) -> tuple[int, int]:
        row = conn.execute("SELECT run_no FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFoundError(run_id)
        low = row[0] << 32
        return low, low + STEP_MASK

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, run_id: str, events: Sequence[EventRow]) -> None:
        conn.executemany(
            "INSERT INTO events (run_id, step, kind, at, data) VALUES (?, ?, ?, ?, ?)",
            [(run_id, e.step, e.kind, e.at, e.data) for e in events],
        )

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

    async def pending_writes(self, run_id: str, step: int) -> list[PendingWrite]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT step, task, result FROM pending_writes WHERE run_id = ? AND step = ? "
                "ORDER BY task",
                (run_id, step),
            ).fetchall()
        return [PendingWrite(step=r[0], task=r[1], result=r[2]) for r in rows]

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

    def vacuum(self) -> None:
        """Give the space of deleted rows back to the file system.

        In WAL mode VACUUM writes the rebuilt file through the log, so the log is then
        checkpointed and truncated: only then does the file system see the space returned.
        """
        with self._read() as conn:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def file_size(self) -> int:
        """Return the bytes used by the database file and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return total


def _request_values(row: RequestRow) -> tuple[Any, ...]:
    return (
        row.run_id,
        row.request_id,
        row.step,
        row.task,
        row.kind,
        row.payload,
        row.schema,
        row.status,
        row.created_at,
        row.expires_at,
        row.answer,
        row.answered_at,
    )
