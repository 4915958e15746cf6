"""A step's units of work and their results (shared by the executor and checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import OrchestraError
from ..specs import Send

if TYPE_CHECKING:
    from ..models.base import Message, ToolCall

NO_PAYLOAD: Any = type("NoPayload", (), {"__repr__": lambda self: "NO_PAYLOAD"})()
"""Marks a task started by an edge: its input is the run state, not a Send payload."""


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
