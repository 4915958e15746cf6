"""Compile: every problem of a graph reported at once, and the frozen compiled graph."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Optional

import pytest
from pydantic import BaseModel, ConfigDict

from orchestra import (
    END,
    START,
    CompiledGraph,
    Graph,
    GraphValidationError,
    append,
    extend,
    merge,
)
from orchestra.errors import DefinitionError


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


def test_compile_cycle_with_a_route_exit_is_valid() -> None:
    """A cycle whose way out is a route compiles."""
    graph = Graph(State)
    graph.add_node("think", step)
    graph.add_node("act", step)
    graph.add_edge(START, "think")
    graph.add_edge("think", "act")
    graph.add_route("act", stop, targets=["think", END])
    assert graph.compile().nodes.keys() == {"think", "act"}


def test_compile_self_loop_through_a_route_is_valid() -> None:
    """A node routing back to itself, with END as another target, compiles."""
    graph = Graph(State)
    graph.add_node("again", step)
    graph.add_edge(START, "again")
    graph.add_route("again", stop, targets=["again", END])
    app = graph.compile()
    assert app.routes["again"][0].targets == ("again", END)


def test_compile_join_and_command_targets_are_valid() -> None:
    """Joins and declared Command targets count as paths to END."""
    graph = Graph(State)
    graph.add_node("a", step)
    graph.add_node("b", step, targets=["c"])
    graph.add_node("c", step)
    graph.add_node("d", step)
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge(["a", "c"], "d")
    graph.add_edge("d", END)
    app = graph.compile()
    assert [join.sources for join in app.joins] == [("a", "c")]


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


# -- every problem, each in a graph with several problems --------------------------------------


def test_compile_reports_unknown_node_in_an_edge_with_a_hint() -> None:
    """An edge to an unknown node is reported with a 'did you mean' hint."""
    graph = chain("research", "write")
    graph.add_edge("research", "wirte")
    graph.add_edge("reserch", END)
    graph.add_node("lonely", step)
    problems = problems_of(graph)
    assert has(problems, "unknown node 'wirte'", "did you mean 'write'?")
    assert has(problems, "unknown node 'reserch'", "did you mean 'research'?")
    assert has(problems, "'lonely'", "unreachable")


def test_compile_reports_unknown_node_without_a_hint_when_nothing_is_close() -> None:
    """An unknown node with no similar name is reported without a hint."""
    graph = chain("a")
    graph.add_edge("a", "zzzzzz")
    graph.add_node("b", step)
    problems = problems_of(graph)
    assert has(problems, "unknown node 'zzzzzz'")
    assert not has(problems, "'zzzzzz'", "did you mean")
    assert has(problems, "'b'", "unreachable")


def test_compile_reports_unknown_nodes_in_a_route() -> None:
    """A route from or to an unknown node is reported."""
    graph = chain("review", "publish")
    graph.add_route("review", stop, targets=["publsh", END])
    graph.add_route("reveiw", stop, targets=[END])
    graph.add_node("sync", lambda state, ctx: None)
    problems = problems_of(graph)
    assert has(problems, "route after 'review'", "unknown node 'publsh'", "did you mean 'publish'?")
    assert has(problems, "route after 'reveiw'", "unknown node 'reveiw'", "'review'")
    assert has(problems, "'sync'", "not an async function")


def test_compile_reports_unknown_nodes_in_a_join() -> None:
    """A join with an unknown source or target is reported."""
    graph = chain("left", "right")
    graph.add_edge(["left", "rihgt"], "merg")
    graph.add_node("merge", step)
    problems = problems_of(graph)
    assert has(problems, "left + rihgt -> merg", "unknown node 'rihgt'", "did you mean 'right'?")
    assert has(problems, "left + rihgt -> merg", "unknown node 'merg'", "did you mean 'merge'?")
    assert has(problems, "'merge'", "unreachable")


def test_compile_reports_unknown_command_targets() -> None:
    """A node's declared targets naming an unknown node are reported."""
    graph = Graph(State)
    graph.add_node("decide", step, targets=["aprove", END])
    graph.add_node("approve", step)
    graph.add_edge(START, "decide")
    graph.add_edge("approve", END)
    graph.add_node("decide", step)
    problems = problems_of(graph)
    assert has(problems, "'decide' targets", "unknown node 'aprove'", "did you mean 'approve'?")
    assert has(problems, "'approve'", "unreachable")
    assert has(problems, "'decide'", "used by 2 nodes")


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


@pytest.mark.parametrize("reserved", [START, END])
def test_compile_reports_reserved_node_names(reserved: str) -> None:
    """A node named START or END is reported."""
    graph = chain("a")
    graph.add_node(reserved, step)
    graph.add_node("b", step, timeout=-1)
    problems = problems_of(graph)
    assert has(problems, repr(reserved), "reserved")
    assert has(problems, "'b'", "timeout must be a positive number")


def test_compile_reports_empty_node_names() -> None:
    """An empty node name is reported."""
    graph = chain("a")
    graph.add_node("", step)
    graph.add_node("b", None)
    problems = problems_of(graph)
    assert has(problems, "node name ''", "invalid")
    assert has(problems, "'b'", "has no function")


def test_compile_reports_nodes_unreachable_from_start() -> None:
    """Every node no path from START leads to is reported."""
    graph = chain("a")
    graph.add_node("island", step)
    graph.add_node("beyond", step)
    graph.add_edge("island", "beyond")
    graph.add_edge("beyond", END)
    graph.add_route("a", stop, targets=[])
    problems = problems_of(graph)
    assert has(problems, "'island'", "unreachable from START")
    assert has(problems, "'beyond'", "unreachable from START")
    assert not has(problems, "'a'", "unreachable")
    assert has(problems, "route after 'a'", "targets is empty")


