"""SQLiteStore: the file itself — pragmas, schema, reopening, bad files, two processes."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestra.errors import StoreError, StoreFileError
from orchestra.outcome import RunStatus
from orchestra.store import SQLiteStore
from orchestra.store.base import (
    CheckpointRow,
    LedgerEntry,
    LedgerKind,
    LedgerStatus,
    RequestKind,
    RequestRow,
    RequestStatus,
    RunRecord,
    StepCommit,
)

pytestmark = pytest.mark.anyio

LEASE = 0.3
POLL = 0.02


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
async def store(path: Path, anyio_backend: str) -> AsyncIterator[SQLiteStore]:
    made = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    yield made
    await made.aclose()


def run_record(run_id: str = "run-1", *, expires_in: float = 30.0) -> RunRecord:
    now = time.time()
    return RunRecord(
        run_id=run_id,
        graph="ticker",
        structure_hash="abc123",
        app_ref=None,
        status="running",
        step=0,
        owner="owner-a",
        epoch=1,
        lease_expires_at=now + expires_in,
        created_at=now,
        updated_at=now,
        usage={},
    )


def checkpoint(step: int, text: str) -> CheckpointRow:
    return CheckpointRow(
        step=step,
        snapshot=json.dumps({"text": text}),
        delta=None,
        tasks="[]",
        created_at=time.time(),
    )


async def fill(store: SQLiteStore, runs: int, steps: int) -> None:
    """Write ``runs`` runs of ``steps`` snapshot checkpoints with some bulk each."""
    rng = random.Random(7)
    for r in range(runs):
        run_id = f"run-{r}"
        await store.create_run(run_record(run_id), checkpoint(0, "start"), [])
        for step in range(1, steps + 1):
            text = "".join(rng.choice("abcdefgh") for _ in range(300))
            row = checkpoint(step, text)
            await store.commit_step(run_id, 1, StepCommit(step=step, checkpoint=row))


def assert_names(error: StoreError, path: Path) -> None:
    assert str(path) in str(error)
    if isinstance(error, StoreFileError):
        assert error.path == str(path)


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def scribble_over_middle_pages(path: Path, page: int = 4096) -> None:
    """Overwrite every page but the first two and the last two with random bytes."""
    data = bytearray(path.read_bytes())
    pages = len(data) // page
    assert pages > 8
    rng = random.Random(3)
    for number in range(2, pages - 2):
        data[number * page : (number + 1) * page] = rng.randbytes(page)
    path.write_bytes(bytes(data))


async def read_everything(store: SQLiteStore) -> None:
    """Read every run, checkpoint and event in the store."""
    for run in await store.list_runs():
        await store.checkpoints(run.run_id)
        await store.events(run.run_id)
        await store.checkpoint_chain(run.run_id)


# -- pragmas, schema ---------------------------------------------------------------------


async def test_sqlite_store_uses_wal_mode(store: SQLiteStore) -> None:
    """The file is in write-ahead-log mode."""
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(("durability", "level"), [("full", 2), ("normal", 1)])
async def test_sqlite_store_sets_synchronous_from_durability(
    path: Path, durability: str, level: int
) -> None:
    """durability="full" syncs every commit (FULL), "normal" only at checkpoints (NORMAL)."""
    store = SQLiteStore(path, durability=durability)  # type: ignore[arg-type]
    try:
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == level
    finally:
        await store.aclose()


async def test_sqlite_store_defaults_to_full_durability(path: Path) -> None:
    """Without a durability argument, every commit is fsynced."""
    store = SQLiteStore(path)
    try:
        assert store.durability == "full"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        await store.aclose()


def test_sqlite_store_rejects_an_invalid_durability(path: Path) -> None:
    """Only "full" and "normal" are accepted."""
    with pytest.raises(ValueError, match="durability"):
        SQLiteStore(path, durability="fast")  # type: ignore[arg-type]


async def test_sqlite_store_records_the_schema_version(store: SQLiteStore) -> None:
    """A new file gets the current schema, named by its newest migration."""
    assert store.schema_version() == "m003_budgets"


async def test_sqlite_store_reopens_an_existing_file(path: Path) -> None:
    """A second store on an existing file reads what the first wrote."""
    first = SQLiteStore(path)
    await first.create_run(run_record(), checkpoint(0, "start"), [])
    await first.aclose()
    second = SQLiteStore(path)
    try:
        assert (await second.get_run("run-1")).graph == "ticker"
        assert second.schema_version() == "m003_budgets"
    finally:
        await second.aclose()


async def test_sqlite_store_integrity_check_is_ok_on_a_good_file(store: SQLiteStore) -> None:
    """A file written by the store passes PRAGMA integrity_check."""
    await fill(store, runs=2, steps=5)
    assert store.integrity_check() == "ok"


# -- bad files ---------------------------------------------------------------------------


async def open_and_read(path: Path) -> None:
    """Open a store on ``path`` and read from it."""
    store = SQLiteStore(path)
    try:
        await store.list_runs()
    finally:
        await store.aclose()


async def test_sqlite_store_refuses_a_text_file(path: Path) -> None:
    """A file that is not a database gives a StoreFileError naming it."""
    write_file(path, b"these are my notes, not a database\n" * 50)
    with pytest.raises(StoreFileError) as info:
        await open_and_read(path)
    assert_names(info.value, path)


async def test_sqlite_store_refuses_another_applications_database(path: Path) -> None:
    """A SQLite file with other tables and no orchestra schema is refused, not migrated."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreFileError, match="not an orchestra database") as info:
        await open_and_read(path)
    assert_names(info.value, path)
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"users"}


