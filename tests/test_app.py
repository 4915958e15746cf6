"""The compiled app: binding a store (with_store), finding the app again (app_ref), and one app
in several threads."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from durable import Ticks, ticker

from orchestra import RunOutcome, RunStatus
from orchestra.errors import RunNotFoundError
from orchestra.store import MemoryStore, SQLiteStore, Store

pytestmark = pytest.mark.anyio


APP = ticker(3).compile()
"""A module-level app: its app_ref is found as ``module:APP``."""


# -- binding a store, finding the app ----------------------------------------------------


async def test_with_store_rebinds_a_compiled_graph(store: Store) -> None:
    """with_store returns the same graph writing to another store."""
    first = MemoryStore()
    app = ticker(3).compile(store=first)
    bound = app.with_store(store)
    assert (bound.store, app.store) == (store, first)
    assert bound.structure_hash == app.structure_hash
    await bound.run(Ticks(), run_id="r1")
    assert (await store.get_run("r1")).status == "completed"
    with pytest.raises(RunNotFoundError):
        await first.get_run("r1")


def test_with_store_keeps_approvals_arbitration_and_breakpoints() -> None:
    """with_store keeps every safeguard setting: the rebound app (what `orchestra resume`
    runs) holds the same calls for approval and arbitrates the same way."""
    from orchestra import Approvals, Arbitration

    approvals = Approvals(require="writes")
    arbitration = Arbitration(policy="first_wins")
    app = ticker(3).compile(
        approvals=approvals,
        arbitration=arbitration,
        interrupt_before=["tick"],
        interrupt_after=["tick"],
    )
    bound = app.with_store(MemoryStore())
    assert bound.approvals is approvals
    assert bound.arbitration is arbitration
    assert bound.interrupt_before == bound.interrupt_after == frozenset({"tick"})
    assert bound.loop_guard is app.loop_guard


async def test_with_store_accepts_a_path(tmp_path: Path) -> None:
    """with_store("file.db") binds an SQLite store on that file."""
    bound = ticker(3).compile().with_store(tmp_path / "other.db")
    try:
        assert isinstance(bound.store, SQLiteStore)
        outcome = await bound.run(Ticks())
        assert (await bound.get_run(outcome.run_id)).status == "completed"
    finally:
        assert bound.store is not None
        await bound.store.aclose()


def test_app_ref_of_a_module_level_graph_is_found() -> None:
    """A compiled graph kept in a module attribute knows its module:attribute."""
    assert APP.app_ref == f"{__name__}:APP"
    module, attribute = APP.app_ref.split(":")
    assert getattr(importlib.import_module(module), attribute) is APP


def test_app_ref_of_a_local_graph_is_none() -> None:
    """A graph not kept in a module attribute has no app_ref."""
    assert ticker(3).compile().app_ref is None


async def test_run_row_records_the_app_ref(store: Store) -> None:
    """The run row says how to import the app again, for `orchestra resume`."""
    outcome = await APP.with_store(store).run(Ticks())
    assert (await store.get_run(outcome.run_id)).app_ref == f"{__name__}:APP"


async def test_sqlite_app_runs_in_a_worker_thread(
    sqlite_store: SQLiteStore, anyio_backend: str
) -> None:
    """One compiled app with an SQLite store runs in the main thread and in a worker thread
    with its own event loop."""
    app = ticker(3).compile(store=sqlite_store)
    here = await app.run(Ticks(), run_id="main")

    def in_worker() -> RunOutcome[Any]:
        return anyio.run(
            functools.partial(app.run, Ticks(), run_id="worker"), backend=anyio_backend
        )

    with anyio.fail_after(5):
        there = await anyio.to_thread.run_sync(in_worker)
    assert (here.status, there.status) == (RunStatus.COMPLETED, RunStatus.COMPLETED)
    assert there.state == here.state
    assert (await sqlite_store.get_run("worker")).status == "completed"
