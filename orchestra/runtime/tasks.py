"""A step's units of work and their results (shared by the executor and checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import OrchestraError
from ..specs import NO_PAYLOAD as NO_PAYLOAD  # one sentinel: tasks started by an edge
from ..specs import Send

if TYPE_CHECKING:
    from ..models.base import Message, ToolCall


@dataclass(slots=True)
class Task:
    """One unit of work in a step: a node, its index among the node's tasks, its input."""

    node: str
    index: int
    payload: Any
    label: str


@dataclass(slots=True)
class TaskResult:
    update: Mapping[str, Any] | None = None
    goto: tuple[str | Send, ...] = ()
    error: OrchestraError | None = None
    duration: float = 0.0
    # an agent's turn: messages for its conversation, proposed tool calls, run again?
    messages: list[Message] | None = None
    calls: tuple[ToolCall, ...] = ()
    again: bool = False
