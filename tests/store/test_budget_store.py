"""A run's stored budget: written with the run, kept by every write, copied by a fork,
changed by ``set_budget`` only while the run is at rest; and the m003_budgets migration."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from orchestra.errors import LeaseHeldError, RunNotFoundError, RunStatusError
from orchestra.runs.fork import fork_run
from orchestra.store import SQLiteStore, Store
from orchestra.store.base import CheckpointRow, RunRecord, StepCommit
from orchestra.store.schema import MIGRATION_SET, migrations

pytestmark = pytest.mark.anyio

TASKS = '[{"node":"tick","index":0,"label":"tick"}]'
LIMITS: dict[str, Any] = {
    "run": {"steps": 40, "wall_seconds": 3600.0, "tokens": 50_000, "cost_usd": 0.5},
    "agents": {"writer": {"steps": 5, "tokens": 10_000}},
}
RAISED: dict[str, Any] = {
    "run": {"steps": 40, "wall_seconds": 3600.0, "tokens": 70_000, "cost_usd": 1.0},
    "agents": {"writer": {"steps": 5, "tokens": 10_000}},
}


def record(
    run_id: str = "run-1",
    *,
    status: str = "running",
    expires_in: float = 30.0,
    budget: dict[str, Any] | None = LIMITS,
) -> RunRecord:
    """Build a run row; a running one is owned by "owner-a" with a lease ``expires_in``."""
    now = time.time()
    running = status == "running"
    return RunRecord(
        run_id=run_id,
        graph="ticker",
        structure_hash="abc123",
        app_ref=None,
        status=status,
        step=0,
        owner="owner-a" if running else None,
        epoch=1,
        lease_expires_at=now + expires_in if running else None,
        created_at=now,
        updated_at=now,
        usage={"steps": 0},
        budget=budget,
    )


def checkpoint(step: int) -> CheckpointRow:
    return CheckpointRow(
        step=step,
        snapshot=json.dumps({"count": step}),
        delta=None,
        tasks=TASKS,
        created_at=time.time(),
    )


async def stopped(store: Store, run_id: str = "run-1", *, steps: int = 2) -> RunRecord:
    """Create a run, commit ``steps`` steps and stop it with ``budget_exceeded``."""
    await store.create_run(record(run_id), checkpoint(0), [])
    for step in range(1, steps + 1):
        await store.commit_step(run_id, 1, StepCommit(step=step, checkpoint=checkpoint(step)))
    await store.finish_run(
        run_id,
        1,
        status="budget_exceeded",
        reason="token budget exhausted",
        error=None,
        usage={"steps": steps},
        events=[],
    )
    return await store.get_run(run_id)


async def budget_events(store: Store, run_id: str = "run-1") -> list[tuple[int | None, Any]]:
    return [
        (row.step, json.loads(row.data))
        for row in await store.events(run_id)
        if row.kind == "budget_raised"
    ]


# -- kept with the run ---------------------------------------------------------------------


async def test_create_run_stores_the_budget(store: Store) -> None:
    """The budget written with a run is read back as it was, by get_run and list_runs."""
    await store.create_run(record(), checkpoint(0), [])
    assert (await store.get_run("run-1")).budget == LIMITS
    assert [r.budget for r in await store.list_runs()] == [LIMITS]


async def test_a_run_without_a_budget_reads_none(store: Store) -> None:
    """A run written without a budget has None, not an empty dict."""
    await store.create_run(record(budget=None), checkpoint(0), [])
    assert (await store.get_run("run-1")).budget is None


async def test_the_budget_survives_steps_renewals_and_finishing(store: Store) -> None:
    """Commits, lease renewals and finish_run leave the stored budget alone."""
    await store.create_run(record(), checkpoint(0), [])
    await store.commit_step("run-1", 1, StepCommit(step=1, checkpoint=checkpoint(1)))
    assert await store.renew("run-1", 1, step=1, usage={"steps": 1})
    await store.finish_run(
        "run-1", 1, status="budget_exceeded", reason=None, error=None, usage={}, events=[]
    )
    assert (await store.get_run("run-1")).budget == LIMITS


async def test_acquire_returns_the_stored_budget(store: Store) -> None:
    """The record a resume acquires carries the budget an operator stored."""
    await stopped(store)
    await store.set_budget("run-1", RAISED)
    acquired = await store.acquire("run-1", "owner-b")
    assert acquired.budget == RAISED


async def test_fork_copies_the_budget(store: Store) -> None:
    """A fork runs under the budget of the run it was forked from."""
    await stopped(store)
    await store.set_budget("run-1", RAISED)
    forked = await fork_run(store, "run-1", 1, "run-2")
    assert forked.budget == RAISED
    assert (await store.get_run("run-2")).budget == RAISED


# -- set_budget ----------------------------------------------------------------------------


async def test_set_budget_stores_and_returns_the_new_budget(store: Store) -> None:
    """set_budget writes the budget and returns the updated run."""
    await stopped(store)
    updated = await store.set_budget("run-1", RAISED, reason="more tokens")
    assert updated.budget == RAISED
    assert (updated.status, updated.step) == ("budget_exceeded", 2)
    assert (await store.get_run("run-1")).budget == RAISED


async def test_set_budget_records_a_budget_raised_event(store: Store) -> None:
    """The event holds the budget before and after and the reason, at the run's step."""
    await stopped(store)
    await store.set_budget("run-1", RAISED, reason="more tokens")
    assert await budget_events(store) == [
        (2, {"before": LIMITS, "after": RAISED, "reason": "more tokens"})
    ]


