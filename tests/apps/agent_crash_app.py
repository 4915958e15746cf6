"""An agent graph for the agent crash tests, run as a subprocess (not collected by pytest).

Usage::

    PYTHONPATH=tests python tests/apps/agent_crash_app.py run|resume DB RUN_ID [--graph single|pair]
        [--backend asyncio|trio] [--wait] [--answer done|retry|abort]

Graphs (on a SQLiteStore, every agent on one :class:`ScriptedModel` given as a per-agent
dict, indexed by the agent's turn, so the answers stay right in another process):

``single``
    ``billing`` alone: turn 0 calls ``lookup_order`` (READ), turn 1 calls ``refund``
    (IRREVERSIBLE), turn 2 gives the final answer into ``resolution``. Three steps.
``pair``
    ``billing`` and ``shipping`` both started from START, so every step runs two agent tasks
    (pending writes, one act phase for both): ``shipping`` calls ``track_parcel`` (READ),
    then ``send_parcel`` (IRREVERSIBLE), then answers into ``shipment``. Three steps.

Every real model call (``{"kind": "model", "agent", "turn"}``) and every tool execution
(``{"kind": "tool", "tool", "caller", "step", "key"}``, logged as the tool starts) appends one
JSON line, with ``run`` and ``pid``, to the side-effect log next to the database
(``effects_path(DB)``), in one ``O_APPEND`` write, so it survives ``os._exit`` and SIGKILL.

``--answer`` answers every open request of the run (read from the store) with ``Done(result=
DONE_RESULT)``, ``Retry()`` or ``Abort()`` before resuming. ``--wait`` retries a resume
refused with LeaseHeldError until the lease expires.

Environment: ``AGENT_APP_LEASE`` (lease seconds, default 0.3), ``AGENT_APP_POLL`` (watcher
poll seconds, default 0.05), ``AGENT_APP_TOOL_SLEEP`` (seconds each irreversible tool sleeps
after logging its start, default 0), ``AGENT_APP_EXIT_AFTER_TOOL`` (a tool name: the process
ends with ``os._exit(137)`` right after that tool's result is recorded in the ledger, before
the step commits), and orchestra's own ``ORCHESTRA_FAULTS``.

Prints ``agent_crash_app: ready`` on stderr once imported. Prints one JSON summary on stdout:
the outcome (``status``, ``steps``, ``state``, ``usage``, ``pending`` request ids,
``stop_reason``, ``error_type``) or the orchestra error that refused the command. Exit
status: 0 completed, 1 the run ended otherwise, 3 the command was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio
from pydantic import BaseModel

from apps.crash_child import configure_logging, effects_path, resume_waiting, summary
from orchestra import (
    END,
    START,
    Abort,
    Agent,
    CompiledGraph,
    Done,
    Effect,
    Graph,
    OrchestraError,
    Retry,
    ToolContext,
    tool,
)
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.store import SQLiteStore
from orchestra.store.base import LedgerEntry

EXIT_CODE = 137  # what orchestra's fault points exit with
STEPS = 3
DONE_RESULT = "done by hand"
AGENTS = {"single": ("billing",), "pair": ("billing", "shipping")}
TOOLS = {"billing": ("lookup_order", "refund"), "shipping": ("track_parcel", "send_parcel")}
IRREVERSIBLE = ("refund", "send_parcel")
EXPECTED_STATE = {
    "single": {"request": "order 42", "resolution": "Refunded order 42.", "shipment": None},
    "pair": {
        "request": "order 42",
        "resolution": "Refunded order 42.",
        "shipment": "Shipped order 42.",
    },
}

SCRIPT = {
    "billing": [
        ModelResponse(tool_calls=(ToolCall(name="lookup_order", arguments={"order_id": "42"}),)),
        ModelResponse(
            tool_calls=(ToolCall(name="refund", arguments={"order_id": "42", "amount": 30.0}),)
        ),
        "Refunded order 42.",
    ],
    "shipping": [
        ModelResponse(tool_calls=(ToolCall(name="track_parcel", arguments={"order_id": "42"}),)),
        ModelResponse(tool_calls=(ToolCall(name="send_parcel", arguments={"order_id": "42"}),)),
        "Shipped order 42.",
    ],
}

TOOL_SLEEP = float(os.environ.get("AGENT_APP_TOOL_SLEEP", "0"))
EXIT_AFTER_TOOL = os.environ.get("AGENT_APP_EXIT_AFTER_TOOL")


class Order(BaseModel):
    request: str = "order 42"
    resolution: str | None = None
    shipment: str | None = None


_effects: str | None = None
_run_id = ""


def _effect(line: dict[str, Any]) -> None:
    if _effects is None:
        return
    line = {"run": _run_id, **line, "pid": os.getpid()}
    fd = os.open(_effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _tool_effect(name: str, ctx: ToolContext) -> None:
    _effect(
        {
            "kind": "tool",
            "tool": name,
            "caller": ctx.caller,
            "step": ctx.step,
            "key": ctx.idempotency_key,
        }
    )


@tool(effect=Effect.READ)
async def lookup_order(order_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Look up an order."""
    _tool_effect("lookup_order", ctx)
    return {"order_id": order_id, "amount": 30.0}


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"order:{a['order_id']}"})
async def refund(order_id: str, amount: float, ctx: ToolContext) -> str:
    """Refund an order (cannot be undone)."""
    _tool_effect("refund", ctx)
    if TOOL_SLEEP:
        await anyio.sleep(TOOL_SLEEP)
    return f"refunded {amount:g} on order {order_id}"


