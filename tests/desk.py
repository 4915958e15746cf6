"""The refund desk the approval tests share (tests/safeguards/test_approvals.py and
tests/runtime/gateway/test_approval.py): its tools, the agents and nodes calling them, and
reading what the requests and tool messages say."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from pydantic import BaseModel

from orchestra import END, START, Agent, Effect, Graph, Request, tool
from orchestra.models import Message, ModelRequest, ModelResponse, ScriptedModel, ToolCall


class S(BaseModel):
    resolution: str | None = None
    note: str = ""


class Desk:
    """Three tools that record each run: ``lookup`` (read), ``note`` (write) and ``refund``
    (irreversible), plus a slow irreversible ``wire`` that always times out."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, Any]] = []

        @tool(effect=Effect.READ)
        async def lookup(order_id: str) -> str:
            self.ran.append(("lookup", order_id))
            return f"order {order_id}"

        @tool
        async def note(text: str) -> str:
            self.ran.append(("note", text))
            return "noted"

        @tool(effect=Effect.IRREVERSIBLE)
        async def refund(order_id: str, amount: float) -> str:
            self.ran.append(("refund", (order_id, amount)))
            return f"refunded {amount:g} on {order_id}"

        @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
        async def wire(account: str) -> str:
            self.ran.append(("wire", account))
            await anyio.sleep(5)
            return "wired"

        self.lookup, self.note, self.refund, self.wire = lookup, note, refund, wire
        self.tools = (lookup, note, refund, wire)

    def names(self) -> list[str]:
        return [name for name, _ in self.ran]


def call(name: str, call_id: str, **arguments: Any) -> ToolCall:
    return ToolCall(name=name, arguments=arguments, id=call_id)


def turn(*calls: ToolCall) -> ModelResponse:
    return ModelResponse(tool_calls=calls)


REFUND = call("refund", "c1", order_id="7", amount=250)


def billing(desk: Desk, script: Sequence[Any], **options: Any) -> tuple[Any, ScriptedModel]:
    """Compile START -> billing (an agent with every desk tool) -> END."""
    model = ScriptedModel({"billing": list(script)})
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("billing", model=model, tools=desk.tools, output="resolution"))
    graph.add_edge(START, "billing")
    graph.add_edge("billing", END)
    return graph.compile(**options), model


def pair(desk: Desk, scripts: Mapping[str, Sequence[Any]], **options: Any) -> tuple[Any, Any]:
    """Compile two agents ``a`` and ``b`` that run in the same step."""
    model = ScriptedModel({name: list(script) for name, script in scripts.items()})
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, tools=desk.tools, output="resolution"))
    graph.add_node(Agent("b", model=model, tools=desk.tools, output="note"))
    for name in ("a", "b"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    return graph.compile(**options), model


def paying(desk: Desk, fn: Any, **options: Any) -> Any:
    """Compile START -> payer -> END where ``payer`` is the plain node ``fn`` with every
    desk tool."""
    graph: Graph[S] = Graph(S)
    graph.add_node("payer", fn, tools=desk.tools)
    graph.add_edge(START, "payer")
    graph.add_edge("payer", END)
    return graph.compile(**options)


def tool_message(request: ModelRequest, call_id: str) -> dict[str, Any]:
    """The content of the tool message answering ``call_id`` in ``request``."""
    found: list[Message] = [
        m for m in request.messages if m.role == "tool" and m.tool_call_id == call_id
    ]
    assert len(found) == 1, found
    content: dict[str, Any] = json.loads(found[0].content)
    return content


def held_tools(pending: Sequence[Request]) -> list[str]:
    assert all(r.kind == "approval" for r in pending)
    return sorted(r.payload["tool"] for r in pending)
