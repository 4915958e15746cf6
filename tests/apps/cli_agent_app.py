"""Agent graphs for the operator CLI tests, at module level so ``app_ref`` resolves.

``desk``: triage looks an order up, asks for ``refund`` (not on its allowlist: denied) and
hands over to billing, which refunds and answers. ``stuck``: one agent whose irreversible
``wire`` call runs past its timeout, so the run stops ``interrupted`` with an in-doubt request.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from pydantic import BaseModel

from orchestra import END, START, Agent, Effect, Graph, append, tool
from orchestra.models import ModelResponse, ScriptedModel, ToolCall


class Ticket(BaseModel):
    request: str = "refund order 42"
    notes: Annotated[list[str], append] = []
    resolution: str | None = None


refunds: list[str] = []  # order ids refunded, in this process


@tool(effect=Effect.READ)
async def lookup_order(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "amount": 30.0}


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"order:{a['order_id']}"})
async def refund(order_id: str, amount: float) -> str:
    refunds.append(order_id)
    return f"refunded {amount}"


@tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
async def wire(account: str, amount: float) -> str:
    await anyio.sleep(10)  # never answers in time: the call is in doubt
    return "wired"


def call(name: str, **arguments: Any) -> ModelResponse:
    return ModelResponse(tool_calls=(ToolCall(name=name, arguments=arguments),))


desk_model = ScriptedModel(
    {
        "triage": [
            call("lookup_order", order_id="42"),
            call("refund", order_id="42", amount=30),
            "billing",
        ],
        "billing": [call("refund", order_id="42", amount=30), "Refunded order 42."],
    }
)


def build_desk() -> Graph[Ticket]:
    graph = Graph(Ticket, name="desk")
    graph.add_node(Agent("triage", model=desk_model, tools=[lookup_order]))
    graph.add_node(
        Agent("billing", model=desk_model, tools=[lookup_order, refund], output="resolution")
    )
    graph.add_edge(START, "triage")
    graph.add_edge("triage", "billing")
    graph.add_edge("billing", END)
    return graph


stuck_model = ScriptedModel({"payer": [call("wire", account="acme", amount=99.5), "Wired."]})


def build_stuck() -> Graph[Ticket]:
    graph = Graph(Ticket, name="stuck")
    graph.add_node(Agent("payer", model=stuck_model, tools=[wire], output="resolution"))
    graph.add_edge(START, "payer")
    graph.add_edge("payer", END)
    return graph


desk = build_desk().compile(approvals=None)
stuck = build_stuck().compile(approvals=None)
