"""Recovering runs that stopped mid-step: failed steps, answers raced by two resumes,
interrupts raised inside a node's own task group, joins waiting on agents across steps and
restarts, usage counted once, and bugs that must not leave a run owned."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Budget,
    Done,
    Effect,
    Graph,
    NodeContext,
    RetryPolicy,
    RunStatus,
    tool,
)
from orchestra.errors import AgentOutputError, AnswerError
from orchestra.models import ModelResponse, ScriptedModel, ToolCall
from orchestra.runtime.executor import Execution
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    note: str = ""
    count: int = 0
    a: str = ""
    b: str = ""
    merged: bool = False


def one_node(fn: Any, tools: Any = (), **options: Any) -> Any:
    graph: Graph[S] = Graph(S)
    graph.add_node("n", fn, tools=list(tools))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    return graph.compile(approvals=None, **options)


async def test_recovery_failed_agent_answer_is_asked_again_on_resume(store: Store) -> None:
    """A run failed on an agent's invalid answer asks the model again when resumed; the
    bad answer is not replayed from the ledger."""
    bad = ScriptedModel(lambda request: "seven")
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=bad, output="count", output_retries=0))
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    first = await graph.compile(approvals=None, store=store).run(S(), run_id="r1")
    assert isinstance(first.error, AgentOutputError)
    good = ScriptedModel(lambda request: "7")
    fixed: Graph[S] = Graph(S)
    fixed.add_node(Agent("a", model=good, output="count", output_retries=0))
    fixed.add_edge(START, "a")
    fixed.add_edge("a", END)
    second = await fixed.compile(approvals=None, store=store).resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert second.state.count == 7
    assert len(good.requests) == 1


async def test_recovery_failed_irreversible_call_is_in_doubt_on_resume(store: Store) -> None:
    """An irreversible tool that raised failed its node; the resume asks an operator
    instead of replaying the error forever or running the call again."""
    ran: list[str] = []

    @tool(effect=Effect.IRREVERSIBLE)
    async def charge(order_id: str) -> str:
        ran.append(order_id)
        raise ConnectionError("503 from the payment API")

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"note": await ctx.call_tool(charge, order_id="42")}

    app = one_node(node, [charge], store=store)
    assert (await app.run(S(), run_id="r1")).status is RunStatus.FAILED
    second = await app.resume("r1")
    assert second.status is RunStatus.INTERRUPTED
    (request,) = second.pending
    assert request.payload["tool"] == "charge"
    third = await app.resume("r1", answers={request.id: Done("charged by hand")})
    assert third.status is RunStatus.COMPLETED
    assert third.state.note == "charged by hand"
    assert ran == ["42"]


async def test_recovery_interrupts_from_a_nodes_own_task_group_stop_the_run(
    store: Store,
) -> None:
    """Calls made concurrently inside a node: an in-doubt one interrupts the run (stored,
    answerable) instead of escaping as an exception group."""

    @tool(effect=Effect.READ)
    async def lookup(order_id: str) -> str:
        return "order"

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def refund(order_id: str) -> str:
        await anyio.sleep(5)
        return "refunded"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        async with anyio.create_task_group() as group:
            group.start_soon(ctx.call_tool, "lookup", {"order_id": "42"})
            group.start_soon(ctx.call_tool, "refund", {"order_id": "42"})
        return {"note": "both"}

    app = one_node(node, [lookup, refund], store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    assert [r.payload["tool"] for r in outcome.pending] == ["refund"]
    record = await store.get_run("r1")
    assert (record.status, record.owner) == ("interrupted", None)
    assert [r.request_id for r in await store.requests("r1")] == [outcome.pending[0].id]


async def test_recovery_unexpected_exception_leaves_the_run_failed_not_owned(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug escaping the executor is raised, and the run is recorded failed (resumable at
    once) rather than left running under a lease."""

    async def broken(self: Execution, tasks: Any, buffer: Any) -> None:
        raise RuntimeError("a bug")

    async def node(state: S, ctx: NodeContext) -> None:
        return None

    app = one_node(node, store=store)
    monkeypatch.setattr(Execution, "_run_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        await app.run(S(), run_id="r1")
    record = await store.get_run("r1")
    assert (record.status, record.owner) == ("failed", None)
    assert "unexpected RuntimeError: a bug" in (record.error or "")


async def test_recovery_sync_irreversible_tool_is_waited_for_and_recorded(
    store: Store,
) -> None:
    """A sync irreversible tool past its timeout is not abandoned mid-call: its real
    result is recorded, so nobody is asked to guess and nothing runs twice."""
    ran: list[str] = []

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    def charge(order_id: str) -> str:
        time.sleep(0.3)
        ran.append(order_id)
        return "charged"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"note": await ctx.call_tool(charge, order_id="42")}

    app = one_node(node, [charge], store=store)
    outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.note == "charged"
    assert ran == ["42"]
    (entry,) = await store.ledger("r1")
    assert (entry.status, entry.result) == ("done", '{"status":"ok","result":"charged"}')


