"""Draw a graph's structure as a Mermaid flowchart."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..specs import END, START, EdgeSpec, NodeSpec, RouteSpec

__all__ = ("render_mermaid",)

_MERMAID_WORDS = frozenset({"end", "graph", "subgraph", "flowchart", "style", "class", "click"})


def render_mermaid(
    nodes: Mapping[str, NodeSpec],
    edges: Iterable[EdgeSpec],
    routes: Mapping[str, Sequence[RouteSpec]],
) -> str:
    """Return a Mermaid flowchart (solid: edges, dotted: routes and declared targets)."""
    # Mermaid ids are letters, digits and underscores, not keywords; any other name (and
    # any starting with "__", so none can collide) gets a numbered id, and the label in
    # the node keeps the real name
    numbered = {
        name: f"__node{i}"
        for i, name in enumerate(nodes)
        if name.startswith("__")
        or not name.replace("_", "a").isalnum()
        or name.lower() in _MERMAID_WORDS
    }

    def ident(name: str) -> str:
        return numbered.get(name, name)

    def label(name: str) -> str:
        return '"' + name.replace('"', "#quot;") + '"'

    lines = ["flowchart TD"]
    lines.append(f"    {ident(START)}([start])")
    for name in nodes:
        lines.append(f"    {ident(name)}[{label(name)}]")
    lines.append(f"    {ident(END)}([end])")
    for edge in edges:
        if edge.is_join:
            join = "join_" + "_".join(map(ident, edge.sources)) + "__" + ident(edge.target)
            lines.append(f"    {join}(( ))")
            for source in edge.sources:
                lines.append(f"    {ident(source)} --> {join}")
            lines.append(f"    {join} --> {ident(edge.target)}")
        else:
            lines.append(f"    {ident(edge.sources[0])} --> {ident(edge.target)}")
    for group in routes.values():
        for route in group:
            how = str(getattr(route.fn, "__name__", "route")).replace("|", "#124;")
            for target in route.targets:
                lines.append(f"    {ident(route.source)} -.->|{how}| {ident(target)}")
    for node in nodes.values():
        for target in node.targets:
            lines.append(f"    {ident(node.name)} -.-> {ident(target)}")
    return "\n".join(lines)
