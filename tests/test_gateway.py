"""The tool gateway: permission before validation before execution, ctx.call_tool from plain
nodes, the ledger's replay, and in-doubt calls resolved by an operator's answers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Abort,
    Agent,
    Done,
    Effect,
    Graph,
    NodeContext,
    NodeError,
    Retry,
    RetryPolicy,
    RunOutcome,
    RunStatus,
    tool,
)
from orchestra.errors import AnswerError, ToolArgumentsError, ToolCallError, ToolDeniedError
from orchestra.events import Event, ToolCalled
from orchestra.models import Message, ModelResponse, ScriptedModel, ToolCall
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    request: str = ""
    resolution: str | None = None
    note: str = ""


class Order(BaseModel):
    order_id: str
    amount: float


def calling(*calls: ToolCall, then: str = "done") -> list[ModelResponse | str]:
    """A script: one turn proposing ``calls``, then a final answer."""
    return [ModelResponse(tool_calls=calls), then]


def single_agent(agent: Agent, **options: Any) -> Any:
    """Compile START -> agent -> END."""
    graph: Graph[S] = Graph(S)
    graph.add_node(agent)
    graph.add_edge(START, agent.name)
    graph.add_edge(agent.name, END)
    return graph.compile(approvals=None, **options)


def one_node(fn: Any, tools: Sequence[Any] = (), **options: Any) -> Any:
    """Compile START -> n -> END where ``n`` may call ``tools``."""
    graph: Graph[S] = Graph(S)
    graph.add_node("n", fn, tools=tools)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    return graph.compile(approvals=None, **options)


async def streamed(app: Any, state: BaseModel) -> tuple[list[Event], RunOutcome[Any]]:
    """Run ``app`` as a stream; return its events and its outcome."""
    events = [event async for event in app.stream(state)]
    outcome = events[-1].outcome
    assert outcome is not None
    return events, outcome


def tool_messages(messages: Sequence[Message]) -> list[Message]:
    return [m for m in messages if m.role == "tool"]


# -- permission -----------------------------------------------------------------------------


async def test_gateway_denied_call_never_runs(store: Store) -> None:
    """A tool not on the agent's allowlist is not run, even if another node may use it."""
    ran: list[str] = []

    @tool
    async def lookup(order_id: str) -> str:
        return f"order {order_id}"

    @tool
    async def delete_db() -> str:
        ran.append("delete_db")
        return "deleted"

    async def admin(state: S, ctx: NodeContext) -> None:
        return None

    model = ScriptedModel({"billing": calling(ToolCall(name="delete_db", id="c1"))})
    graph: Graph[S] = Graph(S)
    graph.add_node("admin", admin, tools=[delete_db])
    graph.add_node(Agent("billing", model=model, tools=[lookup], output="resolution"))
    graph.add_edge(START, "admin")
    graph.add_edge("admin", "billing")
    graph.add_edge("billing", END)
    outcome = await graph.compile(approvals=None, store=store).run(S(), run_id="r1")
    assert outcome.status is RunStatus.COMPLETED
    assert ran == []
    assert outcome.usage.tool_calls == 0


async def test_gateway_denied_call_is_recorded_as_an_event(store: Store) -> None:
    """A denied call is stored as a tool_called event with status denied."""

    @tool
    async def lookup(order_id: str) -> str:
        return order_id

    model = ScriptedModel({"billing": calling(ToolCall(name="delete_db", id="c1"))})
    app = single_agent(Agent("billing", model=model, tools=[lookup]), store=store)
    await app.run(S(), run_id="r1")
    rows = [r for r in await store.events("r1") if r.kind == "tool_called"]
    assert len(rows) == 1
    data = json.loads(rows[0].data)
    assert (rows[0].step, data["tool"], data["node"]) == (1, "delete_db", "billing")
    assert (data["status"], data["call_id"]) == ("denied", "c1")
    assert "not available to 'billing'" in data["error"]


async def test_gateway_denied_call_is_returned_to_the_agent() -> None:
    """The agent's next request carries the denial as a tool message."""

    @tool
    async def lookup(order_id: str) -> str:
        return order_id

    model = ScriptedModel({"billing": calling(ToolCall(name="delete_db", id="c1"))})
    await single_agent(Agent("billing", model=model, tools=[lookup])).run(S())
    (message,) = tool_messages(model.requests[1].messages)
    assert (message.name, message.tool_call_id) == ("delete_db", "c1")
    content = json.loads(message.content)
    assert content["status"] == "denied"
    assert "tool 'delete_db' is not available to 'billing'" in content["error"]
    assert "'lookup'" in content["error"]


