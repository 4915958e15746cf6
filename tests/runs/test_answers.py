"""Answers to requests: every refusal (unknown, already answered, expired, wrong kind of
answer) changes nothing, all or none; app.answer records without resuming; app.pending lists
open requests across runs; a live owner refuses answers; each answer is an event."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Approve,
    Choose,
    Continue,
    Done,
    Edit,
    Effect,
    Graph,
    NodeContext,
    Reject,
    Request,
    RunStatus,
    tool,
)
from orchestra.errors import AnswerError, LeaseHeldError
from orchestra.runs.answers import answer_requests
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    answer: Any = None
    paid: str | None = None


class Refund(BaseModel):
    """The answer the question expects (module level: findable by name)."""

    order_id: str
    amount: float


class Desk:
    """START -> (ask, pay) -> END: ``ask`` asks a question, ``pay`` makes an irreversible
    call the default policy holds; so a run stops with a question and an approval."""

    def __init__(self, store: Store) -> None:
        self.refunds: list[str] = []
        self.store = store

        @tool(effect=Effect.IRREVERSIBLE)
        async def refund(order_id: str) -> str:
            self.refunds.append(order_id)
            return f"refunded {order_id}"

        async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
            return {"answer": await ctx.interrupt("Refund what?", schema=Refund)}

        async def pay(state: S, ctx: NodeContext) -> dict[str, Any]:
            return {"paid": await ctx.call_tool("refund", order_id="7")}

        graph: Graph[S] = Graph(S)
        graph.add_node("ask", ask)
        graph.add_node("pay", pay, tools=[refund])
        for name in ("ask", "pay"):
            graph.add_edge(START, name)
            graph.add_edge(name, END)
        self.app = graph.compile(store=store)

    async def start(self, run_id: str = "r1") -> dict[str, Request]:
        """Run until it stops; return its requests by kind."""
        with anyio.fail_after(5):
            outcome = await self.app.run(S(), run_id=run_id)
        assert outcome.status is RunStatus.INTERRUPTED
        requests = {r.kind: r for r in outcome.pending}
        assert sorted(requests) == ["approval", "question"]
        return requests

    async def open_ids(self, run_id: str = "r1") -> list[str]:
        return sorted(r.request_id for r in await self.store.requests(run_id))

    async def answered_events(self, run_id: str = "r1") -> list[dict[str, Any]]:
        events = await self.store.events(run_id)
        return [json.loads(e.data) for e in events if e.kind == "request_answered"]

    async def unchanged(self, requests: dict[str, Request], run_id: str = "r1") -> None:
        """Assert nothing was recorded: every request open, no answer event, run at rest."""
        assert await self.open_ids(run_id) == sorted(r.id for r in requests.values())
        assert await self.answered_events(run_id) == []
        assert (await self.store.get_run(run_id)).status == "interrupted"
        assert self.refunds == []


REFUND = {"order_id": "7", "amount": 12}


# -- refusals -------------------------------------------------------------------------------


async def test_answers_unknown_request_is_refused(store: Store) -> None:
    """An answer for no such request is refused, naming the open ones; nothing changes."""
    desk = Desk(store)
    requests = await desk.start()
    with pytest.raises(AnswerError, match="no such request") as caught:
        await desk.app.resume("r1", answers={"req_nope": Approve()})
    assert (caught.value.run_id, caught.value.request_id) == ("r1", "req_nope")
    for request in requests.values():
        assert request.id in str(caught.value)
    await desk.unchanged(requests)


async def test_answers_already_answered_request_is_refused(store: Store) -> None:
    """A request answered once cannot be answered again; the first answer stands."""
    desk = Desk(store)
    requests = await desk.start()
    question = requests["question"]
    await desk.app.answer("r1", {question.id: REFUND})
    with pytest.raises(AnswerError, match="already answered"):
        await desk.app.answer("r1", {question.id: {"order_id": "8", "amount": 1}})
    (row,) = [r for r in await store.requests("r1", statuses=()) if r.request_id == question.id]
    assert row.status == "answered"
    assert json.loads(row.answer or "")["value"] == {"order_id": "7", "amount": 12.0}
    assert len(await desk.answered_events()) == 1


async def test_answers_expired_request_is_refused(store: Store) -> None:
    """An answer to a request past its expiry is refused; nothing is recorded."""

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"answer": await ctx.interrupt("Quick?", schema=str, expires_in=0.05)}

    graph: Graph[S] = Graph(S)
    graph.add_node("ask", ask)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    (request,) = outcome.pending
    assert request.expires_at is not None
    await anyio.sleep(max(request.expires_at - time.time(), 0.0) + 0.02)
    with pytest.raises(AnswerError, match="expired"):
        await app.answer("r1", {request.id: "yes"})
    assert [e for e in await store.events("r1") if e.kind == "request_answered"] == []


@pytest.mark.parametrize(
    ("kind", "answer", "error"),
    [
        pytest.param("approval", Done("refunded"), "approval is answered with", id="done"),
        pytest.param("approval", Continue(), "approval is answered with", id="continue"),
        pytest.param("approval", "yes", "approval is answered with", id="text"),
        pytest.param("question", Approve(), "question is answered with a value", id="approve"),
        pytest.param("question", Reject("no"), "question is answered with a value", id="reject"),
        pytest.param("question", Choose("x"), "question is answered with a value", id="choose"),
        pytest.param("question", {"order_id": "7"}, "amount", id="misfit"),
    ],
)
async def test_answers_wrong_kind_of_answer_is_refused(
    store: Store, kind: str, answer: Any, error: str
) -> None:
    """An answer that does not suit its request's kind is refused, saying what suits it;
    nothing is recorded."""
    desk = Desk(store)
    requests = await desk.start()
    with pytest.raises(AnswerError, match=error) as caught:
        await desk.app.resume("r1", answers={requests[kind].id: answer})
    assert caught.value.request_id == requests[kind].id
    await desk.unchanged(requests)


@pytest.mark.parametrize("answer", [Done(), Edit(arguments={}), "go"], ids=["done", "edit", "text"])
async def test_answers_wrong_answer_to_a_breakpoint_is_refused(store: Store, answer: Any) -> None:
    """A breakpoint takes Continue/Approve or Abort/Reject only."""

    async def step(state: S, ctx: NodeContext) -> None:
        return None

    graph: Graph[S] = Graph(S)
    graph.add_node("step", step)
    graph.add_edge(START, "step")
    graph.add_edge("step", END)
    app = graph.compile(store=store, interrupt_before=["step"])
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    (request,) = outcome.pending
    with pytest.raises(AnswerError, match="breakpoint"):
        await app.resume("r1", answers={request.id: answer})
    assert [r.request_id for r in await store.requests("r1")] == [request.id]


async def test_answers_are_recorded_all_or_none(store: Store) -> None:
    """A good answer given with a refused one is not recorded either."""
    desk = Desk(store)
    requests = await desk.start()
    answers = {requests["question"].id: REFUND, requests["approval"].id: Done("x")}
    with pytest.raises(AnswerError):
        await desk.app.answer("r1", answers)
    await desk.unchanged(requests)


async def test_answers_refused_resume_runs_nothing(store: Store) -> None:
    """A resume whose answers are refused does not run the step."""
    desk = Desk(store)
    requests = await desk.start()
    answers = {requests["approval"].id: Approve(), "req_nope": Approve()}
    with pytest.raises(AnswerError):
        await desk.app.resume("r1", answers=answers)
    await desk.unchanged(requests)


# -- app.answer and app.pending -------------------------------------------------------------


async def test_answers_answer_records_without_resuming(store: Store) -> None:
    """app.answer records the answer and returns the requests still open; the run stays
    interrupted and nothing runs."""
    desk = Desk(store)
    requests = await desk.start()
    still_open = await desk.app.answer("r1", {requests["question"].id: REFUND})
    assert [r.id for r in still_open] == [requests["approval"].id]
    assert all(isinstance(r, Request) for r in still_open)
    rows = {r.request_id: r.status for r in await store.requests("r1", statuses=())}
    assert rows == {requests["question"].id: "answered", requests["approval"].id: "open"}
    assert (await store.get_run("r1")).status == "interrupted"
    assert desk.refunds == []


async def test_answers_answer_returns_nothing_once_all_are_answered(store: Store) -> None:
    """Answering every open request leaves none open."""
    desk = Desk(store)
    requests = await desk.start()
    answers = {requests["question"].id: REFUND, requests["approval"].id: Approve()}
    assert await desk.app.answer("r1", answers) == ()
    assert desk.refunds == []


async def test_answers_recorded_answers_are_used_by_a_later_resume(store: Store) -> None:
    """A resume without answers uses the ones recorded by app.answer."""
    desk = Desk(store)
    requests = await desk.start()
    await desk.app.answer("r1", {requests["question"].id: REFUND})
    await desk.app.answer("r1", {requests["approval"].id: Approve()})
    with anyio.fail_after(5):
        outcome = await desk.app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.answer == Refund(order_id="7", amount=12)
    assert outcome.state.paid == "refunded 7"
    assert desk.refunds == ["7"]


async def test_answers_pending_lists_open_requests_of_every_run(store: Store) -> None:
    """app.pending() lists the open requests of all runs; app.pending(run_id) of one."""
    desk = Desk(store)
    first = await desk.start("r1")
    second = await desk.start("r2")
    every = await desk.app.pending()
    assert sorted((r.run_id, r.id) for r in every) == sorted(
        [("r1", r.id) for r in first.values()] + [("r2", r.id) for r in second.values()]
    )
    assert sorted(r.id for r in await desk.app.pending("r1")) == sorted(
        r.id for r in first.values()
    )


async def test_answers_pending_leaves_out_answered_requests(store: Store) -> None:
    """An answered request is no longer pending."""
    desk = Desk(store)
    requests = await desk.start()
    await desk.app.answer("r1", {requests["approval"].id: Reject("no")})
    assert [r.id for r in await desk.app.pending()] == [requests["question"].id]


async def test_answers_pending_requests_describe_themselves(store: Store) -> None:
    """A pending request from app.pending() has its kind, node, payload and schema."""
    desk = Desk(store)
    await desk.start()
    by_kind = {r.kind: r for r in await desk.app.pending("r1")}
    approval, question = by_kind["approval"], by_kind["question"]
    assert (approval.node, approval.payload["tool"]) == ("pay", "refund")
    assert approval.payload["arguments"] == {"order_id": "7"}
    assert (question.node, question.payload["prompt"]) == ("ask", "Refund what?")
    assert question.schema is not None
    assert "amount" in question.schema["properties"]


# -- the run's owner, the audit trail, the app-less check -----------------------------------


@pytest.mark.parametrize("how", ["answer", "resume"])
async def test_answers_are_refused_while_a_live_process_owns_the_run(
    store: Store, how: str
) -> None:
    """While a process runs the run, answers to its open requests are refused
    (LeaseHeldError) and nothing is recorded."""
    entered, release = anyio.Event(), anyio.Event()

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"answer": await ctx.interrupt("First?", schema=str)}

    async def hold(state: S, ctx: NodeContext) -> dict[str, Any]:
        value = await ctx.interrupt("Second?", schema=str)
        entered.set()
        await release.wait()
        return {"paid": value}

    graph: Graph[S] = Graph(S)
    graph.add_node("ask", ask)
    graph.add_node("hold", hold)
    for name in ("ask", "hold"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        by_node = {r.node: r.id for r in first.pending}
        outcomes = []

        async def resume() -> None:
            outcomes.append(await app.resume("r1", answers={by_node["hold"]: "go"}))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(resume)
            await entered.wait()
            late = {by_node["ask"]: "late"}
            try:
                with pytest.raises(LeaseHeldError):
                    await (
                        app.answer("r1", late)
                        if how == "answer"
                        else app.resume("r1", answers=late)
                    )
            finally:
                release.set()
    (second,) = outcomes
    assert second.status is RunStatus.INTERRUPTED
    assert [r.id for r in second.pending] == [by_node["ask"]]
    assert [r.request_id for r in await store.requests("r1")] == [by_node["ask"]]
    with anyio.fail_after(5):
        third = await app.resume("r1", answers={by_node["ask"]: "now"})
    assert third.status is RunStatus.COMPLETED
    assert (third.state.answer, third.state.paid) == ("now", "go")


async def test_answers_each_recorded_answer_is_an_event(store: Store) -> None:
    """Each recorded answer is stored as a request_answered event naming its request."""
    desk = Desk(store)
    requests = await desk.start()
    question, approval = requests["question"], requests["approval"]
    await desk.app.answer("r1", {question.id: REFUND, approval.id: Reject("too soon")})
    found = {e["request_id"]: e for e in await desk.answered_events()}
    assert sorted(found) == sorted([question.id, approval.id])
    assert (found[question.id]["request_kind"], found[question.id]["node"]) == ("question", "ask")
    assert (found[approval.id]["request_kind"], found[approval.id]["node"]) == ("approval", "pay")
    assert json.loads(found[approval.id]["answer"]) == {"answer": "reject", "reason": "too soon"}
    assert json.loads(found[question.id]["answer"])["value"] == {"order_id": "7", "amount": 12.0}


async def test_answers_given_to_resume_are_events(store: Store) -> None:
    """Answers given to resume are stored as request_answered events too, once each."""
    desk = Desk(store)
    requests = await desk.start()
    answers = {requests["question"].id: REFUND, requests["approval"].id: Approve()}
    with anyio.fail_after(5):
        outcome = await desk.app.resume("r1", answers=answers)
    assert outcome.status is RunStatus.COMPLETED
    events = await desk.answered_events()
    assert sorted(e["request_id"] for e in events) == sorted(answers)


async def test_answers_without_the_app_can_approve(store: Store) -> None:
    """answer_requests without the app records an Approve() (it needs no schema)."""
    desk = Desk(store)
    requests = await desk.start()
    rows = await answer_requests(None, store, "r1", {requests["approval"].id: Approve()})
    assert [r.request_id for r in rows] == [requests["question"].id]
    assert len(await desk.answered_events()) == 1


async def test_answers_without_the_app_cannot_check_an_edit(store: Store) -> None:
    """answer_requests without the app refuses an Edit (checking it needs the tool)."""
    desk = Desk(store)
    requests = await desk.start()
    answer = {requests["approval"].id: Edit(arguments={"order_id": "8"})}
    with pytest.raises(AnswerError, match="needs the run's app"):
        await answer_requests(None, store, "r1", answer)
    await desk.unchanged(requests)


async def test_answers_for_an_unknown_run_say_so(store: Store) -> None:
    """app.answer and app.pending name an unknown run (not "no such request")."""
    from orchestra.errors import RunNotFoundError

    desk = Desk(store)
    await desk.start()
    with pytest.raises(RunNotFoundError):
        await desk.app.answer("nope", {"req_x": Approve()})
    with pytest.raises(RunNotFoundError):
        await desk.app.pending("nope")
