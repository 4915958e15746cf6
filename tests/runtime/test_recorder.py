"""The recorder: the run row and the events of each step, pending writes of a step interrupted
half-way, fencing of a stale owner, and what a failing store does to the run."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from durable import (
    Pair,
    Ticks,
    chain,
    fan_out,
    run_until,
    step_one,
    ticker,
    uninterrupted,
    until_pending,
)
from helpers import LEASE, POLL
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    CompiledGraph,
    Graph,
    NodeContext,
    RetryPolicy,
    RunStatus,
    Send,
    append,
)
from orchestra.errors import (
    InvalidUpdateError,
    LeaseHeldError,
    LeaseLostError,
    RunStoreError,
    StoreError,
)
from orchestra.events import RunFinished, StepCommitted
from orchestra.runtime.executor import Execution
from orchestra.runtime.recorder import Recorder
from orchestra.store import SQLiteStore, Store
from orchestra.store.base import new_owner_id

pytestmark = pytest.mark.anyio


# -- the run row and its events ---------------------------------------------------------


async def test_run_writes_the_run_row(store: Store) -> None:
    """A finished run has a row naming its graph, structure and status."""
    app = ticker(3).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    record = await store.get_run("r1")
    assert (record.graph, record.structure_hash) == ("ticker", app.structure_hash)
    assert (record.status, record.step, record.owner) == ("completed", outcome.steps, None)


async def test_run_row_exists_before_the_first_node_runs(store: Store) -> None:
    """A crash in the first step still leaves a visible run."""
    seen: list[Any] = []

    async def first(state: Ticks, ctx: NodeContext) -> None:
        seen.append(await store.get_run(ctx.run_id))

    app = chain(("first", first)).compile(store=store)
    await app.run(Ticks(), run_id="r1")
    [record] = seen
    assert (record.status, record.step) == ("running", 0)
    assert record.owner is not None


async def test_run_events_are_stored_in_order(store: Store) -> None:
    """A run's events start with run_started, end with run_finished, one commit a step."""
    app = ticker(3).compile(store=store)
    await app.run(Ticks(), run_id="r1")
    kinds = [e.kind for e in await store.events("r1")]
    assert kinds[0] == "run_started"
    assert kinds[-1] == "run_finished"
    assert kinds.count("step_committed") == 3


async def test_events_of_a_failed_step_are_stored_under_that_step(store: Store) -> None:
    """A failed step's node_retried and node_finished rows carry that step, not the last one
    committed."""

    async def broken(state: Ticks, ctx: NodeContext) -> None:
        raise RuntimeError("broken")

    graph: Graph[Ticks] = Graph(Ticks)
    graph.add_node("one", step_one)
    graph.add_node("broken", broken, retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "one")
    graph.add_edge("one", "broken")
    graph.add_edge("broken", END)
    failed = await graph.compile(store=store).run(Ticks(), run_id="r1")
    assert (failed.status, failed.steps) == (RunStatus.FAILED, 1)
    rows = [e for e in await store.events("r1") if e.kind.startswith("node_")]
    assert [(e.kind, e.step) for e in rows] == [("node_retried", 2), ("node_finished", 2)]
    assert [json.loads(e.data)["step"] for e in rows] == [2, 2]


# -- pending writes: a step interrupted half-way -----------------------------------------


