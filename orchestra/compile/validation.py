"""Every problem a graph definition can have, found before anything runs.

Each function returns a list of problems in words; ``compile_graph`` reports them all at
once in one GraphValidationError.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..specs import END, START, EdgeSpec, NodeKind, NodeSpec, RetryPolicy, RouteSpec

__all__ = ("Cycle", "Link", "cycles", "node_problems", "reference_problems", "structure_problems")


def node_problems(node: NodeSpec) -> list[str]:
    problems: list[str] = []
    name = node.name
    if not name or not isinstance(name, str):
        problems.append(f"node name {name!r} is invalid; use a non-empty string")
    elif name in (START, END):
        problems.append(f"node name {name!r} is reserved")
    elif "[" in name or "]" in name:
        # "worker[2]" names the third Send task of node "worker" in events and checkpoints
        problems.append(f"node name {name!r} may not contain '[' or ']'")
    if node.kind is NodeKind.AGENT:
        pass  # checked against the state by compile (Agent.problems)
    elif node.fn is None:
        problems.append(f"node {name!r} has no function; add_node('{name}', fn)")
    elif not callable(node.fn):
        problems.append(f"node {name!r}: {node.fn!r} is not callable")
    elif not _is_async(node.fn):
        problems.append(
            f"node {name!r}: {getattr(node.fn, '__name__', node.fn)!r} is not an async function; "
            f"define it with 'async def' (run blocking code with anyio.to_thread.run_sync)"
        )
    if node.timeout is not None and (
        isinstance(node.timeout, bool)
        or not isinstance(node.timeout, int | float)
        or not math.isfinite(node.timeout)
        or node.timeout <= 0
    ):
        problems.append(f"node {name!r}: timeout must be a positive number, got {node.timeout!r}")
    if node.kind is not NodeKind.AGENT:
        problems.extend(tool_problems(name, node.tools))
    if node.retry is not None and not isinstance(node.retry, RetryPolicy):
        problems.append(
            f"node {name!r}: retry must be a RetryPolicy or a number of attempts, "
            f"got {node.retry!r}"
        )
    return problems


def tool_problems(name: str, tools: Iterable[Any]) -> list[str]:
    """A node's allowlist: tools made with @tool, with distinct names."""
    from ..tools import Tool

    problems = []
    names: list[str] = []
    for item in tools:
        if isinstance(item, Tool):
            names.append(item.name)
        else:
            label = getattr(item, "__name__", repr(item))
            problems.append(f"node {name!r}: {label} is not a tool; decorate it with @tool")
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"node {name!r}: two tools are named {dup!r}")
    return problems