async def test_sqlite_store_refuses_a_newer_schema(path: Path) -> None:
    """A file migrated by a newer orchestra is refused with a message saying so."""
    store = SQLiteStore(path)
    store.schema_version()
    await store.aclose()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('orchestra', 'm999_from_the_future', '2099-01-01')"
    )
    conn.commit()
    conn.close()
    with pytest.raises(StoreFileError, match="newer") as info:
        await open_and_read(path)
    assert_names(info.value, path)


async def test_sqlite_store_refuses_a_directory(tmp_path: Path) -> None:
    """A directory path gives a StoreFileError naming it."""
    with pytest.raises(StoreFileError) as info:
        await open_and_read(tmp_path)
    assert_names(info.value, tmp_path)


async def test_sqlite_store_refuses_another_applications_sqlite_utils_database(
    path: Path,
) -> None:
    """A file with migrations of another application is not taken for an orchestra file."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE _sqlite_migrations (id INTEGER PRIMARY KEY, migration_set TEXT, "
        "name TEXT, applied_at TEXT)"
    )
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('blog', 'm001_posts', '2024-01-01')"
    )
    conn.execute("CREATE TABLE posts (id INTEGER PRIMARY KEY, title TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreFileError, match="not an orchestra database") as info:
        await open_and_read(path)
    assert_names(info.value, path)


async def test_sqlite_store_refuses_a_path_in_a_missing_directory(tmp_path: Path) -> None:
    """A file that cannot be created gives a StoreFileError naming it."""
    path = tmp_path / "missing" / "runs.db"
    with pytest.raises(StoreFileError) as info:
        await open_and_read(path)
    assert_names(info.value, path)


async def test_sqlite_store_turns_an_empty_file_into_a_store(path: Path) -> None:
    """An empty file (as `touch` makes) becomes a new orchestra database."""
    write_file(path, b"")
    store = SQLiteStore(path)
    try:
        assert await store.list_runs() == []
        assert store.schema_version() == "m003_budgets"
    finally:
        await store.aclose()


async def test_sqlite_store_reports_a_corrupted_file(path: Path) -> None:
    """Garbage in the middle of a database file gives a StoreError naming the file."""
    store = SQLiteStore(path)
    await fill(store, runs=4, steps=25)
    await store.aclose()  # the last connection checkpoints the WAL into the file
    scribble_over_middle_pages(path)
    store = SQLiteStore(path)
    try:
        with pytest.raises(StoreError) as info:
            await read_everything(store)
    finally:
        await store.aclose()
    assert_names(info.value, path)


# -- two processes -----------------------------------------------------------------------


async def test_sqlite_store_abort_requested_through_one_store_is_seen_by_another(
    path: Path,
) -> None:
    """Two stores on one file (two processes) see each other's abort requests."""
    owner = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    operator = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    try:
        await owner.create_run(run_record(), checkpoint(0, "start"), [])
        record = await operator.request_abort("run-1", "from another terminal")
        assert record.status == "running"
        assert await owner.abort_requested("run-1") == "from another terminal"
    finally:
        await owner.aclose()
        await operator.aclose()


