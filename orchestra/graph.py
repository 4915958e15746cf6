"""The Graph builder: nodes, edges, routes. Definition only; nothing runs here.

Every check happens in :meth:`Graph.compile`, which reports all problems at once, so the
``add_*`` methods only record what they are given (in :attr:`Graph.definition`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from .app import CompiledGraph
from .specs import (
    END,
    START,
    Command,
    EdgeSpec,
    GraphDefinition,
    NodeFn,
    NodeKind,
    NodeSpec,
    RetryPolicy,
    RouteFn,
    RouteSpec,
    Send,
)

if TYPE_CHECKING:
    from .safeguards.budgets import Budget
    from .store.base import Store

__all__ = ("END", "START", "Command", "Graph", "RetryPolicy", "Send")

StateT = TypeVar("StateT", bound=BaseModel)


class Graph(Generic[StateT]):
    """Define an agent graph over a typed state (a pydantic model).

    >>> graph = Graph(State)
    >>> graph.add_node("plan", plan)
    >>> graph.add_edge(START, "plan")
    >>> graph.add_route("plan", choose, targets=["work", END])
    >>> app = graph.compile()
    """

    def __init__(self, state: type[StateT], *, name: str | None = None) -> None:
        self.state = state
        self.name: str = name or getattr(state, "__name__", None) or "graph"
        self.definition = GraphDefinition()

    def add_node(
        self,
        node: str | Any,
        fn: NodeFn | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | int | None = None,
        targets: Iterable[str] = (),
        tools: Iterable[Any] = (),
    ) -> Graph[StateT]:
        """Add a node: an async function ``(state, ctx) -> update``, or an :class:`Agent`.

        ``timeout`` bounds each attempt in seconds; ``retry`` is a :class:`RetryPolicy` or a
        number of attempts; ``targets`` declares where a :class:`Command` ``goto`` or a
        :class:`Send` returned by this node may lead; ``tools`` are the tools the node may
        call with ``ctx.call_tool`` (its allowlist). An agent brings its own name, tools,
        timeout and retry: ``add_node(agent)`` or ``add_node(agent, targets=[...])``.
        """
        from .agents import Agent

        if isinstance(node, Agent):
            if fn is not None or tools:
                self.definition.problems.append(
                    f"agent {node.name!r}: add_node(agent) takes no function or tools; give "
                    f"the agent its tools with Agent(..., tools=[...])"
                )
            fn, tools = node, node.tools  # type: ignore[assignment]  # an Agent is its own fn
            name, kind = node.name, NodeKind.AGENT
            timeout = node.timeout if timeout is None else timeout
            retry = node.retry if retry is None else retry
        elif isinstance(node, str):
            name, kind = node, NodeKind.FUNCTION
        else:
            name = getattr(node, "name", repr(node))
            self.definition.problems.append(
                f"node {name!r}: add_node takes a name and an async function "
                f"(add_node('name', fn)) or an Agent, got {type(node).__name__}"
            )
            return self
        policy: Any = retry
        if isinstance(retry, int) and not isinstance(retry, bool):
            policy = RetryPolicy(attempts=retry)
        if isinstance(targets, str):
            targets = (targets,)
        self.definition.nodes.append(
            NodeSpec(
                name=name,
                fn=fn,
                timeout=timeout,
                retry=policy,
                targets=tuple(targets),
                kind=kind,
                tools=tuple(tools),
            )
        )
        return self

    def add_edge(self, source: str | Sequence[str], target: str) -> Graph[StateT]:
        """Add an edge; with a list of sources, ``target`` runs once after all ran in one step."""
        sources = (source,) if isinstance(source, str) else tuple(source)
        self.definition.edges.append(EdgeSpec(sources=sources, target=target))
        return self

    def add_route(self, source: str, fn: RouteFn, *, targets: Iterable[str]) -> Graph[StateT]:
        """Route after ``source`` with ``fn(state)`` (plain or async).

        ``fn`` returns one target, several, :class:`Send` objects, or ``END``; every possible
        target must be declared in ``targets``.
        """
        if isinstance(targets, str):
            targets = (targets,)
        self.definition.routes.append(RouteSpec(source=source, fn=fn, targets=tuple(targets)))
        return self

    def compile(
        self,
        *,
        store: Store | str | os.PathLike[str] | None = None,
        budget: Budget | None = None,
        max_concurrency: int | None = None,
        app_ref: str | None = None,
        loop_guard: Any = ...,
        approvals: Any = ...,
        arbitration: Any = ...,
        interrupt_before: Iterable[str] = (),
        interrupt_after: Iterable[str] = (),
    ) -> CompiledGraph[StateT]:
        """Validate the graph and return a frozen, runnable :class:`CompiledGraph`.

        ``store``: a database path (an embedded :class:`~orchestra.store.SQLiteStore`) or a
        Store; without one, runs are not checkpointed. ``budget``: hard limits per run
        (default: ``Budget()``). ``max_concurrency``: most tasks of one run running at once.
        ``app_ref``: how an operator's ``orchestra resume`` imports this app again
        (``"package.module:attribute"``); found automatically when the compiled graph is a
        module-level attribute.

        ``loop_guard``: the loop detectors (default ``LoopGuard()``; ``None`` turns them off).

        ``approvals``: which tool calls wait for a person (default ``Approvals()``: every
        irreversible call; ``None``: none). ``arbitration``: how conflicting tool calls of
        one step are settled (default ``Arbitration()``: serialize; ``None``: no
        arbitration, every call runs at once). ``interrupt_before`` / ``interrupt_after``:
        nodes the run stops before / after, for an operator to let it go on.

        Raises :class:`~orchestra.errors.GraphValidationError` listing every problem found.
        """
        from .compile import DEFAULT_GUARD, compile_graph

        caller = sys._getframe(1).f_globals
        origin = (caller.get("__name__"), caller.get("__file__"))
        return compile_graph(
            self.definition,
            self.state,
            graph_name=self.name,
            plan_type=CompiledGraph,
            store=store,
            budget=budget,
            max_concurrency=max_concurrency,
            app_ref=app_ref,
            origin=origin,
            loop_guard=DEFAULT_GUARD if loop_guard is ... else loop_guard,
            approvals=DEFAULT_GUARD if approvals is ... else approvals,
            arbitration=DEFAULT_GUARD if arbitration is ... else arbitration,
            interrupt_before=interrupt_before,
            interrupt_after=interrupt_after,
        )