async def test_recovery_answer_used_by_another_resume_is_refused_and_changes_nothing(
    store: Store,
) -> None:
    """Two resumes with the same answer: the second is refused with AnswerError and the
    run keeps the status the first one left (not marked failed)."""
    attempts: list[str] = []

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def refund(order_id: str) -> str:
        attempts.append(order_id)
        await anyio.sleep(5)
        return "refunded"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        first = await ctx.call_tool(refund, order_id="1")
        second = await ctx.call_tool(refund, order_id="2")
        return {"note": f"{first} {second}"}

    app = one_node(node, [refund], store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
        (request,) = outcome.pending
        answers = {request.id: Done("refunded")}
        again = await app.resume("r1", answers=answers)
        assert again.status is RunStatus.INTERRUPTED  # now on the second call
        with pytest.raises(AnswerError, match=r"answered meanwhile|already answered"):
            await app.resume("r1", answers=answers)
    record = await store.get_run("r1")
    assert (record.status, record.owner) == ("interrupted", None)


async def test_recovery_node_retry_counts_a_replayed_tool_call_once() -> None:
    """A node retried after a tool call replays it; usage counts the call once."""
    ran: list[int] = []

    @tool(effect=Effect.WRITE)
    async def book(slot: int) -> str:
        ran.append(slot)
        return "booked"

    attempts: list[int] = []

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool(book, slot=1)
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("after the call")
        return {"note": result}

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, tools=[book], retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    outcome = await graph.compile(approvals=None).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert ran == [1]
    assert outcome.usage.tool_calls == 1


async def test_recovery_only_denied_calls_are_stored_in_usage(store: Store) -> None:
    """A run whose only call was denied still stores the denial in its usage."""

    async def node(state: S, ctx: NodeContext) -> None:
        try:
            await ctx.call_tool("delete_everything")
        except Exception:
            return None

    app = one_node(node, store=store)
    await app.run(S(), run_id="r1")
    assert (await store.get_run("r1")).usage["denied_calls"] == 1


def join_graph(store: Store, steps: int) -> Any:
    """a (an agent with one tool call: two turns) and b (one turn) join into merge."""

    @tool(effect=Effect.READ)
    async def look() -> str:
        return "seen"

    model = ScriptedModel(
        {"a": [ModelResponse(tool_calls=(ToolCall(name="look"),)), "A"], "b": ["B"]}
    )

    async def merge(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"merged": True, "count": state.count + 1}

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, tools=[look], output="a"))
    graph.add_node(Agent("b", model=model, output="b"))
    graph.add_node("merge", merge)
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge(["a", "b"], "merge")
    graph.add_edge("merge", END)
    return graph.compile(approvals=None, store=store, budget=Budget(steps=steps))


async def test_recovery_join_waits_for_an_agent_that_takes_more_turns(store: Store) -> None:
    """A join fires once, after its last source finishes, when sources are agents that
    finish in different steps."""
    outcome = await join_graph(store, 10).run(S(), run_id="r1")
    assert outcome.status is RunStatus.COMPLETED
    assert (outcome.state.a, outcome.state.b, outcome.state.merged) == ("A", "B", True)
    assert outcome.state.count == 1
    assert outcome.steps == 3


async def test_recovery_join_progress_survives_a_stop_and_resume(store: Store) -> None:
    """Stopped between the two sources' finishing steps, the resumed run still fires the
    join: its progress is checkpointed."""
    first = await join_graph(store, 1).run(S(), run_id="r1")
    assert first.status is RunStatus.BUDGET_EXCEEDED
    assert first.state.b == "B"
    second = await join_graph(store, 10).resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert (second.state.merged, second.state.count) == (True, 1)


