"""Held calls in the gateway: the request a held call becomes, Approve / Reject / Edit, single
use, parallel agents, side effects before the interrupt, and expired requests."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from desk import REFUND, Desk, S, billing, call, pair, paying, tool_message, turn
from helpers import past

from orchestra import (
    END,
    START,
    Agent,
    Approvals,
    Approve,
    Done,
    Edit,
    Effect,
    Graph,
    NodeContext,
    Reject,
    RunStatus,
    tool,
)
from orchestra.errors import AnswerError, RunStatusError, ToolRejectedError
from orchestra.models import ScriptedModel
from orchestra.store import Store

pytestmark = pytest.mark.anyio


# -- the request and its answers ------------------------------------------------------------


async def test_approvals_request_is_bound_to_the_exact_call(store: Store) -> None:
    """The request names the tool, its arguments, its effect and caller; it is stored open,
    and the tool has not run."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    (request,) = outcome.pending
    assert (request.kind, request.node, request.step) == ("approval", "billing", 1)
    assert request.payload["tool"] == "refund"
    assert request.payload["arguments"] == {"order_id": "7", "amount": 250}
    assert (request.payload["effect"], request.payload["call_id"]) == ("irreversible", "c1")
    assert request.schema is not None
    assert sorted(request.schema["properties"]) == ["amount", "order_id"]
    assert [r.request_id for r in await store.requests("r1")] == [request.id]
    assert (await store.get_run("r1")).status == "interrupted"
    assert desk.ran == []


async def test_approvals_approve_runs_the_call_once(store: Store) -> None:
    """Approve() runs the held call once, with its arguments; the agent gets its result."""
    desk = Desk()
    app, model = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Approve()})
    assert second.status is RunStatus.COMPLETED
    assert second.state.resolution == "done"
    assert desk.ran == [("refund", ("7", 250.0))]
    assert tool_message(model.requests[-1], "c1") == {"result": "refunded 250 on 7"}


async def test_approvals_resume_replays_the_model_call_of_the_held_turn(store: Store) -> None:
    """The model call whose proposal was held is replayed on resume, not made again."""
    desk = Desk()
    app, model = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Approve()})
    assert len(model.requests) == 2  # the held turn, then the turn after the result
    assert second.usage.model_calls == 2


async def test_approvals_reject_never_runs_the_call(store: Store) -> None:
    """Reject(reason) keeps the call from running; the run goes on."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Reject("too much")})
    assert second.status is RunStatus.COMPLETED
    assert desk.ran == []


async def test_approvals_reject_tells_the_agent_why(store: Store) -> None:
    """The agent's next turn sees the call rejected, with the reason."""
    desk = Desk()
    app, model = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await app.resume("r1", answers={request.id: Reject("over the limit")})
    message = tool_message(model.requests[-1], "c1")
    assert message["status"] == "rejected"
    assert "over the limit" in message["error"]


async def test_approvals_rejected_node_call_raises_tool_rejected(store: Store) -> None:
    """A plain node's held call that is rejected raises ToolRejectedError in the node."""
    desk = Desk()
    caught: list[str] = []

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            await ctx.call_tool("refund", order_id="7", amount=250)
        except ToolRejectedError as exc:
            caught.append(str(exc))
            return {"note": "not refunded"}
        return {"note": "refunded"}

    app = paying(desk, payer, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Reject("no refunds today")})
    assert second.state.note == "not refunded"
    (error,) = caught
    assert "no refunds today" in error
    assert desk.ran == []


async def test_approvals_held_node_call_cannot_be_swallowed(store: Store) -> None:
    """A node catching Exception around a held call does not catch the interrupt."""
    desk = Desk()

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            await ctx.call_tool("refund", order_id="7", amount=250)
        except Exception:
            return {"note": "swallowed"}
        return {"note": "refunded"}

    with anyio.fail_after(5):
        outcome = await paying(desk, payer, store=store).run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.state.note == ""


async def test_approvals_edit_runs_the_call_with_the_new_arguments(store: Store) -> None:
    """Edit(arguments) runs the call once, with the edited arguments."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        answer = Edit(arguments={"order_id": "7", "amount": 100})
        second = await app.resume("r1", answers={request.id: answer})
    assert second.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 100.0))]


async def test_approvals_edit_tells_the_agent_the_arguments_changed(store: Store) -> None:
    """The agent's tool message carries the result and the arguments used, with a note."""
    desk = Desk()
    app, model = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        answer = Edit(arguments={"order_id": "7", "amount": 100})
        await app.resume("r1", answers={request.id: answer})
    message = tool_message(model.requests[-1], "c1")
    assert message["result"] == "refunded 100 on 7"
    assert message["arguments_used"] == {"order_id": "7", "amount": 100}
    assert "changed the arguments" in message["note"]


