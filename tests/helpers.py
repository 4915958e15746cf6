"""Shared test helpers: short leases and polls for tests that use the stores (see the
``store`` fixture in conftest.py), where the helper apps in tests/apps live and how to start
one, helpers several test files had their own copy of, and the small graphs and problem
finders the compile and Graph builder tests share."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Graph,
    GraphValidationError,
    NodeContext,
    Request,
    RunOutcome,
    append,
)
from orchestra.events import Event

LEASE = 0.3
POLL = 0.02

NodeFn = Callable[[Any, NodeContext], Awaitable[Any]]

TESTS = Path(__file__).resolve().parent
APPS = TESTS / "apps"


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Return ``environ`` with the tests folder first on PYTHONPATH, so a helper app started
    as a script (``python tests/apps/crash_app.py``) can import ``apps.crash_child``."""
    path = [str(TESTS), *filter(None, [environ.get("PYTHONPATH")])]
    return {**environ, "PYTHONPATH": os.pathsep.join(path)}


async def streamed(app: Any, state: BaseModel) -> tuple[list[Event], RunOutcome[Any]]:
    """Run ``app`` as a stream; return its events and its outcome."""
    events = [event async for event in app.stream(state)]
    outcome = events[-1].outcome
    assert outcome is not None
    return events, outcome


def integrity(db: Path) -> str:
    """Return SQLite's integrity check of ``db`` ("ok" when intact)."""
    with closing(sqlite3.connect(db)) as conn:
        return "\n".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))


class Order(BaseModel):
    order_id: str
    amount: float


async def past(request: Request) -> None:
    """Wait until ``request`` has expired."""
    assert request.expires_at is not None
    await anyio.sleep(max(request.expires_at - time.time(), 0.0) + 0.02)


# -- compile: a small valid graph, and the problems compiling one reports -----------------


class State(BaseModel):
    log: Annotated[list[str], append] = []
    count: int = 0


async def step(state: State, ctx: Any) -> dict[str, Any]:
    return {"log": ctx.node}


def stop(state: State) -> str:
    return END


def problems_of(graph: Graph[Any]) -> tuple[str, ...]:
    """Compile ``graph``, expecting it to fail, and return every problem reported."""
    with pytest.raises(GraphValidationError) as caught:
        graph.compile()
    return caught.value.problems


def has(problems: tuple[str, ...], *parts: str) -> bool:
    """Tell whether one problem mentions every one of ``parts``."""
    return any(all(part in problem for part in parts) for problem in problems)


def chain(*names: str) -> Graph[State]:
    """A valid graph START -> names... -> END."""
    graph = Graph(State)
    for name in names:
        graph.add_node(name, step)
    for source, target in zip((START, *names), (*names, END), strict=True):
        graph.add_edge(source, target)
    return graph
