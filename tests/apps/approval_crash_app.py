"""A graph with an approval policy for the approval crash tests, run as a subprocess (not
collected by pytest).

Usage::

    PYTHONPATH=tests python tests/apps/approval_crash_app.py run|resume DB RUN_ID
        [--graph agent|node] [--backend asyncio|trio] [--wait]
        [--answer approve|edit|done|retry|abort]

Graphs (on a SQLiteStore, compiled with the default ``Approvals()``: every irreversible call
waits for a person):

``agent``
    The agent ``billing`` (a :class:`ScriptedModel` indexed by turn, so its answers stay
    right in another process): turn 0 calls ``refund`` (IRREVERSIBLE, held), turn 1 answers
    into ``resolution``. Two steps.
``node``
    The plain node ``clerk``: ``ctx.call_tool("note", ...)`` (WRITE), then
    ``ctx.call_tool("refund", ...)`` (IRREVERSIBLE, held); the refund's result goes into
    ``resolution``. One step.

Every tool execution (``{"kind": "tool", "tool", "arguments", "caller", "step", "key"}``,
logged as the tool starts) and every real model call (``{"kind": "model", "agent",
"turn"}``) appends one JSON line, with ``run`` and ``pid``, to the side-effect log next to
the database (``effects_path(DB)``), in one ``O_APPEND`` write, so it survives ``os._exit``
and SIGKILL.

``--answer`` answers every open request of the run (read from the store) before resuming:
``approve`` (:class:`Approve`), ``edit`` (``Edit(arguments=EDITED)``), ``done``
(``Done(result=DONE_RESULT)``), ``retry`` (:class:`Retry`) or ``abort`` (:class:`Abort`);
an answer that does not fit a request's kind is refused (exit status 3). ``--wait`` retries
a resume refused with LeaseHeldError until the lease expires.

Environment: ``APPROVAL_APP_LEASE`` (lease seconds, default 0.3), ``APPROVAL_APP_POLL``
(watcher poll seconds, default 0.05), ``APPROVAL_APP_TOOL_SLEEP`` (seconds ``refund`` sleeps
after logging its start, default 0), and orchestra's own ``ORCHESTRA_FAULTS``.

Prints one JSON summary on stdout: the outcome (``status``, ``steps``, ``state``,
``pending``: each open request's ``id``, ``kind`` and ``payload``, ``answered``,
``error_type``) or the orchestra error that refused the command. Exit status: 0 completed,
1 the run ended otherwise, 3 the command was refused.
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
    Approvals,
    Approve,
    CompiledGraph,
    Done,
    Edit,
    Effect,
    Graph,
    NodeContext,
    OrchestraError,
    Retry,
    ToolContext,
    tool,
)
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.store import SQLiteStore

EXIT_CODE = 137  # what orchestra's fault points exit with
GRAPHS = ("agent", "node")
STEPS = {"agent": 2, "node": 1}
ARGUMENTS = {"order_id": "42", "amount": 30.0}  # the refund as proposed
EDITED = {"order_id": "42", "amount": 12.5}  # the refund as an operator edits it
NOTE = "refunding order 42"
DONE_RESULT = "refunded by hand"

SCRIPT: dict[str, list[ModelResponse | str]] = {
    "billing": [
        ModelResponse(tool_calls=(ToolCall(name="refund", arguments=dict(ARGUMENTS)),)),
        "Refunded order 42.",
    ]
}

TOOL_SLEEP = float(os.environ.get("APPROVAL_APP_TOOL_SLEEP", "0"))


class Order(BaseModel):
    request: str = "order 42"
    resolution: str | None = None


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


def _tool_effect(name: str, arguments: dict[str, Any], ctx: ToolContext) -> None:
    _effect(
        {
            "kind": "tool",
            "tool": name,
            "arguments": arguments,
            "caller": ctx.caller,
            "step": ctx.step,
            "key": ctx.idempotency_key,
        }
    )


@tool(effect=Effect.WRITE)
async def note(text: str, ctx: ToolContext) -> str:
    """File a note on the order (an effect, but not an irreversible one)."""
    _tool_effect("note", {"text": text}, ctx)
    return f"noted: {text}"


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"order:{a['order_id']}"})
async def refund(order_id: str, amount: float, ctx: ToolContext) -> str:
    """Refund an order (cannot be undone)."""
    _tool_effect("refund", {"order_id": order_id, "amount": amount}, ctx)
    if TOOL_SLEEP:
        await anyio.sleep(TOOL_SLEEP)
    return f"refunded {amount:g} on order {order_id}"


class LoggedModel:
    """A ScriptedModel that logs every real call (a replayed call never reaches it)."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model
        self.name = model.name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        _effect({"kind": "model", "agent": request.agent, "turn": request.turn})
        return await self.model.complete(request)


async def clerk(state: Order, ctx: NodeContext) -> dict[str, Any]:
    """File a note, then refund the order (the refund waits for approval)."""
    await ctx.call_tool("note", text=NOTE)
    result = await ctx.call_tool("refund", **ARGUMENTS)
    return {"resolution": result}


def build(store: SQLiteStore, graph_name: str) -> CompiledGraph[Order]:
    """Compile the ``agent`` or ``node`` graph on ``store``, with the default approvals."""
    graph = Graph(Order, name=f"approvals-{graph_name}")
    if graph_name == "agent":
        billing = Agent(
            "billing",
            model=LoggedModel(ScriptedModel(SCRIPT)),
            tools=[refund],
            instructions="Refund the order.",
            output="resolution",
        )
        graph.add_node(billing)
        name = "billing"
    else:
        graph.add_node("clerk", clerk, tools=[note, refund])
        name = "clerk"
    graph.add_edge(START, name)
    graph.add_edge(name, END)
    return graph.compile(store=store, approvals=Approvals())


def open_store(db: str) -> SQLiteStore:
    return SQLiteStore(
        db,
        durability="normal",
        lease_seconds=float(os.environ.get("APPROVAL_APP_LEASE", "0.3")),
        poll_seconds=float(os.environ.get("APPROVAL_APP_POLL", "0.05")),
    )


ANSWERS = {
    "approve": Approve,
    "edit": lambda: Edit(arguments=dict(EDITED)),
    "done": lambda: Done(result=DONE_RESULT),
    "retry": Retry,
    "abort": Abort,
}


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
    return {
        **summary(outcome),
        "pending": [
            {"id": request.id, "kind": request.kind, "payload": request.payload}
            for request in outcome.pending
        ],
        "answered": answered,
    }


def main(argv: list[str] | None = None) -> int:
    global _effects, _run_id
    parser = argparse.ArgumentParser(description="Run or resume the approval crash-test graph.")
    parser.add_argument("command", choices=("run", "resume"))
    parser.add_argument("db")
    parser.add_argument("run_id")
    parser.add_argument("--graph", choices=GRAPHS, default="agent")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--wait", action="store_true", help="wait out a live lease on resume")
    parser.add_argument("--answer", choices=tuple(ANSWERS), help="answer every open request")
    args = parser.parse_args(argv)
    configure_logging()
    _effects, _run_id = os.fspath(effects_path(args.db)), args.run_id
    app = build(open_store(args.db), args.graph)
    summary: dict[str, Any] = {"command": args.command, "run_id": args.run_id, "pid": os.getpid()}
    try:
        result = anyio.run(
            execute, app, args.command, args.run_id, args.wait, args.answer, backend=args.backend
        )
    except OrchestraError as exc:
        summary.update(status=None, error_type=type(exc).__name__, error=str(exc))
        print(json.dumps(summary), flush=True)
        print(f"approval_crash_app: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    summary.update(result)
    print(json.dumps(summary), flush=True)
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown: the store is closed, the output flushed
