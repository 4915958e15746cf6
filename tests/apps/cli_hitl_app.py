"""Graphs that stop for a person, for the operator CLI's answer verbs (at module level, so
``app_ref`` resolves).

- ``desk``: agent billing proposes an irreversible ``refund``, held for approval (the default
  policy); its answer is what its tool messages said. ``double``: two refunds at once, each
  held. ``expiring``: the same as ``desk``, with approvals
  that expire after an hour. ``orphan``: the same, with an app reference that cannot be
  imported.
- ``shipping``: a node asks ``ctx.interrupt`` for a :class:`Shipping` (a pydantic model).
- ``pricing``: agent pricer proposes two prices for one sku in one turn; arbitration
  escalates the conflict to a person.
- ``payer``: agent payer's irreversible ``wire`` runs past its timeout: an in-doubt call.
- ``gated``: a plain node behind ``interrupt_before``.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Approvals,
    Arbitration,
    Effect,
    Graph,
    NodeContext,
    append,
    tool,
)
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall


class Ticket(BaseModel):
    request: str = "refund order 42"
    notes: Annotated[list[str], append] = []
    resolution: str | None = None


class Shipping(BaseModel):
    carrier: str
    days: int


refunds: list[tuple[str, float]] = []  # (order id, amount) refunded, in this process
prices: list[tuple[str, float]] = []  # (sku, price) set, in this process


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"order:{a['order_id']}"})
async def refund(order_id: str, amount: float) -> str:
    refunds.append((order_id, amount))
    return f"refunded {amount}"


@tool(effect=Effect.WRITE, resources=lambda a: {f"sku:{a['sku']}"})
async def set_price(sku: str, price: float) -> str:
    prices.append((sku, price))
    return f"{sku} costs {price}"


@tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
async def wire(account: str, amount: float) -> str:
    await anyio.sleep(10)  # never answers in time: the call is in doubt
    return "wired"


def _calls(*calls: tuple[str, dict[str, Any]]) -> ModelResponse:
    return ModelResponse(tool_calls=tuple(ToolCall(name=n, arguments=a) for n, a in calls))


def _script(first: ModelResponse) -> Any:
    """First turn: ``first``; then answer with what the tools said (so the final state
    shows what the agent saw: a result, a rejection, a conflict)."""

    def reply(request: ModelRequest) -> ModelResponse | str:
        if request.turn == 0:
            return first
        return " | ".join(m.content for m in request.messages if m.role == "tool")

    return reply


refund_model = ScriptedModel(_script(_calls(("refund", {"order_id": "42", "amount": 30.0}))))
pricing_model = ScriptedModel(
    _script(
        _calls(
            ("set_price", {"sku": "A1", "price": 9.5}),
            ("set_price", {"sku": "A1", "price": 8.0}),
        )
    )
)
double_model = ScriptedModel(
    _script(
        _calls(
            ("refund", {"order_id": "42", "amount": 30.0}),
            ("refund", {"order_id": "43", "amount": 5.0}),
        )
    )
)
payer_model = ScriptedModel(_script(_calls(("wire", {"account": "acme", "amount": 99.5}))))


def _agent_graph(name: str, agent: Agent) -> Graph[Ticket]:
    graph = Graph(Ticket, name=name)
    graph.add_node(agent)
    graph.add_edge(START, agent.name)
    graph.add_edge(agent.name, END)
    return graph


def build_desk() -> Graph[Ticket]:
    return _agent_graph(
        "desk", Agent("billing", model=refund_model, tools=[refund], output="resolution")
    )


async def ask(state: Ticket, ctx: NodeContext) -> dict[str, Any]:
    shipping = await ctx.interrupt("Which carrier, and how many days?", schema=Shipping)
    return {"resolution": f"{shipping.carrier} in {shipping.days} days"}


def build_shipping() -> Graph[Ticket]:
    graph = Graph(Ticket, name="shipping")
    graph.add_node("ask", ask)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    return graph


async def work(state: Ticket, ctx: NodeContext) -> dict[str, Any]:
    return {"resolution": "worked"}


def build_gated() -> Graph[Ticket]:
    graph = Graph(Ticket, name="gated")
    graph.add_node("work", work)
    graph.add_edge(START, "work")
    graph.add_edge("work", END)
    return graph


desk = build_desk().compile()
double = _agent_graph(
    "double", Agent("billing", model=double_model, tools=[refund], output="resolution")
).compile()
expiring = build_desk().compile(approvals=Approvals(expires_after=3600))
orphan = build_desk().compile(app_ref="cli_hitl_gone:app")
shipping = build_shipping().compile()
pricing = _agent_graph(
    "pricing", Agent("pricer", model=pricing_model, tools=[set_price], output="resolution")
).compile(arbitration=Arbitration(policy="escalate"))
payer = _agent_graph(
    "payer", Agent("payer", model=payer_model, tools=[wire], output="resolution")
).compile(approvals=None)
gated = build_gated().compile(interrupt_before=["work"])
