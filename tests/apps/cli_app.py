"""Small graphs for the operator CLI tests, at module level so ``app_ref`` resolves.

``app`` counts: a planner fans out to two workers, then ``tick`` loops until ``n`` reaches
``limit``. The input decides the rest: ``delay`` slows every tick (to abort a live run),
``flaky_at`` makes the tick that reaches it fail once and succeed on its retry, and
``fail_at`` makes it fail once without a retry (the run fails; resuming it succeeds). Run as a
script (``python tests/apps/cli_app.py DB [LIMIT [LEASE_SECONDS]]``) it runs the count "crashy"
against DB, as the crash test's subprocess does.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import anyio
from pydantic import BaseModel

from orchestra import END, START, Graph, NodeContext, RetryPolicy, Send, add, append
from orchestra.store import SQLiteStore

LEASE_SECONDS = 0.5
POLL_SECONDS = 0.02

# (run_id, n) of the ticks that already failed once: the next attempt, or resume, succeeds
_failed: set[tuple[str, int]] = set()


class Count(BaseModel):
    limit: int = 3
    n: int = 0
    log: Annotated[list[str], append] = []
    work: Annotated[int, add] = 0
    delay: float = 0.0
    flaky_at: int | None = None
    fail_at: int | None = None


async def plan(state: Count, ctx: NodeContext) -> list[Send]:
    return [Send("work", 1), Send("work", 2)]


async def work(amount: int, ctx: NodeContext) -> dict[str, Any]:
    return {"work": amount}


async def tick(state: Count, ctx: NodeContext) -> dict[str, Any]:
    n = state.n + 1
    if state.delay:
        await anyio.sleep(state.delay)
    if n in (state.flaky_at, state.fail_at) and (ctx.run_id, n) not in _failed:
        _failed.add((ctx.run_id, n))
        if n == state.flaky_at:
            raise ConnectionError(f"tick {n} lost its connection")
        raise RuntimeError(f"tick {n} broke")
    return {"n": n, "log": f"tick {n}"}


def again(state: Count) -> str:
    return "tick" if state.n < state.limit else END


def build(state: type[Count] = Count) -> Graph[Any]:
    graph: Graph[Any] = Graph(state, name="count")
    graph.add_node("plan", plan, targets=["work"])
    graph.add_node("work", work)
    graph.add_node("tick", tick, retry=RetryPolicy(attempts=2, backoff=0, on=(ConnectionError,)))
    graph.add_edge(START, "plan")
    graph.add_edge("work", "tick")
    graph.add_route("tick", again, targets=["tick", END])
    return graph


def store_at(path: str) -> SQLiteStore:
    """Open the store the tests use: a short lease and a fast abort poll."""
    return SQLiteStore(path, lease_seconds=LEASE_SECONDS, poll_seconds=POLL_SECONDS)


graph = build()
app = graph.compile(store=store_at("cli_app.db"))


class CountV2(Count):
    """The same state with one more field: a changed structure hash, compatible data."""

    note: str = ""


changed = build(CountV2).compile()


def unreferenced() -> Any:
    """Return the app compiled inside a function: its runs store no ``app_ref``."""
    return build().compile()


not_an_app = 42

if __name__ == "__main__":
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    lease = float(sys.argv[3]) if len(sys.argv) > 3 else LEASE_SECONDS

    async def main() -> None:
        store = SQLiteStore(sys.argv[1], lease_seconds=lease, poll_seconds=POLL_SECONDS)
        try:
            outcome = await app.with_store(store).run({"limit": limit}, run_id="crashy")
            print(outcome.status)
        finally:
            await store.aclose()

    anyio.run(main)
