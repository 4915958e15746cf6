"""Durable runs: checkpoints, resume, leases, abort and stop-all through the compiled app."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from helpers import LEASE, POLL
from pydantic import BaseModel, Field

from orchestra import (
    END,
    START,
    Budget,
    CompiledGraph,
    Graph,
    NodeContext,
    RetryPolicy,
    RunOutcome,
    RunStatus,
    Send,
    add,
    append,
)
from orchestra.errors import (
    GraphChangedError,
    InvalidUpdateError,
    LeaseHeldError,
    LeaseLostError,
    OrchestraError,
    RouteError,
    RunNotFoundError,
    RunStatusError,
    RunStoreError,
    StopAllActiveError,
    StoreError,
)
from orchestra.events import NodeFinished, RunFinished, StepCommitted
from orchestra.executor import Execution
from orchestra.recorder import Recorder
from orchestra.runs import fork_run
from orchestra.store import MemoryStore, SQLiteStore, Store
from orchestra.store.base import RunRecord, new_owner_id

pytestmark = pytest.mark.anyio

BLOB = "x" * 10_000

NodeFn = Callable[[Any, NodeContext], Awaitable[Any]]


class Ticks(BaseModel):
    count: int = 0
    notes: Annotated[list[str], append] = []
    total: Annotated[int, add] = 0
    blob: str = ""


class Pair(BaseModel):
    a: int = 0
    b: int = 0
    log: Annotated[list[str], append] = []


@pytest.fixture
async def sqlite_store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[SQLiteStore]:
    made = SQLiteStore(tmp_path / "runs.db", lease_seconds=LEASE, poll_seconds=POLL)
    yield made
    await made.aclose()


# -- graphs ------------------------------------------------------------------------------


def ticker(
    limit: int = 12,
    *,
    seen: dict[int, Ticks] | None = None,
    broken_at: int | None = None,
    flag: dict[str, bool] | None = None,
    extra_target: bool = False,
) -> Graph[Ticks]:
    """One node looping ``limit`` times: counts, appends a note, adds to a total.

    With ``broken_at``, the node raises at that step while ``flag["broken"]`` is true.
    ``extra_target`` changes the graph's structure (not its behaviour).
    """

    async def tick(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        if seen is not None:
            seen[ctx.step] = state
        if broken_at == ctx.step and flag is not None and flag["broken"]:
            raise RuntimeError("tick is broken")
        return {"count": state.count + 1, "notes": f"note {ctx.step}", "total": 2}

    def again(state: Ticks) -> str:
        return "tick" if state.count < limit else END

    graph: Graph[Ticks] = Graph(Ticks, name="ticker")
    graph.add_node("tick", tick)
    graph.add_edge(START, "tick")
    targets = ["tick", END]
    if extra_target:

        async def audit(state: Ticks, ctx: NodeContext) -> None:
            return None

        graph.add_node("audit", audit)
        graph.add_edge("audit", END)
        targets.append("audit")
    graph.add_route("tick", again, targets=targets)
    return graph


def ping_pong(rounds: int) -> Graph[Ticks]:
    """A two-node loop of ``2 * rounds`` steps that only ever changes ``count``."""

    async def ping(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        return {"count": state.count + 1}

    async def pong(state: Ticks, ctx: NodeContext) -> None:
        return None

    def again(state: Ticks) -> str:
        return "ping" if state.count < rounds else END

    graph: Graph[Ticks] = Graph(Ticks, name="ping_pong")
    graph.add_node("ping", ping)
    graph.add_node("pong", pong)
    graph.add_edge(START, "ping")
    graph.add_edge("ping", "pong")
    graph.add_route("pong", again, targets=["ping", END])
    return graph


def chain(*nodes: tuple[str, NodeFn]) -> Graph[Ticks]:
    """Nodes run one after another, one per step."""
    graph: Graph[Ticks] = Graph(Ticks, name="chain")
    previous = START
    for name, fn in nodes:
        graph.add_node(name, fn)
        graph.add_edge(previous, name)
        previous = name
    graph.add_edge(previous, END)
    return graph


def fan_out(b: NodeFn, calls: collections.Counter[str]) -> Graph[Pair]:
    """Step 1 runs ``a`` and ``b`` concurrently; step 2 runs ``c`` once."""

    async def a(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        calls["a"] += 1
        return {"a": 1, "log": "a"}

    async def c(state: Pair, ctx: NodeContext) -> dict[str, Any]:
        calls["c"] += 1
        return {"log": "c"}

    graph: Graph[Pair] = Graph(Pair, name="fan_out")
    graph.add_node("a", a)
    graph.add_node("b", b)
    graph.add_node("c", c)
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge("a", "c")
    graph.add_edge("b", "c")
    graph.add_edge("c", END)
    return graph


APP = ticker(3).compile()
"""A module-level app: its app_ref is found as ``module:APP``."""


async def step_one(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
    return {"count": 1, "notes": "one"}


def hanging(entered: anyio.Event) -> NodeFn:
    """A node that signals it started, then never returns."""

    async def hang(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return hang


async def run_until(
    app: CompiledGraph[Any],
    input: Any,
    run_id: str,
    started: anyio.Event,
    then: Callable[[], Awaitable[Any]],
) -> RunOutcome[Any]:
    """Run ``app`` in the background; once ``started`` is set, await ``then()``; return the
    run's outcome (guarded: a run that does not stop fails the test instead of hanging)."""
    outcomes: list[RunOutcome[Any]] = []

    async def run() -> None:
        outcomes.append(await app.run(input, run_id=run_id))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await started.wait()
            await then()
    return outcomes[0]


