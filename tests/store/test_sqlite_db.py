"""The SQLite database under SQLiteStore: the settings it refuses, one connection per
thread opened on first use, the schema version, integrity check, file size and vacuum, and
the errors for a file that is not a database or a database that stays locked."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from helpers import LEASE, POLL

from orchestra.errors import StoreError, StoreFileError
from orchestra.outcome import RunStatus
from orchestra.store import SQLiteStore
from orchestra.store.base import CheckpointRow, RunRecord, StepCommit
from orchestra.store.schema import KNOWN_MIGRATIONS

pytestmark = pytest.mark.anyio


def run_record(run_id: str) -> RunRecord:
    now = time.time()
    return RunRecord(
        run_id=run_id,
        graph="ticker",
        structure_hash="abc123",
        app_ref=None,
        status=RunStatus.RUNNING,
        step=0,
        owner="owner-a",
        epoch=1,
        lease_expires_at=now + 30,
        created_at=now,
        updated_at=now,
    )


def checkpoint(step: int, text: str = "") -> CheckpointRow:
    return CheckpointRow(
        step=step,
        snapshot=json.dumps({"text": text}),
        delta=None,
        tasks="[]",
        created_at=time.time(),
    )


async def write_runs(store: SQLiteStore, runs: int, steps: int, size: int = 2000) -> None:
    """Write ``runs`` runs of ``steps`` checkpoints of about ``size`` bytes each."""
    for r in range(runs):
        run_id = f"run-{r}"
        await store.create_run(run_record(run_id), checkpoint(0), [])
        for step in range(1, steps + 1):
            text = f"{run_id}:{step}:".ljust(size, "x")
            await store.commit_step(
                run_id, 1, StepCommit(step=step, checkpoint=checkpoint(step, text))
            )


def size_of(path: str) -> int:
    return Path(path).stat().st_size


# -- settings -------------------------------------------------------------------------------------


def test_sqlite_db_refuses_an_unknown_durability(tmp_path: Path) -> None:
    """Only "full" and "normal" are durabilities; the error quotes the one given."""
    with pytest.raises(ValueError, match="durability must be 'full' or 'normal', got 'fast'"):
        SQLiteStore(tmp_path / "runs.db", durability="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"lease_seconds": 0},
        {"lease_seconds": -5},
        {"poll_seconds": 0},
        {"poll_seconds": -0.1},
    ],
    ids=["zero-lease", "negative-lease", "zero-poll", "negative-poll"],
)
def test_sqlite_db_refuses_a_lease_or_poll_that_is_not_positive(
    tmp_path: Path, options: dict[str, float]
) -> None:
    """The lease and the poll interval must be positive."""
    with pytest.raises(ValueError, match="lease_seconds and poll_seconds must be positive"):
        SQLiteStore(tmp_path / "runs.db", **options)  # type: ignore[arg-type]


def test_sqlite_db_refuses_a_poll_longer_than_a_third_of_the_lease(tmp_path: Path) -> None:
    """A lease renewed on a poll must not lapse between two polls."""
    with pytest.raises(ValueError, match=r"poll_seconds \(4\) must be at most a third"):
        SQLiteStore(tmp_path / "runs.db", lease_seconds=10, poll_seconds=4)


def test_sqlite_db_accepts_a_poll_of_exactly_a_third_of_the_lease(tmp_path: Path) -> None:
    """A poll of exactly a third of the lease is allowed."""
    store = SQLiteStore(tmp_path / "runs.db", lease_seconds=9, poll_seconds=3)
    assert (store.lease_seconds, store.poll_seconds) == (9.0, 3.0)


def test_sqlite_db_constructor_does_not_touch_the_file(tmp_path: Path) -> None:
    """Making a store opens nothing: the file appears on first use."""
    path = tmp_path / "runs.db"
    SQLiteStore(path)
    assert not path.exists()


def test_sqlite_db_repr_names_the_file_and_durability(tmp_path: Path) -> None:
    """The repr shows the path and the durability."""
    path = tmp_path / "runs.db"
    assert repr(SQLiteStore(path, durability="normal")) == (
        f"SQLiteStore({str(path)!r}, durability='normal')"
    )


# -- connections ----------------------------------------------------------------------------------


async def test_sqlite_db_keeps_one_connection_per_thread(sqlite_store: SQLiteStore) -> None:
    """The same thread always gets the same connection."""
    assert sqlite_store.conn is sqlite_store.conn


async def test_sqlite_db_gives_another_thread_its_own_connection(
    sqlite_store: SQLiteStore,
) -> None:
    """A second thread gets a connection of its own, on the same file."""
    here = sqlite_store.conn
    seen: list[Any] = []

    def in_thread() -> None:
        conn = sqlite_store.conn
        seen.append(conn)
        seen.append(conn.execute("SELECT count(*) FROM runs").fetchone()[0])
        conn.close()

    await sqlite_store.create_run(run_record("run-1"), checkpoint(0), [])
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(timeout=5)
    assert seen[0] is not here
    assert seen[1] == 1  # it reads what the main thread's connection wrote


async def test_sqlite_db_async_with_opens_the_file_and_closes_it(tmp_path: Path) -> None:
    """Entering opens (and creates) the file; leaving closes the connection."""
    path = tmp_path / "runs.db"
    async with SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL) as store:
        assert path.exists()
        conn = store.conn
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")


# -- schema, integrity, size, vacuum ------------------------------------------------------------


async def test_sqlite_db_schema_version_is_the_newest_migration(sqlite_store: SQLiteStore) -> None:
    """A new file is migrated to the newest schema, and says so."""
    assert sqlite_store.schema_version() == KNOWN_MIGRATIONS[-1]


async def test_sqlite_db_integrity_check_is_ok_on_a_fresh_file(sqlite_store: SQLiteStore) -> None:
    """A freshly created file passes SQLite's integrity check."""
    assert sqlite_store.integrity_check() == "ok"