async def test_approvals_edited_node_call_returns_its_result(store: Store) -> None:
    """A plain node's call approved with Edit returns the result of the edited call."""
    desk = Desk()

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"note": await ctx.call_tool("refund", order_id="7", amount=250)}

    app = paying(desk, payer, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        answer = Edit(arguments={"order_id": "8", "amount": 1})
        second = await app.resume("r1", answers={request.id: answer})
    assert second.state.note == "refunded 1 on 8"
    assert desk.ran == [("refund", ("8", 1.0))]


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({"order_id": "7", "amount": "lots"}, "amount", id="wrong-type"),
        pytest.param({"order_id": "7"}, "amount", id="missing"),
        pytest.param({"order_id": "7", "amount": 1, "bank": "x"}, "bank", id="extra"),
    ],
)
async def test_approvals_invalid_edit_is_refused_and_changes_nothing(
    store: Store, arguments: dict[str, Any], error: str
) -> None:
    """Edited arguments that do not fit the tool are refused naming the field; the request
    stays open and a later Approve() still runs the original call."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        with pytest.raises(AnswerError, match=error) as caught:
            await app.resume("r1", answers={request.id: Edit(arguments=arguments)})
        assert caught.value.request_id == request.id
        assert [r.request_id for r in await store.requests("r1")] == [request.id]
        assert (await store.get_run("r1")).status == "interrupted"
        assert [e for e in await store.events("r1") if e.kind == "request_answered"] == []
        second = await app.resume("r1", answers={request.id: Approve()})
    assert second.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 250.0))]


async def test_approvals_decisions_are_events(store: Store) -> None:
    """Each applied answer is stored as an approval_decided event with its decision."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await app.resume("r1", answers={request.id: Reject("no")})
    rows = [json.loads(e.data) for e in await store.events("r1") if e.kind == "approval_decided"]
    assert [(r["request_id"], r["decision"], r["tool"]) for r in rows] == [
        (request.id, "rejected", "refund")
    ]


# -- single use -----------------------------------------------------------------------------


async def test_approvals_identical_later_call_asks_again(store: Store) -> None:
    """An approval is used once: the same call with the same arguments next turn is a new
    request, and runs only when that one is approved."""
    desk = Desk()
    again = call("refund", "c2", order_id="7", amount=250)
    app, _ = billing(desk, [turn(REFUND), turn(again), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Approve()})
        assert second.status is RunStatus.INTERRUPTED
        (other,) = second.pending
        assert other.id != request.id
        assert other.payload["call_id"] == "c2"
        assert desk.names() == ["refund"]
        third = await app.resume("r1", answers={other.id: Approve()})
    assert third.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 250.0)), ("refund", ("7", 250.0))]


async def test_approvals_identical_calls_in_one_turn_are_asked_apart(store: Store) -> None:
    """Two identical calls in one turn are two requests, each answered on its own."""
    desk = Desk()
    twin = call("refund", "c2", order_id="7", amount=250)
    app, model = billing(desk, [turn(REFUND, twin), "done"], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        by_call = {r.payload["call_id"]: r.id for r in first.pending}
        assert sorted(by_call) == ["c1", "c2"]
        assert by_call["c1"] != by_call["c2"]
        answers = {by_call["c1"]: Approve(), by_call["c2"]: Reject("a duplicate")}
        second = await app.resume("r1", answers=answers)
    assert second.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 250.0))]
    assert tool_message(model.requests[-1], "c1") == {"result": "refunded 250 on 7"}
    assert tool_message(model.requests[-1], "c2")["status"] == "rejected"


async def test_approvals_approved_call_is_recorded_started_before_it_runs(store: Store) -> None:
    """The approved call is in the ledger as started while it runs, and done after."""
    seen: list[list[tuple[str, str]]] = []

    @tool(effect=Effect.IRREVERSIBLE)
    async def refund(order_id: str, amount: float) -> str:
        entries = await store.ledger("r1", 1)
        seen.append([(e.name, e.status) for e in entries if e.kind == "tool"])
        return "refunded"

    model = ScriptedModel({"billing": [turn(REFUND), "done"]})
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("billing", model=model, tools=[refund], output="resolution"))
    graph.add_edge(START, "billing")
    graph.add_edge("billing", END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await app.resume("r1", answers={request.id: Approve()})
    assert seen == [[("refund", "started")]]
    after = [(e.name, e.status) for e in await store.ledger("r1", 1) if e.kind == "tool"]
    assert after == [("refund", "done")]


async def test_approvals_approved_write_call_is_recorded_started_before_it_runs(
    store: Store,
) -> None:
    """An approved write call (held by a tool rule) is recorded as started before it runs,
    like an irreversible one: the approval is used once even across a crash."""
    seen: list[list[tuple[str, str]]] = []

    @tool
    async def note(text: str) -> str:
        entries = await store.ledger("r1", 1)
        seen.append([(e.name, e.status) for e in entries if e.kind == "tool"])
        return "noted"

    model = ScriptedModel({"billing": [turn(call("note", "n1", text="x")), "done"]})
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("billing", model=model, tools=[note], output="resolution"))
    graph.add_edge(START, "billing")
    graph.add_edge("billing", END)
    app = graph.compile(store=store, approvals=Approvals(tools={"note": True}))
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await app.resume("r1", answers={request.id: Approve()})
    assert seen == [[("note", "started")]]


