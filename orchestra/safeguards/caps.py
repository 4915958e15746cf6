"""Per-field caps: how long a list field of the state may grow.

``Annotated[list[str], append, Cap(max_items=50, policy="drop_oldest")]``. At the barrier,
after a step's updates are merged, a capped field longer than ``max_items`` is, by policy:

- ``"refuse"`` (default): the step fails with an error naming the field, the nodes that wrote
  it and the sizes; nothing of the step is committed;
- ``"drop_oldest"``: trimmed to its newest ``max_items`` items;
- a function ``items -> items`` (a hook that compacts or summarizes, e.g. replaces the oldest
  notes by one summary): its result, which must fit the cap, becomes the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ("Cap",)


@dataclass(frozen=True, slots=True)
class Cap:
    """The most items a list field may hold, and what happens to more (see the module)."""

    max_items: int
    policy: str | Callable[[list[Any]], Sequence[Any]] = "refuse"

    def __post_init__(self) -> None:
        if isinstance(self.max_items, bool) or not isinstance(self.max_items, int):
            raise ValueError(f"Cap.max_items must be an int, got {self.max_items!r}")
        if self.max_items < 1:
            raise ValueError(f"Cap.max_items must be at least 1, got {self.max_items}")
        if not callable(self.policy) and self.policy not in ("refuse", "drop_oldest"):
            raise ValueError(
                f"Cap.policy must be 'refuse', 'drop_oldest' or a function, got {self.policy!r}"
            )


def field_caps(model: type[Any]) -> dict[str, Cap]:
    """The capped fields of a state model."""
    caps = {}
    for name, info in model.model_fields.items():
        for item in info.metadata:
            if isinstance(item, Cap):
                caps[name] = item
    return caps
