"""render(): the compiled graph as a Mermaid flowchart."""

from __future__ import annotations

import re

from helpers import State, chain, step, stop

from orchestra import END, START, Graph


def test_compiled_graph_render_is_mermaid_with_nodes_and_edges() -> None:
    """render() returns a Mermaid flowchart naming every node and edge."""
    graph = chain("plan", "work")
    graph.add_route("work", stop, targets=["plan", END])
    text = graph.compile().render()
    assert text.startswith("flowchart")
    for node in ("plan", "work", "__start__", "__end__"):
        assert node in text
    assert "__start__ --> plan" in text
    assert "plan --> work" in text
    assert "work --> __end__" in text


def test_compiled_graph_render_draws_routes_dotted() -> None:
    """render() draws every route target as a dotted edge labelled by the route."""
    graph = chain("plan", "work")
    graph.add_route("work", stop, targets=["plan", END])
    text = graph.compile().render()
    assert "work -.->|stop| plan" in text
    assert "work -.->|stop| __end__" in text


def test_compiled_graph_render_draws_joins() -> None:
    """render() draws a join as both sources leading to one join point, then the target."""
    graph = Graph(State)
    for name in ("a", "b", "c"):
        graph.add_node(name, step)
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge(["a", "b"], "c")
    graph.add_edge("c", END)
    lines = graph.compile().render().splitlines()
    join = next(line.split("((")[0].strip() for line in lines if "(( ))" in line)
    assert f"    a --> {join}" in lines
    assert f"    b --> {join}" in lines
    assert f"    {join} --> c" in lines


def test_compiled_graph_render_draws_command_targets_dotted() -> None:
    """render() draws a node's declared Command targets as dotted edges."""
    graph = chain("a", "b")
    graph.add_node("c", step, targets=["b", END])
    graph.add_edge(START, "c")
    text = graph.compile().render()
    assert "c -.-> b" in text
    assert "c -.-> __end__" in text


def test_compiled_graph_render_escapes_names_that_are_not_mermaid_ids() -> None:
    """Names with spaces or dashes, and Mermaid keywords, get safe ids; labels keep the
    names."""
    text = chain("my node", "data-prep", "end").compile().render()
    labels = dict(re.findall(r'^ +(\S+)\["(.*)"\]$', text, re.MULTILINE))
    assert sorted(labels.values()) == ["data-prep", "end", "my node"]
    edges = re.findall(r"^ +(\S+) --> (\S+)$", text, re.MULTILINE)
    for ident in {*labels, *(i for edge in edges for i in edge)}:
        assert re.fullmatch(r"[A-Za-z0-9_]+", ident), ident
        assert ident.lower() != "end"
    names = {**labels, "__start__": START, "__end__": END}
    assert [(names[a], names[b]) for a, b in edges] == [
        (START, "my node"),
        ("my node", "data-prep"),
        ("data-prep", "end"),
        ("end", END),
    ]
