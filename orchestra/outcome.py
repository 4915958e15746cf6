"""What a run returns: its status, final state, usage and, for a failed run, the error."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from .errors import OrchestraError

__all__ = ("COUNTERS", "RunOutcome", "RunStatus", "Usage")

StateT = TypeVar("StateT", bound=BaseModel)


class RunStatus(StrEnum):
    """Where a run stands; every status but ``running`` and ``completed`` can be resumed.

    ``pending``: created (by ``orchestra fork``) but not started yet.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    ABORTED = "aborted"
    BUDGET_EXCEEDED = "budget_exceeded"
    LOOP_DETECTED = "loop_detected"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What a run has consumed so far."""

    steps: int = 0
    tasks: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    """Dollars, from the price table (``register_price``); 0 for models without a price."""
    model_calls: int = 0
    tool_calls: int = 0
    denied_calls: int = 0
    wall_seconds: float = 0.0
    by_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per agent or node: ``input_tokens``, ``output_tokens``, ``model_calls``,
    ``tool_calls`` (calls that ran), ``denied_calls`` (refused by the allowlist)."""

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


COUNTERS = (
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "model_calls",
    "tool_calls",
    "denied_calls",
)
"""The fields of :class:`Usage` that model and tool calls add to (the run's meter keeps
them, per run and per node); the others are the run's own (steps, tasks, wall time)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOutcome(Generic[StateT]):
    """The result of ``app.run``: why the run stopped and the state it stopped with.

    ``state`` is the last committed state: for a failed or stopped run, the state after the
    last step that completed. ``stop_reason`` says in words why a safeguard stopped the run;
    ``next`` names the nodes that were ready to run when it stopped. ``pending`` holds the
    open :class:`~orchestra.safeguards.interrupts.Request` objects of an ``interrupted`` run.
    """

    run_id: str
    status: RunStatus
    state: StateT
    steps: int
    usage: Usage
    error: OrchestraError | None = None
    stop_reason: str | None = None
    pending: tuple[Any, ...] = field(default=())
    next: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.COMPLETED

    def raise_for_status(self) -> RunOutcome[StateT]:
        """Raise the run's error if it failed; return the outcome otherwise (for chaining)."""
        if self.error is not None:
            raise self.error
        return self