async def test_set_budget_of_a_run_stored_without_one(store: Store) -> None:
    """A run stored before budgets gets one; the event's ``before`` is null."""
    await store.create_run(record(status="interrupted", budget=None), checkpoint(0), [])
    await store.set_budget("run-1", LIMITS)
    assert (await store.get_run("run-1")).budget == LIMITS
    assert await budget_events(store) == [(0, {"before": None, "after": LIMITS, "reason": None})]


async def test_set_budget_keeps_the_lease_epoch(store: Store) -> None:
    """Changing the budget is not taking the run: its epoch and owner stay as they were."""
    before = await stopped(store)
    after = await store.set_budget("run-1", RAISED)
    assert (after.epoch, after.owner, after.lease_expires_at) == (before.epoch, None, None)


async def test_set_budget_refuses_a_completed_run(store: Store) -> None:
    """A completed run has nothing left to budget: refused, nothing changed."""
    await store.create_run(record(status="completed"), checkpoint(0), [])
    with pytest.raises(RunStatusError, match="cannot raise its budget"):
        await store.set_budget("run-1", RAISED)
    assert (await store.get_run("run-1")).budget == LIMITS
    assert await budget_events(store) == []


async def test_set_budget_refuses_a_run_with_a_live_owner(store: Store) -> None:
    """A run whose owner holds a live lease runs under the budget it loaded: refused."""
    await store.create_run(record(expires_in=30.0), checkpoint(0), [])
    with pytest.raises(LeaseHeldError, match="owner-a"):
        await store.set_budget("run-1", RAISED)
    assert (await store.get_run("run-1")).budget == LIMITS
    assert await budget_events(store) == []


async def test_set_budget_takes_a_crashed_run(store: Store) -> None:
    """A running run whose owner's lease expired is at rest: its budget can change."""
    await store.create_run(record(expires_in=-1.0), checkpoint(0), [])
    assert (await store.set_budget("run-1", RAISED)).budget == RAISED


async def test_set_budget_of_an_unknown_run(store: Store) -> None:
    """An unknown run id raises RunNotFoundError."""
    with pytest.raises(RunNotFoundError):
        await store.set_budget("nope", RAISED)


async def test_set_budget_refuses_what_is_not_json(store: Store) -> None:
    """A budget that cannot be stored as JSON is refused and nothing changes."""
    await stopped(store)
    with pytest.raises(TypeError):
        await store.set_budget("run-1", {"run": {"tokens": {1, 2}}})
    assert (await store.get_run("run-1")).budget == LIMITS
    assert await budget_events(store) == []


async def test_set_budget_keeps_no_reference_to_the_callers_dict(store: Store) -> None:
    """Changing the dict after the call does not change what is stored."""
    await stopped(store)
    budget = json.loads(json.dumps(RAISED))
    await store.set_budget("run-1", budget)
    budget["run"]["tokens"] = 1
    assert (await store.get_run("run-1")).budget == RAISED


# -- the m003_budgets migration ------------------------------------------------------------


def build_m002(path: Path) -> None:
    """Write a database at schema m002_agents holding run ``old`` (stopped at step 1)."""
    from sqlite_utils import Database

    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        migrations().apply(Database(conn), stop_before="m003_budgets")
        now = time.time()
        conn.execute(
            "INSERT INTO runs (run_id, graph, structure_hash, app_ref, status, step, owner, "
            "epoch, lease_expires_at, created_at, updated_at, usage) "
            "VALUES ('old', 'ticker', 'abc123', NULL, 'budget_exceeded', 1, NULL, 1, NULL, "
            "?, ?, '{\"steps\": 1}')",
            (now, now),
        )
        conn.execute(
            "INSERT INTO checkpoints (id, step, snapshot, delta, tasks, created_at) "
            "VALUES ((1 << 32) + 1, 1, '{\"count\": 1}', NULL, ?, ?)",
            (TASKS, now),
        )


def migration_names(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = ? ORDER BY rowid",
            (MIGRATION_SET,),
        )
        return [r[0] for r in rows]


async def test_m002_database_migrates_to_m003_with_budget_null(tmp_path: Path) -> None:
    """An m002 database gains runs.budget; its runs read budget None."""
    path = tmp_path / "old.db"
    build_m002(path)
    assert migration_names(path) == ["m001_initial", "m002_agents"]
    async with SQLiteStore(path) as store:
        assert store.schema_version() == "m003_budgets"
        old = await store.get_run("old")
    assert (old.status, old.step, old.budget) == ("budget_exceeded", 1, None)
    assert migration_names(path) == ["m001_initial", "m002_agents", "m003_budgets"]
    with closing(sqlite3.connect(path)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
        (stored,) = conn.execute("SELECT budget FROM runs").fetchone()
    assert columns[-1] == "budget"
    assert stored is None


async def test_m002_run_takes_a_budget_after_the_migration(tmp_path: Path) -> None:
    """A migrated run can be given a budget, which the next store reads back."""
    path = tmp_path / "old.db"
    build_m002(path)
    async with SQLiteStore(path) as store:
        await store.set_budget("old", LIMITS, reason="stored at last")
    async with SQLiteStore(path) as store:
        assert (await store.get_run("old")).budget == LIMITS
        assert store.integrity_check() == "ok"
