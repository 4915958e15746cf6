"""The Graph builder: nodes, edges, routes. Definition only; nothing runs here.

Every check happens in :meth:`Graph.compile`, which reports all problems at once, so the
``add_*`` methods only record what they are given.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from .compile import CompiledGraph
    from .safeguards.budgets import Budget
    from .store.base import Store

__all__ = ("END", "START", "Command", "Graph", "RetryPolicy", "Send")

START = "__start__"
"""The virtual node a run begins at: ``graph.add_edge(START, "first")``."""

END = "__end__"
"""The virtual node a run finishes at: ``graph.add_edge("last", END)``."""

StateT = TypeVar("StateT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Send:
    """Run ``node`` as its own task in the next step, with ``payload`` as its input.

    Returned (one or several) by a node or a route for dynamic fan-out; ``node`` must be one of
    the declared targets of whoever returns it.
    """

    node: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Command:
    """Update the state and choose where to go next, from one node.

    ``goto`` names declared targets (``add_node(..., targets=[...])``) or holds :class:`Send`
    objects; it adds to the node's static edges, it does not replace them.
    """

    update: Any = None
    goto: str | Send | Sequence[str | Send] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Retry a failing node attempt with exponential backoff.

    ``attempts`` counts the first try; ``on`` lists the exception types worth retrying (others
    fail the run at once). The delay before retry *n* (1-based) is
    ``min(backoff * multiplier ** (n - 1), max_backoff)``, scaled by a random factor in
    ``[1 - jitter, 1]``.
    """

    attempts: int = 3
    backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 0.25
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy needs backoff >= 0, max_backoff >= 0, multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be within [0, 1], got {self.jitter}")

    def delay(self, retry: int) -> float:
        """Return the delay in seconds before retry number ``retry`` (1-based)."""
        base = min(self.backoff * self.multiplier ** (retry - 1), self.max_backoff)
        return base * (1 - self.jitter * random.random())

    def retries(self, error: BaseException) -> bool:
        """Tell whether ``error`` is worth another attempt."""
        return isinstance(error, self.on)


NodeFn = Callable[[Any, Any], Awaitable[Any]]
RouteFn = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    fn: Any
    timeout: float | None = None
    retry: RetryPolicy | None = None
    targets: tuple[str, ...] = ()
    kind: str = "function"
    tools: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class EdgeSpec:
    sources: tuple[str, ...]
    target: str

    @property
    def is_join(self) -> bool:
        return len(self.sources) > 1


@dataclass(frozen=True, slots=True)
class RouteSpec:
    source: str
    fn: Any
    targets: tuple[str, ...]


@dataclass(slots=True)
class _Definition:
    nodes: list[NodeSpec] = field(default_factory=list)
    edges: list[EdgeSpec] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


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
        self._definition = _Definition()

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
                self._definition.problems.append(
                    f"agent {node.name!r}: add_node(agent) takes no function or tools; give "
                    f"the agent its tools with Agent(..., tools=[...])"
                )
            fn, tools = node, node.tools  # type: ignore[assignment]  # an Agent is its own fn
            name, kind = node.name, "agent"
            timeout = node.timeout if timeout is None else timeout
            retry = node.retry if retry is None else retry
        elif isinstance(node, str):
            name, kind = node, "function"
        else:
            name = getattr(node, "name", repr(node))
            self._definition.problems.append(
                f"node {name!r}: add_node takes a name and an async function "
                f"(add_node('name', fn)) or an Agent, got {type(node).__name__}"
            )
            return self
        policy: Any = retry
        if isinstance(retry, int) and not isinstance(retry, bool):
            policy = RetryPolicy(attempts=retry)
        if isinstance(targets, str):
            targets = (targets,)
        self._definition.nodes.append(
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
        self._definition.edges.append(EdgeSpec(sources=sources, target=target))
        return self

    def add_route(self, source: str, fn: RouteFn, *, targets: Iterable[str]) -> Graph[StateT]:
        """Route after ``source`` with ``fn(state)`` (plain or async).

        ``fn`` returns one target, several, :class:`Send` objects, or ``END``; every possible
        target must be declared in ``targets``.
        """
        if isinstance(targets, str):
            targets = (targets,)
        self._definition.routes.append(RouteSpec(source=source, fn=fn, targets=tuple(targets)))
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
            self,
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