async def until_pending(store: Store, run_id: str, step: int) -> None:
    """Wait until some task of ``step`` is kept as a pending write."""
    # the condition lives in the store, written by the executor: there is no event to await
    while not await store.pending_writes(run_id, step):  # noqa: ASYNC110
        await anyio.sleep(0.005)


async def uninterrupted(graph: Graph[Any], input: Any) -> Any:
    """The final state of a run with no store, no stop and no failure."""
    outcome = await graph.compile().run(input)
    assert outcome.status is RunStatus.COMPLETED
    return outcome.state


# -- the run row and checkpoints ---------------------------------------------------------


async def test_run_writes_the_run_row(store: Store) -> None:
    """A finished run has a row naming its graph, structure and status."""
    app = ticker(3).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    record = await store.get_run("r1")
    assert (record.graph, record.structure_hash) == ("ticker", app.structure_hash)
    assert (record.status, record.step, record.owner) == ("completed", outcome.steps, None)


async def test_run_writes_its_input_as_checkpoint_0(store: Store) -> None:
    """Checkpoint 0 is the run's input state."""
    app = ticker(3).compile(store=store)
    await app.run(Ticks(notes=["given"]), run_id="r1")
    rows = await store.checkpoints("r1")
    assert [r.step for r in rows] == [0, 1, 2, 3]
    assert await app.load_state("r1", 0) == Ticks(notes=["given"])


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


async def test_load_state_returns_the_state_at_every_step(store: Store) -> None:
    """Every checkpoint loads as the full state the next step saw."""
    seen: dict[int, Ticks] = {}
    app = ticker(12, seen=seen).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    assert sorted(seen) == list(range(1, 13))
    for step, state in seen.items():
        assert await app.load_state("r1", step - 1) == state
    assert await app.load_state("r1", 12) == outcome.state


async def test_load_state_defaults_to_the_last_checkpoint(store: Store) -> None:
    """Without a step, load_state gives the run's last state."""
    app = ticker(5).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    assert await app.load_state("r1") == outcome.state


async def test_checkpoints_store_deltas_not_whole_states(store: Store) -> None:
    """With an unchanged 10 KB field, a step stores well under 1 KB."""
    app = ping_pong(100).compile(store=store)
    outcome = await app.run(Ticks(blob=BLOB), run_id="r1")
    assert outcome.steps == 200
    rows = (await store.checkpoints("r1"))[1:]
    stored = sum(r.size + len(r.tasks) + len(r.events or "") for r in rows)
    assert stored / outcome.steps < 1024
    assert await app.load_state("r1") == outcome.state


