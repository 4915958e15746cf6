"""Support desk: two agents, tools with declared effects, and a durable record of every call.

Run it with ``python examples/support_desk.py`` (the run is stored in a temporary database),
or ``python examples/support_desk.py support_desk.db`` to keep the database and look at the
run afterwards with ``orchestra --db support_desk.db show RUN``. It shows:

- agents on a scripted model: ``ScriptedModel`` with one script per agent, indexed by the
  agent's turn, so the run is deterministic and a resumed run gets the same answers;
- tools with effects: ``lookup_order`` only reads; ``refund`` is irreversible, names the
  resource it touches (``order:42``), and passes the call's idempotency key (from its
  ``ToolContext``) to the payment system, so a retried request cannot refund twice;
- an allowlist: triage asks for ``refund``, which is not one of its tools; the gateway denies
  the call without running it, and triage hands the ticket to billing instead;
- a typed state: the triage agent's answer is validated against a pydantic model (its
  ``notes`` are appended by the field's reducer), billing's final answer becomes
  ``resolution``, and a route sends the ticket to ``billing`` or ends the run;
- approval: ``refund`` is irreversible, so the run stops ``interrupted`` before it runs, with
  an approval request naming the exact call; the example approves it (an operator would run
  ``orchestra approve RUN REQ``) and resumes: the refund runs once, and the calls made
  before the interrupt are replayed from the ledger, not made again;
- what the store keeps: status, usage (tokens, model and tool calls, per agent) and one event
  per model and tool call.

No model or API key is needed: swap ``ScriptedModel`` for ``OpenAICompatible(base_url=...,
model=...)`` to run the same graph on a real model.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import structlog
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Approve,
    Budget,
    Effect,
    Graph,
    ToolContext,
    append,
    tool,
)
from orchestra.models import ModelResponse, ScriptedModel, ToolCall
from orchestra.store import SQLiteStore


class Ticket(BaseModel):
    """The state both agents read; they change it only through their validated answers."""

    request: str
    notes: Annotated[list[str], append] = []  # each write adds one note
    queue: Literal["billing", "closed"] | None = None  # where triage sent the ticket
    resolution: str | None = None  # billing's final answer


class Triage(BaseModel):
    """Triage's final answer: a JSON object whose fields are written to the state."""

    queue: Literal["billing", "closed"]
    notes: str  # one note; the state's reducer appends it to the ticket's notes


# -- the outside world: an order database and a payment system (fakes, in memory) ------------

ORDERS = {"42": {"order_id": "42", "item": "kettle", "amount": 30.0, "status": "delivered"}}


class PaymentSystem:
    """Stands in for a payment provider that deduplicates requests by idempotency key."""

    def __init__(self) -> None:
        self.refunds: dict[str, dict[str, Any]] = {}  # idempotency key -> refund
        self.requests = 0

    async def refund(self, order_id: str, amount: float, *, idempotency_key: str) -> str:
        self.requests += 1
        await anyio.sleep(0.01)  # the network
        if idempotency_key not in self.refunds:  # a repeated request refunds nothing more
            number = len(self.refunds) + 1
            self.refunds[idempotency_key] = {
                "receipt": f"rf_{number:04d}",
                "order_id": order_id,
                "amount": amount,
            }
        return self.refunds[idempotency_key]["receipt"]


PAYMENTS = PaymentSystem()


