"""Formatting what ``orchestra graph check`` finds: the graph's size, its cycles, the guard."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..app import CompiledGraph
from ..compile.validation import Cycle, Link, cycles
from ..safeguards.loops import LoopGuard
from ..specs import END, NodeKind

__all__ = (
    "GraphReport",
    "check_graph",
    "format_guard",
    "format_kind",
    "format_link",
    "report_json",
    "report_lines",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphReport:
    """What ``orchestra graph check`` says about one compiled graph."""

    app: str
    name: str
    structure_hash: str
    nodes: int
    agents: tuple[str, ...]
    edges: int
    joins: int
    routes: int
    cycles: tuple[Cycle, ...]
    truncated: bool
    loop_guard: LoopGuard | None
    steps: int | None
    wall_seconds: float | None


def check_graph(app: CompiledGraph[Any], ref: str, *, limit: int | None = None) -> GraphReport:
    """Analyse ``app`` (loaded from ``ref``): its counts and at most ``limit`` cycles."""
    routes = [route for group in app.routes.values() for route in group]
    found = cycles(app.edges, routes, app.nodes, limit=None if limit is None else limit + 1)
    truncated = limit is not None and len(found) > limit
    return GraphReport(
        app=ref,
        name=app.name,
        structure_hash=app.structure_hash,
        nodes=len(app.nodes),
        agents=tuple(name for name, node in app.nodes.items() if node.kind is NodeKind.AGENT),
        edges=len(app.edges),
        joins=len(app.joins),
        routes=len(routes),
        cycles=tuple(found[:limit]) if truncated else tuple(found),
        truncated=truncated,
        loop_guard=app.loop_guard,
        steps=app.budget.steps,
        wall_seconds=app.budget.wall_seconds,
    )


def format_link(link: Link) -> str:
    """Say one way between nodes: ``review -> draft (route verdict)``."""
    how = f"route {link.label}" if link.via == "route" and link.label else link.via
    target = "END" if link.target == END else link.target
    return f"{link.source} -> {target} ({how})"


def format_kind(links: Sequence[Link]) -> str:
    """Say whether a cycle's hops are all plain edges, or what decides it goes round."""
    parts: list[str] = []
    for link in links:
        if link.via == "route":
            part = f"route {link.label or '?'} after {link.source}"
        elif link.via == "goto":
            part = f"goto from {link.source}"
        elif link.via == "join":
            part = f"join into {link.target}"
        else:
            continue
        if part not in parts:
            parts.append(part)
    if not parts:
        return "unconditional (plain edges only)"
    return f"conditional ({', '.join(parts)})"


def _guard_settings(guard: LoopGuard) -> dict[str, Any]:
    """Return a guard's settings, every field of it, as JSON-ready values."""
    settings: dict[str, Any] = {}
    for item in dataclasses.fields(guard):
        value = getattr(guard, item.name)
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        settings[item.name] = value
    return settings


def format_guard(report: GraphReport) -> str:
    """Say whether runtime loop detection is on, with its settings, or what bounds a loop."""
    guard = report.loop_guard
    if guard is None:
        limits = [f"steps={report.steps}"] if report.steps is not None else []
        if report.wall_seconds is not None:
            limits.append(f"wall_seconds={report.wall_seconds:g}")
        bound = (
            f"the budget ({', '.join(limits)})" if limits else "nothing (the budget is unlimited)"
        )
        return (
            f"off (compiled with loop_guard=None): a run going round a cycle is stopped "
            f"only by {bound}"
        )
    settings = []
    for key, value in _guard_settings(guard).items():
        if isinstance(value, list):
            if value:
                settings.append(f"{key}={','.join(map(str, value))}")
        elif isinstance(value, dict):
            settings.append(f"{key}=" + ",".join(f"{k}:{v}" for k, v in value.items()))
        else:
            settings.append(f"{key}={'off' if value is None else value}")
    return "on: " + ", ".join(settings)


def report_lines(report: GraphReport) -> list[str]:
    """Return the check as lines of text."""
    lines = [
        f"graph       {report.name} (structure hash {report.structure_hash})",
        f"app         {report.app}",
        f"nodes       {report.nodes}"
        + (f" (agents: {', '.join(report.agents)})" if report.agents else ""),
        f"edges       {report.edges}" + (f" ({report.joins} joins)" if report.joins else ""),
        f"routes      {report.routes}",
    ]
    count = len(report.cycles)
    if not count:
        lines.append("cycles      none: no run can go round")
    else:
        noun = "cycle" if count == 1 and not report.truncated else "cycles"
        more = f" (only the first {count} shown; raise --limit)" if report.truncated else ""
        lines.append(f"cycles      {count}{'+' if more else ''} {noun}, each with a way out{more}")
    for number, cycle in enumerate(report.cycles, 1):
        path = " -> ".join((*cycle.nodes, cycle.nodes[0]))
        lines.append("")
        lines.append(f"cycle {number}: {path}")
        lines.append(f"  hops      {', '.join(format_link(link) for link in cycle.links)}")
        lines.append(f"  kind      {format_kind(cycle.links)}")
        lines.append(f"  exits     {', '.join(format_link(link) for link in cycle.exits)}")
        if cycle.agents:
            lines.append(
                f"  agents    {', '.join(cycle.agents)} (model-driven: a model's answers can "
                f"keep it going)"
            )
    lines.append("")
    lines.append(f"loop guard  {format_guard(report)}")
    return lines


def _link_json(link: Link) -> dict[str, Any]:
    return {"source": link.source, "target": link.target, "via": link.via, "label": link.label}


def report_json(report: GraphReport) -> dict[str, Any]:
    """Return the check as JSON-ready data (the same facts as :func:`report_lines`)."""
    guard = report.loop_guard
    return {
        "graph": report.name,
        "app": report.app,
        "structure_hash": report.structure_hash,
        "nodes": report.nodes,
        "agents": list(report.agents),
        "edges": report.edges,
        "joins": report.joins,
        "routes": report.routes,
        "cycles": [
            {
                "nodes": list(cycle.nodes),
                "conditional": cycle.conditional,
                "links": [_link_json(link) for link in cycle.links],
                "exits": [_link_json(link) for link in cycle.exits],
                "agents": list(cycle.agents),
            }
            for cycle in report.cycles
        ],
        "truncated": report.truncated,
        "loop_guard": {"enabled": guard is not None}
        | (_guard_settings(guard) if guard is not None else {}),
        "budget": {"steps": report.steps, "wall_seconds": report.wall_seconds},
    }
