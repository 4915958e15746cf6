"""Executing calls: an irreversible call left in doubt interrupts the run with one request, and
the operator's answers (Done, Retry, Abort) settle it, checked all or none and used once."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from orchestra import END, START, Abort, Agent, Done, Effect, Graph, Retry, RunStatus, tool
from orchestra.errors import AnswerError
from orchestra.models import ModelResponse, ScriptedModel, ToolCall
from orchestra.store import Store
from runtime.gateway.graphs import S, calling, single_agent, tool_messages

pytestmark = pytest.mark.anyio


# -- in-doubt calls and their answers --------------------------------------------------------


class Refunds:
    """An irreversible refund tool that is slow (times out) on the calls listed in ``slow``,
    and an agent that calls it once per entry of ``orders``, then answers ``done``."""

    def __init__(self, store: Store, orders: Sequence[str] = ("42",), slow: int = 1) -> None:
        self.runs: list[str] = []
        self.slow = slow

        @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
        async def refund(order_id: str) -> str:
            self.runs.append(order_id)
            if len(self.runs) <= self.slow:
                await anyio.sleep(5)
            return f"refunded {order_id}"

        script: list[ModelResponse | str] = [
            ModelResponse(tool_calls=(ToolCall(name="refund", arguments={"order_id": o}),))
            for o in orders
        ]
        self.model = ScriptedModel({"billing": [*script, "done"]})
        agent = Agent("billing", model=self.model, tools=[refund], output="resolution")
        self.app = single_agent(agent, store=store)
        self.store = store

    async def status(self, run_id: str = "r1") -> str:
        return (await self.store.get_run(run_id)).status

    async def open_ids(self, run_id: str = "r1") -> list[str]:
        return [r.request_id for r in await self.store.requests(run_id)]


async def test_gateway_in_doubt_call_interrupts_with_one_request(store: Store) -> None:
    """An irreversible call past its timeout stops the run with one stored open request."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        outcome = await refunds.app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    assert (request.kind, request.node, request.payload["tool"]) == (
        "in_doubt",
        "billing",
        "refund",
    )
    assert await refunds.open_ids() == [request.id]
    assert await refunds.status() == "interrupted"


async def test_gateway_resume_without_an_answer_stays_interrupted(store: Store) -> None:
    """Resumed with no answer, the run stays interrupted on the same request, not a copy."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        second = await refunds.app.resume("r1")
    assert second.status is RunStatus.INTERRUPTED
    assert [r.id for r in second.pending] == [r.id for r in first.pending]
    assert len(await store.requests("r1", statuses=())) == 1
    assert refunds.runs == ["42"]


async def test_gateway_done_answer_continues_without_running_the_tool(store: Store) -> None:
    """Done(result) resolves the call: the tool does not run again; the agent sees result."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await refunds.app.resume("r1", answers={request.id: Done("refunded by hand")})
    assert second.status is RunStatus.COMPLETED
    assert second.state.resolution == "done"
    assert refunds.runs == ["42"]
    (message,) = tool_messages(refunds.model.requests[-1].messages)
    assert json.loads(message.content) == {"result": "refunded by hand"}
    assert await refunds.open_ids() == []


async def test_gateway_retry_answer_runs_the_tool_once_more(store: Store) -> None:
    """Retry() runs the in-doubt call again, exactly once."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await refunds.app.resume("r1", answers={request.id: Retry()})
    assert second.status is RunStatus.COMPLETED
    assert refunds.runs == ["42", "42"]
    (message,) = tool_messages(refunds.model.requests[-1].messages)
    assert json.loads(message.content) == {"result": "refunded 42"}


async def test_gateway_abort_answer_ends_the_run_aborted(store: Store) -> None:
    """Abort() ends the run with status aborted; the tool does not run again."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await refunds.app.resume("r1", answers={request.id: Abort("not sure")})
    assert second.status is RunStatus.ABORTED
    assert second.stop_reason == "not sure"
    assert refunds.runs == ["42"]
    assert await refunds.status() == "aborted"
    assert await refunds.open_ids() == []


async def test_gateway_answer_to_an_unknown_request_is_refused(store: Store) -> None:
    """An answer for no such request raises AnswerError; the run and request are unchanged."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        with pytest.raises(AnswerError, match="no such request") as caught:
            await refunds.app.resume("r1", answers={"req_nope": Done("x")})
    assert caught.value.request_id == "req_nope"
    assert await refunds.open_ids() == [first.pending[0].id]
    assert await refunds.status() == "interrupted"
    assert refunds.runs == ["42"]


async def test_gateway_answers_are_all_checked_before_any_is_used(store: Store) -> None:
    """A valid answer given with a refused one is not used: the request stays open."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        with pytest.raises(AnswerError):
            await refunds.app.resume("r1", answers={request.id: Retry(), "req_nope": Retry()})
    assert await refunds.open_ids() == [request.id]
    assert await refunds.status() == "interrupted"
    assert refunds.runs == ["42"]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param("yes", "resolved with Done", id="not-an-answer"),
        pytest.param(Done(123), "does not fit tool 'refund'", id="done-wrong-type"),
    ],
)
async def test_gateway_invalid_answer_is_refused(store: Store, answer: Any, error: str) -> None:
    """An answer of the wrong kind or a Done result that does not fit is refused."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        with pytest.raises(AnswerError, match=error):
            await refunds.app.resume("r1", answers={request.id: answer})
    assert await refunds.open_ids() == [request.id]
    assert await refunds.status() == "interrupted"
    assert refunds.runs == ["42"]


async def test_gateway_answer_is_used_once(store: Store) -> None:
    """An answered request cannot be answered again while the run waits on another."""
    refunds = Refunds(store, orders=("1", "2"), slow=2)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await refunds.app.resume("r1", answers={request.id: Done("refunded 1")})
        assert second.status is RunStatus.INTERRUPTED
        (other,) = second.pending
        assert other.id != request.id
        with pytest.raises(AnswerError, match="already answered"):
            await refunds.app.resume("r1", answers={request.id: Done("refunded 1")})
    assert await refunds.open_ids() == [other.id]
    assert await refunds.status() == "interrupted"
    assert refunds.runs == ["1", "2"]


async def test_gateway_resumed_step_counts_its_model_call_once(store: Store) -> None:
    """The model call of an interrupted step is replayed on resume, and counted once."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await refunds.app.resume("r1", answers={request.id: Done("refunded")})
    assert first.usage.model_calls == 1
    assert second.usage.model_calls == 2
    assert len(refunds.model.requests) == 2
    rows = [json.loads(r.data) for r in await store.events("r1") if r.kind == "model_called"]
    # the interrupted run's own call, its replay on resume, then the next turn
    assert [(r["step"], r["replayed"]) for r in rows] == [(1, False), (1, True), (2, False)]