async def test_sqlite_file_grows_with_what_changed_not_with_the_state(
    sqlite_store: SQLiteStore,
) -> None:
    """200 steps over a state with an unchanged 10 KB field grow the file < 1 KB a step."""
    store = sqlite_store
    store.schema_version()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = store.file_size()
    outcome = await ping_pong(100).compile(store=store).run(Ticks(blob=BLOB))
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert (store.file_size() - before) / outcome.steps < 1024


async def test_append_fields_store_only_the_new_items(store: Store) -> None:
    """A step's checkpoint of an append field holds the items it added, not the list."""

    async def write(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": f"note {ctx.step}"}

    def again(state: Ticks) -> str:
        return "write" if len(state.notes) < 20 else END

    graph: Graph[Ticks] = Graph(Ticks)
    graph.add_node("write", write)
    graph.add_edge(START, "write")
    graph.add_route("write", again, targets=["write", END])
    app = graph.compile(store=store)
    await app.run(Ticks(blob="y" * 2000), run_id="r1")
    deltas = [r for r in await store.checkpoints("r1") if r.delta is not None]
    assert len(deltas) == 20
    for row in deltas:
        assert json.loads(row.delta or "") == {"append": {"notes": [f"note {row.step}"]}}


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


# -- resume ------------------------------------------------------------------------------


async def test_resume_continues_a_run_stopped_by_the_step_budget(store: Store) -> None:
    """A budget-stopped run resumes under a bigger budget and completes."""
    stopped = await ticker(8).compile(store=store, budget=Budget(steps=3)).run(Ticks(), run_id="r1")
    assert (stopped.status, stopped.steps) == (RunStatus.BUDGET_EXCEEDED, 3)
    bigger = ticker(8).compile(store=store, budget=Budget(steps=100))
    outcome = await bigger.resume("r1")
    assert (outcome.status, outcome.steps) == (RunStatus.COMPLETED, 8)
    assert outcome.state == await uninterrupted(ticker(8), Ticks())
    assert (await store.get_run("r1")).status == "completed"


async def test_resume_continues_a_run_whose_node_failed(store: Store) -> None:
    """After a node failure is fixed, resume completes the run from its last checkpoint."""
    flag = {"broken": True}
    seen: dict[int, Ticks] = {}
    app = ticker(6, seen=seen, broken_at=4, flag=flag).compile(store=store)
    failed = await app.run(Ticks(), run_id="r1")
    assert (failed.status, failed.steps) == (RunStatus.FAILED, 3)
    assert (await store.get_run("r1")).status == "failed"
    flag["broken"] = False
    outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == await uninterrupted(ticker(6), Ticks())


async def test_resume_records_a_resumed_run_started_event(store: Store) -> None:
    """A resumed run's events show a second run_started, marked resumed."""
    await ticker(5).compile(store=store, budget=Budget(steps=2)).run(Ticks(), run_id="r1")
    await ticker(5).compile(store=store).resume("r1")
    started = [json.loads(e.data) for e in await store.events("r1") if e.kind == "run_started"]
    assert [s["resumed"] for s in started] == [False, True]
    assert started[1]["step"] == 2


@pytest.mark.parametrize("every", [1, 2, 5])
async def test_resumed_runs_reach_the_same_final_state(store: Store, every: int) -> None:
    """Stopping every few steps and resuming ends where an uninterrupted run ends."""
    outcome = (
        await ticker(11).compile(store=store, budget=Budget(steps=every)).run(Ticks(), run_id="r1")
    )
    limit = every
    while outcome.status is RunStatus.BUDGET_EXCEEDED:
        limit += every
        outcome = await ticker(11).compile(store=store, budget=Budget(steps=limit)).resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == await uninterrupted(ticker(11), Ticks())
    assert [r.step for r in await store.checkpoints("r1")] == list(range(12))


async def test_resume_of_a_completed_run_raises_run_status_error(store: Store) -> None:
    """A completed run cannot be resumed."""
    app = ticker(3).compile(store=store)
    await app.run(Ticks(), run_id="r1")
    with pytest.raises(RunStatusError, match="r1") as info:
        await app.resume("r1")
    assert info.value.status == "completed"


async def test_resume_of_an_unknown_run_raises_run_not_found(store: Store) -> None:
    """Resuming a run that does not exist names it."""
    with pytest.raises(RunNotFoundError, match="nope"):
        await ticker(3).compile(store=store).resume("nope")


async def test_resume_with_a_changed_graph_raises_graph_changed(store: Store) -> None:
    """A graph whose structure differs from the stored run's is refused."""
    app = ticker(6).compile(store=store, budget=Budget(steps=2))
    await app.run(Ticks(), run_id="r1")
    changed = ticker(6, extra_target=True).compile(store=store)
    with pytest.raises(GraphChangedError) as info:
        await changed.resume("r1")
    assert (info.value.stored, info.value.current) == (
        app.structure_hash,
        changed.structure_hash,
    )
    record = await store.get_run("r1")
    assert (record.status, record.owner) == ("budget_exceeded", None)


async def test_resume_with_a_changed_graph_is_allowed_when_asked(store: Store) -> None:
    """allow_graph_change=True resumes with the changed graph."""
    await ticker(6).compile(store=store, budget=Budget(steps=2)).run(Ticks(), run_id="r1")
    changed = ticker(6, extra_target=True).compile(store=store)
    outcome = await changed.resume("r1", allow_graph_change=True)
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == await uninterrupted(ticker(6), Ticks())


async def test_resume_while_another_owner_runs_it_raises_lease_held(store: Store) -> None:
    """A second resumer is refused with an error naming the run's owner."""
    entered, gate = anyio.Event(), anyio.Event()
    errors: list[LeaseHeldError] = []

    async def wait(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        entered.set()
        await gate.wait()
        return {"count": 1}

    app = chain(("wait", wait)).compile(store=store)

    async def resume_then_release() -> None:
        with pytest.raises(LeaseHeldError) as info:
            await chain(("wait", wait)).compile(store=store).resume("r1")
        errors.append(info.value)
        owner = (await store.get_run("r1")).owner
        assert owner is not None
        assert info.value.owner == owner
        assert owner in str(info.value)
        gate.set()

    outcome = await run_until(app, Ticks(), "r1", entered, resume_then_release)
    assert len(errors) == 1
    assert outcome.status is RunStatus.COMPLETED


async def test_fork_resumes_from_the_forked_step(store: Store) -> None:
    """A run forked from an earlier checkpoint resumes to the same end."""
    app = ticker(6).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    await fork_run(store, "r1", 2, "f1")
    forked = await app.resume("f1")
    assert forked.status is RunStatus.COMPLETED
    assert forked.state == outcome.state
    assert [r.step for r in await store.checkpoints("f1")] == [2, 3, 4, 5, 6]


async def test_resume_of_a_run_whose_start_route_failed_runs_its_first_node(
    store: Store,
) -> None:
    """A run that failed routing from START resumes from its input and runs the first node."""
    routing = {"broken": True}

    def first(state: Ticks) -> str:
        if routing["broken"]:
            raise RuntimeError("routing service down")
        return "one"

    graph: Graph[Ticks] = Graph(Ticks)
    graph.add_node("one", step_one)
    graph.add_route(START, first, targets=["one"])
    graph.add_edge("one", END)
    app = graph.compile(store=store)
    failed = await app.run(Ticks(), run_id="r1")
    assert (failed.status, failed.steps) == (RunStatus.FAILED, 0)
    assert isinstance(failed.error, RouteError)
    routing["broken"] = False
    outcome = await app.resume("r1")
    assert (outcome.status, outcome.steps) == (RunStatus.COMPLETED, 1)
    assert outcome.state == Ticks(count=1, notes=["one"])


def stuck_after_one(entered: list[int], flag: dict[str, bool]) -> Graph[Ticks]:
    """Step 1 runs ``one``; step 2 runs ``stuck``, which hangs while ``flag["stuck"]``."""

    async def stuck(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        entered.append(ctx.step)
        if flag["stuck"]:
            await anyio.sleep_forever()
        return {"notes": "unstuck"}

    return chain(("one", step_one), ("stuck", stuck))


async def test_resume_under_the_same_wall_budget_stops_at_once(store: Store) -> None:
    """The wall time spent before a stop counts on resume: the same budget is still spent,
    so no node runs again."""
    entered: list[int] = []
    graph = stuck_after_one(entered, {"stuck": True})
    app = graph.compile(store=store, budget=Budget(wall_seconds=0.2))
    with anyio.fail_after(5):
        stopped = await app.run(Ticks(), run_id="r1")
        assert (stopped.status, stopped.steps) == (RunStatus.BUDGET_EXCEEDED, 1)
        again = await app.resume("r1")
    assert (again.status, again.steps) == (RunStatus.BUDGET_EXCEEDED, 1)
    assert again.usage.wall_seconds >= 0.2
    assert entered == [2]


async def test_resume_under_a_bigger_wall_budget_continues(store: Store) -> None:
    """A run stopped by its wall budget continues under a bigger one."""
    entered: list[int] = []
    flag = {"stuck": True}
    graph = stuck_after_one(entered, flag)
    with anyio.fail_after(5):
        await graph.compile(store=store, budget=Budget(wall_seconds=0.2)).run(Ticks(), run_id="r1")
        flag["stuck"] = False
        outcome = await graph.compile(store=store, budget=Budget(wall_seconds=60)).resume("r1")
    assert (outcome.status, outcome.steps) == (RunStatus.COMPLETED, 2)
    assert outcome.state == Ticks(count=1, notes=["one", "unstuck"])
    assert entered == [2, 2]


class Aliased(BaseModel):
    user_name: str = Field("nobody", alias="userName")
    count: int = 0


def aliased(limit: int) -> Graph[Aliased]:
    """One node counting to ``limit``; the aliased field is only ever read."""

    async def tick(state: Aliased, ctx: NodeContext) -> dict[str, Any]:
        return {"count": state.count + 1}

    def again(state: Aliased) -> str:
        return "tick" if state.count < limit else END

    graph: Graph[Aliased] = Graph(Aliased, name="aliased")
    graph.add_node("tick", tick)
    graph.add_edge(START, "tick")
    graph.add_route("tick", again, targets=["tick", END])
    return graph


@pytest.mark.parametrize(
    "input",
    [Aliased(userName="ann"), {"userName": "ann"}, {"user_name": "ann"}],
    ids=["instance", "dict-by-alias", "dict-by-name"],
)
async def test_aliased_fields_keep_their_input_value(store: Store, input: Any) -> None:
    """An aliased field keeps the value given by an instance, or a dict by alias or name."""
    app = aliased(2).compile(store=store)
    outcome = await app.run(input, run_id="r1")
    assert outcome.state.user_name == "ann"
    assert (await app.load_state("r1", 0)).user_name == "ann"


async def test_aliased_fields_keep_their_value_across_resume(store: Store) -> None:
    """A resumed run reloads an aliased field with its stored value."""
    await (
        aliased(3)
        .compile(store=store, budget=Budget(steps=1))
        .run({"userName": "ann"}, run_id="r1")
    )
    outcome = await aliased(3).compile(store=store).resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == Aliased(userName="ann", count=3)


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


# -- a run that no longer fits -----------------------------------------------------------


class Reshaped(BaseModel):
    count: int = 0
    required_now: str


def reshaped() -> Graph[Reshaped]:
    """A graph named like ``ticker`` whose state the ticker's checkpoints do not fit."""

    async def tick(state: Reshaped, ctx: NodeContext) -> None:
        return None

    graph: Graph[Reshaped] = Graph(Reshaped, name="ticker")
    graph.add_node("tick", tick)
    graph.add_edge(START, "tick")
    graph.add_edge("tick", END)
    return graph


async def test_resume_of_a_run_that_no_longer_fits_marks_it_failed(store: Store) -> None:
    """A run whose checkpoint cannot be loaded is left failed and released, not owned."""
    await ticker(6).compile(store=store, budget=Budget(steps=2)).run(Ticks(), run_id="r1")
    with contextlib.suppress(Exception):
        await reshaped().compile(store=store).resume("r1", allow_graph_change=True)
    record = await store.get_run("r1")
    assert (record.status, record.owner) == ("failed", None)
    assert record.error is not None
    assert "could not load" in record.error


async def test_resume_of_a_run_that_no_longer_fits_raises_an_orchestra_error(
    store: Store,
) -> None:
    """The load failure reaches the caller as an OrchestraError naming the run."""
    await ticker(6).compile(store=store, budget=Budget(steps=2)).run(Ticks(), run_id="r1")
    with pytest.raises(OrchestraError, match="r1"):
        await reshaped().compile(store=store).resume("r1", allow_graph_change=True)


async def nothing(state: Ticks, ctx: NodeContext) -> None:
    return None


async def test_resume_of_a_run_whose_next_node_is_gone_raises_and_marks_it_failed(
    store: Store,
) -> None:
    """A changed graph without the node the run is due to run refuses the resume naming that
    node; the run is left failed, its lease released."""
    await (
        chain(("one", step_one), ("two", nothing))
        .compile(store=store, budget=Budget(steps=1))
        .run(Ticks(), run_id="r1")
    )
    renamed = chain(("one", step_one), ("three", nothing)).compile(store=store)
    with pytest.raises(StoreError, match="'two'"):
        await renamed.resume("r1", allow_graph_change=True)
    record = await store.get_run("r1")
    assert (record.status, record.owner, record.lease_expires_at) == ("failed", None, None)
    assert record.error is not None
    assert "'two'" in record.error


# -- abort and stop-all ------------------------------------------------------------------


async def test_abort_stops_a_hanging_run_with_the_reason(store: Store) -> None:
    """abort cancels the node in flight; the run ends aborted with the reason."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)

    async def abort() -> None:
        record = await app.abort("r1", "operator says stop")
        assert (record.status, record.abort_requested) == ("running", "operator says stop")

    outcome = await run_until(app, Ticks(), "r1", entered, abort)
    assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "operator says stop")
    record = await store.get_run("r1")
    assert (record.status, record.reason, record.owner) == ("aborted", "operator says stop", None)


async def test_abort_stops_a_streamed_run(store: Store) -> None:
    """abort also stops a run driven through app.stream."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    finished: list[RunFinished] = []

    async def consume() -> None:
        async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
            async for event in events:
                if isinstance(event, RunFinished):
                    finished.append(event)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await entered.wait()
            await app.abort("r1", "stop the stream")
    [event] = finished
    assert (event.status, event.reason) == ("aborted", "stop the stream")
    assert (await store.get_run("r1")).status == "aborted"


async def test_closing_a_stream_early_records_the_run_aborted(store: Store) -> None:
    """A reader that stops reading leaves a run at rest, resumable at once."""
    app = ticker(6).compile(store=store)
    async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
        async for event in events:
            if isinstance(event, StepCommitted) and event.step == 2:
                break
    record = await store.get_run("r1")
    assert (record.status, record.owner, record.step) == ("aborted", None, 2)
    outcome = await app.resume("r1")
    assert outcome.state == await uninterrupted(ticker(6), Ticks())


async def test_closing_a_stream_mid_run_says_the_reader_closed_it(store: Store) -> None:
    """A run whose stream was closed while it ran is stored aborted with that reason."""
    app = ticker(6).compile(store=store)
    async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
        async for event in events:
            if isinstance(event, StepCommitted) and event.step == 2:
                break
    record = await store.get_run("r1")
    assert (record.status, record.reason) == (
        "aborted",
        "the event stream was closed by its reader",
    )


async def test_closing_a_stream_after_a_failed_step_records_the_failure(store: Store) -> None:
    """A reader that stops at a failure leaves the run stored failed with its error, not
    aborted."""

    async def broken(state: Ticks, ctx: NodeContext) -> None:
        raise RuntimeError("broken for good")

    app = chain(("one", step_one), ("broken", broken)).compile(store=store)
    async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
        async for event in events:
            if isinstance(event, NodeFinished) and event.error is not None:
                break
    record = await store.get_run("r1")
    assert (record.status, record.reason, record.owner) == ("failed", None, None)
    assert record.error is not None
    assert "broken for good" in record.error


async def test_abort_keeps_the_last_checkpoint(store: Store) -> None:
    """An aborted run's state is the state before the step that was cancelled."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    outcome = await run_until(app, Ticks(), "r1", entered, lambda: app.abort("r1", "stop"))
    assert [r.step for r in await store.checkpoints("r1")] == [0, 1]
    assert await app.load_state("r1") == Ticks(count=1, notes=["one"])
    assert outcome.state == Ticks(count=1, notes=["one"])


async def test_aborted_run_can_be_resumed(store: Store) -> None:
    """An aborted run resumes from its last checkpoint."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    await run_until(app, Ticks(), "r1", entered, lambda: app.abort("r1", "stop"))

    async def fixed(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": "fixed"}

    outcome = await chain(("one", step_one), ("hang", fixed)).compile(store=store).resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == Ticks(count=1, notes=["one", "fixed"])


async def test_abort_from_another_store_object_stops_the_run(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    """An operator's store on the same file (another process) aborts the run."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=sqlite_store)
    operator = SQLiteStore(tmp_path / "runs.db")
    try:
        outcome = await run_until(
            app, Ticks(), "r1", entered, lambda: operator.request_abort("r1", "from the CLI")
        )
        assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "from the CLI")
        assert (await operator.get_run("r1")).status == "aborted"
    finally:
        await operator.aclose()


def spinner(limit: int) -> Graph[Ticks]:
    """One node looping ``limit`` times that never awaits: while a step runs, the event loop
    gets no turn (CPU-bound work, a blocking library call)."""

    async def spin(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        sum(range(20_000))
        return {"count": state.count + 1}

    def again(state: Ticks) -> str:
        return "spin" if state.count < limit else END

    graph: Graph[Ticks] = Graph(Ticks, name="spinner")
    graph.add_node("spin", spin)
    graph.add_edge(START, "spin")
    graph.add_route("spin", again, targets=["spin", END])
    return graph


@contextlib.contextmanager
def another_process(path: Path, work: Callable[[SQLiteStore], Awaitable[None]]) -> Iterator[None]:
    """Run ``work`` with its own store on ``path`` in a thread with its own event loop, as
    another process would; on exit, wait for it and raise what it raised."""
    errors: list[Exception] = []

    async def main() -> None:
        with anyio.fail_after(10):
            async with SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL) as store:
                await work(store)

    def thread_main() -> None:
        try:
            anyio.run(main)
        except Exception as exc:  # handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if errors:
        raise errors[0]


async def until_step(store: Store, run_id: str, step: int) -> RunRecord:
    """Wait until the run exists and has committed ``step`` (or stopped); return its row."""
    # the run is driven elsewhere: its row is the only thing to watch
    while True:
        with contextlib.suppress(RunNotFoundError):
            record = await store.get_run(run_id)
            if record.step >= step or record.status != "running":
                return record
        await anyio.sleep(0.005)


async def test_abort_stops_a_run_whose_nodes_never_yield(tmp_path: Path) -> None:
    """A run that never gives the event loop a turn still notices an abort between steps."""
    path, limit = tmp_path / "runs.db", 5_000

    async def abort(operator: SQLiteStore) -> None:
        await until_step(operator, "r1", 3)
        await operator.request_abort("r1", "operator says stop")

    async with SQLiteStore(
        path, durability="normal", lease_seconds=LEASE, poll_seconds=POLL
    ) as store:
        app = spinner(limit).compile(store=store, budget=Budget(steps=None))
        with another_process(path, abort):
            outcome = await app.run(Ticks(), run_id="r1")
        assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "operator says stop")
        assert outcome.steps < limit
        assert (await store.get_run("r1")).status == "aborted"


async def test_lease_of_a_run_whose_nodes_never_yield_is_renewed(tmp_path: Path) -> None:
    """A run that never gives the event loop a turn still renews its lease between steps."""
    path = tmp_path / "runs.db"
    seen: list[tuple[RunRecord, float]] = []

    async def observe(observer: SQLiteStore) -> None:
        await until_step(observer, "r1", 1)
        await anyio.sleep(3 * LEASE)  # only renewals keep the lease live this long
        seen.append((await observer.get_run("r1"), time.time()))
        await observer.request_abort("r1", "seen enough")

    async with SQLiteStore(
        path, durability="normal", lease_seconds=LEASE, poll_seconds=POLL
    ) as store:
        app = spinner(20_000).compile(store=store, budget=Budget(steps=None))
        with another_process(path, observe):
            outcome = await app.run(Ticks(), run_id="r1")
    [(record, now)] = seen
    assert record.status == "running"
    assert record.lease_live(now)
    assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "seen enough")


async def test_run_cancelled_by_its_caller_is_recorded_aborted(store: Store) -> None:
    """A caller that cancels app.run leaves a run at rest, resumable at once."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    with anyio.fail_after(5), anyio.CancelScope() as caller:
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(app.run, Ticks(), run_id="r1"))
            await entered.wait()
            caller.cancel()
    record = await store.get_run("r1")
    assert (record.status, record.owner, record.step) == ("aborted", None, 1)
    assert await app.load_state("r1") == Ticks(count=1, notes=["one"])


async def test_abort_of_a_run_at_rest_marks_it_aborted(store: Store) -> None:
    """A run with no owner is aborted at once, its checkpoints kept."""
    app = ticker(6).compile(store=store, budget=Budget(steps=2))
    stopped = await app.run(Ticks(), run_id="r1")
    record = await app.abort("r1", "not needed any more")
    assert (record.status, record.reason) == ("aborted", "not needed any more")
    assert (await store.get_run("r1")).status == "aborted"
    assert await app.load_state("r1") == stopped.state


async def test_abort_of_a_completed_run_raises_run_status_error(store: Store) -> None:
    """A completed run cannot be aborted."""
    app = ticker(2).compile(store=store)
    await app.run(Ticks(), run_id="r1")
    with pytest.raises(RunStatusError):
        await app.abort("r1", "too late")


async def test_stop_all_aborts_a_running_run(store: Store) -> None:
    """stop-all stops a run in flight with its reason."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    affected: list[list[str]] = []

    async def stop_all() -> None:
        affected.append(await store.stop_all("maintenance"))

    outcome = await run_until(app, Ticks(), "r1", entered, stop_all)
    assert affected == [["r1"]]
    assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "maintenance")
    assert (await store.get_run("r1")).status == "aborted"


async def test_stop_all_refuses_new_runs_until_released(store: Store) -> None:
    """Under stop-all no run starts or resumes; after release they do."""
    app = ticker(3).compile(store=store, budget=Budget(steps=1))
    await app.run(Ticks(), run_id="r1")
    await store.stop_all("maintenance")
    with pytest.raises(StopAllActiveError, match="maintenance"):
        await app.run(Ticks(), run_id="r2")
    with pytest.raises(StopAllActiveError):
        await ticker(3).compile(store=store).resume("r1")
    with pytest.raises(RunNotFoundError):
        await store.get_run("r2")
    await store.release_stop_all()
    assert (await app.run(Ticks(), run_id="r2")).status is RunStatus.BUDGET_EXCEEDED
    assert (await ticker(3).compile(store=store).resume("r1")).status is RunStatus.COMPLETED


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