@tool(effect=Effect.READ)
async def track_parcel(order_id: str, ctx: ToolContext) -> dict[str, Any]:
    """Find an order's parcel."""
    _tool_effect("track_parcel", ctx)
    return {"order_id": order_id, "parcel": "p-7"}


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"parcel:{a['order_id']}"})
async def send_parcel(order_id: str, ctx: ToolContext) -> str:
    """Send an order's parcel (cannot be undone)."""
    _tool_effect("send_parcel", ctx)
    if TOOL_SLEEP:
        await anyio.sleep(TOOL_SLEEP)
    return f"sent parcel of order {order_id}"


class LoggedModel:
    """A ScriptedModel that logs every real call (a replayed call never reaches it)."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model
        self.name = model.name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        _effect({"kind": "model", "agent": request.agent, "turn": request.turn})
        return await self.model.complete(request)


class ExitingStore(SQLiteStore):
    """A SQLiteStore that ends the process right after a given tool's result is recorded."""

    async def put_ledger(self, run_id: str, epoch: int, entry: LedgerEntry) -> None:
        await super().put_ledger(run_id, epoch, entry)
        if entry.kind == "tool" and entry.status == "done" and entry.name == EXIT_AFTER_TOOL:
            os._exit(EXIT_CODE)


def build(store: SQLiteStore | str | os.PathLike[str], graph_name: str) -> CompiledGraph[Order]:
    """Compile the ``single`` or ``pair`` agent graph on ``store``."""
    model = LoggedModel(ScriptedModel(SCRIPT))
    billing = Agent(
        "billing",
        model=model,
        tools=[lookup_order, refund],
        instructions="Refund the order.",
        output="resolution",
    )
    graph = Graph(Order, name=f"agents-{graph_name}")
    graph.add_node(billing)
    graph.add_edge(START, "billing")
    graph.add_edge("billing", END)
    if graph_name == "pair":
        shipping = Agent(
            "shipping",
            model=model,
            tools=[track_parcel, send_parcel],
            instructions="Ship the order.",
            output="shipment",
        )
        graph.add_node(shipping)
        graph.add_edge(START, "shipping")
        graph.add_edge("shipping", END)
    return graph.compile(approvals=None, store=store)


def open_store(db: str) -> SQLiteStore:
    kind = ExitingStore if EXIT_AFTER_TOOL else SQLiteStore
    return kind(
        db,
        durability="normal",
        lease_seconds=float(os.environ.get("AGENT_APP_LEASE", "0.3")),
        poll_seconds=float(os.environ.get("AGENT_APP_POLL", "0.05")),
    )


ANSWERS = {"done": lambda: Done(result=DONE_RESULT), "retry": Retry, "abort": Abort}


async def execute(
    app: CompiledGraph[Order], command: str, run_id: str, wait: bool, answer: str | None
) -> dict[str, Any]:
    store = app.store
    assert store is not None
    answered: list[str] = []
    try:
        if command == "run":
            outcome = await app.run(Order(), run_id=run_id)
        else:
            answers = None
            if answer is not None:
                answers = {r.request_id: ANSWERS[answer]() for r in await store.requests(run_id)}
                answered = sorted(answers)
            outcome = await resume_waiting(app, run_id, wait=wait, answers=answers)
    finally:
        await store.aclose()
    usage = outcome.usage
    return {
        **summary(outcome),
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "model_calls": usage.model_calls,
            "tool_calls": usage.tool_calls,
            "by_node": usage.by_node,
        },
        "pending": [request.id for request in outcome.pending],
        "answered": answered,
        "stop_reason": outcome.stop_reason,
    }


def main(argv: list[str] | None = None) -> int:
    global _effects, _run_id
    parser = argparse.ArgumentParser(description="Run or resume the agent crash-test graph.")
    parser.add_argument("command", choices=("run", "resume"))
    parser.add_argument("db")
    parser.add_argument("run_id")
    parser.add_argument("--graph", choices=tuple(AGENTS), default="single")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--wait", action="store_true", help="wait out a live lease on resume")
    parser.add_argument("--answer", choices=tuple(ANSWERS), help="answer every open request")
    args = parser.parse_args(argv)
    configure_logging()
    _effects, _run_id = os.fspath(effects_path(args.db)), args.run_id
    app = build(open_store(args.db), args.graph)
    import sqlite_utils  # noqa: F401 - imported before "ready", like everything the run needs

    anyio.run(anyio.sleep, 0, backend=args.backend)
    print("agent_crash_app: ready", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"command": args.command, "run_id": args.run_id, "pid": os.getpid()}
    try:
        result = anyio.run(
            execute, app, args.command, args.run_id, args.wait, args.answer, backend=args.backend
        )
    except OrchestraError as exc:
        summary.update(status=None, error_type=type(exc).__name__, error=str(exc))
        print(json.dumps(summary), flush=True)
        print(f"agent_crash_app: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    summary.update(result)
    print(json.dumps(summary), flush=True)
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown: the store is closed, the output flushed
