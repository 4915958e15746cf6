"""Resume: a stopped, failed or crashed run continues where it stopped; a changed graph, a held
lease or a run that no longer fits is refused."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio
import pytest
from durable import Ticks, chain, run_until, step_one, ticker, uninterrupted
from pydantic import BaseModel, Field

from orchestra import END, START, Budget, Graph, NodeContext, RunStatus
from orchestra.errors import (
    GraphChangedError,
    LeaseHeldError,
    OrchestraError,
    RouteError,
    RunNotFoundError,
    RunStatusError,
    StoreError,
)
from orchestra.store import Store

pytestmark = pytest.mark.anyio


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