async def test_resume_after_a_failure_mid_step_redoes_only_unfinished_tasks(
    store: Store,
) -> None:
    """Tasks that finished in the failed step are not run again on resume."""
    calls: collections.Counter[str] = collections.Counter()
    flag = {"broken": True}

    async def b(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        calls["b"] += 1
        if flag["broken"]:
            await until_pending(store, ctx.run_id, ctx.step)
            raise RuntimeError("b is broken")
        return {"b": 2, "log": "b"}

    app = fan_out(b, calls).compile(store=store)
    with anyio.fail_after(5):
        failed = await app.run(Pair(), run_id="r1")
    assert failed.status is RunStatus.FAILED
    assert [w.task for w in await store.pending_writes("r1", 1)] == ["a"]
    flag["broken"] = False
    outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert calls == {"a": 1, "b": 2, "c": 1}
    assert outcome.state == Pair(a=1, b=2, log=["a", "b", "c"])
    assert await store.pending_writes("r1", 1) == []


async def test_resume_after_an_abort_mid_step_redoes_only_unfinished_tasks(
    store: Store,
) -> None:
    """Tasks that finished in the aborted step are not run again on resume."""
    calls: collections.Counter[str] = collections.Counter()
    flag = {"hang": True}
    entered = anyio.Event()

    async def b(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        calls["b"] += 1
        if flag["hang"]:
            await until_pending(store, ctx.run_id, ctx.step)
            entered.set()
            await anyio.sleep_forever()
        return {"b": 2, "log": "b"}

    app = fan_out(b, calls).compile(store=store)
    aborted = await run_until(app, Pair(), "r1", entered, lambda: app.abort("r1", "stop"))
    assert aborted.status is RunStatus.ABORTED
    flag["hang"] = False
    outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert calls == {"a": 1, "b": 2, "c": 1}


async def crash_mid_step(
    store: Store, calls: collections.Counter[str], flag: dict[str, bool]
) -> CompiledGraph[Pair]:
    """Start run r1 and stop it like a killed process once ``a`` finished and ``b`` is
    still running in step 1; return the app.

    The run is driven through ``Execution`` without ``run_to_end``, so nothing runs after
    the "kill": no finish, no commit, no lease renewal.
    """
    dying = anyio.Event()

    async def b(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        calls["b"] += 1
        if flag["crash"]:
            await until_pending(store, ctx.run_id, ctx.step)
            dying.set()
            await anyio.sleep_forever()
        return {"b": 2, "log": "b"}

    app = fan_out(b, calls).compile(store=store)
    recorder = Recorder(store, app, "r1", new_owner_id())
    execution = Execution(app, Pair(), run_id="r1", recorder=recorder)
    with anyio.fail_after(5), anyio.CancelScope() as process:
        await execution.start()
        async with anyio.create_task_group() as group:
            group.start_soon(execution.advance)
            await dying.wait()
            process.cancel()
    return app


async def test_resume_after_a_crash_mid_step_redoes_only_unfinished_tasks(
    store: Store,
) -> None:
    """After a crash, only the tasks without a pending write run again."""
    calls: collections.Counter[str] = collections.Counter()
    flag = {"crash": True}
    app = await crash_mid_step(store, calls, flag)
    record = await store.get_run("r1")
    assert (record.status, record.step) == ("running", 0)
    flag["crash"] = False
    await anyio.sleep(LEASE + 0.1)  # the dead owner's lease runs out
    with anyio.fail_after(5):
        outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert calls == {"a": 1, "b": 2, "c": 1}
    assert outcome.state == Pair(a=1, b=2, log=["a", "b", "c"])


async def test_resume_of_a_crashed_run_waits_for_the_dead_owners_lease(store: Store) -> None:
    """A crashed run's lease must run out before another process can take the run."""
    calls: collections.Counter[str] = collections.Counter()
    flag = {"crash": True}
    app = await crash_mid_step(store, calls, flag)
    flag["crash"] = False
    with pytest.raises(LeaseHeldError):
        await app.resume("r1")
    await anyio.sleep(LEASE + 0.1)
    with anyio.fail_after(5):
        outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED


async def test_resumed_crashed_run_reaches_the_uninterrupted_final_state(store: Store) -> None:
    """A run that crashed mid-step ends in the same state as one that did not."""
    calls: collections.Counter[str] = collections.Counter()
    flag = {"crash": True}
    app = await crash_mid_step(store, calls, flag)
    flag["crash"] = False
    await anyio.sleep(LEASE + 0.1)
    with anyio.fail_after(5):
        outcome = await app.resume("r1")

    async def b(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        return {"b": 2, "log": "b"}

    assert outcome.state == await uninterrupted(fan_out(b, collections.Counter()), Pair())


async def test_resume_after_a_failed_merge_reruns_the_steps_tasks(store: Store) -> None:
    """A step whose writes could not be merged keeps no pending writes: once the node is
    fixed, resume runs every task of the step again and completes."""
    calls: collections.Counter[str] = collections.Counter()
    flag = {"broken": True}

    async def b(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        calls["b"] += 1
        return {"b": "not a number"} if flag["broken"] else {"b": 2, "log": "b"}

    app = fan_out(b, calls).compile(store=store)
    failed = await app.run(Pair(), run_id="r1")
    assert failed.status is RunStatus.FAILED
    assert isinstance(failed.error, InvalidUpdateError)
    assert await store.pending_writes("r1", 1) == []
    flag["broken"] = False
    outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert calls == {"a": 2, "b": 2, "c": 1}
    assert outcome.state == Pair(a=1, b=2, log=["a", "b", "c"])


# -- fencing -----------------------------------------------------------------------------


def paused_then_overtaken(store: Store, *, tasks: int) -> Graph[Pair]:
    """Step 1 runs ``tasks`` tasks; in ``a`` the process pauses past its lease (nothing can
    renew it) and another process takes the run over; then ``a`` returns as if it woke up."""

    overtaken = anyio.Event()

    async def a(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        time.sleep(LEASE + 0.1)  # noqa: ASYNC251 - the whole process is paused
        await store.acquire(ctx.run_id, "other-process")
        overtaken.set()
        return {"a": 1}

    async def b(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        await overtaken.wait()  # b, too, finishes only after the takeover
        return {"b": 2}

    graph: Graph[Pair] = Graph(Pair, name="paused")
    graph.add_node("a", a)
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    if tasks == 2:
        graph.add_node("b", b)
        graph.add_edge(START, "b")
        graph.add_edge("b", END)
    return graph


@pytest.mark.parametrize("tasks", [1, 2], ids=["one-task", "two-tasks"])
async def test_stale_owner_that_wakes_up_is_fenced_off(store: Store, tasks: int) -> None:
    """An owner that lost its lease while paused stops with LeaseLostError."""
    app = paused_then_overtaken(store, tasks=tasks).compile(store=store)
    with anyio.fail_after(5):
        outcome = await app.run(Pair(), run_id="r1")
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, LeaseLostError)


@pytest.mark.parametrize("tasks", [1, 2], ids=["one-task", "two-tasks"])
async def test_stale_owner_that_wakes_up_writes_nothing(store: Store, tasks: int) -> None:
    """The fenced owner's step, pending writes and end are not stored; the new owner's run
    is as it found it."""
    app = paused_then_overtaken(store, tasks=tasks).compile(store=store)
    with anyio.fail_after(5), contextlib.suppress(Exception):
        await app.run(Pair(), run_id="r1")
    record = await store.get_run("r1")
    assert (record.status, record.owner, record.epoch) == ("running", "other-process", 2)
    assert [r.step for r in await store.checkpoints("r1")] == [0]
    assert await store.pending_writes("r1", 1) == []


async def test_stream_paused_past_its_lease_runs_no_step_twice(store: Store) -> None:
    """A reader pausing longer than the lease lets another process resume the run; the
    paused stream then ends failed with LeaseLostError and runs no step again."""
    ran: list[int] = []

    async def tick(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        ran.append(ctx.step)
        return {"count": state.count + 1}

    def again(state: Ticks) -> str:
        return "tick" if state.count < 3 else END

    graph: Graph[Ticks] = Graph(Ticks, name="counter")
    graph.add_node("tick", tick)
    graph.add_edge(START, "tick")
    graph.add_route("tick", again, targets=["tick", END])
    paused, resumed = anyio.Event(), anyio.Event()
    finished: list[RunFinished] = []

    async def read() -> None:
        async with contextlib.aclosing(
            graph.compile(store=store).stream(Ticks(), run_id="r1")
        ) as events:
            async for event in events:
                if isinstance(event, StepCommitted) and event.step == 1:
                    paused.set()
                    await resumed.wait()  # a slow reader: nothing renews the lease meanwhile
                if isinstance(event, RunFinished):
                    finished.append(event)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await paused.wait()
            await anyio.sleep(LEASE + 0.1)  # the paused owner's lease runs out
            outcome = await graph.compile(store=store).resume("r1")
            resumed.set()
    assert outcome.status is RunStatus.COMPLETED
    [event] = finished
    assert event.outcome is not None
    assert event.outcome.status is RunStatus.FAILED
    assert isinstance(event.outcome.error, LeaseLostError)
    assert ran == [1, 2, 3]


# -- store failures ----------------------------------------------------------------------


class WriteLock:
    """A write transaction on a database file held by another process (as a long-running
    writer, a backup or an editor holds it)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)

    def take(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


@pytest.fixture
def write_lock(tmp_path: Path) -> Iterator[WriteLock]:
    lock = WriteLock(tmp_path / "runs.db")
    yield lock
    lock.release()
    lock.conn.close()


def locking(write_lock: WriteLock) -> Graph[Ticks]:
    """One node that takes the file's write lock (another process's) before returning."""

    async def lock_then_return(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        write_lock.take()
        return {"count": 1}

    return chain(("lock", lock_then_return))


async def test_store_locked_during_a_step_fails_the_run_with_run_store_error(
    tmp_path: Path, write_lock: WriteLock
) -> None:
    """A database locked past its busy timeout fails the run with a RunStoreError naming the
    run and step; the StoreError is its cause."""
    # a long lease: no renewal is due, only the step's commit meets the lock
    async with SQLiteStore(
        tmp_path / "runs.db", busy_timeout=0.1, lease_seconds=60, poll_seconds=POLL
    ) as store:
        with anyio.fail_after(5):
            outcome = await locking(write_lock).compile(store=store).run(Ticks(), run_id="r1")
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, RunStoreError)
    assert (outcome.error.run_id, outcome.error.step) == ("r1", 1)
    assert str(outcome.error).startswith("run r1, step 1: ")
    assert isinstance(outcome.error.__cause__, StoreError)
    assert "locked" in str(outcome.error.__cause__)


async def test_store_failing_again_after_a_failed_step_keeps_the_steps_error(
    tmp_path: Path, write_lock: WriteLock
) -> None:
    """A lease renewal that meets the same lock once the step has failed does not replace
    the step's error."""
    # a short lease: a renewal is due by the time the step's commit has given up
    async with SQLiteStore(
        tmp_path / "runs.db", busy_timeout=0.1, lease_seconds=LEASE, poll_seconds=POLL
    ) as store:
        with anyio.fail_after(5):
            outcome = await locking(write_lock).compile(store=store).run(Ticks(), run_id="r1")
    assert isinstance(outcome.error, RunStoreError)
    assert outcome.error.step == 1


async def test_store_full_during_a_pending_write_fails_the_run_with_run_store_error(
    sqlite_store: SQLiteStore,
) -> None:
    """A disk that fills up while a multi-task step keeps its finished tasks fails the run
    with a RunStoreError naming the run and step, not an exception group."""
    conn = sqlite_store.conn

    async def fan(state: Ticks, ctx: NodeContext) -> list[Send]:
        return [Send("write", 0), Send("write", 1)]

    async def write(item: int, ctx: NodeContext) -> dict[str, Any] | None:
        if item == 0:  # the disk is nearly full now
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={pages + 3}")
            return {"blob": "x" * 200_000}
        return None

    graph: Graph[Ticks] = Graph(Ticks)
    graph.add_node("fan", fan, targets=["write"])
    graph.add_node("write", write)
    graph.add_edge(START, "fan")
    graph.add_edge("write", END)
    with anyio.fail_after(5):
        outcome = await graph.compile(store=sqlite_store).run(Ticks(), run_id="r1")
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, RunStoreError)
    assert (outcome.error.run_id, outcome.error.step) == ("r1", 2)
    assert isinstance(outcome.error.__cause__, StoreError)
    assert "full" in str(outcome.error.__cause__)


class Opaque:
    """A value that JSON cannot hold."""


class Loose(BaseModel):
    notes: Annotated[list[str], append] = []
    anything: Any = None


def writes_opaque(how: str) -> Graph[Loose]:
    """A graph whose node ``bad`` produces a value that is not JSON: in an update (alone in
    its step, or next to another task) or as a Send payload."""

    async def bad(state: Loose, ctx: NodeContext) -> Any:
        if how == "send":
            return [Send("take", Opaque()), Send("take", Opaque())]
        return {"anything": Opaque()}

    async def other(state: Loose, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": "other"}

    async def take(item: Opaque, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": "took"}

    graph: Graph[Loose] = Graph(Loose, name="opaque")
    graph.add_node("bad", bad, targets=["take"] if how == "send" else ())
    graph.add_edge(START, "bad")
    if how == "send":
        graph.add_node("take", take)
        graph.add_edge("take", END)
    else:
        graph.add_edge("bad", END)
    if how == "update-next-to-another":
        graph.add_node("other", other)
        graph.add_edge(START, "other")
        graph.add_edge("other", END)
    return graph


OPAQUE_WAYS = ["update-alone", "update-next-to-another", "send"]


@pytest.mark.parametrize("how", OPAQUE_WAYS)
async def test_value_a_store_cannot_keep_fails_the_run_naming_the_node(
    store: Store, how: str
) -> None:
    """An update or Send payload that is not JSON fails the run with InvalidUpdateError
    naming the node that produced it."""
    with anyio.fail_after(5):
        outcome = await writes_opaque(how).compile(store=store).run(Loose(), run_id="r1")
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert (outcome.error.step, outcome.error.node) == (1, "bad")
    assert "JSON" in str(outcome.error)
    assert (await store.get_run("r1")).status == "failed"


@pytest.mark.parametrize("how", OPAQUE_WAYS)
async def test_value_a_store_cannot_keep_is_fine_without_a_store(how: str) -> None:
    """Without a store nothing is serialized: the same graph completes."""
    outcome = await writes_opaque(how).compile().run(Loose())
    assert outcome.status is RunStatus.COMPLETED


async def test_run_cancelled_while_the_store_fails_raises_the_cancellation(
    tmp_path: Path, write_lock: WriteLock
) -> None:
    """A caller cancelling a run whose store is locked gets its cancellation back, not the
    StoreError of recording the abort."""
    entered = anyio.Event()

    async def lock_then_hang(state: Ticks, ctx: NodeContext) -> None:
        write_lock.take()
        entered.set()
        await anyio.sleep_forever()

    # a long lease: no renewal is due while the lock is held, only the abort's record
    async with SQLiteStore(
        tmp_path / "runs.db", busy_timeout=0.1, lease_seconds=60, poll_seconds=POLL
    ) as store:
        app = chain(("lock", lock_then_hang)).compile(store=store)
        with anyio.fail_after(5), anyio.CancelScope() as caller:
            async with anyio.create_task_group() as group:
                group.start_soon(functools.partial(app.run, Ticks(), run_id="r1"))
                await entered.wait()
                caller.cancel()
    assert caller.cancelled_caught
