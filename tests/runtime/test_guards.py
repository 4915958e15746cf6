"""Breakpoints (interrupt_before / interrupt_after): where the run stops, what a plain
resume does, the answers that go on or end the run, a node in a loop, and compile checks."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Abort,
    Approve,
    Continue,
    Graph,
    GraphValidationError,
    NodeContext,
    Reject,
    RunStatus,
    append,
)
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    visits: Annotated[list[str], append] = []
    rounds: int = 0


def chain(runs: list[str], **options: Any) -> Any:
    """Compile START -> a -> b -> c -> END; each node records its run in ``runs`` and in
    the state's ``visits``."""

    def node(name: str) -> Any:
        async def fn(state: S, ctx: NodeContext) -> dict[str, Any]:
            runs.append(name)
            return {"visits": name}

        return fn

    graph: Graph[S] = Graph(S)
    for name in ("a", "b", "c"):
        graph.add_node(name, node(name))
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_edge("c", END)
    return graph.compile(**options)


async def test_breakpoints_before_stops_before_the_node_runs(store: Store) -> None:
    """interrupt_before stops the run with a before request; the node has not run."""
    runs: list[str] = []
    app = chain(runs, store=store, interrupt_before=["b"])
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    assert (request.kind, request.node) == ("before", "b")
    assert runs == ["a"]
    assert outcome.state.visits == ["a"]
    assert [r.request_id for r in await store.requests("r1")] == [request.id]


async def test_breakpoints_after_stops_after_the_node_ran(store: Store) -> None:
    """interrupt_after stops the run once the node ran; its update is in the state."""
    runs: list[str] = []
    app = chain(runs, store=store, interrupt_after=["b"])
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    assert (request.kind, request.node) == ("after", "b")
    assert runs == ["a", "b"]
    assert outcome.state.visits == ["a", "b"]
    assert (await app.load_state("r1")).visits == ["a", "b"]


async def test_breakpoints_before_the_first_node_stops_before_anything_runs(
    store: Store,
) -> None:
    """A breakpoint before the first node stops the run before any node runs; Continue()
    runs it."""
    runs: list[str] = []
    app = chain(runs, store=store, interrupt_before=["a"])
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        assert first.status is RunStatus.INTERRUPTED
        assert runs == []
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Continue()})
    assert second.status is RunStatus.COMPLETED
    assert runs == ["a", "b", "c"]


@pytest.mark.parametrize("where", ["before", "after"])
async def test_breakpoints_plain_resume_asks_again(store: Store, where: str) -> None:
    """A resume without an answer stops at the same breakpoint again and runs nothing."""
    runs: list[str] = []
    app = chain(runs, store=store, **{f"interrupt_{where}": ["b"]})
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        ran = list(runs)
        second = await app.resume("r1")
    assert second.status is RunStatus.INTERRUPTED
    assert [r.id for r in second.pending] == [r.id for r in first.pending]
    assert runs == ran
    assert len(await store.requests("r1", statuses=())) == 1


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("answer", [Continue(), Approve()], ids=["continue", "approve"])
async def test_breakpoints_go_on_answer_finishes_the_run(
    store: Store, where: str, answer: Any
) -> None:
    """Continue() (or Approve()) lets the run go on past the breakpoint, each node once."""
    runs: list[str] = []
    app = chain(runs, store=store, **{f"interrupt_{where}": ["b"]})
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: answer})
    assert second.status is RunStatus.COMPLETED
    assert runs == ["a", "b", "c"]
    assert second.state.visits == ["a", "b", "c"]
    assert await store.requests("r1") == []


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize(
    "answer", [Abort("not today"), Reject("not today")], ids=["abort", "reject"]
)
async def test_breakpoints_stop_answer_aborts_the_run(
    store: Store, where: str, answer: Any
) -> None:
    """Abort(reason) (or Reject(reason)) ends the run aborted with the reason; nothing
    more runs."""
    runs: list[str] = []
    app = chain(runs, store=store, **{f"interrupt_{where}": ["b"]})
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        ran = list(runs)
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: answer})
    assert second.status is RunStatus.ABORTED
    assert second.stop_reason == "not today"
    assert runs == ran
    assert (await store.get_run("r1")).status == "aborted"


@pytest.mark.parametrize("where", ["before", "after"])
async def test_breakpoints_resume_after_an_abort_asks_again(store: Store, where: str) -> None:
    """A run aborted at a breakpoint stops at it again when resumed: the aborted run lists
    no open request, a plain resume runs nothing and asks it again, and Continue() then
    goes on."""
    runs: list[str] = []
    app = chain(runs, store=store, **{f"interrupt_{where}": ["b"]})
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        ran = list(runs)
        (request,) = first.pending
        aborted = await app.resume("r1", answers={request.id: Abort("not today")})
        assert aborted.status is RunStatus.ABORTED
        assert await store.requests("r1") == []
        again = await app.resume("r1")
        assert again.status is RunStatus.INTERRUPTED
        assert [r.id for r in again.pending] == [request.id]
        assert runs == ran
        last = await app.resume("r1", answers={request.id: Continue()})
    assert last.status is RunStatus.COMPLETED
    assert runs == ["a", "b", "c"]