async def test_gateway_denied_call_does_not_stop_the_allowed_ones() -> None:
    """In one turn, an allowed call runs and a denied one does not."""
    ran: list[str] = []

    @tool
    async def lookup(order_id: str) -> str:
        ran.append(order_id)
        return f"order {order_id}"

    model = ScriptedModel(
        {
            "billing": calling(
                ToolCall(name="lookup", arguments={"order_id": "7"}, id="ok"),
                ToolCall(name="refund", arguments={"order_id": "7"}, id="no"),
            )
        }
    )
    outcome = await single_agent(Agent("billing", model=model, tools=[lookup])).run(S())
    assert ran == ["7"]
    assert outcome.usage.tool_calls == 1
    statuses = {
        m.tool_call_id: json.loads(m.content).get("status", "ok")
        for m in tool_messages(model.requests[1].messages)
    }
    assert statuses == {"ok": "ok", "no": "denied"}


async def test_gateway_checks_permission_before_arguments() -> None:
    """A call to a tool not allowed, with bad arguments too, is reported as denied."""

    @tool
    async def lookup(order_id: str) -> str:
        return order_id

    @tool
    async def refund(order_id: str, amount: float) -> str:
        return "refunded"

    async def other(state: S, ctx: NodeContext) -> None:
        return None

    model = ScriptedModel({"billing": calling(ToolCall(name="refund", arguments="not json"))})
    graph: Graph[S] = Graph(S)
    graph.add_node("other", other, tools=[refund])
    graph.add_node(Agent("billing", model=model, tools=[lookup]))
    graph.add_edge(START, "other")
    graph.add_edge("other", "billing")
    graph.add_edge("billing", END)
    events, _ = await streamed(graph.compile(approvals=None), S())
    (called,) = [e for e in events if isinstance(e, ToolCalled)]
    assert called.status == "denied"


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param("not json {", "arguments are not valid JSON", id="not-json"),
        pytest.param("[1, 2]", "arguments must be a JSON object, got list", id="json-array"),
        pytest.param('"42"', "arguments must be a JSON object, got str", id="json-string"),
        pytest.param({"order_id": "42", "amount": "lots"}, "amount:", id="wrong-type"),
        pytest.param({"order_id": "42"}, "amount: Field required", id="missing"),
        pytest.param("", "order_id: Field required", id="empty-text"),
        pytest.param(
            {"order_id": "42", "amount": 1, "admin": True},
            "admin: Extra inputs are not permitted",
            id="extra",
        ),
    ],
)
async def test_gateway_invalid_arguments_never_run(arguments: Any, error: str) -> None:
    """Malformed arguments give status invalid_arguments; the tool does not run."""
    ran: list[Any] = []

    @tool
    async def refund(order_id: str, amount: float) -> str:
        ran.append(order_id)
        return "refunded"

    model = ScriptedModel({"billing": calling(ToolCall(name="refund", arguments=arguments))})
    app = single_agent(Agent("billing", model=model, tools=[refund]))
    events, outcome = await streamed(app, S())
    assert outcome.status is RunStatus.COMPLETED
    assert ran == []
    (called,) = [e for e in events if isinstance(e, ToolCalled)]
    assert called.status == "invalid_arguments"
    assert called.error is not None
    assert error in called.error
    assert outcome.usage.tool_calls == 0


async def test_gateway_invalid_arguments_error_reaches_the_model() -> None:
    """The validation error is sent back to the model as the call's tool message."""

    @tool
    async def refund(order_id: str, amount: float) -> str:
        return "refunded"

    call = ToolCall(name="refund", arguments={"order_id": "42", "amount": "lots"}, id="c1")
    model = ScriptedModel({"billing": calling(call)})
    await single_agent(Agent("billing", model=model, tools=[refund])).run(S())
    (message,) = tool_messages(model.requests[1].messages)
    content = json.loads(message.content)
    assert (message.name, message.tool_call_id) == ("refund", "c1")
    assert content["status"] == "invalid_arguments"
    assert "amount" in content["error"]
    assert "the call was not made" in content["error"]