async def test_recovery_errors_from_a_nodes_own_task_group_are_retried() -> None:
    """A plain error raised inside a node's own task group is the node's failure: retried
    by its policy, then a NodeError, never an exception out of run()."""
    attempts: list[int] = []

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        attempts.append(1)

        async def flaky() -> None:
            if len(attempts) == 1:
                raise ConnectionError("flaky backend")

        async with anyio.create_task_group() as group:
            group.start_soon(flaky)
        return {"count": len(attempts)}

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    outcome = await graph.compile(approvals=None).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.count == 2


async def test_recovery_read_call_never_takes_the_place_of_an_irreversible_one(
    store: Store,
) -> None:
    """A re-run that asks for a read-only call where an irreversible one was recorded is
    refused (LedgerMismatchError); the irreversible call never runs twice."""
    refunds: list[str] = []
    first_version = [True]

    @tool(effect=Effect.READ)
    async def lookup(order_id: str) -> str:
        return "order"

    @tool(effect=Effect.IRREVERSIBLE)
    async def refund(order_id: str) -> str:
        refunds.append(order_id)
        return "refunded"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        if not first_version[0]:
            await ctx.call_tool(lookup, order_id="A1")  # a "fix" that adds a read first
        await ctx.call_tool(refund, order_id="A1")
        if first_version[0]:
            raise RuntimeError("a bug after the refund")
        return {"note": "done"}

    app = one_node(node, [lookup, refund], store=store)
    assert (await app.run(S(), run_id="r1")).status is RunStatus.FAILED
    first_version[0] = False
    second = await app.resume("r1")
    assert second.status is RunStatus.FAILED
    assert "recorded as tool 'refund'" in str(second.error)
    assert refunds == ["A1"]


async def test_recovery_failed_step_keeps_the_calls_of_tasks_that_finished(
    store: Store,
) -> None:
    """In a step where one task failed, a task that finished (its pending write kept) is
    not run again on resume, and its model call stays counted in the usage."""
    model = ScriptedModel(lambda request: "answer " * 20)
    fixed = [False]

    async def b(state: S, ctx: NodeContext) -> dict[str, Any]:
        await anyio.sleep(0.05)  # 'a' finishes first: its pending write is stored
        if not fixed[0]:
            raise RuntimeError("b is broken")
        return {"count": 1}

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, output="note"))
    graph.add_node("b", b)
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge("a", END)
    graph.add_edge("b", END)
    app = graph.compile(approvals=None, store=store)
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.FAILED
    fixed[0] = True
    second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert len(model.requests) == 1
    assert second.usage.model_calls == 1
    assert second.usage.output_tokens == first.usage.output_tokens > 0


async def test_recovery_answers_are_recorded_all_or_none(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one of several answers is given by another process between this resume's
    checks and its recording, none of the others is recorded either: the refused resume
    changes nothing."""

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def charge(order_id: str) -> str:
        await anyio.sleep(5)
        return "charged"

    def charging(order_id: str) -> Any:
        async def node(state: S, ctx: NodeContext) -> None:
            await ctx.call_tool(charge, order_id=order_id)

        return node

    graph: Graph[S] = Graph(S)
    graph.add_node("one", charging("1"), tools=[charge])
    graph.add_node("two", charging("2"), tools=[charge])
    graph.add_edge(START, "one")
    graph.add_edge(START, "two")
    graph.add_edge("one", END)
    graph.add_edge("two", END)
    app = graph.compile(approvals=None, store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    first, second = sorted(outcome.pending, key=lambda r: r.node)
    record_answers = store.record_answers
    raced: list[bool] = []

    async def racing(run_id: str, answers: Any, events: Any) -> None:
        if not raced:  # another operator answers the second request first
            raced.append(True)
            await record_answers(run_id, [(second.id, '{"answer":"retry"}')], [])
        await record_answers(run_id, answers, events)

    monkeypatch.setattr(store, "record_answers", racing)
    with pytest.raises(AnswerError, match="answered meanwhile"):
        await app.resume("r1", answers={first.id: Done("a"), second.id: Done("b")})
    assert [r.request_id for r in await store.requests("r1")] == [first.id]
    record = await store.get_run("r1")
    assert (record.status, record.owner) == ("interrupted", None)
    assert all(e.status == "started" for e in await store.ledger("r1"))
