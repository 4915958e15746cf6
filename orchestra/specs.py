"""What a graph is made of, as data: the virtual nodes, Send, Command, RetryPolicy and the
node, edge and route specs a Graph builder records. Nothing here runs anything."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = (
    "END",
    "NO_PAYLOAD",
    "START",
    "Command",
    "EdgeSpec",
    "Effect",
    "GraphDefinition",
    "NodeKind",
    "NodeSpec",
    "RetryPolicy",
    "RouteSpec",
    "Send",
)

START = "__start__"
"""The virtual node a run begins at: ``graph.add_edge(START, "first")``."""

END = "__end__"
"""The virtual node a run finishes at: ``graph.add_edge("last", END)``."""


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


class Effect(StrEnum):
    """What a tool does to the world.

    ``READ`` changes nothing; ``WRITE`` changes something that can be changed back;
    ``IRREVERSIBLE`` cannot be undone (a payment, an email): it is recorded as started before
    it runs, and a crash mid-call makes it *in doubt* for an operator, never a silent re-run.
    """

    READ = "read"
    WRITE = "write"
    IRREVERSIBLE = "irreversible"


class NodeKind(StrEnum):
    """What runs a node: a plain async function or an Agent."""

    FUNCTION = "function"
    AGENT = "agent"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    fn: Any
    timeout: float | None = None
    retry: RetryPolicy | None = None
    targets: tuple[str, ...] = ()
    kind: NodeKind = NodeKind.FUNCTION
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
class GraphDefinition:
    """What a Graph builder recorded: nodes, edges, routes and the problems found while
    adding them (reported by compile with every other problem)."""

    nodes: list[NodeSpec] = field(default_factory=list)
    edges: list[EdgeSpec] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


NO_PAYLOAD: Any = type("NoPayload", (), {"__repr__": lambda self: "NO_PAYLOAD"})()
"""Marks a task started by an edge: its input is the run state, not a Send payload."""
