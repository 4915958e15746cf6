"""What the benchmark scripts share: the loop graph, result checks, statistics, provenance."""

from __future__ import annotations

import importlib.metadata
import logging
import statistics
import subprocess
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel

from orchestra import END, START, Budget, CompiledGraph, Graph
from orchestra.store import Store


class BenchmarkError(RuntimeError):
    """A measured run did not produce the expected outcome."""


class CounterState(BaseModel):
    counter: int = 0


async def increment(state: Any, ctx: Any) -> dict[str, int]:
    return {"counter": state.counter + 1}


async def do_nothing(state: Any, ctx: Any) -> None:
    return None


def build_loop(
    state: type[BaseModel], store: Store | None, *, turns: int, steps: int
) -> CompiledGraph[Any]:
    """The 2-node loop: ``a`` counts, ``b`` does nothing, a route loops back ``turns`` times."""

    def loop_again(state: Any) -> str:
        return "a" if state.counter < turns else END

    graph = Graph(state, name="loop")
    graph.add_node("a", increment)
    graph.add_node("b", do_nothing)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_route("b", loop_again, targets=["a", END])
    return graph.compile(store=store, budget=Budget(steps=steps))


def expect(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise BenchmarkError(f"{what}: expected {want!r}, got {got!r}")


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def revision() -> str | None:
    """Return the git commit of the measured checkout, marked dirty if orchestra/ has edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "orchestra"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if dirty else head


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the named distributions (None when not installed)."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def configure_logging(level: int = logging.WARNING) -> None:
    """Quiet orchestra to warnings (or ``level``): a benchmark is an application and may
    configure logging."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
