"""Routing between steps: routes (sync and async, several targets, undeclared or failing), Send
fan-out, joins and Command."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import NodeFn

from orchestra import END, START, Command, Graph, NodeContext, RunStatus, Send
from orchestra.errors import InvalidUpdateError, RouteError
from runtime.graphs import State, graph_of, join_graph, record

pytestmark = pytest.mark.anyio


# -- routes -------------------------------------------------------------------------------


async def test_run_route_loop_with_a_counter() -> None:
    """A route back to its own node loops until it chooses END."""

    async def count(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"count": state.count + 1}

    def again(state: State) -> str:
        return "count" if state.count < 5 else END

    graph = Graph(State)
    graph.add_node("count", count)
    graph.add_edge(START, "count")
    graph.add_route("count", again, targets=["count", END])
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.count == 5
    assert outcome.steps == 5


async def test_run_route_sees_the_merged_state() -> None:
    """A route function sees the state after its step's writes were merged."""
    seen: list[int] = []

    async def bump(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"value": 7}

    def decide(state: State) -> str:
        seen.append(state.value)
        return END

    graph = Graph(State)
    graph.add_node("bump", bump)
    graph.add_edge(START, "bump")
    graph.add_route("bump", decide, targets=[END])
    await graph.compile().run(State())
    assert seen == [7]


async def test_run_route_returning_several_targets_runs_them_in_one_step() -> None:
    """A route returning several targets runs them all in the next step."""
    steps: dict[str, int] = {}

    def track(name: str) -> NodeFn:
        async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
            steps[name] = ctx.step
            return {"log": name}

        return node

    graph = Graph(State)
    for name in ("plan", "left", "right"):
        graph.add_node(name, track(name))
    graph.add_edge(START, "plan")
    graph.add_route("plan", lambda s: ["right", "left"], targets=["left", "right"])
    graph.add_edge("left", END)
    graph.add_edge("right", END)
    outcome = await graph.compile().run(State())
    assert steps == {"plan": 1, "left": 2, "right": 2}
    assert outcome.state.log == ["plan", "left", "right"]
    assert outcome.steps == 2


async def test_run_async_route_function() -> None:
    """An async route function is awaited."""

    async def choose(state: State) -> str:
        await anyio.lowlevel.checkpoint()
        return "b"

    graph = Graph(State)
    graph.add_node("a", record())
    graph.add_node("b", record())
    graph.add_edge(START, "a")
    graph.add_route("a", choose, targets=["b", END])
    graph.add_edge("b", END)
    outcome = await graph.compile().run(State())
    assert outcome.state.log == ["a", "b"]


async def test_run_route_returning_an_undeclared_target_fails() -> None:
    """A route returning a target it did not declare fails the run with InvalidUpdateError."""
    graph = Graph(State)
    graph.add_node("a", record())
    graph.add_node("b", record())
    graph.add_edge(START, "a")
    graph.add_route("a", lambda s: "b", targets=[END])
    graph.add_edge(START, "b")
    graph.add_edge("b", END)
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert outcome.error.node == "a"


async def test_run_failing_route_fails_the_run_with_route_error() -> None:
    """A route function that raises fails the run with RouteError chaining the original."""

    def broken(state: State) -> str:
        raise KeyError("missing")

    graph = Graph(State)
    graph.add_node("a", record())
    graph.add_edge(START, "a")
    graph.add_route("a", broken, targets=[END])
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, RouteError)
    assert outcome.error.node == "a"
    assert outcome.error.step == 1
    assert isinstance(outcome.error.__cause__, KeyError)


async def test_run_failing_route_at_start_fails_the_run() -> None:
    """A route from START that raises fails the run before any node runs."""
    ran: list[str] = []

    async def node(state: State, ctx: NodeContext) -> None:
        ran.append("node")

    def broken(state: State) -> str:
        raise KeyError("missing")

    graph = Graph(State)
    graph.add_node("a", node)
    graph.add_route(START, broken, targets=["a"])
    graph.add_edge("a", END)
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, RouteError)
    assert outcome.steps == 0
    assert ran == []


# -- Send fan-out ---------------------------------------------------------------------------


async def test_run_send_runs_each_payload_as_its_own_task() -> None:
    """Each Send runs its node as a separate task with the payload as first argument."""
    calls: list[tuple[Any, int, int, list[str]]] = []

    async def work(payload: Any, ctx: NodeContext) -> dict[str, Any]:
        calls.append((payload, ctx.task, ctx.step, list(ctx.state.log)))
        return {"total": payload}

    graph = Graph(State)
    graph.add_node("split", record())
    graph.add_node("work", work)
    graph.add_edge(START, "split")
    graph.add_route("split", lambda s: [Send("work", n) for n in (1, 2, 3)], targets=["work"])
    graph.add_edge("work", END)
    outcome = await graph.compile().run(State())
    assert sorted(calls) == [(1, 0, 2, ["split"]), (2, 1, 2, ["split"]), (3, 2, 2, ["split"])]
    assert outcome.state.total == 6
    assert outcome.usage.tasks == 4


