"""Compile a graph definition: check everything, report every problem at once, and build
the frozen plan."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, get_origin

from pydantic import BaseModel

from ..errors import GraphValidationError
from ..safeguards.approvals import Approvals
from ..safeguards.arbitration import Arbitration
from ..safeguards.budgets import Budget, price_of
from ..safeguards.caps import field_caps
from ..safeguards.loops import LoopGuard
from ..specs import GraphDefinition, NodeKind, NodeSpec
from ..state import StateSchema
from .plan import Plan
from .validation import (
    graph_tool_problems,
    node_problems,
    reference_problems,
    structure_problems,
)

__all__ = ("DEFAULT_GUARD", "compile_graph", "price_problems")

DEFAULT_GUARD: Any = object()
"""Stands for "the default LoopGuard()" in compile's signature (None turns it off)."""

PlanT = TypeVar("PlanT", bound=Plan[Any])


def compile_graph(
    definition: GraphDefinition,
    state: Any,
    *,
    graph_name: str,
    plan_type: type[PlanT],
    store: Any = None,
    budget: Budget | None,
    max_concurrency: int | None,
    app_ref: str | None = None,
    origin: tuple[str | None, str | None] = (None, None),
    loop_guard: Any = DEFAULT_GUARD,
    approvals: Any = DEFAULT_GUARD,
    arbitration: Any = DEFAULT_GUARD,
    interrupt_before: Iterable[str] = (),
    interrupt_after: Iterable[str] = (),
) -> PlanT:
    """Check a graph definition (every problem at once) and build its frozen plan as
    ``plan_type``; raise :class:`~orchestra.errors.GraphValidationError` listing them."""
    problems: list[str] = list(definition.problems)
    schema: StateSchema | None = None
    if not (isinstance(state, type) and issubclass(state, BaseModel)):
        problems.append(f"state must be a pydantic BaseModel subclass, got {state!r}")
    else:
        schema = StateSchema(state)
        problems.extend(schema.problems)
        problems.extend(cap_problems(state))
        serialization = schema.serialization_problem()
        if serialization is not None:
            problems.append(serialization)

    nodes: dict[str, NodeSpec] = {}
    counts = Counter(node.name for node in definition.nodes)
    for name, count in counts.items():
        if count > 1:
            problems.append(f"node name {name!r} is used by {count} nodes; names must be unique")
    for node in definition.nodes:
        problems.extend(node_problems(node))
        if node.kind is NodeKind.AGENT and schema is not None:
            problems.extend(node.fn.problems(state, schema))
        nodes.setdefault(node.name, node)
    problems.extend(graph_tool_problems(definition.nodes))

    known = set(nodes)
    problems.extend(reference_problems(definition.edges, definition.routes, nodes, known))

    if budget is not None and not isinstance(budget, Budget):
        problems.append(f"budget must be a Budget, got {type(budget).__name__}")
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool)
        or not isinstance(max_concurrency, int)
        or max_concurrency < 1
    ):
        problems.append(f"max_concurrency must be a positive integer, got {max_concurrency!r}")

    problems.extend(structure_problems(definition.edges, definition.routes, nodes))
    if budget is None or isinstance(budget, Budget):
        problems.extend(price_problems(nodes, budget or Budget()))

    resolved_store = None
    if store is not None:
        from ..store import as_store

        try:
            resolved_store = as_store(store)
        except TypeError as exc:
            problems.append(str(exc))
    if app_ref is not None and (not isinstance(app_ref, str) or ":" not in app_ref):
        problems.append(f"app_ref must look like 'package.module:attribute', got {app_ref!r}")

    if loop_guard is DEFAULT_GUARD:
        loop_guard = LoopGuard()
    if loop_guard is not None and not isinstance(loop_guard, LoopGuard):
        problems.append(f"loop_guard must be a LoopGuard or None, got {loop_guard!r}")
    elif loop_guard is not None and schema is not None:
        problems.extend(loop_guard.problems(schema.fields))
    approvals, arbitration = _hitl_settings(
        approvals, arbitration, nodes, definition.nodes, problems
    )
    before = _breakpoints("interrupt_before", interrupt_before, nodes, problems)
    after = _breakpoints("interrupt_after", interrupt_after, nodes, problems)
    if problems:
        raise GraphValidationError(graph_name, problems)
    assert schema is not None
    return plan_type(
        name=graph_name,
        state_model=state,
        schema=schema,
        nodes=nodes,
        edges=definition.edges,
        routes=definition.routes,
        budget=budget if budget is not None else Budget(),
        max_concurrency=max_concurrency,
        store=resolved_store,
        app_ref=app_ref,
        origin=origin,
        loop_guard=loop_guard,
        approvals=approvals,
        arbitration=arbitration,
        interrupt_before=before,
        interrupt_after=after,
    )


def _hitl_settings(
    approvals: Any,
    arbitration: Any,
    nodes: Mapping[str, Any],
    specs: Any,
    problems: list[str],
) -> tuple[Approvals | None, Arbitration | None]:
    """The approval policy and arbitration, defaulted and checked (problems appended)."""
    if approvals is DEFAULT_GUARD:
        approvals = Approvals()
    if arbitration is DEFAULT_GUARD:
        arbitration = Arbitration()
    tools = {
        name
        for node in nodes.values()
        for t in getattr(node, "tools", ())
        if isinstance(name := getattr(t, "name", None), str)
    }
    if approvals is not None:
        if not isinstance(approvals, Approvals):
            problems.append(f"approvals must be an Approvals or None, got {approvals!r}")
            approvals = None
        else:
            problems.extend(approvals.problems(nodes, tools))
    if arbitration is not None:
        if not isinstance(arbitration, Arbitration):
            problems.append(f"arbitration must be an Arbitration or None, got {arbitration!r}")
            arbitration = None
        else:
            problems.extend(arbitration.problems())
    return approvals, arbitration


def _breakpoints(
    label: str, names: Iterable[str], nodes: Mapping[str, Any], problems: list[str]
) -> frozenset[str]:
    if isinstance(names, str):
        problems.append(f"{label} takes a list of node names, got the string {names!r}")
        return frozenset()
    try:
        found = frozenset(names)
    except TypeError:
        problems.append(f"{label} takes a list of node names, got {names!r}")
        return frozenset()
    for name in sorted(found, key=str):
        if name not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            problems.append(f"{label}: no node {name!r} in this graph (its nodes: {known})")
    return found


def price_problems(
    nodes: Mapping[str, NodeSpec], budget: Budget, agents: Mapping[str, Budget] | None = None
) -> list[str]:
    """A cost budget needs a price for every model it covers: never a silent zero."""

    problems = []
    for node in nodes.values():
        if node.kind is not NodeKind.AGENT:
            continue
        agent = node.fn
        own = agent.budget if agents is None else agents.get(node.name)
        if budget.cost_usd is None and (own is None or own.cost_usd is None):
            continue
        name = getattr(agent.model, "name", None)
        if not isinstance(name, str) or price_of(name) is None:
            whose = "the run's" if budget.cost_usd is not None else "its own"
            problems.append(
                f"agent {node.name!r}: {whose} cost budget needs a price for model {name!r}; "
                f"add one with orchestra.register_price({name!r}, input_per_million=..., "
                f"output_per_million=...)"
            )
    return problems


def cap_problems(state: type[BaseModel]) -> list[str]:
    """Caps go on list fields."""
    problems = []
    for name, _ in field_caps(state).items():
        annotation = state.model_fields[name].annotation
        origin = get_origin(annotation) or annotation
        if origin not in (list, tuple):
            problems.append(f"state field {name!r} has a Cap but is not a list")
    return problems
