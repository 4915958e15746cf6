"""Compile a Graph: check everything with networkx, report every problem at once.

A :class:`CompiledGraph` is frozen: its nodes, edges and routes are fixed, so a run and its
replay always see the same structure (``structure_hash`` names it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import GraphValidationError, InputValidationError, StoreError
from .events import Event
from .graph import END, START, EdgeSpec, NodeSpec, RouteSpec
from .outcome import RunOutcome
from .safeguards.approvals import Approvals
from .safeguards.arbitration import Arbitration
from .safeguards.budgets import Budget
from .safeguards.loops import LoopGuard
from .state import StateSchema, describe_validation_error
from .validation import (
    graph_tool_problems,
    node_problems,
    reference_problems,
    structure_problems,
)

if TYPE_CHECKING:
    from .executor import Execution
    from .graph import Graph
    from .safeguards.interrupts import Request
    from .store.base import RunRecord, Store
    from .tools import Tool

__all__ = ("CompiledGraph",)

DEFAULT_GUARD: Any = object()
"""Stands for "the default LoopGuard()" in compile's signature (None turns it off)."""

StateT = TypeVar("StateT", bound=BaseModel)


class CompiledGraph(Generic[StateT]):
    """A validated, frozen graph, ready to run."""

    __slots__ = (
        "_app_ref",
        "_frozen",
        "_origin",
        "agent_budgets",
        "approvals",
        "arbitration",
        "budget",
        "edges",
        "interrupt_after",
        "interrupt_before",
        "joins",
        "loop_guard",
        "max_concurrency",
        "name",
        "nodes",
        "routes",
        "schema",
        "state_model",
        "store",
        "structure_hash",
        "successors",
        "tools",
    )

    name: str
    state_model: type[StateT]
    schema: StateSchema
    nodes: Mapping[str, NodeSpec]
    edges: tuple[EdgeSpec, ...]
    successors: Mapping[str, tuple[str, ...]]
    joins: tuple[EdgeSpec, ...]
    routes: Mapping[str, tuple[RouteSpec, ...]]
    budget: Budget
    agent_budgets: Mapping[str, Budget]
    loop_guard: LoopGuard | None
    approvals: Approvals | None
    arbitration: Arbitration | None
    interrupt_before: frozenset[str]
    interrupt_after: frozenset[str]
    max_concurrency: int | None
    structure_hash: str
    store: Store | None
    tools: Mapping[str, Tool]
    _app_ref: str | None
    _origin: tuple[str | None, str | None]

    def __init__(
        self,
        *,
        name: str,
        state_model: type[StateT],
        schema: StateSchema,
        nodes: Mapping[str, NodeSpec],
        edges: Iterable[EdgeSpec],
        routes: Iterable[RouteSpec],
        budget: Budget,
        max_concurrency: int | None,
        store: Store | None = None,
        app_ref: str | None = None,
        origin: tuple[str | None, str | None] = (None, None),
        loop_guard: LoopGuard | None = None,
        approvals: Approvals | None = None,
        arbitration: Arbitration | None = None,
        interrupt_before: frozenset[str] = frozenset(),
        interrupt_after: frozenset[str] = frozenset(),
    ) -> None:
        set_ = object.__setattr__
        set_(self, "approvals", approvals)
        set_(self, "arbitration", arbitration)
        set_(self, "interrupt_before", frozenset(interrupt_before))
        set_(self, "interrupt_after", frozenset(interrupt_after))
        set_(self, "name", name)
        set_(self, "state_model", state_model)
        set_(self, "schema", schema)
        set_(self, "nodes", MappingProxyType(dict(nodes)))
        from .agents import tool_map

        every = [t for node in self.nodes.values() for t in node.tools]
        set_(self, "tools", MappingProxyType(dict(tool_map(every))))
        edges = tuple(edges)
        set_(self, "edges", edges)
        successors: dict[str, list[str]] = defaultdict(list)
        for edge in edges:
            if not edge.is_join and edge.target not in successors[edge.sources[0]]:
                successors[edge.sources[0]].append(edge.target)
        set_(self, "successors", MappingProxyType({k: tuple(v) for k, v in successors.items()}))
        set_(self, "joins", tuple(e for e in edges if e.is_join))
        by_source: dict[str, list[RouteSpec]] = defaultdict(list)
        for route in routes:
            by_source[route.source].append(route)
        set_(self, "routes", MappingProxyType({k: tuple(v) for k, v in by_source.items()}))
        set_(self, "budget", budget)
        set_(
            self,
            "agent_budgets",
            MappingProxyType(
                {
                    name: node.fn.budget
                    for name, node in self.nodes.items()
                    if node.kind == "agent" and node.fn.budget is not None
                }
            ),
        )
        set_(self, "max_concurrency", max_concurrency)
        set_(self, "loop_guard", loop_guard)
        set_(self, "structure_hash", self._hash())
        set_(self, "store", store)
        set_(self, "_app_ref", app_ref)
        set_(self, "_origin", origin)
        set_(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"CompiledGraph is frozen; cannot set {name!r}")

    def __repr__(self) -> str:
        return f"<CompiledGraph {self.name!r} nodes={len(self.nodes)} hash={self.structure_hash}>"

    def with_store(self, store: Store | str | os.PathLike[str]) -> CompiledGraph[StateT]:
        """Return the same graph bound to another store (the CLI's ``--db``)."""
        from .store import as_store

        return CompiledGraph(
            name=self.name,
            state_model=self.state_model,
            schema=self.schema,
            nodes=self.nodes,
            edges=self.edges,
            routes=[r for rs in self.routes.values() for r in rs],
            budget=self.budget,
            max_concurrency=self.max_concurrency,
            store=as_store(store),
            app_ref=self.app_ref,
            loop_guard=self.loop_guard,
            approvals=self.approvals,
            arbitration=self.arbitration,
            interrupt_before=self.interrupt_before,
            interrupt_after=self.interrupt_after,
        )

    @property
    def app_ref(self) -> str | None:
        """``module:attribute`` (or ``path/file.py:attribute``) that holds this app, if known.

        Stored with each run so ``orchestra resume RUN`` can import the graph again.
        """
        if self._app_ref is not None:
            return self._app_ref
        module_name, file = self._origin
        module = sys.modules.get(module_name or "")
        if module is None:
            return None
        for attribute, value in vars(module).items():
            if value is self:
                where = os.path.abspath(file) if module_name == "__main__" and file else module_name
                ref = f"{where}:{attribute}"
                object.__setattr__(self, "_app_ref", ref)
                return ref
        return None

    def _hash(self) -> str:
        """Hash what a checkpoint depends on: nodes, edges, routes and the state schema."""
        description = {
            "state": _shape(self.state_model.model_json_schema(mode="serialization")),
            "reducers": {
                k: f.reducer.kind if f.reducer else None for k, f in self.schema.fields.items()
            },
            "nodes": sorted((n.name, n.kind, sorted(n.targets)) for n in self.nodes.values()),
            "edges": sorted((list(e.sources), e.target) for e in self.edges),
            "routes": sorted(
                (r.source, sorted(r.targets)) for rs in self.routes.values() for r in rs
            ),
        }
        blob = json.dumps(description, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def render(self) -> str:
        """Return a Mermaid flowchart of the graph (solid: edges, dotted: routes/targets)."""

        # Mermaid ids are letters, digits and underscores, not keywords; any other name (and
        # any starting with "__", so none can collide) gets a numbered id, and the label in
        # the node keeps the real name
        numbered = {
            name: f"__node{i}"
            for i, name in enumerate(self.nodes)
            if name.startswith("__")
            or not name.replace("_", "a").isalnum()
            or name.lower() in _MERMAID_WORDS
        }

        def ident(name: str) -> str:
            return numbered.get(name, name)

        def label(name: str) -> str:
            return '"' + name.replace('"', "#quot;") + '"'

        lines = ["flowchart TD"]
        lines.append(f"    {ident(START)}([start])")
        for name in self.nodes:
            lines.append(f"    {ident(name)}[{label(name)}]")
        lines.append(f"    {ident(END)}([end])")
        for edge in self.edges:
            if edge.is_join:
                join = "join_" + "_".join(map(ident, edge.sources)) + "__" + ident(edge.target)
                lines.append(f"    {join}(( ))")
                for source in edge.sources:
                    lines.append(f"    {ident(source)} --> {join}")
                lines.append(f"    {join} --> {ident(edge.target)}")
            else:
                lines.append(f"    {ident(edge.sources[0])} --> {ident(edge.target)}")
        for routes in self.routes.values():
            for route in routes:
                how = str(getattr(route.fn, "__name__", "route")).replace("|", "#124;")
                for target in route.targets:
                    lines.append(f"    {ident(route.source)} -.->|{how}| {ident(target)}")
        for node in self.nodes.values():
            for target in node.targets:
                lines.append(f"    {ident(node.name)} -.-> {ident(target)}")
        return "\n".join(lines)

    def validate_input(self, data: StateT | Mapping[str, Any]) -> StateT:
        """Return ``data`` as a valid state, or raise :class:`InputValidationError`."""
        model = self.state_model
        try:
            if isinstance(data, model):
                return model.model_validate(data.model_dump(), by_name=True)
            if isinstance(data, BaseModel):
                raise InputValidationError(
                    model.__name__, f"got a {type(data).__name__} instance, not {model.__name__}"
                )
            return model.model_validate(data, by_name=True)
        except ValidationError as exc:
            details = describe_validation_error(exc, "(root)")
            raise InputValidationError(model.__name__, details) from exc

    async def run(
        self, input: StateT | Mapping[str, Any], *, run_id: str | None = None
    ) -> RunOutcome[StateT]:
        """Run the graph from ``input`` until it completes or stops; return the outcome.

        A node failure does not raise: the outcome has status ``failed`` and the error
        (``outcome.raise_for_status()`` raises it). Invalid input raises
        :class:`InputValidationError` before anything runs.
        """
        from .executor import run_to_end

        return await run_to_end(self._execution(input, run_id, events=False))

    async def stream(
        self, input: StateT | Mapping[str, Any], *, run_id: str | None = None
    ) -> AsyncGenerator[Event, None]:
        """Run the graph and yield its events as each step passes its barrier.

        The last event is :class:`~orchestra.events.RunFinished` carrying the outcome. Invalid
        input raises on the first iteration, before any node runs. To stop early, close the
        stream (``contextlib.aclosing``): no further node runs.
        """
        from .executor import stream_events

        execution = self._execution(input, run_id, events=True)
        async with aclosing(stream_events(execution)) as events:
            async for event in events:
                yield event

    def _execution(
        self, input: StateT | Mapping[str, Any], run_id: str | None, *, events: bool
    ) -> Execution:
        from .executor import Execution
        from .recorder import Recorder
        from .store.base import new_owner_id

        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        state = self.validate_input(input)
        run_id = run_id or new_run_id()
        recorder = None
        if self.store is not None:
            recorder = Recorder(self.store, self, run_id, new_owner_id())
        return Execution(self, state, run_id=run_id, recorder=recorder, events=events)

    async def resume(
        self,
        run_id: str,
        *,
        answers: Mapping[str, Any] | None = None,
        allow_graph_change: bool = False,
    ) -> RunOutcome[StateT]:
        """Continue an unfinished run from its last checkpoint; return the new outcome.

        Works for crashed, interrupted, aborted, failed and budget-stopped runs. Tasks that
        finished in the step that was in flight are not run again, and the model and tool
        calls of that step that completed are replayed from the ledger, not made again.
        ``answers`` maps the ids of an interrupted run's requests (``outcome.pending``) to
        their answers; every answer is checked before anything changes
        (:class:`~orchestra.errors.AnswerError`). Refused with a clear error for an unknown
        or completed run, a run another live process owns, or a graph whose structure
        changed (unless ``allow_graph_change``).
        """
        from .executor import run_to_end
        from .runs import prepare_resume

        execution = await prepare_resume(
            self, run_id, allow_graph_change=allow_graph_change, answers=answers
        )
        return await run_to_end(execution)

    async def answer(self, run_id: str, answers: Mapping[str, Any]) -> tuple[Request, ...]:
        """Record answers to a stopped run's requests without resuming it; return the
        requests still open. Every answer is checked first (against its request's schema,
        the tool's for an ``Edit``); a refused one raises
        :class:`~orchestra.errors.AnswerError` and nothing is recorded. A later
        ``resume`` uses them."""
        from .runs import answer_requests
        from .safeguards.interrupts import Request

        rows = await answer_requests(self, self._require_store(), run_id, answers)
        return tuple(Request.from_row(row) for row in rows)

    async def pending(self, run_id: str | None = None) -> tuple[Request, ...]:
        """Return the open requests of one run, or of every run in the store, oldest
        first. Raises :class:`~orchestra.errors.RunNotFoundError` for an unknown run."""
        from .safeguards.interrupts import Request

        store = self._require_store()
        if run_id is not None:
            await store.get_run(run_id)  # an unknown run is said so (RunNotFoundError)
        rows = await store.requests(run_id)
        return tuple(Request.from_row(row) for row in rows)

    async def abort(self, run_id: str, reason: str = "aborted by operator") -> RunRecord:
        """Ask a run to stop: its owner cancels it within one poll interval and records
        ``aborted``; a run with no live owner is marked ``aborted`` at once."""
        return await self._require_store().request_abort(run_id, reason)

    async def set_budget(
        self,
        run_id: str,
        budget: Budget,
        *,
        agents: Mapping[str, Budget] | None = None,
        reason: str | None = None,
    ) -> RunRecord:
        """Change the limits stored with a stopped run (what ``orchestra budget`` does); a
        resume runs under them, raised to its app's where the app's are higher. ``agents``
        replaces the named agents' budgets. Refused for a completed run or one a live
        process owns; a cost limit over a model without a price is refused too."""
        from .safeguards.budgets import stored_budget

        if not isinstance(budget, Budget):
            raise TypeError(f"set_budget takes a Budget, got {type(budget).__name__}")
        bad = [name for name, b in (agents or {}).items() if not isinstance(b, Budget)]
        if bad:
            raise TypeError(f"set_budget: the budgets of agents {bad} are not Budget objects")
        unknown = sorted(set(agents or {}) - set(self.nodes))
        if unknown:
            raise ValueError(f"set_budget: this graph has no agents {unknown}")
        store = self._require_store()
        record = await store.get_run(run_id)
        current = dict(self.agent_budgets)
        if record.budget is not None:
            current.update(
                {k: Budget.from_dict(v) for k, v in (record.budget.get("agents") or {}).items()}
            )
        current.update(agents or {})
        problems = price_problems(self.nodes, budget, current)
        if problems:
            raise ValueError("; ".join(problems))
        return await store.set_budget(run_id, stored_budget(budget, current), reason=reason)

    async def get_run(self, run_id: str) -> RunRecord:
        """Return the stored record of a run."""
        return await self._require_store().get_run(run_id)

    async def load_state(self, run_id: str, step: int | None = None) -> StateT:
        """Return the state of a run at ``step`` (default: its last checkpoint)."""
        from .checkpoint import load_state

        chain = await self._require_store().checkpoint_chain(run_id, step)
        return load_state(self.schema, chain)  # type: ignore[return-value]

    def _require_store(self) -> Store:
        if self.store is None:
            raise StoreError(
                f"graph {self.name!r} has no store; compile it with store='runs.db' to keep, "
                f"resume and abort runs"
            )
        return self.store


_MERMAID_WORDS = frozenset({"end", "graph", "subgraph", "flowchart", "style", "class", "click"})


def _shape(schema: Any) -> Any:
    """Drop what does not change a state's shape (titles, descriptions, examples)."""
    if isinstance(schema, dict):
        return {
            k: _shape(v) for k, v in schema.items() if k not in ("title", "description", "examples")
        }
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema


def new_run_id() -> str:
    """Return a new random run id (16 hex digits)."""
    return secrets.token_hex(8)


def compile_graph(
    graph: Graph[Any],
    *,
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
) -> CompiledGraph[Any]:
    definition = graph._definition
    problems: list[str] = list(definition.problems)
    state = graph.state
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
        if node.kind == "agent" and schema is not None:
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
        from .store import as_store

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
        raise GraphValidationError(graph.name, problems)
    assert schema is not None
    return CompiledGraph(
        name=graph.name,
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
    from .safeguards.budgets import price_of

    problems = []
    for node in nodes.values():
        if node.kind != "agent":
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
    from typing import get_origin

    from .safeguards.caps import field_caps

    problems = []
    for name, _ in field_caps(state).items():
        annotation = state.model_fields[name].annotation
        origin = get_origin(annotation) or annotation
        if origin not in (list, tuple):
            problems.append(f"state field {name!r} has a Cap but is not a list")
    return problems