async def test_run_send_context_state_is_the_run_state() -> None:
    """A Send task's ctx.state is the run's state, not the payload."""
    seen: list[Any] = []

    async def work(payload: Any, ctx: NodeContext) -> None:
        seen.append((payload, type(ctx.state).__name__, ctx.state.note))

    graph = Graph(State)
    graph.add_node("work", work)
    graph.add_route(START, lambda s: [Send("work", {"id": 1})], targets=["work"])
    graph.add_edge("work", END)
    await graph.compile().run(State(note="run state"))
    assert seen == [({"id": 1}, "State", "run state")]


async def test_run_send_returned_by_a_node() -> None:
    """A node returning Send objects to declared targets fans out in the next step."""
    payloads: list[str] = []

    async def split(state: State, ctx: NodeContext) -> list[Send]:
        return [Send("work", "x"), Send("work", "y")]

    async def work(payload: str, ctx: NodeContext) -> dict[str, Any]:
        payloads.append(payload)
        return {"log": payload}

    graph = Graph(State)
    graph.add_node("split", split, targets=["work"])
    graph.add_node("work", work)
    graph.add_edge(START, "split")
    graph.add_edge("work", END)
    outcome = await graph.compile().run(State())
    assert sorted(payloads) == ["x", "y"]
    assert outcome.state.log == ["x", "y"]
    assert outcome.steps == 2


async def test_run_send_to_an_undeclared_target_fails() -> None:
    """A node returning a Send to a node it did not declare fails with InvalidUpdateError."""

    async def split(state: State, ctx: NodeContext) -> Send:
        return Send("work", 1)

    app = graph_of(
        {"split": split, "work": record()},
        [(START, "split"), ("split", "work"), ("work", END)],
    )
    outcome = await app.run(State())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert "'work'" in str(outcome.error)


# -- joins ----------------------------------------------------------------------------------


async def test_run_join_runs_its_target_once_after_both_sources() -> None:
    """A join target runs once, in the step after all its sources ran together."""
    outcome = await join_graph([]).run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.log == ["a", "b", "c"]
    assert outcome.steps == 2


async def test_run_join_does_not_run_when_sources_ran_in_different_steps() -> None:
    """A join target does not run when its sources ran in different steps."""
    outcome = await join_graph(["b0"]).run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert "c" not in outcome.state.log
    assert outcome.state.log == ["a", "b0", "b"]


async def test_run_node_triggered_by_two_edges_runs_once() -> None:
    """A node that several of the step's nodes lead to runs once in the next step."""
    app = graph_of(
        {"a": record(), "b": record(), "c": record()},
        [(START, "a"), (START, "b"), ("a", "c"), ("b", "c"), ("c", END)],
    )
    outcome = await app.run(State())
    assert outcome.state.log == ["a", "b", "c"]
    assert outcome.usage.tasks == 3


# -- Command --------------------------------------------------------------------------------


async def test_run_command_updates_and_goes_to_a_declared_target() -> None:
    """A Command applies its update and schedules its goto target next step."""

    async def decide(state: State, ctx: NodeContext) -> Command:
        return Command(update={"value": 3, "log": "decide"}, goto="act")

    graph = Graph(State)
    graph.add_node("decide", decide, targets=["act", END])
    graph.add_node("act", record())
    graph.add_edge(START, "decide")
    graph.add_edge("act", END)
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.value == 3
    assert outcome.state.log == ["decide", "act"]


async def test_run_command_goto_end_finishes() -> None:
    """A Command with goto END and no static edge ends the run."""

    async def done(state: State, ctx: NodeContext) -> Command:
        return Command(update={"value": 1}, goto=END)

    graph = Graph(State)
    graph.add_node("done", done, targets=[END])
    graph.add_edge(START, "done")
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.value == 1


async def test_run_command_goto_adds_to_static_edges() -> None:
    """A Command's goto runs alongside the node's static edges, not instead of them."""

    async def decide(state: State, ctx: NodeContext) -> Command:
        return Command(goto="extra")

    graph = Graph(State)
    graph.add_node("decide", decide, targets=["extra"])
    graph.add_node("always", record())
    graph.add_node("extra", record())
    graph.add_edge(START, "decide")
    graph.add_edge("decide", "always")
    graph.add_edge("always", END)
    graph.add_edge("extra", END)
    outcome = await graph.compile().run(State())
    assert outcome.state.log == ["always", "extra"]
    assert outcome.steps == 2


async def test_run_command_goto_an_undeclared_target_fails() -> None:
    """A Command going to a node not among its declared targets fails with InvalidUpdateError."""

    async def decide(state: State, ctx: NodeContext) -> Command:
        return Command(update={"value": 3}, goto="other")

    graph = Graph(State)
    graph.add_node("decide", decide, targets=["act"])
    graph.add_node("act", record())
    graph.add_node("other", record())
    graph.add_edge(START, "decide")
    graph.add_edge("act", "other")
    graph.add_edge("other", END)
    outcome = await graph.compile().run(State(), run_id="cmd")
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert outcome.error.node == "decide"
    assert outcome.error.run_id == "cmd"
    assert "'other'" in str(outcome.error)
    assert outcome.state.value == 0
