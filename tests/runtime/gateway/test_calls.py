"""The gateway's calls: permission before validation before execution, and ctx.call_tool from
plain nodes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import Order, streamed

from orchestra import END, START, Agent, Effect, Graph, NodeContext, NodeError, RunStatus, tool
from orchestra.errors import ToolArgumentsError, ToolCallError, ToolDeniedError
from orchestra.events import ToolCalled
from orchestra.models import ScriptedModel, ToolCall
from orchestra.store import Store
from runtime.gateway.graphs import S, calling, one_node, single_agent, tool_messages

pytestmark = pytest.mark.anyio


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
