"""Requests for a human, and the answers that resolve them.

A run that needs a person stops with status ``interrupted`` and one :class:`Request` per
open question; ``app.resume(run_id, answers={request.id: answer})`` continues it. Requests
are kept in the store, so an operator can answer from another process.

This version raises one kind of request: ``in_doubt``, for an irreversible tool call that was
recorded as started but has no result (the process died mid-call, or the call ran past its
timeout): it may or may not have taken effect, so it is never silently run again. Answer it
with :class:`Done` (it took effect; here is its result), :class:`Retry` (it did not; run it
again) or :class:`Abort` (stop the run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..store.base import RequestRow

__all__ = (
    "Abort",
    "Answer",
    "Continue",
    "Done",
    "Request",
    "Retry",
    "StepInterrupted",
    "request_id",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One open question for a human.

    ``payload`` describes it (for an in-doubt call: the tool, its arguments, the call id and
    idempotency key); ``schema`` is the JSON schema of a valid answer, when the answer is a
    value.
    """

    id: str
    run_id: str
    kind: str
    step: int
    node: str
    payload: dict[str, Any]
    schema: dict[str, Any] | None = None
    created_at: float = 0.0
    expires_at: float | None = None

    def to_row(self) -> RequestRow:
        """The stored form of the request (open)."""
        from ..store.base import RequestRow

        return RequestRow(
            run_id=self.run_id,
            request_id=self.id,
            step=self.step,
            task=self.node,
            kind=self.kind,
            payload=_dumps(self.payload),
            schema=None if self.schema is None else _dumps(self.schema),
            status="open",
            created_at=self.created_at,
            expires_at=self.expires_at,
        )

    @classmethod
    def from_row(cls, row: RequestRow) -> Request:
        """Rebuild a request from its stored row (tolerating a payload that is not an
        object, so an operator can still see it)."""
        payload = _loads(row.payload)
        schema = _loads(row.schema)
        return cls(
            id=row.request_id,
            run_id=row.run_id,
            kind=row.kind,
            step=row.step,
            node=row.task,
            payload=payload if isinstance(payload, dict) else {"payload": payload},
            schema=schema if isinstance(schema, dict) else None,
            created_at=row.created_at,
            expires_at=row.expires_at,
        )

    def describe(self) -> str:
        """Say in one line what the request asks."""
        if self.kind == "in_doubt":
            return (
                f"irreversible call {self.payload.get('tool')!r} by {self.node!r} at step "
                f"{self.step} started but never reported a result: did it take effect?"
            )
        if self.kind == "loop":
            return f"suspected loop after step {self.step}: {self.payload.get('message')}"
        return f"{self.kind} request from {self.node!r} at step {self.step}"


@dataclass(frozen=True, slots=True)
class Done:
    """The in-doubt call did take effect; ``result`` is what it returned (validated against
    the tool's return type)."""

    result: Any = None


@dataclass(frozen=True, slots=True)
class Retry:
    """The in-doubt call did not take effect; run it again (with the same idempotency key)."""


@dataclass(frozen=True, slots=True)
class Continue:
    """A suspected loop is not one (or is worth its cost): let the run go on. The loop
    detectors watch it afresh."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop the run here (status ``aborted``)."""

    reason: str = "aborted by an operator's answer"


Answer = Done | Retry | Continue | Abort


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def request_id(run_id: str, step: int, task: str, seq: int, kind: str, started: float = 0.0) -> str:
    """A request's id, stable for the same call: asking again does not duplicate it.

    ``started`` tells apart the attempts of one call (an in-doubt call an operator retried,
    in doubt again, is asked about anew).
    """
    digest = hashlib.sha256(
        f"{run_id}\x00{step}\x00{task}\x00{seq}\x00{kind}\x00{started!r}".encode()
    )
    return "req_" + digest.hexdigest()[:12]


@dataclass(slots=True)
class StepInterrupted(BaseException):
    """Stops the step in flight because a human must answer first (never an ``Exception``:
    user code cannot swallow it)."""

    requests: list[Request] = field(default_factory=list)