async def test_sqlite_db_file_size_of_a_file_not_yet_created_is_zero(tmp_path: Path) -> None:
    """Before first use there is no file, and so no bytes."""
    assert SQLiteStore(tmp_path / "runs.db").file_size() == 0


async def test_sqlite_db_file_size_grows_after_writes(sqlite_store: SQLiteStore) -> None:
    """Writing runs makes the file (with its log) larger."""
    sqlite_store.conn  # noqa: B018 - create the file and its schema first
    before = sqlite_store.file_size()
    await write_runs(sqlite_store, runs=2, steps=10)
    assert sqlite_store.file_size() > before + 2 * 10 * 2000


async def test_sqlite_db_file_size_counts_the_write_ahead_log(sqlite_store: SQLiteStore) -> None:
    """The size is the database file plus its WAL, where fresh commits live."""
    await write_runs(sqlite_store, runs=1, steps=5)
    wal = size_of(sqlite_store.path + "-wal")
    assert wal > 0
    assert sqlite_store.file_size() == size_of(sqlite_store.path) + wal


async def test_sqlite_db_vacuum_gives_deleted_space_back(sqlite_store: SQLiteStore) -> None:
    """After pruning, vacuum shrinks the file and truncates the log."""
    await write_runs(sqlite_store, runs=4, steps=20)
    before = sqlite_store.file_size()
    await sqlite_store.prune(older_than=time.time() + 60, statuses=[RunStatus.RUNNING])
    sqlite_store.vacuum()
    assert sqlite_store.file_size() < before / 4
    assert size_of(sqlite_store.path + "-wal") == 0


async def test_sqlite_db_vacuum_keeps_what_was_not_deleted(sqlite_store: SQLiteStore) -> None:
    """Vacuum leaves the remaining runs readable and the file intact."""
    await write_runs(sqlite_store, runs=2, steps=3)
    sqlite_store.vacuum()
    assert {r.run_id for r in await sqlite_store.list_runs()} == {"run-0", "run-1"}
    assert len(await sqlite_store.checkpoints("run-1")) == 4
    assert sqlite_store.integrity_check() == "ok"


# -- bad files and a locked database --------------------------------------------------------------


async def test_sqlite_db_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A file of other bytes gives a StoreFileError naming the file and saying what it is
    not."""
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 50)
    store = SQLiteStore(path)
    with pytest.raises(StoreFileError) as info:
        await store.list_runs()
    assert info.value.path == str(path)
    assert info.value.detail == "not a SQLite database (or it is encrypted or corrupted)"
    assert str(info.value) == f"{path}: {info.value.detail}"


async def test_sqlite_db_leaves_a_file_that_is_not_a_database_unchanged(tmp_path: Path) -> None:
    """Refusing a file does not write to it."""
    path = tmp_path / "notes.db"
    original = b"these are my notes, not a database\n" * 50
    path.write_bytes(original)
    with pytest.raises(StoreFileError):
        await SQLiteStore(path).list_runs()
    assert path.read_bytes() == original


async def test_sqlite_db_reports_a_database_locked_past_its_busy_timeout(tmp_path: Path) -> None:
    """A write that waits out the busy timeout is a StoreError saying the file is locked
    and for how long it waited."""
    path = tmp_path / "runs.db"
    store = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL, busy_timeout=0.05)
    try:
        store.conn  # noqa: B018 - create the schema before the other writer locks the file
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(
                StoreError, match=r"database is locked after waiting 0\.05s"
            ) as info:
                await store.create_run(run_record("run-1"), checkpoint(0), [])
            other.execute("ROLLBACK")
        assert not isinstance(info.value, StoreFileError)
        assert str(path) in str(info.value)
    finally:
        await store.aclose()
