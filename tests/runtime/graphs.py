"""The state and small graphs the executor, routing and driver tests share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from helpers import NodeFn
from pydantic import BaseModel

from orchestra import END, START, CompiledGraph, Graph, NodeContext, add, append
from orchestra.events import Event


class State(BaseModel):
    log: Annotated[list[str], append] = []
    count: int = 0
    total: Annotated[int, add] = 0
    value: int = 0
    note: str = ""


def record(name: str | None = None) -> NodeFn:
    """A node that appends its name (or ``name``) to ``log``."""

    async def node(state: Any, ctx: NodeContext) -> dict[str, Any]:
        return {"log": name or ctx.node}

    return node


def graph_of(
    nodes: dict[str, NodeFn],
    edges: list[tuple[Any, str]],
    state: type[BaseModel] = State,
    **options: Any,
) -> CompiledGraph[Any]:
    """Compile a graph with ``nodes`` and plain ``edges``."""
    graph: Graph[Any] = Graph(state)
    for name, fn in nodes.items():
        graph.add_node(name, fn)
    for source, target in edges:
        graph.add_edge(source, target)
    return graph.compile(**options)


def parallel(*names: str, fn: Callable[[str], NodeFn] = record, **options: Any) -> CompiledGraph:
    """Compile START -> each of ``names`` -> END: one step running them all."""
    edges = [(START, n) for n in names] + [(n, END) for n in names]
    return graph_of({n: fn(n) for n in names}, edges, **options)


async def collect(app: CompiledGraph[Any], input: Any, **kwargs: Any) -> list[Event]:
    return [event async for event in app.stream(input, **kwargs)]


def join_graph(first_path: list[str]) -> CompiledGraph[Any]:
    """START -> a; START -> first_path... -> b; join [a, b] -> c -> END."""
    graph = Graph(State)
    for name in ("a", "b", "c", *first_path):
        graph.add_node(name, record())
    graph.add_edge(START, "a")
    for source, target in zip((START, *first_path), (*first_path, "b"), strict=True):
        graph.add_edge(source, target)
    graph.add_edge(["a", "b"], "c")
    graph.add_edge("c", END)
    return graph.compile()


async def boom(state: State, ctx: NodeContext) -> None:
    raise ValueError("boom")
