"""The approval storm's app, and the other process that answers it.

The approval storm (``approval.py``, next to this file) imports this module to start runs that
stop for approval, then runs this file in a new process, on the same SQLite file, to answer and
resume them::

    .venv/bin/python benchmarks/storms/_approval_worker.py --db runs.db --out answers.json
        [--backend asyncio|trio]

The graph is one plain node, ``checkout``, calling the irreversible tool ``pay`` through
``ctx.call_tool``; the default approval policy holds the call, so each run stops
``interrupted`` with one ``approval`` request. The worker lists the open requests
(``app.pending()``) and, run by run, alternating two ways of answering:

- ``resume``: ``app.resume(run_id, answers={request: Approve()})``, answer and resume in one
  call;
- ``answer``: ``app.answer(run_id, {request: Approve()})``, then ``app.resume(run_id)``.

It notes ``time.time()`` just before the answer call; ``pay`` notes ``time.time()`` when it
runs, appends a line to the log file named by ``$APPROVAL_STORM_LOG`` (so every execution is
counted, in any process) and returns the time, which the node writes into the state. The
worker writes, per run, the times and the outcome to ``--out`` (JSON). After each run it
times the floor, interleaved: one autocommit INSERT into a fresh WAL database next to
``--db`` at ``synchronous=FULL`` (the store's default durability), one commit and one fsync.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import statistics
import sys
import time
from typing import Any

import anyio
from _shared import configure_logging
from pydantic import BaseModel

from orchestra import END, START, Approve, CompiledGraph, Effect, Graph, NodeContext, tool

LOG = "APPROVAL_STORM_LOG"
MODES = ("resume", "answer")


class Payment(BaseModel):
    order: int
    paid_at: float | None = None


@tool(effect=Effect.IRREVERSIBLE, resources=lambda a: {f"order:{a['order']}"})
async def pay(order: int) -> float:
    """Pay one order (irreversible); return when it ran."""
    now = time.time()
    path = os.environ.get(LOG)
    if path:
        # one small O_APPEND write a call: lines from any process never interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{order} {now!r} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    return now


async def checkout(state: Payment, ctx: NodeContext) -> dict[str, Any]:
    paid_at = await ctx.call_tool("pay", {"order": state.order})
    return {"paid_at": paid_at}


graph: Graph[Payment] = Graph(Payment, name="approval_storm")
graph.add_node("checkout", checkout, tools=[pay])
graph.add_edge(START, "checkout")
graph.add_edge("checkout", END)


def compiled(db: str) -> CompiledGraph[Payment]:
    """The app on the storm's database, with compile's defaults (``Approvals()``: every
    irreversible call is held) and the store's default durability."""
    return graph.compile(store=db)


class CommitFloor:
    """Single-INSERT commits into a fresh WAL database next to the storm's, at
    synchronous=FULL (the store's default durability): one commit and one fsync each."""

    def __init__(self, db: str) -> None:
        path = f"{db}.floor"
        for stale in (path, f"{path}-wal", f"{path}-shm"):
            if os.path.exists(stale):
                os.remove(stale)
        self.conn = sqlite3.connect(path, isolation_level=None)  # autocommit: one INSERT
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data TEXT)")
        self.took: list[float] = []

    def sample(self) -> None:
        began = time.perf_counter()
        self.conn.execute("INSERT INTO t (data) VALUES (?)", ('{"answer":"approve"}',))
        self.took.append(time.perf_counter() - began)

    def close(self) -> None:
        self.conn.close()


async def answer_all(db: str) -> dict[str, Any]:
    """Answer every open request of the database, one run after another; return what
    happened to each."""
    app = compiled(db)
    began = time.perf_counter()
    pending = await app.pending()
    listed = time.perf_counter() - began
    floor = CommitFloor(db)
    done: list[dict[str, Any]] = []
    first = time.time()
    for i, request in enumerate(pending):
        mode = MODES[i % len(MODES)]
        answers = {request.id: Approve()}
        answered_at = time.time()
        if mode == "resume":
            outcome = await app.resume(request.run_id, answers=answers)
            recorded_at = None
        else:
            left = await app.answer(request.run_id, answers)
            recorded_at = time.time()
            if left:
                raise RuntimeError(f"run {request.run_id}: still open after the answer: {left}")
            outcome = await app.resume(request.run_id)
        returned_at = time.time()
        floor.sample()  # interleaved: the floor sees the disk as the runs did
        done.append(
            {
                "run_id": request.run_id,
                "request_id": request.id,
                "kind": request.kind,
                "tool": request.payload.get("tool"),
                "mode": mode,
                "answered_at": answered_at,
                "recorded_at": recorded_at,
                "returned_at": returned_at,
                "status": str(outcome.status),
                "paid_at": outcome.state.paid_at,
                "error": None if outcome.error is None else repr(outcome.error),
            }
        )
    floor.close()
    return {
        "pid": os.getpid(),
        "listed": len(pending),
        "list_seconds": listed,
        "floor_commit_seconds": statistics.median(floor.took),
        "floor_commit_p99_seconds": statistics.quantiles(floor.took, n=100, method="inclusive")[-1]
        if len(floor.took) > 1
        else floor.took[0],
        "floor_total_seconds": sum(floor.took),
        "first_answer_at": first,
        "last_returned_at": time.time(),
        "runs": done,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    configure_logging(logging.ERROR)
    result = anyio.run(answer_all, args.db, backend=args.backend)
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
