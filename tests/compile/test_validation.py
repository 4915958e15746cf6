"""Validation: valid graphs pass; each problem of a graph (unknown or misused nodes, unreachable
nodes, exit-less cycles, bad node functions) is reported, with the others; cycles() lists
every cycle with its ways out."""

from __future__ import annotations

from typing import Any

import pytest
from apps import graph_app
from helpers import State, chain, has, problems_of, step, stop
from pydantic import BaseModel

from orchestra import END, START, Graph, NodeContext, Send
from orchestra.compile.validation import Cycle, Link, cycles
from orchestra.specs import EdgeSpec, NodeSpec, RouteSpec


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


def test_compile_reports_node_names_with_brackets() -> None:
    """A node may not be named like a Send task label ("worker[0]")."""
    graph = chain("w[0]")
    assert "node name 'w[0]' may not contain '[' or ']'" in problems_of(graph)


# -- cycles(): each cycle of a graph with its ways out -------------------------------------


class Counter(BaseModel):
    n: int = 0


async def increment(state: Counter, ctx: NodeContext) -> dict[str, Any]:
    return {"n": state.n + 1}


async def fan(state: Counter, ctx: NodeContext) -> list[Send]:
    return [Send("work", 1)]


def done(state: Counter) -> str:
    return END


def cycles_of(app: Any, **options: Any) -> list[Cycle]:
    routes = [route for group in app.routes.values() for route in group]
    return cycles(app.edges, routes, app.nodes, **options)


def test_cycles_lists_each_cycle_with_its_hops_exits_and_agents() -> None:
    """Both cycles of the drafting app come back, each with how it goes round and out."""
    through_agent, alone = cycles_of(graph_app.app)
    assert through_agent.nodes == ("writer", "review")
    assert through_agent.links == (
        Link("writer", "review", "edge"),
        Link("review", "writer", "route", "verdict"),
    )
    assert through_agent.exits == (
        Link("review", "polish", "route", "verdict"),
        Link("review", END, "route", "verdict"),
    )
    assert through_agent.agents == ("writer",)
    assert through_agent.conditional
    assert alone == Cycle(
        nodes=("polish",),
        links=(Link("polish", "polish", "route", "again"),),
        exits=(Link("polish", END, "route", "again"),),
        agents=(),
    )


def test_cycles_of_a_graph_without_one_is_empty() -> None:
    """A graph that cannot go round has no cycles."""
    assert cycles_of(graph_app.straight) == []


def test_cycles_start_at_the_node_nearest_start() -> None:
    """A cycle is told from where a run enters it, whatever the declaration order."""
    graph = Graph(Counter)
    graph.add_node("check", increment)
    graph.add_node("work", increment)
    graph.add_edge(START, "work")
    graph.add_edge("work", "check")
    graph.add_route("check", done, targets=["work", END])
    (cycle,) = cycles_of(graph.compile())
    assert cycle.nodes == ("work", "check")


def test_cycles_follow_goto_targets_and_joins() -> None:
    """Declared goto/Send targets and joins are hops too, both conditional."""
    graph = Graph(Counter)
    graph.add_node("plan", fan, targets=["work"])
    graph.add_node("work", increment)
    graph.add_node("a", increment)
    graph.add_node("b", increment)
    graph.add_node("merge", increment)
    graph.add_edge(START, "plan")
    graph.add_route("work", done, targets=["plan", "a", "b"])
    graph.add_edge(["a", "b"], "merge")
    graph.add_route("merge", done, targets=["a", END])
    found = {cycle.nodes: cycle for cycle in cycles_of(graph.compile())}
    assert set(found) == {("plan", "work"), ("a", "merge")}
    assert [link.via for link in found["plan", "work"].links] == ["goto", "route"]
    assert [link.via for link in found["a", "merge"].links] == ["join", "route"]
    assert Link("merge", END, "route", "done") in found["a", "merge"].exits
    assert all(cycle.conditional for cycle in found.values())


def test_cycles_work_on_a_definition_that_does_not_compile() -> None:
    """On bare specs it reports an unconditional cycle with no way out, and ignores unknown
    nodes (compile reports those)."""
    nodes = {name: NodeSpec(name, None) for name in ("a", "b")}
    edges = [EdgeSpec(("a",), "b"), EdgeSpec(("b",), "a"), EdgeSpec(("b",), "ghost")]
    routes = [RouteSpec("ghost", done, ("a",))]
    (cycle,) = cycles(edges, routes, nodes)
    assert cycle.nodes == ("a", "b")
    assert not cycle.conditional
    assert cycle.exits == ()


def test_cycles_stops_at_the_limit() -> None:
    """Four agents that can each hand over to any other make 20 cycles; limit caps them."""
    names = ["w", "x", "y", "z"]
    graph = Graph(Counter)
    for name in names:
        graph.add_node(name, fan, targets=[n for n in names if n != name])
        graph.add_route(name, done, targets=[END])
    graph.add_edge(START, "w")
    app = graph.compile()
    assert len(cycles_of(app)) == 20
    assert len(cycles_of(app, limit=5)) == 5