def graph_tool_problems(nodes: Iterable[NodeSpec]) -> list[str]:
    """Tools are known by name across the graph: one name, one tool."""
    from ..tools import Tool

    seen: dict[str, Any] = {}
    problems = []
    for node in nodes:
        for item in node.tools:
            if not isinstance(item, Tool):
                continue
            other = seen.setdefault(item.name, item)
            if other is not item and other.fn is not item.fn:
                problems.append(
                    f"two different tools are named {item.name!r} (one is used by node "
                    f"{node.name!r}); give them distinct names with @tool(name=...)"
                )
    return sorted(set(problems))


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _unknown(name: str, known: set[str], role: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{role} refers to unknown node {name!r}{hint}"


def reference_problems(
    edges: Iterable[EdgeSpec],
    routes: Iterable[RouteSpec],
    nodes: Mapping[str, NodeSpec],
    known: set[str],
) -> list[str]:
    problems: list[str] = []
    for edge in edges:
        label = f"edge {' + '.join(edge.sources)} -> {edge.target}"
        if not edge.sources:
            problems.append(f"{label}: an edge needs at least one source")
        for source in edge.sources:
            if source == END:
                problems.append(f"{label}: END has no outgoing edges")
            elif source == START and edge.is_join:
                problems.append(f"{label}: START cannot be part of a join")
            elif source != START and source not in known:
                problems.append(_unknown(source, known, label))
        if edge.is_join and len(set(edge.sources)) != len(edge.sources):
            problems.append(f"{label}: a join lists the same source twice")
        if edge.target == START:
            problems.append(f"{label}: nothing can lead to START")
        elif edge.target != END and edge.target not in known:
            problems.append(_unknown(edge.target, known, label))
    for route in routes:
        label = f"route after {route.source!r}"
        if route.source == END:
            problems.append(f"{label}: END has no outgoing routes")
        elif route.source != START and route.source not in known:
            problems.append(_unknown(route.source, known, label))
        if not callable(route.fn):
            problems.append(f"{label}: {route.fn!r} is not callable")
        if not route.targets:
            problems.append(f"{label}: targets is empty; declare every node it can return")
        for target in route.targets:
            if target == START:
                problems.append(f"{label}: nothing can lead to START")
            elif target != END and target not in known:
                problems.append(_unknown(target, known, f"{label} target"))
    for node in nodes.values():
        for target in node.targets:
            if target == START:
                problems.append(f"node {node.name!r} targets: nothing can lead to START")
            elif target != END and target not in known:
                problems.append(_unknown(target, known, f"node {node.name!r} targets"))
    return problems


def structure_problems(
    edges: Iterable[EdgeSpec], routes: Iterable[RouteSpec], nodes: Mapping[str, NodeSpec]
) -> list[str]:
    import networkx as nx

    edges = list(edges)
    routes = list(routes)
    known = set(nodes) | {START, END}
    flow = nx.DiGraph()
    flow.add_nodes_from(known)
    static = nx.DiGraph()
    for edge in edges:
        for source in edge.sources:
            if source in known and edge.target in known:
                flow.add_edge(source, edge.target)
                if not edge.is_join:
                    static.add_edge(source, edge.target)
    for route in routes:
        for target in route.targets:
            if route.source in known and target in known:
                flow.add_edge(route.source, target)
    for node in nodes.values():
        for target in node.targets:
            if target in known:
                flow.add_edge(node.name, target)

    problems: list[str] = []
    if flow.out_degree(START) == 0:
        problems.append("START has no outgoing edge or route; add_edge(START, 'first_node')")
    reachable = nx.descendants(flow, START)
    for name in sorted(set(nodes) - reachable):
        problems.append(f"node {name!r} is unreachable from START")
    finishing = nx.ancestors(flow, END)
    for name in sorted(set(nodes) & reachable - finishing):
        problems.append(f"node {name!r} cannot reach END (every path from it goes on forever)")
    for component in nx.strongly_connected_components(static):
        if len(component) == 1:
            (only,) = component
            if not static.has_edge(only, only):
                continue
        cycle = nx.find_cycle(static.subgraph(component))
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        problems.append(
            f"cycle {path} is made only of unconditional edges, so it never ends; "
            f"replace one edge with a route that can leave the cycle"
        )
    return problems


# the ways from one node to another, the most certain first (a hop shows the first it has)
_WAYS = ("edge", "join", "route", "goto")


@dataclass(frozen=True, slots=True)
class Link:
    """One way from a node to the next.

    ``via`` is ``edge`` (always taken), ``join`` (taken once all the join's sources ran in
    one step), ``route`` (its function, named by ``label``, decides) or ``goto`` (a
    :class:`~orchestra.graph.Command` or :class:`~orchestra.graph.Send` the node returns,
    to one of its declared targets).
    """

    source: str
    target: str
    via: str
    label: str | None = None

    @property
    def conditional(self) -> bool:
        """Whether taking this way is decided when the graph runs."""
        return self.via != "edge"


@dataclass(frozen=True, slots=True)
class Cycle:
    """A path of nodes that can lead back to its first node, and the ways out of it.

    ``links[i]`` goes from ``nodes[i]`` to the next node (the last one back to the first);
    ``exits`` are the ways from a node of the cycle to a node outside it or to END;
    ``agents`` are the cycle's agent nodes (where a model's answers keep it going).
    """

    nodes: tuple[str, ...]
    links: tuple[Link, ...]
    exits: tuple[Link, ...]
    agents: tuple[str, ...]

    @property
    def conditional(self) -> bool:
        """Whether some hop is decided when the graph runs (a route, a goto or a join)."""
        return any(link.conditional for link in self.links)


def cycles(
    edges: Iterable[EdgeSpec],
    routes: Iterable[RouteSpec],
    nodes: Mapping[str, NodeSpec],
    *,
    limit: int | None = None,
) -> list[Cycle]:
    """Return every simple cycle through the graph's nodes (at most ``limit`` of them).

    The cycles follow edges, joins, route targets and declared goto/Send targets; START and
    END are never part of one. Each cycle starts at its node nearest to START (then first
    declared), and the cycles come in that order. References to unknown nodes are ignored
    (``reference_problems`` reports them).
    """
    import itertools

    import networkx as nx

    ways: dict[tuple[str, str], dict[Link, None]] = {}

    def add(link: Link) -> None:
        if (link.source in nodes or link.source == START) and (
            link.target in nodes or link.target == END
        ):
            ways.setdefault((link.source, link.target), {})[link] = None

    for edge in edges:
        for source in edge.sources:
            add(Link(source, edge.target, "join" if edge.is_join else "edge"))
    for route in routes:
        label = getattr(route.fn, "__name__", None)
        for target in route.targets:
            add(Link(route.source, target, "route", label if isinstance(label, str) else None))
    for node in nodes.values():
        for target in node.targets:
            add(Link(node.name, target, "goto"))

    full = nx.DiGraph()
    full.add_nodes_from([START, *nodes, END])
    full.add_edges_from(ways)
    depth = nx.single_source_shortest_path_length(full, START)
    declared = {name: i for i, name in enumerate(nodes)}

    def rank(name: str) -> tuple[float, int]:
        return depth.get(name, math.inf), declared[name]

    leaving: dict[str, list[Link]] = {}
    for (source, _), links in ways.items():
        leaving.setdefault(source, []).extend(links)

    found = []
    flow = full.subgraph(nodes)
    for path in itertools.islice(nx.simple_cycles(flow), limit):
        first = path.index(min(path, key=rank))
        ordered = tuple(path[first:] + path[:first])
        members = set(ordered)
        hops = tuple(
            min(ways[pair], key=lambda link: _WAYS.index(link.via))
            for pair in zip(ordered, ordered[1:] + ordered[:1], strict=True)
        )
        exits = tuple(
            link for name in ordered for link in leaving[name] if link.target not in members
        )
        agents = tuple(name for name in ordered if nodes[name].kind is NodeKind.AGENT)
        found.append(Cycle(nodes=ordered, links=hops, exits=exits, agents=agents))
    found.sort(key=lambda cycle: [rank(name) for name in cycle.nodes])
    return found
