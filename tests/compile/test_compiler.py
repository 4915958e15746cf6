"""compile(): a compiled graph, or one error listing every problem at once: the state model,
duplicate names and the compile options."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Optional

import pytest
from helpers import State, chain, has, problems_of, step, stop
from pydantic import BaseModel, ConfigDict

from orchestra import END, START, CompiledGraph, Graph, GraphValidationError, append, extend, merge
from orchestra.errors import DefinitionError

# -- valid graphs ---------------------------------------------------------------------------


def test_compile_valid_graph_returns_a_compiled_graph() -> None:
    """A valid graph compiles to a CompiledGraph holding its nodes."""
    app = chain("plan", "work").compile()
    assert isinstance(app, CompiledGraph)
    assert set(app.nodes) == {"plan", "work"}
    assert app.name == "State"


def test_compile_graph_name_defaults_to_the_state_model() -> None:
    """A graph is named after its state model unless given a name."""
    assert Graph(State).name == "State"
    assert Graph(State, name="tickets").name == "tickets"


def test_compile_error_is_a_definition_error_naming_the_graph() -> None:
    """GraphValidationError is a DefinitionError whose message names the graph and counts."""
    graph = Graph(State, name="broken")
    graph.add_node("a", step)
    graph.add_node("a", step)
    with pytest.raises(DefinitionError) as caught:
        graph.compile()
    assert isinstance(caught.value, GraphValidationError)
    assert caught.value.graph == "broken"
    message = str(caught.value)
    assert "'broken'" in message
    assert f"{len(caught.value.problems)} problem" in message
    for problem in caught.value.problems:
        assert problem in message


def test_compile_reports_duplicate_node_names() -> None:
    """Two nodes with one name are reported once, with the count."""
    graph = chain("a", "b")
    graph.add_node("a", step)
    graph.add_node("b", step)
    graph.add_node("b", step)
    graph.add_edge("a", "c")
    problems = problems_of(graph)
    assert has(problems, "'a'", "used by 2 nodes")
    assert has(problems, "'b'", "used by 3 nodes")
    assert has(problems, "unknown node 'c'")
    assert sum("used by" in problem for problem in problems) == 2


def test_compile_reports_a_state_model_pydantic_cannot_serialize() -> None:
    """A state holding an arbitrary class pydantic cannot serialize is reported."""

    class Connection:
        pass

    class Unserializable(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        connection: Connection | None = None

    graph = Graph(Unserializable)
    graph.add_node("a", step)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    problems = problems_of(graph)
    assert has(problems, "Unserializable", "cannot be serialized")
    assert has(problems, "unknown node 'b'")
    assert has(problems, "'a'", "cannot reach END")


@pytest.mark.parametrize("not_a_model", [dict, "State", dataclasses.make_dataclass("D", ["x"])])
def test_compile_reports_a_state_that_is_not_a_base_model(not_a_model: Any) -> None:
    """A state that is not a pydantic BaseModel subclass is reported."""
    graph = Graph(not_a_model)
    graph.add_node("a", step)
    graph.add_node("a", step)
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    problems = problems_of(graph)
    assert has(problems, "state must be a pydantic BaseModel subclass")
    assert has(problems, "'a'", "used by 2 nodes")


def test_compile_reports_two_reducers_on_one_field() -> None:
    """A state field with two reducers is reported, with other schema problems."""

    class Twice(BaseModel):
        items: Annotated[list[str], append, extend] = []
        total: Annotated[str, append] = ""

    graph = Graph(Twice)
    graph.add_node("a", step)
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    graph.add_edge(START, "ghost")
    problems = problems_of(graph)
    assert has(problems, "'items'", "2 reducers")
    assert has(problems, "'total'", "append")
    assert has(problems, "unknown node 'ghost'")


def test_compile_reports_bad_compile_options() -> None:
    """A max_concurrency below 1 and a budget that is not a Budget are reported."""
    graph = chain("a")
    with pytest.raises(GraphValidationError) as caught:
        graph.compile(max_concurrency=0, budget="lots")  # type: ignore[arg-type]
    problems = caught.value.problems
    assert has(problems, "max_concurrency must be a positive integer")
    assert has(problems, "budget must be a Budget")


def test_compile_reports_a_max_concurrency_of_true() -> None:
    """True is an int to Python but not a concurrency limit: it is reported."""
    with pytest.raises(GraphValidationError) as caught:
        chain("a").compile(max_concurrency=True)
    assert has(caught.value.problems, "max_concurrency must be a positive integer", "True")


class Optionals(BaseModel):
    notes: Annotated[Optional[list[str]], append] = None  # noqa: UP045 - typing.Union form
    seen: Annotated[dict[str, int] | None, merge] = None


@pytest.mark.anyio
async def test_compile_accepts_optional_list_and_dict_reducer_fields() -> None:
    """``Optional[list[X]]`` takes append and ``dict[K, V] | None`` takes merge, from None."""

    async def first(state: Optionals, ctx: Any) -> dict[str, Any]:
        return {"notes": "one", "seen": {"a": 1}}

    async def second(state: Optionals, ctx: Any) -> dict[str, Any]:
        return {"notes": "two", "seen": {"b": 2}}

    graph = Graph(Optionals)
    graph.add_node("first", first)
    graph.add_node("second", second)
    graph.add_edge(START, "first")
    graph.add_edge("first", "second")
    graph.add_edge("second", END)
    outcome = await graph.compile().run(Optionals())
    assert outcome.state == Optionals(notes=["one", "two"], seen={"a": 1, "b": 2})


def test_compile_reports_every_problem_at_once() -> None:
    """One graph with many problems reports all of them in one error."""

    def sync_node(state: State, ctx: Any) -> None:
        return None

    graph = Graph(State)
    graph.add_node("plan", step)
    graph.add_node("plan", step)
    graph.add_node("work", sync_node, timeout=0)
    graph.add_node("island", step)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "wrok")
    graph.add_route("plan", stop, targets=[])
    graph.add_edge("island", END)
    problems = problems_of(graph)
    expected = [
        ("'plan'", "used by 2 nodes"),
        ("'work'", "not an async function"),
        ("'work'", "timeout"),
        ("unknown node 'wrok'", "did you mean 'work'?"),
        ("route after 'plan'", "targets is empty"),
        ("'island'", "unreachable"),
        ("'work'", "unreachable"),
        ("'plan'", "cannot reach END"),
    ]
    for parts in expected:
        assert has(problems, *parts), parts
    assert len(problems) == len(expected)