def test_compile_reports_nodes_that_cannot_reach_end() -> None:
    """Every reachable node with no path to END is reported."""
    graph = chain("a")
    graph.add_node("sink", step)
    graph.add_node("deeper", step)
    graph.add_route("a", stop, targets=["sink", END])
    graph.add_route("sink", stop, targets=["deeper"])
    graph.add_route("deeper", stop, targets=["sink"])
    graph.add_node("slow", step, timeout=0)
    graph.add_edge("slow", END)
    problems = problems_of(graph)
    assert has(problems, "'sink'", "cannot reach END")
    assert has(problems, "'deeper'", "cannot reach END")
    assert not has(problems, "'a'", "cannot reach END")
    assert has(problems, "'slow'", "timeout must be a positive number, got 0")
    assert has(problems, "'slow'", "unreachable")


def test_compile_reports_a_cycle_of_unconditional_edges() -> None:
    """A cycle made only of plain edges is reported even when it can reach END."""
    graph = Graph(State)
    for name in ("a", "b", "c"):
        graph.add_node(name, step)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_edge("c", "a")
    graph.add_edge("a", END)
    graph.add_node("b", step)
    problems = problems_of(graph)
    assert has(problems, "cycle", "unconditional edges")
    cycle = next(problem for problem in problems if problem.startswith("cycle"))
    for name in ("a", "b", "c"):
        assert name in cycle
    assert has(problems, "'b'", "used by 2 nodes")
    assert not has(problems, "cannot reach END")


def test_compile_reports_an_unconditional_self_loop() -> None:
    """A plain edge from a node to itself is a cycle that never ends."""
    graph = chain("spin")
    graph.add_edge("spin", "spin")
    graph.add_edge(START, "nowhere")
    problems = problems_of(graph)
    assert has(problems, "cycle spin -> spin")
    assert has(problems, "unknown node 'nowhere'")


def test_compile_reports_each_unconditional_cycle() -> None:
    """Two separate plain-edge cycles are both reported."""
    graph = chain("a", "b")
    graph.add_edge("a", "a")
    graph.add_edge("b", "b")
    problems = problems_of(graph)
    assert has(problems, "cycle a -> a")
    assert has(problems, "cycle b -> b")


def test_compile_reports_a_route_with_empty_targets() -> None:
    """A route declaring no targets is reported."""
    graph = chain("a", "b")
    graph.add_route("a", stop, targets=[])
    graph.add_route("b", "not callable", targets=[END])  # type: ignore[arg-type]
    problems = problems_of(graph)
    assert has(problems, "route after 'a'", "targets is empty")
    assert has(problems, "route after 'b'", "not callable")


def test_compile_reports_start_without_an_outgoing_edge() -> None:
    """A graph whose START leads nowhere is reported, with its unreachable nodes."""
    graph = Graph(State)
    graph.add_node("a", step)
    graph.add_node("b", step)
    graph.add_edge("a", "b")
    graph.add_edge("b", END)
    problems = problems_of(graph)
    assert has(problems, "START has no outgoing edge")
    assert has(problems, "'a'", "unreachable from START")
    assert has(problems, "'b'", "unreachable from START")


def test_compile_reports_a_non_async_node_function() -> None:
    """A node whose function is not async is reported."""

    def sync_node(state: State, ctx: Any) -> None:
        return None

    graph = chain("a")
    graph.add_node("b", sync_node)
    graph.add_node("c", 42)  # type: ignore[arg-type]
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_route("c", stop, targets=[END])
    problems = problems_of(graph)
    assert has(problems, "'b'", "'sync_node'", "not an async function")
    assert has(problems, "'c'", "not callable")


def test_compile_accepts_an_object_with_an_async_call() -> None:
    """A callable object whose __call__ is async is a valid node function."""

    class Worker:
        async def __call__(self, state: State, ctx: Any) -> None:
            return None

    graph = Graph(State)
    graph.add_node("w", Worker())
    graph.add_edge(START, "w")
    graph.add_edge("w", END)
    assert isinstance(graph.compile().nodes["w"].fn, Worker)


@pytest.mark.parametrize("timeout", [0, -0.5, "1s", float("nan"), True])
def test_compile_reports_a_bad_timeout(timeout: object) -> None:
    """A timeout that is not a positive number is reported."""
    graph = chain("a")
    graph.add_node("b", step, timeout=timeout)  # type: ignore[arg-type]
    graph.add_node("c", step, retry="twice")  # type: ignore[arg-type]
    problems = problems_of(graph)
    assert has(problems, "'b'", "timeout must be a positive number", repr(timeout))
    assert has(problems, "'c'", "retry must be a RetryPolicy")
    assert has(problems, "'b'", "unreachable")


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


def test_compile_reports_edges_that_misuse_start_and_end() -> None:
    """Edges out of END, into START, or joins with START are reported."""
    graph = chain("a", "b")
    graph.add_edge(END, "a")
    graph.add_edge("b", START)
    graph.add_edge([START, "a"], "b")
    graph.add_route(END, stop, targets=["a"])
    graph.add_edge(["a", "a"], "b")
    problems = problems_of(graph)
    assert has(problems, "END has no outgoing edges")
    assert has(problems, "nothing can lead to START")
    assert has(problems, "START cannot be part of a join")
    assert has(problems, "END has no outgoing routes")
    assert has(problems, "same source twice")


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


def test_compile_reports_node_names_with_brackets() -> None:
    """A node may not be named like a Send task label ("worker[0]")."""
    graph = chain("w[0]")
    assert "node name 'w[0]' may not contain '[' or ']'" in problems_of(graph)