async def test_gateway_arguments_as_json_text_are_parsed() -> None:
    """Arguments given as JSON object text are parsed, validated and the call is made."""
    ran: list[tuple[str, float]] = []

    @tool
    async def refund(order_id: str, amount: float) -> str:
        ran.append((order_id, amount))
        return "refunded"

    model = ScriptedModel(
        {"billing": calling(ToolCall(name="refund", arguments='{"order_id": "9", "amount": 2}'))}
    )
    await single_agent(Agent("billing", model=model, tools=[refund])).run(S())
    assert ran == [("9", 2.0)]


# -- ctx.call_tool from a plain node --------------------------------------------------------


async def test_gateway_node_call_returns_the_validated_result() -> None:
    """ctx.call_tool on the node's allowlist returns the tool's (validated) result."""

    @tool
    async def total(a: int, b: int) -> int:
        return a + b

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        value = await ctx.call_tool("total", {"a": "2"}, b=3)
        return {"resolution": f"{type(value).__name__}:{value}"}

    outcome = await one_node(node, [total]).run(S())
    assert outcome.state.resolution == "int:5"


async def test_gateway_node_call_returns_a_model_instance() -> None:
    """A tool returning a pydantic model gives the node an instance, not a dict."""

    @tool
    async def fetch(order_id: str) -> Order:
        return Order(order_id=order_id, amount=4)

    seen: list[Any] = []

    async def node(state: S, ctx: NodeContext) -> None:
        seen.append(await ctx.call_tool(fetch, order_id="42"))

    await one_node(node, [fetch]).run(S())
    assert seen == [Order(order_id="42", amount=4.0)]
    assert isinstance(seen[0], Order)


async def test_gateway_node_call_to_a_tool_not_given_raises_tool_denied() -> None:
    """A node calling a tool not on its own allowlist gets ToolDeniedError; it never runs."""
    ran: list[str] = []

    @tool
    async def allowed() -> str:
        return "ok"

    @tool
    async def forbidden() -> str:
        ran.append("forbidden")
        return "bad"

    async def other(state: S, ctx: NodeContext) -> None:
        return None

    errors: list[ToolCallError] = []

    async def node(state: S, ctx: NodeContext) -> None:
        try:
            await ctx.call_tool(forbidden)
        except ToolDeniedError as exc:
            errors.append(exc)

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, tools=[allowed])
    graph.add_node("other", other, tools=[forbidden])
    graph.add_edge(START, "n")
    graph.add_edge("n", "other")
    graph.add_edge("other", END)
    outcome = await graph.compile(approvals=None).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert ran == []
    (error,) = errors
    assert (error.tool, error.status) == ("forbidden", "denied")
    assert "its tools: 'allowed'" in str(error)


async def test_gateway_node_without_tools_is_denied_every_tool() -> None:
    """A node given no tools is denied any call, and the error says it has none."""

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            await ctx.call_tool("anything")
        except ToolDeniedError as exc:
            return {"resolution": str(exc)}
        return {"resolution": "ran"}

    outcome = await one_node(node).run(S())
    assert outcome.state.resolution is not None
    assert "its tools: none" in outcome.state.resolution


async def test_gateway_node_call_with_bad_arguments_raises_tool_arguments_error() -> None:
    """Arguments that do not fit raise ToolArgumentsError (a ToolCallError); no run."""
    ran: list[int] = []

    @tool
    async def square(x: int) -> int:
        ran.append(x)
        return x * x

    errors: list[ToolCallError] = []

    async def node(state: S, ctx: NodeContext) -> None:
        try:
            await ctx.call_tool(square, x="not a number")
        except ToolArgumentsError as exc:
            errors.append(exc)

    await one_node(node, [square]).run(S())
    assert ran == []
    (error,) = errors
    assert isinstance(error, ToolCallError)
    assert (error.tool, error.status) == ("square", "invalid_arguments")
    assert "x:" in error.detail