@tool(effect=Effect.READ)
async def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by its id: item, amount paid and delivery status."""
    return ORDERS.get(order_id, {"order_id": order_id, "error": "no such order"})


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"order:{a['order_id']}"})
async def refund(order_id: str, amount: float, ctx: ToolContext) -> str:
    """Refund an amount of an order to the customer. This cannot be undone."""
    # the key is the same every time this call is attempted, in this process or another
    return await PAYMENTS.refund(order_id, amount, idempotency_key=ctx.idempotency_key)


# -- the agents: what the (scripted) model answers at each of their turns ---------------------


def call(tool: str, **arguments: Any) -> ModelResponse:
    """A model turn that proposes one tool call."""
    return ModelResponse(tool_calls=(ToolCall(name=tool, arguments=arguments),))


MODEL = ScriptedModel(
    {
        "triage": [
            call("lookup_order", order_id="42"),
            # triage has no refund tool: this call is denied, and triage re-plans
            call("refund", order_id="42", amount=30),
            json.dumps({"queue": "billing", "notes": "order 42 (kettle, $30) arrived broken"}),
        ],
        "billing": [
            call("lookup_order", order_id="42"),
            call("refund", order_id="42", amount=30),
            "Refunded $30.00 for order 42; the customer keeps the kettle.",
        ],
    }
)

triage = Agent(
    "triage",
    model=MODEL,
    tools=[lookup_order],  # its allowlist: it may look orders up, nothing more
    instructions="Read the ticket, look up the order, and send money matters to billing.",
    output=Triage,
)
billing = Agent(
    "billing",
    model=MODEL,
    tools=[lookup_order, refund],
    instructions="Resolve billing tickets. Refund only what the customer paid.",
    output="resolution",
)


def route(ticket: Ticket) -> str:
    """After triage: billing, or the end (both targets are declared below)."""
    return "billing" if ticket.queue == "billing" else END


def build_graph() -> Graph[Ticket]:
    graph = Graph(Ticket, name="support_desk")
    graph.add_node(triage)
    graph.add_node(billing)
    graph.add_edge(START, "triage")
    graph.add_route("triage", route, targets=["billing", END])
    graph.add_edge("billing", END)
    return graph


# module level, so `orchestra resume RUN` can import it again (the store is bound per run)
app = build_graph().compile(budget=Budget(steps=20))


# -- running it and showing what was recorded -------------------------------------------------


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe(kind: str, data: dict[str, Any]) -> str | None:
    """One timeline line for a stored model or tool call event (None for other events)."""
    replayed = " (replayed from the ledger)" if data.get("replayed") else ""
    if kind == "model_called":
        tokens = f"{data['input_tokens']} tokens in, {data['output_tokens']} out"
        return f"{data['node']:<8} model {data['model']}: {tokens}{replayed}"
    if kind == "tool_called":
        error = f": {data['error']}" if data.get("error") else ""
        return f"{data['node']:<8} tool  {data['tool']} -> {data['status']}{error}{replayed}"
    if kind == "approval_decided":
        return f"{data['node']:<8} approval of {data['tool']}: {data['decision']}"
    return None


async def main(path: Path) -> str:
    """Run one ticket on the database at ``path``; print what happened; return the run id."""
    async with SQLiteStore(path) as store:
        desk = app.with_store(store)
        outcome = await desk.run(Ticket(request="My order 42 arrived broken. Refund, please."))
        for request in outcome.pending:  # the refund waits for a person
            call = request.payload
            print(f"waiting for approval: {call['tool']}({call['arguments']}) [{request.id}]")
            print(f"  (an operator: orchestra approve {outcome.run_id} {request.id})")
        outcome = await desk.resume(
            outcome.run_id, answers={request.id: Approve() for request in outcome.pending}
        )
        outcome.raise_for_status()
        events = await store.events(outcome.run_id)

    usage = outcome.usage
    print(f"run {outcome.run_id}: {outcome.status} after {outcome.steps} steps")
    print(f"  queue       {outcome.state.queue}")
    print(f"  notes       {outcome.state.notes}")
    print(f"  resolution  {outcome.state.resolution}")
    print(
        f"usage: {usage.tokens} tokens ({usage.input_tokens} in, {usage.output_tokens} out), "
        f"{count(usage.model_calls, 'model call')}, {count(usage.tool_calls, 'tool call')}"
    )
    for agent, used in usage.by_node.items():
        print(
            f"  {agent:<8} {used['input_tokens'] + used['output_tokens']} tokens, "
            f"{count(used['model_calls'], 'model call')}, {count(used['tool_calls'], 'tool call')}"
        )
    print("model and tool calls, as stored with the run:")
    for event in events:
        line = describe(event.kind, json.loads(event.data))
        if line is not None:
            print(f"  step {event.step}  {line}")
    print(
        f"payment system: {count(PAYMENTS.requests, 'request')}, "
        f"{count(len(PAYMENTS.refunds), 'refund')}"
    )
    for key, made in PAYMENTS.refunds.items():
        print(f"  {made['receipt']}  order {made['order_id']}  ${made['amount']:.2f}  key {key}")
    return outcome.run_id


if __name__ == "__main__":
    # orchestra logs through structlog and never configures it: show warnings (such as the
    # denied call) on stderr, keeping stdout for the result
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if len(sys.argv) > 1:
        kept = Path(sys.argv[1])
        run_id = anyio.run(main, kept)
        print(f"\nstored in {kept}; see it with: orchestra --db {kept} show {run_id}")
    else:
        with tempfile.TemporaryDirectory() as scratch:
            anyio.run(main, Path(scratch) / "support_desk.db")
        print(
            "\n(stored in a temporary database; to keep it for `orchestra show`, pass a path: "
            "python examples/support_desk.py support_desk.db)"
        )
