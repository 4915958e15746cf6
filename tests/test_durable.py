"""Durable runs: checkpoints, resume, leases, abort and stop-all through the compiled app."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Budget,
    CompiledGraph,
    Graph,
    NodeContext,
    RunOutcome,
    RunStatus,
    add,
    append,
)
from orchestra.errors import (
    GraphChangedError,
    LeaseHeldError,
    LeaseLostError,
    OrchestraError,
    RunNotFoundError,
    RunStatusError,
    StopAllActiveError,
)
from orchestra.events import RunFinished, StepCommitted
from orchestra.executor import Execution
from orchestra.recorder import Recorder
from orchestra.runs import fork_run
from orchestra.store import MemoryStore, SQLiteStore, Store
from orchestra.store.base import new_owner_id

pytestmark = pytest.mark.anyio

LEASE = 0.3
POLL = 0.02
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


@pytest.fixture(params=["sqlite", "memory"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[Store]:
    """Yield each store implementation, with a short lease and poll interval."""
    if request.param == "sqlite":
        made: Store = SQLiteStore(tmp_path / "runs.db", lease_seconds=LEASE, poll_seconds=POLL)
    else:
        made = MemoryStore(lease_seconds=LEASE, poll_seconds=POLL)
    yield made
    await made.aclose()


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