async def test_gateway_node_call_of_a_failing_tool_raises_tool_call_error() -> None:
    """A tool that raises gives the node ToolCallError with status error."""

    @tool
    async def broken() -> str:
        raise RuntimeError("backend down")

    errors: list[ToolCallError] = []

    async def node(state: S, ctx: NodeContext) -> None:
        try:
            await ctx.call_tool(broken)
        except ToolCallError as exc:
            errors.append(exc)

    await one_node(node, [broken]).run(S())
    (error,) = errors
    assert type(error) is ToolCallError
    assert (error.status, error.detail) == ("error", "RuntimeError: backend down")


async def test_gateway_uncaught_tool_error_fails_the_node() -> None:
    """A ToolCallError the node does not catch fails it with NodeError, cause kept."""

    async def node(state: S, ctx: NodeContext) -> None:
        await ctx.call_tool("missing")

    outcome = await one_node(node).run(S())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, NodeError)
    assert isinstance(outcome.error.__cause__, ToolDeniedError)
    assert outcome.error.node == "n"


async def test_gateway_node_calls_are_events() -> None:
    """Every ctx.call_tool call, allowed or not, is a tool_called event of its node."""

    @tool
    async def ping() -> str:
        return "pong"

    async def node(state: S, ctx: NodeContext) -> None:
        await ctx.call_tool(ping)
        with pytest.raises(ToolDeniedError):
            await ctx.call_tool("pong")

    events, _ = await streamed(one_node(node, [ping]), S())
    called = [(e.node, e.tool, e.status) for e in events if isinstance(e, ToolCalled)]
    assert called == [("n", "ping", "ok"), ("n", "pong", "denied")]


# -- the ledger -----------------------------------------------------------------------------


async def test_gateway_retried_node_replays_its_recorded_call() -> None:
    """A node retried after its tool call replays the call instead of running it again."""
    ran: list[int] = []
    attempts: list[int] = []

    @tool
    async def charge(amount: int) -> str:
        ran.append(amount)
        return f"charged {amount}"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool(charge, amount=5)
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("flaky after the charge")
        return {"resolution": result}

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, tools=[charge], retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    app = graph.compile(approvals=None)
    events, outcome = await streamed(app, S())
    assert outcome.state.resolution == "charged 5"
    assert ran == [5]
    replays = [e.replayed for e in events if isinstance(e, ToolCalled)]
    assert replays == [False, True]


async def test_gateway_resumed_step_replays_recorded_calls(store: Store) -> None:
    """A failed step resumed later replays the tool calls it had made; they do not rerun."""
    ran: list[int] = []
    fail = [True]

    @tool
    async def charge(amount: int) -> str:
        ran.append(amount)
        return f"charged {amount}"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool(charge, amount=5)
        if fail[0]:
            raise ConnectionError("crashed after the charge")
        return {"resolution": result}

    app = one_node(node, [charge], store=store)
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.FAILED
    fail[0] = False
    second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert second.state.resolution == "charged 5"
    assert ran == [5]


def flaky_tool(calls: list[int]) -> Any:
    """A tool that raises ConnectionError on its first call only."""

    @tool
    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("backend down")
        return "ok"

    return flaky


async def test_gateway_retried_node_runs_a_failed_tool_call_again() -> None:
    """A node retried after its tool failed calls the tool again."""
    calls: list[int] = []
    flaky = flaky_tool(calls)

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(flaky)}

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, tools=[flaky], retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    outcome = await graph.compile(approvals=None).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert calls == [1, 1]


async def test_gateway_resume_runs_a_failed_tool_call_again(store: Store) -> None:
    """Resuming a run that failed on a tool error calls the tool again."""
    calls: list[int] = []
    flaky = flaky_tool(calls)

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(flaky)}

    app = one_node(node, [flaky], store=store)
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.FAILED
    second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert calls == [1, 1]


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


async def test_gateway_denied_calls_are_counted_apart_from_calls_made() -> None:
    """usage.denied_calls counts allowlist refusals; tool_calls only calls that ran."""

    @tool(effect=Effect.READ)
    async def look(order_id: str) -> str:
        return order_id

    model = ScriptedModel(
        {
            "a": calling(
                ToolCall(name="look", arguments={"order_id": "1"}),
                ToolCall(name="refund", arguments={"order_id": "1"}),
            )
        }
    )
    outcome = await single_agent(Agent("a", model=model, tools=[look])).run(S())
    assert (outcome.usage.tool_calls, outcome.usage.denied_calls) == (1, 1)
    assert outcome.usage.by_node["a"]["denied_calls"] == 1
