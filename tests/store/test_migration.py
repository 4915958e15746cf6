"""SQLiteStore migrations: a database written at schema m001 (before agents) opens, migrates
to m002_agents and m003_budgets, and its runs load and resume.

The m001 database is built as orchestra 3a5208c built it: its DDL is copied here (frozen, so
a later edit of the package's m001 cannot hide a migration problem) and applied by
sqlite-utils as migration ``m001_initial`` of the ``orchestra`` set; the run rows are those
that version wrote for ``tests/apps/crash_app.py`` killed after committing step 3.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from apps import crash_app
from helpers import LEASE, POLL

from orchestra.store import MemoryStore, SQLiteStore

pytestmark = pytest.mark.anyio

M001_DDL = (
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
    )""",
    "CREATE INDEX runs_by_status ON runs (status)",
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
    )""",
    """
    CREATE TABLE pending_writes (
        run_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        task TEXT NOT NULL,
        result TEXT NOT NULL,
        PRIMARY KEY (run_id, step, task)
    ) WITHOUT ROWID""",
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        step INTEGER,
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX events_by_run ON events (run_id, id)",
    "CREATE TABLE control (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID",
)

COMMITTED = 3  # the old run's last committed step
TASKS = '[{"node":"count","index":0,"label":"count"}]'


def old_state(step: int) -> dict[str, Any]:
    return {"counter": step, "items": [f"c{i}" for i in range(1, step + 1)]}


def build_m001(path: Path) -> None:
    """Write an m001 database holding run ``old``: crashed (lease expired) after step 3."""
    from sqlite_utils import Database, Migrations

    migrations = Migrations("orchestra")

    @migrations(name="m001_initial")
    def m001_initial(db: Any) -> None:
        for statement in M001_DDL:
            db.execute(statement)

    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        migrations.apply(Database(conn))
        now = time.time() - 60
        structure = crash_app.build(MemoryStore()).structure_hash
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO runs (run_id, graph, structure_hash, app_ref, status, step, owner, "
            "epoch, lease_expires_at, created_at, updated_at, usage) "
            "VALUES ('old', 'crash', ?, NULL, 'running', 0, 'gone:1:abc', 1, ?, ?, ?, '{}')",
            (structure, now + 0.3, now, now),
        )
        for step in range(COMMITTED + 1):
            events = usage = None
            if step:
                events = json.dumps(
                    [
                        {
                            "event": "step_committed",
                            "at": now + step,
                            "nodes": ["count"],
                            "changed": ["items", "counter"],
                            "duration": 0.0001,
                            "durations": [0.0001],
                        }
                    ]
                )
                usage = json.dumps({"steps": step, "tasks": step, "wall_seconds": 0.01 * step})
            conn.execute(
                "INSERT INTO checkpoints (id, step, snapshot, delta, tasks, events, usage, "
                "created_at) VALUES ((1 << 32) + ?, ?, ?, NULL, ?, ?, ?, ?)",
                (
                    step,
                    step,
                    json.dumps(old_state(step), separators=(",", ":")),
                    TASKS,
                    events,
                    usage,
                    now + step,
                ),
            )
        conn.execute(
            "INSERT INTO events (run_id, step, kind, at, data) VALUES ('old', 0, 'run_started', "
            "?, ?)",
            (now, '{"graph":"crash","step":0,"resumed":false,"next":["count"]}'),
        )
        conn.execute("COMMIT")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    made = tmp_path / "old.db"
    build_m001(made)
    return made


def tables(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def migration_names(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = 'orchestra' ORDER BY rowid"
        )
        return [r[0] for r in rows]


def test_m001_database_is_at_schema_m001(path: Path) -> None:
    """The database built here has only m001 applied and none of the agents' tables."""
    assert migration_names(path) == ["m001_initial"]
    assert not {"ledger", "requests"} & tables(path)


async def test_m001_database_opens_migrated_to_the_current_schema(path: Path) -> None:
    """Opening an m001 database applies m002_agents and m003_budgets once."""
    async with SQLiteStore(path) as store:
        assert store.schema_version() == "m003_budgets"
    async with SQLiteStore(path) as store:
        assert store.schema_version() == "m003_budgets"
    assert migration_names(path) == ["m001_initial", "m002_agents", "m003_budgets"]


async def test_m001_database_gains_the_agents_tables_and_memory_column(path: Path) -> None:
    """After the migration the ledger and requests tables and checkpoints.memory exist."""
    async with SQLiteStore(path) as store:
        assert await store.ledger("old") == []
        assert await store.requests("old", statuses=()) == []
    assert {"ledger", "requests"} <= tables(path)
    with closing(sqlite3.connect(path)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(checkpoints)")]
    assert columns[-1] == "memory"


async def test_m001_run_keeps_its_row_and_checkpoints(path: Path) -> None:
    """The old run loads as written: its row, every checkpoint (memory empty), the chain."""
    async with SQLiteStore(path) as store:
        run = await store.get_run("old")
        rows = await store.checkpoints("old")
        chain = await store.checkpoint_chain("old")
        events = await store.events("old")
    assert (run.status, run.step, run.epoch, run.owner) == ("running", COMMITTED, 1, "gone:1:abc")
    assert [json.loads(row.snapshot or "") for row in rows] == [
        old_state(step) for step in range(COMMITTED + 1)
    ]
    assert [row.memory for row in rows] == [None] * (COMMITTED + 1)
    assert [row.step for row in chain] == [COMMITTED]
    assert [event.kind for event in events] == ["run_started"] + ["step_committed"] * COMMITTED


async def test_m001_run_resumes_to_completion(path: Path) -> None:
    """The crashed old run of a graph without agents resumes from step 3 and completes like
    an uncrashed run."""
    store = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    app = crash_app.build(store)
    try:
        outcome = await app.resume("old")
        chain = await store.checkpoint_chain("old", COMMITTED)
    finally:
        await store.aclose()
    assert (str(outcome.status), outcome.steps) == ("completed", crash_app.STEPS)
    assert outcome.state.model_dump() == {
        "counter": crash_app.LAST,
        "items": crash_app.EXPECTED_ITEMS,
    }
    assert json.loads(chain[-1].snapshot or "") == old_state(COMMITTED)


async def test_m001_database_passes_integrity_check_after_migration(path: Path) -> None:
    """PRAGMA integrity_check is ok after the migration and a resume."""
    store = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    try:
        await crash_app.build(store).resume("old")
        assert store.integrity_check() == "ok"
    finally:
        await store.aclose()


def test_m001_database_opened_by_two_stores_at_once_migrates_once(path: Path) -> None:
    """Two stores (threads, each with its own connection) opening the m001 file at the same
    moment both end at m003_budgets, each migration applied once."""
    barrier = threading.Barrier(2)
    versions: list[str] = []

    def open_store() -> None:
        store = SQLiteStore(path)
        barrier.wait()
        versions.append(store.schema_version())
        store.conn.close()

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert versions == ["m003_budgets", "m003_budgets"]
    assert migration_names(path) == ["m001_initial", "m002_agents", "m003_budgets"]
