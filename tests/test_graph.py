"""The Graph builder: what add_node accepts."""

from __future__ import annotations

from helpers import chain, has, problems_of


def test_compile_reports_node_objects_that_are_not_agents() -> None:
    """add_node with an object that is neither a name nor an Agent is reported at compile."""

    class FakeAgent:
        name = "triage"

    graph = chain("a")
    graph.add_node(FakeAgent())
    graph.add_edge("a", "b")
    problems = problems_of(graph)
    assert has(problems, "'triage'", "or an Agent, got FakeAgent")
    assert has(problems, "unknown node 'b'")
