"""The frozen plan a compiled graph runs: structure, state schema, limits, policies.

A plan is immutable: its nodes, edges and routes are fixed, so a run and its replay always
see the same structure (``structure_hash`` names it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import InputValidationError, StoreError
from ..safeguards.approvals import Approvals
from ..safeguards.arbitration import Arbitration
from ..safeguards.budgets import Budget
from ..safeguards.loops import LoopGuard
from ..specs import EdgeSpec, NodeKind, NodeSpec, RouteSpec
from ..state import StateSchema, describe_validation_error

if TYPE_CHECKING:
    from ..store.base import Store
    from ..tools import Tool

__all__ = ("Plan",)

StateT = TypeVar("StateT", bound=BaseModel)


class Plan(Generic[StateT]):
    """A validated, frozen graph: its structure, state schema, limits and policies.

    What the runtime reads; :class:`~orchestra.app.CompiledGraph` (the facade users call)
    adds the run and operator methods on top.
    """

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

        from ..tools import tool_map  # tools bring pydantic models: loaded when used

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
                    if node.kind is NodeKind.AGENT and node.fn.budget is not None
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
        raise AttributeError(f"{type(self).__name__} is frozen; cannot set {name!r}")

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} nodes={len(self.nodes)} "
            f"hash={self.structure_hash}>"
        )

    def with_store(self, store: Store | str | os.PathLike[str]) -> Self:
        """Return the same graph bound to another store (the CLI's ``--db``)."""
        from ..store import as_store

        return type(self)(
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
        from .mermaid import render_mermaid

        return render_mermaid(self.nodes, self.edges, self.routes)

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

    def require_store(self) -> Store:
        """Return the graph's store, or raise StoreError saying how to give it one."""
        if self.store is None:
            raise StoreError(
                f"graph {self.name!r} has no store; compile it with store='runs.db' to keep, "
                f"resume and abort runs"
            )
        return self.store


def _shape(schema: Any) -> Any:
    """Drop what does not change a state's shape (titles, descriptions, examples)."""
    if isinstance(schema, dict):
        return {
            k: _shape(v) for k, v in schema.items() if k not in ("title", "description", "examples")
        }
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema
