"""A small durable graph for the crash tests, run as a subprocess (not collected by pytest).

Usage::

    PYTHONPATH=tests python tests/apps/crash_app.py run|resume DB RUN_ID
        [--backend asyncio|trio] [--wait] [--go FILE]

The graph: ``count`` increments ``counter`` and appends ``c<counter>`` to ``items``; the route
after it loops back while ``counter < LAST``, except when ``counter == FAN_AT``, where it fans
out to ``FAN_OUT`` ``Send("worker", i)`` tasks that each append ``w<i>`` (one step, several
tasks, so pending writes); the workers lead back to ``count``. The run is ``STEPS`` steps and
ends with ``counter == LAST`` and ``items == EXPECTED_ITEMS``.

Every node execution appends one JSON line ``{"run", "node", "step", "task", "pid"}`` to the
side-effect log next to the database (``effects_path(DB)``), with one ``O_APPEND`` write, so
the line survives ``os._exit`` and SIGKILL and the tests can count how often each task ran.

Environment: ``CRASH_APP_LEASE`` (lease seconds, default 0.3), ``CRASH_APP_POLL`` (watcher
poll seconds, default 0.05), ``CRASH_APP_SLEEP`` (seconds each node sleeps, default 0), and
orchestra's own ``ORCHESTRA_FAULTS``.

Prints ``crash_app: ready`` on stderr once imported, then (with ``--go FILE``) waits for FILE to
exist, so several processes can start at the same moment. Prints one JSON summary on stdout:
the outcome (``status``, ``steps``, ``state``, ``error_type``), or the orchestra error that
refused the command (``error_type``, ``error``). Exit status: 0 completed, 1 the run ended
otherwise (e.g. failed with LeaseLostError), 3 the command was refused (e.g. LeaseHeldError),
``--wait`` retries a resume refused with LeaseHeldError until the lease expires.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Annotated, Any

import anyio
from pydantic import BaseModel

from apps.crash_child import configure_logging, effects_path, resume_waiting, summary
from orchestra import END, START, CompiledGraph, Graph, NodeContext, OrchestraError, Send, append
from orchestra.store import SQLiteStore, Store

FAN_AT = 5  # the count step whose route fans out (its counter value)
FAN_OUT = 4
LAST = 10
FAN_STEP = FAN_AT + 1  # the step that runs the worker tasks
STEPS = LAST + 1  # LAST count steps plus the fan-out step
EXPECTED_ITEMS = [
    *(f"c{i}" for i in range(1, FAN_AT + 1)),
    *(f"w{i}" for i in range(FAN_OUT)),
    *(f"c{i}" for i in range(FAN_AT + 1, LAST + 1)),
]

SLEEP = float(os.environ.get("CRASH_APP_SLEEP", "0"))


class CrashState(BaseModel):
    counter: int = 0
    items: Annotated[list[str], append] = []


def task_label(node: str, task: int) -> str:
    """Return the label orchestra gives a task (the workers are several tasks of one node)."""
    return f"{node}[{task}]" if node == "worker" else node


_effects: str | None = None


def _effect(ctx: NodeContext) -> None:
    if _effects is None:
        return
    line = {"run": ctx.run_id, "node": ctx.node, "step": ctx.step, "task": ctx.task}
    line["pid"] = os.getpid()
    fd = os.open(_effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


async def count(state: CrashState, ctx: NodeContext) -> dict[str, Any]:
    _effect(ctx)
    if SLEEP:
        await anyio.sleep(SLEEP)
    value = state.counter + 1
    return {"counter": value, "items": f"c{value}"}


async def worker(index: int, ctx: NodeContext) -> dict[str, Any]:
    _effect(ctx)
    if SLEEP:
        await anyio.sleep(SLEEP)
    return {"items": f"w{index}"}


def after_count(state: CrashState) -> str | list[Send]:
    if state.counter == FAN_AT:
        return [Send("worker", i) for i in range(FAN_OUT)]
    return "count" if state.counter < LAST else END


def build(store: Store | str | os.PathLike[str]) -> CompiledGraph[CrashState]:
    """Compile the crash graph on ``store``."""
    graph = Graph(CrashState, name="crash")
    graph.add_node("count", count)
    graph.add_node("worker", worker)
    graph.add_edge(START, "count")
    graph.add_route("count", after_count, targets=["count", "worker", END])
    graph.add_edge("worker", "count")
    return graph.compile(store=store)


def open_store(db: str) -> SQLiteStore:
    return SQLiteStore(
        db,
        durability="normal",
        lease_seconds=float(os.environ.get("CRASH_APP_LEASE", "0.3")),
        poll_seconds=float(os.environ.get("CRASH_APP_POLL", "0.05")),
    )


async def execute(
    app: CompiledGraph[CrashState], command: str, run_id: str, wait: bool
) -> dict[str, Any]:
    store = app.store
    assert store is not None
    try:
        if command == "run":
            outcome = await app.run(CrashState(), run_id=run_id)
        else:
            outcome = await resume_waiting(app, run_id, wait=wait)
    finally:
        await store.aclose()
    return summary(outcome)


def main(argv: list[str] | None = None) -> int:
    global _effects
    parser = argparse.ArgumentParser(description="Run or resume the crash-test graph.")
    parser.add_argument("command", choices=("run", "resume"))
    parser.add_argument("db")
    parser.add_argument("run_id")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--wait", action="store_true", help="wait out a live lease on resume")
    parser.add_argument("--go", help="wait for this file to exist before starting")
    args = parser.parse_args(argv)
    configure_logging()
    _effects = os.fspath(effects_path(args.db))
    app = build(open_store(args.db))
    # import all the run needs (the store's sqlite-utils, the event loop backend) before
    # "ready", so a test killing this process a random time after it hits the run itself
    import sqlite_utils  # noqa: F401

    anyio.run(anyio.sleep, 0, backend=args.backend)
    print("crash_app: ready", file=sys.stderr, flush=True)
    while args.go is not None and not os.path.exists(args.go):
        time.sleep(0.001)
    summary: dict[str, Any] = {"command": args.command, "run_id": args.run_id, "pid": os.getpid()}
    try:
        result = anyio.run(execute, app, args.command, args.run_id, args.wait, backend=args.backend)
    except OrchestraError as exc:
        summary.update(status=None, error_type=type(exc).__name__, error=str(exc))
        print(json.dumps(summary), flush=True)
        print(f"crash_app: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    summary.update(result)
    print(json.dumps(summary), flush=True)
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown (~0.15 s): the store is closed, the output flushed, and
    # the crash tests start dozens of these processes
    os._exit(code)
