"""Reducers: pure functions that combine a field's current value with one written value.

Attach one to a state field with ``Annotated``::

    class State(BaseModel):
        notes: Annotated[list[str], append] = []       # each write adds one item
        found: Annotated[list[str], extend] = []       # each write adds a list of items
        seen: Annotated[dict[str, int], merge] = {}    # each write merges a dict
        total: Annotated[int, add] = 0                 # each write adds a number
        best: Annotated[float, max] = 0.0              # any function (current, value) -> new

Fields without a reducer are plain: a write replaces the value, and two writers in one step
are a conflict. Writes to a reducer field within a step are applied in a deterministic order
(node name, then task index), never in completion order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ("Reducer", "add", "append", "extend", "merge", "reducer")

ReducerKind = Literal["append", "extend", "merge", "add", "custom"]


@dataclass(frozen=True, slots=True)
class Reducer:
    """A named reducer: ``fn(current, value) -> new value``.

    ``kind`` tells the rest of orchestra what a write means: for ``append`` the written value is
    one item, for ``extend`` a list of items, so checkpoints can store only the new items.
    """

    fn: Callable[[Any, Any], Any]
    kind: ReducerKind = "custom"
    name: str = ""

    def __call__(self, current: Any, value: Any) -> Any:
        return self.fn(current, value)

    def __repr__(self) -> str:
        return f"<reducer {self.name or getattr(self.fn, '__name__', '?')}>"


def _append(current: list[Any] | None, value: Any) -> list[Any]:
    return [*(current or ()), value]


def _extend(current: list[Any] | None, value: Iterable[Any]) -> list[Any]:
    if isinstance(value, str | bytes | Mapping):
        raise TypeError(f"extend takes a list of items, got {type(value).__name__}")
    return [*(current or ()), *value]


def _merge(current: Mapping[Any, Any] | None, value: Mapping[Any, Any]) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"merge takes a mapping, got {type(value).__name__}")
    return {**(current or {}), **value}


def _add(current: Any, value: Any) -> Any:
    return value if current is None else current + value


append = Reducer(_append, "append", "append")
"""Add the written value as one new item at the end of a list."""

extend = Reducer(_extend, "extend", "extend")
"""Add every item of the written list at the end of a list."""

merge = Reducer(_merge, "merge", "merge")
"""Merge the written mapping into a dict; written keys win."""

add = Reducer(_add, "add", "add")
"""Add the written number to the current one."""


def reducer(fn: Callable[[Any, Any], Any]) -> Reducer:
    """Mark ``fn(current, value) -> new`` as a custom reducer (plain functions work too)."""
    return Reducer(fn, "custom", getattr(fn, "__name__", "custom"))
