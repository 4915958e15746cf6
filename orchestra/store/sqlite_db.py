"""The SQLite database under SQLiteStore: its connection (one per thread), schema and
migrations, transactions, and the row-level helpers both of the store's contracts use."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, Self

from ..errors import (
    LeaseLostError,
    RunNotFoundError,
    StopAllActiveError,
    StoreError,
    StoreFileError,
)
from .records import (
    CheckpointRow,
    EventRow,
    RequestRow,
    RunRecord,
)
from .schema import (
    INSERT_CHECKPOINT,
    KNOWN_MIGRATIONS,
    MIGRATION_SET,
    READ_COLUMNS,
    RUN_COLUMNS,
    RUN_VALUES,
    STEP_MASK,
    checkpoint_values,
    describe_error,
    migrations,
    record_from_row,
    run_values,
)

__all__ = ("SQLiteDatabase",)


class SQLiteDatabase:
    """One SQLite file in WAL mode: connection, schema, transactions (see SQLiteStore)."""

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

    async def __aenter__(self) -> Self:
        self.conn  # noqa: B018 - open (and check) the file now
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check``; return "ok" or what is wrong."""
        with self._read() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

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

    @staticmethod
    def _fence(conn: sqlite3.Connection, run_id: str, epoch: int, step: int | None) -> None:
        """Refuse a write by an owner whose epoch is not current (or of a run that is gone)."""
        row = conn.execute("SELECT epoch FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None or row[0] != epoch:
            raise LeaseLostError(run_id=run_id, step=step, epoch=epoch)

    def _stop_reason(self, conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT value FROM control WHERE key = 'stop_all'").fetchone()
        if row is None:
            return None
        return str(json.loads(row[0]).get("reason") or "stop-all")

    def _refuse_if_stopped(self, conn: sqlite3.Connection) -> None:
        reason = self._stop_reason(conn)
        if reason is not None:
            raise StopAllActiveError(reason)

    def _get(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        row = conn.execute(
            f"SELECT {READ_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise RunNotFoundError(run_id)
        return record_from_row(row)

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


def request_values(row: RequestRow) -> tuple[Any, ...]:
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