async def test_sqlite_store_commits_through_one_store_are_seen_by_another(path: Path) -> None:
    """A step committed by the owner's store is visible to a reader's store at once."""
    owner = SQLiteStore(path)
    reader = SQLiteStore(path)
    try:
        await owner.create_run(run_record(), checkpoint(0, "start"), [])
        assert (await reader.get_run("run-1")).step == 0
        await owner.commit_step("run-1", 1, StepCommit(step=1, checkpoint=checkpoint(1, "x")))
        assert (await reader.get_run("run-1")).step == 1
    finally:
        await owner.aclose()
        await reader.aclose()


# -- values that are not members of their enums -----------------------------------------------


async def damaged(path: Path) -> SQLiteStore:
    """A store with one run that stopped with an open request and one ledger entry."""
    store = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    await store.create_run(run_record(), checkpoint(0, "start"), [])
    now = time.time()
    entry = LedgerEntry(
        step=1,
        task="billing",
        seq=0,
        kind=LedgerKind.TOOL,
        name="refund",
        request_hash="h",
        status=LedgerStatus.STARTED,
        result=None,
        created_at=now,
    )
    await store.put_ledger("run-1", 1, entry)
    row = RequestRow(
        run_id="run-1",
        request_id="req_1",
        step=1,
        task="billing",
        kind=RequestKind.IN_DOUBT,
        payload="{}",
        schema=None,
        status=RequestStatus.OPEN,
        created_at=now,
    )
    await store.finish_run(
        "run-1",
        1,
        status=RunStatus.INTERRUPTED,
        reason=None,
        error=None,
        usage={},
        events=[],
        requests=[row],
    )
    return store


def edit(path: Path, sql: str) -> None:
    """Change the file behind the store's back, as a person with sqlite3 would."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql)
    conn.close()


async def test_sqlite_store_reads_back_enum_members(path: Path) -> None:
    """Stored statuses and kinds come back as members of their enums."""
    store = await damaged(path)
    try:
        assert (await store.get_run("run-1")).status is RunStatus.INTERRUPTED
        [row] = await store.requests("run-1")
        assert row.kind is RequestKind.IN_DOUBT
        assert row.status is RequestStatus.OPEN
        [entry] = await store.ledger("run-1")
        assert entry.kind is LedgerKind.TOOL
        assert entry.status is LedgerStatus.STARTED
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("sql", "read", "named"),
    [
        ("UPDATE runs SET status = 'sleeping'", "get_run", "table runs holds status 'sleeping'"),
        ("UPDATE runs SET status = 'sleeping'", "list_runs", "table runs holds status 'sleeping'"),
        (
            "UPDATE requests SET status = 'maybe'",
            "requests",
            "table requests holds status 'maybe'",
        ),
        ("UPDATE requests SET kind = 'vote'", "requests", "table requests holds kind 'vote'"),
        ("UPDATE ledger SET status = 'halfway'", "ledger", "table ledger holds status 'halfway'"),
        ("UPDATE ledger SET kind = 'rpc'", "ledger", "table ledger holds kind 'rpc'"),
    ],
)
async def test_sqlite_store_refuses_a_stored_value_that_is_not_a_member(
    path: Path, sql: str, read: str, named: str
) -> None:
    """A status or kind edited into the file (or written by a newer orchestra) is a
    StoreError naming the run, the table and the value, never a bare ValueError."""
    store = await damaged(path)
    await store.aclose()
    edit(path, sql)
    store = SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL)
    try:
        calls = {
            "get_run": lambda: store.get_run("run-1"),
            "list_runs": lambda: store.list_runs(),
            "requests": lambda: store.requests("run-1", statuses=()),
            "ledger": lambda: store.ledger("run-1"),
        }
        with pytest.raises(StoreError, match=f"run run-1: {named}") as caught:
            await calls[read]()
        assert not isinstance(caught.value, ValueError)
    finally:
        await store.aclose()
