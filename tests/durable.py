"""The states, graphs and waits the durable-run tests share (tests/runtime/test_checkpoint.py,
test_recorder.py, test_drivers.py, tests/runs/test_resume.py, test_fork.py, tests/test_app.py)."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import anyio
from helpers import NodeFn
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    CompiledGraph,
    Graph,
    NodeContext,
    RunOutcome,
    RunStatus,
    add,
    append,
)
from orchestra.store import Store

BLOB = "x" * 10_000


class Ticks(BaseModel):
    count: int = 0
    notes: Annotated[list[str], append] = []
    total: Annotated[int, add] = 0
    blob: str = ""


class Pair(BaseModel):
    a: int = 0
    b: int = 0
    log: Annotated[list[str], append] = []


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
