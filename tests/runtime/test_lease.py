"""The run's hold on its store: when a poll is due, and what a poll finds (nothing, an abort
request, a lost lease, a failing store) and renews."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from helpers import LEASE, POLL
from pydantic import BaseModel

from orchestra import END, START, Graph, NodeContext
from orchestra.errors import LeaseLostError, RunStoreError
from orchestra.runtime.lease import LeaseWatch
from orchestra.runtime.recorder import Recorder
from orchestra.runtime.tasks import Task
from orchestra.specs import NO_PAYLOAD
from orchestra.store import SQLiteStore, Store
from orchestra.store.base import new_owner_id

pytestmark = pytest.mark.anyio


class S(BaseModel):
    count: int = 0


async def tick(state: S, ctx: NodeContext) -> dict[str, Any]:
    return {"count": state.count + 1}


async def watching(store: Store) -> LeaseWatch:
    """Start run r1 on ``store`` as the runtime does (a Recorder under a new owner, the run
    row written) and return the lease watch of its owner."""
    graph: Graph[S] = Graph(S)
    graph.add_node("tick", tick)
    graph.add_edge(START, "tick")
    graph.add_edge("tick", END)
    app = graph.compile(store=store)
    recorder = Recorder(store, app, "r1", new_owner_id())
    await recorder.begin(S(), [Task("tick", 0, NO_PAYLOAD, "tick")], [])
    return LeaseWatch(recorder)


def usage_at(step: int) -> Callable[[], dict[str, Any]]:
    return lambda: {"steps": step, "tasks": step, "wall_seconds": 0.0}


# -- due / wait ---------------------------------------------------------------------------


async def test_lease_watch_is_not_due_when_it_starts(store: Store) -> None:
    """A new watch counts as just polled: the first poll is one interval away."""
    watch = await watching(store)
    assert not watch.due()
    assert 0 < watch.wait() <= POLL


async def test_lease_watch_is_due_after_poll_seconds(store: Store) -> None:
    """Once poll_seconds have passed, a poll is due and there is nothing to wait for."""
    watch = await watching(store)
    await anyio.sleep(POLL * 1.5)
    assert watch.due()
    assert watch.wait() <= 0


async def test_lease_poll_restarts_the_poll_clock(store: Store) -> None:
    """After a poll, the next one is a whole interval away."""
    watch = await watching(store)
    await anyio.sleep(POLL * 1.5)
    await watch.poll(1, usage_at(1))
    assert not watch.due()
    assert watch.wait() > POLL / 2


# -- poll ---------------------------------------------------------------------------------


async def test_lease_poll_finds_nothing_for_an_owned_run(store: Store) -> None:
    """A poll of a run its owner still holds, with no abort asked, returns None."""
    watch = await watching(store)
    assert await watch.poll(1, usage_at(1)) is None


async def test_lease_poll_returns_the_reason_of_a_requested_abort(store: Store) -> None:
    """After store.request_abort, a poll returns the operator's reason."""
    watch = await watching(store)
    await store.request_abort("r1", "operator said stop")
    assert await watch.poll(1, usage_at(1)) == "operator said stop"


async def test_lease_poll_returns_lease_lost_when_another_owner_took_the_run(
    store: Store,
) -> None:
    """A renewal refused because another process acquired the run is a LeaseLostError."""
    watch = await watching(store)
    await anyio.sleep(LEASE * 1.2)  # the lease lapses: another process may take the run
    await store.acquire("r1", new_owner_id())
    found = await watch.poll(3, usage_at(3))
    assert isinstance(found, LeaseLostError)
    assert (found.run_id, found.step, found.epoch) == ("r1", 3, 1)


async def test_lease_poll_does_not_renew_before_a_third_of_the_lease(store: Store) -> None:
    """A poll soon after the run started leaves the lease and the run row as they were."""
    watch = await watching(store)
    before = await store.get_run("r1")
    assert await watch.poll(4, usage_at(4)) is None
    after = await store.get_run("r1")
    assert (after.usage, after.lease_expires_at) == ({}, before.lease_expires_at)


async def test_lease_poll_renews_once_a_third_of_the_lease_passed(store: Store) -> None:
    """A poll a third of the lease after the last renewal extends the lease and stores the
    run's usage."""
    watch = await watching(store)
    before = await store.get_run("r1")
    await anyio.sleep(LEASE / 3 * 1.2)
    assert await watch.poll(4, usage_at(4)) is None
    after = await store.get_run("r1")
    assert before.lease_expires_at is not None
    assert after.lease_expires_at is not None
    assert after.lease_expires_at > before.lease_expires_at
    assert after.usage == usage_at(4)()


async def test_lease_poll_renews_only_every_third_of_the_lease(store: Store) -> None:
    """Right after a renewal, the next poll does not renew again."""
    watch = await watching(store)
    await anyio.sleep(LEASE / 3 * 1.2)
    await watch.poll(4, usage_at(4))
    await anyio.sleep(POLL)
    await watch.poll(5, usage_at(5))
    assert (await store.get_run("r1")).usage == usage_at(4)()


async def test_lease_poll_returns_a_store_failure(sqlite_store: SQLiteStore) -> None:
    """A store that fails during the poll is the run's RunStoreError, returned, not raised."""
    watch = await watching(sqlite_store)
    with sqlite3.connect(sqlite_store.path) as conn:
        conn.execute("ALTER TABLE runs RENAME TO runs_gone")
    found = await watch.poll(2, usage_at(2))
    assert isinstance(found, RunStoreError)
    assert (found.run_id, found.step) == ("r1", None)


# -- a run that stopped -------------------------------------------------------------------


async def test_lease_poll_of_a_stopped_run_ignores_an_abort(store: Store) -> None:
    """A run that stopped already keeps its own outcome: the poll returns None."""
    watch = await watching(store)
    await store.request_abort("r1", "operator said stop")
    assert await watch.poll(1, usage_at(1), stopped=True) is None


async def test_lease_poll_of_a_stopped_run_counts_as_a_poll(store: Store) -> None:
    """A stopped run's poll restarts the poll clock all the same."""
    watch = await watching(store)
    await anyio.sleep(POLL * 1.5)
    await watch.poll(1, usage_at(1), stopped=True)
    assert not watch.due()


async def test_lease_poll_of_a_stopped_run_does_not_renew(store: Store) -> None:
    """A stopped run's poll touches neither the lease nor the run row."""
    watch = await watching(store)
    await anyio.sleep(LEASE / 3 * 1.2)
    await watch.poll(4, usage_at(4), stopped=True)
    assert (await store.get_run("r1")).usage == {}
