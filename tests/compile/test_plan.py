"""The compiled graph as a frozen plan, and its structure hash."""

from __future__ import annotations

from typing import Annotated

import pytest
from helpers import chain, step, stop
from pydantic import BaseModel

from orchestra import END, START, Graph, extend

# -- the compiled graph -----------------------------------------------------------------------


def test_compiled_graph_is_frozen() -> None:
    """Setting any attribute of a compiled graph raises AttributeError."""
    app = chain("a").compile()
    with pytest.raises(AttributeError, match="frozen"):
        app.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        app.new_attribute = 1  # type: ignore[attr-defined]
    assert app.name == "State"


def test_compiled_graph_does_not_change_with_its_graph() -> None:
    """Adding to the Graph after compile does not change the compiled graph."""
    graph = chain("a")
    app = graph.compile()
    graph.add_node("b", step)
    assert set(app.nodes) == {"a"}


def test_compiled_graph_structure_hash_is_stable_for_equal_graphs() -> None:
    """Two graphs built the same way have the same structure hash."""
    first = chain("a", "b").compile()
    second = chain("a", "b").compile()
    assert first.structure_hash == second.structure_hash
    assert first.structure_hash == chain("a", "b").compile().structure_hash


def test_compiled_graph_structure_hash_changes_with_an_edge() -> None:
    """Changing one edge changes the structure hash."""
    base = chain("a", "b")
    changed = chain("a", "b")
    changed.add_edge(START, "b")
    assert base.compile().structure_hash != changed.compile().structure_hash


def test_compiled_graph_structure_hash_changes_with_a_route_target() -> None:
    """Changing a route's targets changes the structure hash."""
    one = chain("a", "b")
    one.add_route("b", stop, targets=[END])
    two = chain("a", "b")
    two.add_route("b", stop, targets=["a", END])
    assert one.compile().structure_hash != two.compile().structure_hash


def test_compiled_graph_structure_hash_changes_with_the_state_model() -> None:
    """A different state schema gives a different structure hash."""

    class Other(BaseModel):
        log: Annotated[list[str], extend] = []
        count: int = 0

    graph = Graph(Other)
    graph.add_node("a", step)
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    assert graph.compile().structure_hash != chain("a").compile().structure_hash