async def test_breakpoints_answer_is_marked_used(store: Store) -> None:
    """A breakpoint's answer is used once by the resume that applies it."""
    runs: list[str] = []
    app = chain(runs, store=store, interrupt_before=["b"])
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await app.resume("r1", answers={request.id: Continue()})
    (row,) = await store.requests("r1", statuses=())
    assert (row.request_id, row.status) == (request.id, "used")


async def test_breakpoints_before_and_after_the_same_node(store: Store) -> None:
    """A node marked both ways stops the run before it and again after it."""
    runs: list[str] = []
    app = chain(runs, store=store, interrupt_before=["b"], interrupt_after=["b"])
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (before,) = first.pending
        second = await app.resume("r1", answers={before.id: Continue()})
        assert second.status is RunStatus.INTERRUPTED
        (after,) = second.pending
        assert (before.kind, after.kind) == ("before", "after")
        assert runs == ["a", "b"]
        third = await app.resume("r1", answers={after.id: Continue()})
    assert third.status is RunStatus.COMPLETED
    assert runs == ["a", "b", "c"]


@pytest.mark.parametrize("where", ["before", "after"])
async def test_breakpoints_node_in_a_loop_is_stopped_every_time(store: Store, where: str) -> None:
    """A breakpoint on a node in a loop stops the run at each visit, with a new request."""

    async def work(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"rounds": state.rounds + 1}

    async def check(state: S, ctx: NodeContext) -> None:
        return None

    graph: Graph[S] = Graph(S)
    graph.add_node("work", work)
    graph.add_node("check", check)
    graph.add_edge(START, "work")
    graph.add_edge("work", "check")
    graph.add_route("check", lambda s: "work" if s.rounds < 3 else END, targets=["work", END])
    marks: dict[str, Any] = {f"interrupt_{where}": ["work"]}
    app = graph.compile(store=store, **marks)
    seen: list[tuple[str, int]] = []
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
        while outcome.status is RunStatus.INTERRUPTED:
            (request,) = outcome.pending
            seen.append((request.id, outcome.state.rounds))
            assert len(seen) <= 5, seen
            outcome = await app.resume("r1", answers={request.id: Continue()})
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.rounds == 3
    assert len({rid for rid, _ in seen}) == len(seen)
    if where == "before":
        assert [rounds for _, rounds in seen] == [0, 1, 2]
    else:  # the last visit is followed by check, so it is stopped after too
        assert [rounds for _, rounds in seen] == [1, 2, 3]


def test_breakpoints_compile_rejects_unknown_nodes() -> None:
    """Unknown node names in interrupt_before and interrupt_after are compile errors, all
    reported at once."""
    with pytest.raises(GraphValidationError) as caught:
        chain([], interrupt_before=["x"], interrupt_after=["y", "b"])
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert any("interrupt_before" in p and "'x'" in p for p in problems)
    assert any("interrupt_after" in p and "'y'" in p for p in problems)


def test_breakpoints_compile_rejects_a_string() -> None:
    """interrupt_before takes a list of names, not one string (which would be letters)."""
    with pytest.raises(GraphValidationError, match="list of node names"):
        chain([], interrupt_before="b")


@pytest.mark.parametrize("where", ["before", "after"])
async def test_breakpoints_stop_an_agent_once_per_visit(store: Store, where: str) -> None:
    """An agent taking three turns (two rounds of tool calls, then its answer) is stopped
    once: before its first turn, or after its answer; not at every turn."""
    from orchestra import Agent, Effect, tool
    from orchestra.models import ModelResponse, ScriptedModel, ToolCall

    @tool(effect=Effect.READ)
    async def peek(q: str) -> str:
        """Look."""
        return "seen"

    def look(q: str) -> ModelResponse:
        return ModelResponse(tool_calls=(ToolCall(name="peek", arguments={"q": q}),))

    model = ScriptedModel({"agent": [look("1"), look("2"), "done"]})
    runs: list[str] = []

    async def after(state: S, ctx: NodeContext) -> dict[str, Any]:
        runs.append("after")
        return {"visits": "after"}

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("agent", model=model, tools=[peek]))
    graph.add_node("next", after)
    graph.add_edge(START, "agent")
    graph.add_edge("agent", "next")
    graph.add_edge("next", END)
    app = graph.compile(store=store, **{f"interrupt_{where}": ["agent"]})
    stops = []
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
        while outcome.status is RunStatus.INTERRUPTED and len(stops) < 5:
            stops.append([(r.kind, r.node, r.step) for r in outcome.pending])
            outcome = await app.resume("r1", answers={r.id: Continue() for r in outcome.pending})
    assert outcome.status is RunStatus.COMPLETED
    assert stops == [[(where, "agent", 1 if where == "before" else 3)]]
    assert runs == ["after"]
