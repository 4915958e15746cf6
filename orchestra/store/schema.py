"""The SQLite store's schema and row mapping: migrations, column lists, how records become
rows and back. ``sqlite.py`` holds the operations."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from ..outcome import RunStatus
from .records import (
    CheckpointRow,
    LedgerEntry,
    LedgerKind,
    LedgerStatus,
    RequestKind,
    RequestRow,
    RequestStatus,
    RunRecord,
    stored_member,
)

MIGRATION_SET = "orchestra"
KNOWN_MIGRATIONS = ("m001_initial", "m002_agents", "m003_budgets")
CHECKPOINT_COLUMNS = (
    "step, snapshot, delta, tasks, created_at, events, usage, "
    "length(CAST(coalesce(snapshot, delta, '') AS BLOB)), memory"
)
RUN_COLUMNS = (
    "run_id, graph, structure_hash, app_ref, status, step, owner, epoch, lease_expires_at, "
    "created_at, updated_at, usage, reason, error, abort_requested, parent_run_id, parent_step, "
    "budget"
)
RUN_VALUES = ", ".join("?" for _ in RUN_COLUMNS.split(","))
# A checkpoint's id is (run_no << 32) + step: the table's own rowid, so a step is one plain
# b-tree insert with no second index, and a run's checkpoints are one rowid range.
STEP_MASK = 0xFFFFFFFF
# a running run's row is refreshed only when its lease is renewed; its checkpoints are current
READ_COLUMNS = RUN_COLUMNS.replace(
    "status, step,",
    "status, coalesce((SELECT max(c.id) FROM checkpoints c WHERE c.id BETWEEN "
    "runs.run_no << 32 AND (runs.run_no << 32) + 4294967295) & 4294967295, step),",
)


def migrations() -> Any:
    from sqlite_utils import Migrations

    migrations = Migrations(MIGRATION_SET)

    @migrations(name="m001_initial")
    def m001_initial(db: Any) -> None:
        db.execute(
            """
            CREATE TABLE runs (
                run_no INTEGER PRIMARY KEY,
                run_id TEXT NOT NULL UNIQUE,
                graph TEXT NOT NULL,
                structure_hash TEXT NOT NULL,
                app_ref TEXT,
                status TEXT NOT NULL,
                step INTEGER NOT NULL,
                owner TEXT,
                epoch INTEGER NOT NULL,
                lease_expires_at REAL,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                usage TEXT NOT NULL,
                reason TEXT,
                error TEXT,
                abort_requested TEXT,
                parent_run_id TEXT,
                parent_step INTEGER
            )"""
        )
        db.execute("CREATE INDEX runs_by_status ON runs (status)")
        db.execute(
            """
            CREATE TABLE checkpoints (
                id INTEGER PRIMARY KEY,
                step INTEGER NOT NULL,
                snapshot TEXT,
                delta TEXT,
                tasks TEXT NOT NULL,
                events TEXT,
                usage TEXT,
                created_at REAL NOT NULL
            )"""
        )
        db.execute(
            """
            CREATE TABLE pending_writes (
                run_id TEXT NOT NULL,
                step INTEGER NOT NULL,
                task TEXT NOT NULL,
                result TEXT NOT NULL,
                PRIMARY KEY (run_id, step, task)
            ) WITHOUT ROWID"""
        )
        db.execute(
            """
            CREATE TABLE events (
                id INTEGER PRIMARY KEY,
                run_id TEXT NOT NULL,
                step INTEGER,
                kind TEXT NOT NULL,
                at REAL NOT NULL,
                data TEXT NOT NULL
            )"""
        )
        db.execute("CREATE INDEX events_by_run ON events (run_id, id)")
        db.execute("CREATE TABLE control (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")

    @migrations(name="m002_agents")
    def m002_agents(db: Any) -> None:
        # agents' conversations, checkpointed with the state (deltas, snapshots)
        db.execute("ALTER TABLE checkpoints ADD COLUMN memory TEXT")
        db.execute(
            """
            CREATE TABLE ledger (
                run_id TEXT NOT NULL,
                step INTEGER NOT NULL,
                task TEXT NOT NULL,
                seq INTEGER NOT NULL,
                kind TEXT NOT NULL,
                name TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                status TEXT NOT NULL,
                result TEXT,
                created_at REAL NOT NULL,
                finished_at REAL,
                PRIMARY KEY (run_id, step, task, seq)
            ) WITHOUT ROWID"""
        )
        db.execute(
            """
            CREATE TABLE requests (
                run_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                step INTEGER NOT NULL,
                task TEXT NOT NULL,
                kind TEXT NOT NULL,
                payload TEXT NOT NULL,
                schema TEXT,
                status TEXT NOT NULL,
                created_at REAL NOT NULL,
                expires_at REAL,
                answer TEXT,
                answered_at REAL,
                PRIMARY KEY (run_id, request_id)
            ) WITHOUT ROWID"""
        )
        db.execute("CREATE INDEX requests_by_status ON requests (status, created_at)")

    @migrations(name="m003_budgets")
    def m003_budgets(db: Any) -> None:
        # the limits a run was started with (raised by an operator), so a resume keeps them;
        # NULL for the runs already stored
        db.execute("ALTER TABLE runs ADD COLUMN budget TEXT")

    return migrations


def describe_error(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "file is not a database" in text:
        return "not a SQLite database (or it is encrypted or corrupted)"
    if "malformed" in text:
        return f"the database file is corrupted ({text}); restore it from a backup"
    return f"database error: {text}"


INSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (id, step, snapshot, delta, tasks, events, usage, created_at, "
    "memory) SELECT (run_no << 32) + ?, ?, ?, ?, ?, ?, ?, ?, ? FROM runs WHERE run_id = ?"
)
LEDGER_COLUMNS = (
    "step, task, seq, kind, name, request_hash, status, result, created_at, finished_at"
)
REQUEST_COLUMNS = (
    "run_id, request_id, step, task, kind, payload, schema, status, created_at, expires_at, "
    "answer, answered_at"
)


def checkpoint_values(run_id: str, row: CheckpointRow) -> tuple[Any, ...]:
    return (
        row.step,
        row.step,
        row.snapshot,
        row.delta,
        row.tasks,
        row.events,
        row.usage,
        row.created_at,
        row.memory,
        run_id,
    )


def run_values(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.run_id,
        record.graph,
        record.structure_hash,
        record.app_ref,
        record.status,
        record.step,
        record.owner,
        record.epoch,
        record.lease_expires_at,
        record.created_at,
        record.updated_at,
        json.dumps(record.usage),
        record.reason,
        record.error,
        record.abort_requested,
        record.parent_run_id,
        record.parent_step,
        None if record.budget is None else json.dumps(record.budget),
    )


def record_from_row(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        graph=row[1],
        structure_hash=row[2],
        app_ref=row[3],
        status=stored_member(RunStatus, row[4], run_id=row[0], table="runs", column="status"),
        step=row[5],
        owner=row[6],
        epoch=row[7],
        lease_expires_at=row[8],
        created_at=row[9],
        updated_at=row[10],
        usage=json.loads(row[11]) if row[11] else {},
        reason=row[12],
        error=row[13],
        abort_requested=row[14],
        parent_run_id=row[15],
        parent_step=row[16],
        budget=json.loads(row[17]) if row[17] is not None else None,
    )


def checkpoint_from_row(row: Sequence[Any]) -> CheckpointRow:
    return CheckpointRow(
        step=row[0],
        snapshot=row[1],
        delta=row[2],
        tasks=row[3],
        created_at=row[4],
        events=row[5],
        usage=row[6],
        size=row[7],
        memory=row[8],
    )


def ledger_from_row(run_id: str, row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(
        step=row[0],
        task=row[1],
        seq=row[2],
        kind=stored_member(LedgerKind, row[3], run_id=run_id, table="ledger", column="kind"),
        name=row[4],
        request_hash=row[5],
        status=stored_member(LedgerStatus, row[6], run_id=run_id, table="ledger", column="status"),
        result=row[7],
        created_at=row[8],
        finished_at=row[9],
    )


def request_from_row(row: Sequence[Any]) -> RequestRow:
    return RequestRow(
        run_id=row[0],
        request_id=row[1],
        step=row[2],
        task=row[3],
        kind=stored_member(RequestKind, row[4], run_id=row[0], table="requests", column="kind"),
        payload=row[5],
        schema=row[6],
        status=stored_member(
            RequestStatus, row[7], run_id=row[0], table="requests", column="status"
        ),
        created_at=row[8],
        expires_at=row[9],
        answer=row[10],
        answered_at=row[11],
    )