async def test_gateway_interrupted_step_keeps_the_calls_that_completed(store: Store) -> None:
    """A call that completed beside an in-doubt one is replayed on resume, not rerun."""
    noted: list[str] = []
    refunds: list[str] = []

    @tool
    async def note(text: str) -> str:
        noted.append(text)
        return "noted"

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def refund(order_id: str) -> str:
        refunds.append(order_id)
        await anyio.sleep(5)
        return "refunded"

    model = ScriptedModel(
        {
            "clerk": calling(ToolCall(name="note", arguments={"text": "hi"})),
            "payer": calling(ToolCall(name="refund", arguments={"order_id": "42"})),
        }
    )
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("clerk", model=model, tools=[note]))
    graph.add_node(Agent("payer", model=model, tools=[refund], output="resolution"))
    graph.add_edge(START, "clerk")
    graph.add_edge(START, "payer")
    graph.add_edge("clerk", END)
    graph.add_edge("payer", END)
    app = graph.compile(approvals=None, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        assert request.node == "payer"
        second = await app.resume("r1", answers={request.id: Done("refunded by hand")})
    assert second.status is RunStatus.COMPLETED
    assert (noted, refunds) == (["hi"], ["42"])
    assert len(model.requests) == 4
    clerk_last = [r for r in model.requests if r.agent == "clerk"][-1]
    assert json.loads(tool_messages(clerk_last.messages)[0].content) == {"result": "noted"}


async def test_gateway_retried_call_in_doubt_again_asks_again(store: Store) -> None:
    """A call retried with Retry() that is in doubt again opens a new request."""
    refunds = Refunds(store, slow=2)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await refunds.app.resume("r1", answers={request.id: Retry()})
        assert second.status is RunStatus.INTERRUPTED
        assert refunds.runs == ["42", "42"]
        (again,) = second.pending
        assert await refunds.open_ids() == [again.id]
        third = await refunds.app.resume("r1", answers={again.id: Done("refunded by hand")})
    assert third.status is RunStatus.COMPLETED


async def test_gateway_requests_can_be_answered_one_at_a_time(store: Store) -> None:
    """Two calls in doubt in one step: answering one leaves the run waiting on the other."""
    runs: list[str] = []

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def refund(order_id: str) -> str:
        runs.append(order_id)
        await anyio.sleep(5)
        return "refunded"

    def refunding(order_id: str) -> list[ModelResponse | str]:
        return calling(ToolCall(name="refund", arguments={"order_id": order_id}))

    model = ScriptedModel({"a": refunding("1"), "b": refunding("2")})
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, tools=[refund], output="resolution"))
    graph.add_node(Agent("b", model=model, tools=[refund], output="note"))
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge("a", END)
    graph.add_edge("b", END)
    app = graph.compile(approvals=None, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        by_node = {r.node: r.id for r in first.pending}
        assert sorted(by_node) == ["a", "b"]
        second = await app.resume("r1", answers={by_node["a"]: Done("refunded 1")})
        assert [r.id for r in second.pending] == [by_node["b"]]
        third = await app.resume("r1", answers={by_node["b"]: Done("refunded 2")})
    assert third.status is RunStatus.COMPLETED
    assert (third.state.resolution, third.state.note) == ("done", "done")
    assert sorted(runs) == ["1", "2"]


async def test_gateway_answer_is_recorded_as_an_event(store: Store) -> None:
    """An operator's answer is in the run's history, apart from the replay it causes."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        first = await refunds.app.run(S(), run_id="r1")
        (request,) = first.pending
        await refunds.app.resume("r1", answers={request.id: Done("refunded by hand")})
    answered = [e for e in await store.events("r1") if e.kind == "request_answered"]
    assert len(answered) == 1
    data = json.loads(answered[0].data)
    assert (data["request_id"], data["request_kind"], data["node"]) == (
        request.id,
        "in_doubt",
        "billing",
    )
    assert json.loads(data["answer"]) == {"answer": "done", "result": "refunded by hand"}


async def test_gateway_interrupted_step_events_come_before_the_run_end(store: Store) -> None:
    """The calls of a step that stopped for a person are stored before run_finished."""
    refunds = Refunds(store)
    with anyio.fail_after(5):
        await refunds.app.run(S(), run_id="r1")
    kinds = [e.kind for e in await store.events("r1")]
    assert kinds[-1] == "run_finished"
    assert kinds.index("tool_called") < kinds.index("run_finished")
