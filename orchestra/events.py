"""Typed events: what a run reports as it goes (records: treat them as read-only).

``app.stream(...)`` yields them; the same objects are logged through structlog (debug level for
per-node and per-step events, info for the run's start and end), so what a caller watches and
what the log says never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .kinds import ApprovalDecision

if TYPE_CHECKING:
    from .outcome import RunOutcome

__all__ = (
    "ApprovalDecided",
    "BudgetWarned",
    "ConflictArbitrated",
    "Event",
    "LoopDetected",
    "ModelCalled",
    "NodeFinished",
    "NodeRetried",
    "NodeStarted",
    "RequestAnswered",
    "RunFinished",
    "RunStarted",
    "StepCommitted",
    "ToolCalled",
)


@dataclass(slots=True, kw_only=True)
class Event:
    """Base of every event: which run, and when (seconds since the epoch)."""

    kind: ClassVar[str] = "event"
    run_id: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a plain dict (the fields plus ``event``: its kind)."""
        data: dict[str, Any] = {"event": self.kind}
        for item in fields(self):
            if item.name != "outcome":
                data[item.name] = getattr(self, item.name)
        return data


@dataclass(slots=True, kw_only=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    graph: str
    step: int
    resumed: bool = False
    next: tuple[str, ...] = ()


@dataclass(slots=True, kw_only=True)
class NodeStarted(Event):
    kind: ClassVar[str] = "node_started"
    step: int
    node: str
    task: int


@dataclass(slots=True, kw_only=True)
class NodeRetried(Event):
    kind: ClassVar[str] = "node_retried"
    step: int
    node: str
    task: int
    attempt: int
    error: str
    delay: float


@dataclass(slots=True, kw_only=True)
class NodeFinished(Event):
    kind: ClassVar[str] = "node_finished"
    step: int
    node: str
    task: int
    duration: float
    attempts: int
    error: str | None = None


@dataclass(slots=True, kw_only=True)
class ModelCalled(Event):
    """An agent's model answered (``replayed``: the answer came from the ledger, unbilled
    again, after a resume)."""

    kind: ClassVar[str] = "model_called"
    step: int
    node: str
    model: str
    input_tokens: int
    output_tokens: int
    duration: float
    finish_reason: str | None = None
    replayed: bool = False


@dataclass(slots=True, kw_only=True)
class BudgetWarned(Event):
    """Usage reached a budget's soft threshold (``Budget.soft``, 80 % by default): ``used``
    of ``value`` for ``limit`` (``tokens``, ``cost_usd``, ...) of ``scope`` (``run`` or an
    agent)."""

    kind: ClassVar[str] = "budget_warned"
    step: int
    scope: str
    limit: str
    used: float
    value: float


@dataclass(slots=True, kw_only=True)
class LoopDetected(Event):
    """A loop detector tripped after ``step`` (``detector``: ``repeats``, ``same_call`` or
    ``no_progress``); ``evidence`` is JSON: the steps, what repeated."""

    kind: ClassVar[str] = "loop_detected"
    step: int
    detector: str
    message: str
    evidence: str


@dataclass(slots=True, kw_only=True)
class ConflictArbitrated(Event):
    """Tool calls of one step conflicted over ``resources`` and ``policy`` settled it:
    ``calls`` (JSON: each call's key, caller, tool, arguments, resources), ``run`` (the keys
    that ran, in order) and ``lost`` (JSON: key -> why it did not run). ``replayed``: the
    decision recorded by an earlier run of the step was reused."""

    kind: ClassVar[str] = "conflict_arbitrated"
    step: int
    policy: str
    resources: tuple[str, ...]
    calls: str
    run: tuple[str, ...]
    lost: str
    replayed: bool = False


@dataclass(slots=True, kw_only=True)
class ApprovalDecided(Event):
    """A held call met its approval: ``decision`` is ``approved``, ``edited``,
    ``rejected`` or ``expired``; ``request_id`` the request that held it."""

    kind: ClassVar[str] = "approval_decided"
    step: int
    node: str
    tool: str
    call_id: str
    request_id: str
    decision: ApprovalDecision
    reason: str | None = None


@dataclass(slots=True, kw_only=True)
class RequestAnswered(Event):
    """An operator answered a request (``answer``: the answer's kind and its fields, as
    JSON) before the run was resumed."""

    kind: ClassVar[str] = "request_answered"
    step: int
    node: str
    request_id: str
    request_kind: str
    answer: str


@dataclass(slots=True, kw_only=True)
class ToolCalled(Event):
    """A tool call went through the gateway.

    ``status`` is ``ok``, ``denied`` (not on the caller's allowlist; it did not run),
    ``invalid_arguments`` (did not run), ``error`` (the tool raised), ``timeout``,
    ``too_large``, ``invalid_result``, ``in_doubt`` (an irreversible call with no recorded
    result: the run waits for an operator), ``rejected`` (an operator refused it, or its
    approval expired; it did not run) or ``conflict`` (arbitration gave its resources to
    another call; it did not run). ``replayed``: the result came from the ledger.
    """

    kind: ClassVar[str] = "tool_called"
    step: int
    node: str
    tool: str
    call_id: str
    status: str
    duration: float = 0.0
    error: str | None = None
    replayed: bool = False


@dataclass(slots=True, kw_only=True)
class StepCommitted(Event):
    """A step's barrier passed: its writes are merged and the next tasks are known.

    ``durations`` holds each task's own duration, in the order of ``nodes``.
    """

    kind: ClassVar[str] = "step_committed"
    step: int
    nodes: tuple[str, ...]
    changed: tuple[str, ...]
    next: tuple[str, ...]
    duration: float
    durations: tuple[float, ...] = ()


@dataclass(slots=True, kw_only=True)
class RunFinished(Event):
    """The run stopped; ``outcome`` is what ``app.run`` would have returned."""

    kind: ClassVar[str] = "run_finished"
    status: str
    steps: int
    error: str | None = None
    reason: str | None = None
    outcome: RunOutcome[Any] | None = field(default=None, repr=False, compare=False)