async def test_approvals_approved_call_is_not_run_again_by_a_later_resume(store: Store) -> None:
    """An approved call that ran is replayed, not run again, when its step is resumed for
    another reason (here a call beside it that ended in doubt)."""
    desk = Desk()
    wire = call("wire", "w1", account="acme")
    policy = Approvals(tools={"wire": False})
    app, model = billing(desk, [turn(REFUND, wire), "done"], store=store, approvals=policy)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Approve()})
        assert second.status is RunStatus.INTERRUPTED
        (doubt,) = second.pending
        assert doubt.kind == "in_doubt"
        assert sorted(desk.names()) == ["refund", "wire"]
        third = await app.resume("r1", answers={doubt.id: Done("wired by hand")})
    assert third.status is RunStatus.COMPLETED
    assert sorted(desk.names()) == ["refund", "wire"]
    assert tool_message(model.requests[-1], "c1") == {"result": "refunded 250 on 7"}
    with pytest.raises(RunStatusError):
        await app.resume("r1")
    assert sorted(desk.names()) == ["refund", "wire"]


async def test_approvals_approved_node_call_runs_once_across_a_later_question(
    store: Store,
) -> None:
    """A node's approved call is replayed, not run again, when the node is run again for
    the answer to a question it asks after the call."""
    desk = Desk()

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool("refund", order_id="7", amount=250)
        reason = await ctx.interrupt("Why was it refunded?", schema=str)
        return {"note": f"{result}: {reason}"}

    app = paying(desk, payer, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (approval,) = first.pending
        second = await app.resume("r1", answers={approval.id: Approve()})
        (question,) = second.pending
        assert question.kind == "question"
        assert desk.names() == ["refund"]
        third = await app.resume("r1", answers={question.id: "damaged"})
    assert third.status is RunStatus.COMPLETED
    assert third.state.note == "refunded 250 on 7: damaged"
    assert desk.ran == [("refund", ("7", 250.0))]


# -- parallel agents ------------------------------------------------------------------------


async def test_approvals_parallel_agents_are_asked_at_once(store: Store) -> None:
    """Two agents of one step holding a call each: two requests pending at once."""
    desk = Desk()
    scripts = {
        "a": [turn(call("refund", "ca", order_id="1", amount=10)), "done"],
        "b": [turn(call("refund", "cb", order_id="2", amount=20)), "done"],
    }
    app, _ = pair(desk, scripts, store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    assert sorted((r.node, r.payload["arguments"]["order_id"]) for r in outcome.pending) == [
        ("a", "1"),
        ("b", "2"),
    ]
    assert len({r.id for r in outcome.pending}) == 2
    assert sorted(r.request_id for r in await store.requests("r1")) == sorted(
        r.id for r in outcome.pending
    )
    assert desk.ran == []


async def test_approvals_held_call_is_asked_with_a_question_of_the_same_step(
    store: Store,
) -> None:
    """An agent's held call and a node's question in one step are pending together (not
    the approval only after the question is answered); answering both runs the call once."""
    desk = Desk()
    model = ScriptedModel({"billing": [turn(REFUND), "refunded"]})

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"note": await ctx.interrupt("Which note?", schema=str)}

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("billing", model=model, tools=desk.tools, output="resolution"))
    graph.add_node("ask", ask)
    for name in ("billing", "ask"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
        assert sorted(r.kind for r in outcome.pending) == ["approval", "question"]
        answers = {r.id: Approve() if r.kind == "approval" else "checked" for r in outcome.pending}
        done = await app.resume("r1", answers=answers)
    assert done.status is RunStatus.COMPLETED
    assert (done.state.resolution, done.state.note) == ("refunded", "checked")
    assert desk.names() == ["refund"]


async def test_approvals_parallel_requests_are_answered_one_at_a_time(store: Store) -> None:
    """Answering one of two requests leaves the run waiting on the other only, with nothing
    run; answering the other runs both calls once."""
    desk = Desk()
    scripts = {
        "a": [turn(call("refund", "ca", order_id="1", amount=10)), "done"],
        "b": [turn(call("refund", "cb", order_id="2", amount=20)), "done"],
    }
    app, _ = pair(desk, scripts, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        by_node = {r.node: r.id for r in first.pending}
        second = await app.resume("r1", answers={by_node["a"]: Approve()})
        assert second.status is RunStatus.INTERRUPTED
        assert [r.id for r in second.pending] == [by_node["b"]]
        assert desk.ran == []
        third = await app.resume("r1", answers={by_node["b"]: Approve()})
    assert third.status is RunStatus.COMPLETED
    assert sorted(desk.ran) == [("refund", ("1", 10.0)), ("refund", ("2", 20.0))]


# -- side effects before the interrupt --------------------------------------------------------


async def test_approvals_work_before_a_held_call_is_not_redone(store: Store) -> None:
    """A node's write before its held call, and a model call beside it in the step, happen
    once across the interrupt and the resume."""
    desk = Desk()

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        await ctx.call_tool("note", text="refunding 7")
        await ctx.call_tool("refund", order_id="7", amount=250)
        return {"note": "refunded"}

    model = ScriptedModel({"clerk": ["filed"]})
    graph: Graph[S] = Graph(S)
    graph.add_node("payer", payer, tools=desk.tools)
    graph.add_node(Agent("clerk", model=model, output="resolution"))
    for name in ("payer", "clerk"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        assert desk.names() == ["note"]
        second = await app.resume("r1", answers={request.id: Approve()})
    assert second.status is RunStatus.COMPLETED
    assert (second.state.note, second.state.resolution) == ("refunded", "filed")
    assert desk.ran == [("note", "refunding 7"), ("refund", ("7", 250.0))]
    assert len(model.requests) == 1


async def test_approvals_expired_request_cannot_be_approved(store: Store) -> None:
    """An answer to an expired request is refused; nothing runs."""
    desk = Desk()
    policy = Approvals(expires_after=0.05)
    app, _ = billing(desk, [turn(REFUND), "done"], store=store, approvals=policy)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await past(request)
        with pytest.raises(AnswerError, match="expired"):
            await app.resume("r1", answers={request.id: Approve()})
    assert desk.ran == []
    assert (await store.get_run("r1")).status == "interrupted"


async def test_approvals_resume_rejects_an_expired_call(store: Store) -> None:
    """A resume without an answer after the expiry rejects the held call ("expired"), marks
    the request expired, and the run goes on."""
    desk = Desk()
    policy = Approvals(expires_after=0.05)
    app, model = billing(desk, [turn(REFUND), "done"], store=store, approvals=policy)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await past(request)
        second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert desk.ran == []
    message = tool_message(model.requests[-1], "c1")
    assert message["status"] == "rejected"
    assert "expired" in message["error"]
    (row,) = await store.requests("r1", statuses=())
    assert (row.request_id, row.status) == (request.id, "expired")


async def test_approvals_expired_node_call_raises_tool_rejected(store: Store) -> None:
    """A plain node's held call whose request expired raises ToolRejectedError on resume."""
    desk = Desk()
    caught: list[str] = []

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            await ctx.call_tool("refund", order_id="7", amount=250)
        except ToolRejectedError as exc:
            caught.append(str(exc))
            return {"note": "not refunded"}
        return {"note": "refunded"}

    app = paying(desk, payer, store=store, approvals=Approvals(expires_after=0.05))
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        await past(first.pending[0])
        second = await app.resume("r1")
    assert second.state.note == "not refunded"
    (error,) = caught
    assert "expired" in error
    assert desk.ran == []


async def test_approvals_expiry_is_an_approval_decision(store: Store) -> None:
    """An expired request is recorded as an approval_decided event with decision expired."""
    desk = Desk()
    policy = Approvals(expires_after=0.05)
    app, _ = billing(desk, [turn(REFUND), "done"], store=store, approvals=policy)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await past(request)
        await app.resume("r1")
    rows = [json.loads(e.data) for e in await store.events("r1") if e.kind == "approval_decided"]
    assert [(r["request_id"], r["decision"]) for r in rows] == [(request.id, "expired")]


async def test_approvals_request_left_behind_is_closed_when_the_run_completes(
    store: Store,
) -> None:
    """A held call the re-run step no longer makes (its node took another path) leaves no
    open request once the run completes: nothing lists it or can answer it."""
    desk = Desk()
    pay = {"now": True}

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        if pay["now"]:
            await ctx.call_tool(desk.refund, order_id="7", amount=250)
        return {"note": "done"}

    app = paying(desk, payer, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        pay["now"] = False
        done = await app.resume("r1")
    assert done.status is RunStatus.COMPLETED
    assert await app.pending() == ()
    (row,) = await store.requests("r1", statuses=())
    assert (row.request_id, row.status) == (request.id, "closed")
    with pytest.raises((AnswerError, RunStatusError)):
        await app.answer("r1", {request.id: Approve()})
    assert desk.ran == []
