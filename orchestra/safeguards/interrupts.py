"""Requests for a human, and the answers that resolve them.

A run that needs a person stops with status ``interrupted`` and one :class:`Request` per
open question; ``app.resume(run_id, answers={request.id: answer})`` continues it. Requests
are kept in the store, so an operator can answer from another process.

Kinds of request, and their answers:

- ``approval``: a tool call the approval policy holds (by default every irreversible call),
  bound to the exact tool and arguments: :class:`Approve`, :class:`Reject` (the caller gets a
  rejection it can act on) or :class:`Edit` (approve with changed arguments, checked against
  the tool's schema);
- ``question``: ``await ctx.interrupt(prompt, schema=...)`` in a node: a value that fits the
  request's schema (the node gets it back, validated);
- ``conflict``: calls the ``escalate`` arbitration policy leaves to a person:
  :class:`Choose` (the calls that run, by key; the others get a conflict result);
- ``before`` / ``after``: a breakpoint (``interrupt_before`` / ``interrupt_after``), and
  ``loop``: a suspected loop: :class:`Continue` (or :class:`Approve`) goes on,
  :class:`Abort` (or :class:`Reject`) stops the run;
- ``in_doubt``: an irreversible tool call recorded as started but without a result (the
  process died mid-call, or the call ran past its timeout): it may or may not have taken
  effect, so it is never silently run again. :class:`Done` (it took effect; here is its
  result), :class:`Retry` (it did not; run it again) or :class:`Abort` (stop the run).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .._json import loads_object, loads_or_text
from ..kinds import RequestKind, RequestStatus, expired

if TYPE_CHECKING:
    from ..store.records import RequestRow

__all__ = (
    "Abort",
    "Answer",
    "AnswerKind",
    "Approve",
    "Choose",
    "Continue",
    "Done",
    "Edit",
    "Reject",
    "Request",
    "Retry",
    "StepInterrupted",
    "aborted",
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
    kind: RequestKind
    step: int
    node: str
    payload: dict[str, Any]
    schema: dict[str, Any] | None = None
    created_at: float = 0.0
    expires_at: float | None = None

    @classmethod
    def new(
        cls,
        *,
        run_id: str,
        kind: RequestKind,
        step: int,
        node: str,
        payload: dict[str, Any],
        task: str,
        seq: int,
        identity: str,
        started: float = 0.0,
        schema: dict[str, Any] | None = None,
        expires_in: float | None = None,
    ) -> Request:
        """Ask something new: the id comes from the asking position (``task``, ``seq``) and
        what is asked (``identity``; ``started`` tells attempts apart), so asking again
        gives the same id; the request expires ``expires_in`` seconds from now, if given."""
        now = time.time()
        return cls(
            id=request_id(run_id, step, task, seq, identity, started),
            run_id=run_id,
            kind=kind,
            step=step,
            node=node,
            payload=payload,
            schema=schema,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )

    def expired(self, now: float) -> bool:
        """Tell whether the request can no longer be answered."""
        return expired(self.expires_at, now)

    def to_row(self) -> RequestRow:
        """The stored form of the request (open)."""
        from ..store.records import RequestRow

        return RequestRow(
            run_id=self.run_id,
            request_id=self.id,
            step=self.step,
            task=self.node,
            kind=self.kind,
            payload=_dumps(self.payload),
            schema=None if self.schema is None else _dumps(self.schema),
            status=RequestStatus.OPEN,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )

    @classmethod
    def from_row(cls, row: RequestRow) -> Request:
        """Rebuild a request from its stored row (tolerating a payload that is not an
        object, so an operator can still see it)."""
        payload = loads_or_text(row.payload)
        schema = loads_or_text(row.schema)
        return cls(
            id=row.request_id,
            run_id=row.run_id,
            kind=row.kind,  # as stored: a store reads back members
            step=row.step,
            node=row.task,
            payload=payload if isinstance(payload, dict) else {"payload": payload},
            schema=schema if isinstance(schema, dict) else None,
            created_at=row.created_at,
            expires_at=row.expires_at,
        )

    def describe(self) -> str:
        """Say in one line what the request asks."""
        if self.kind == RequestKind.IN_DOUBT:
            return (
                f"irreversible call {self.payload.get('tool')!r} by {self.node!r} at step "
                f"{self.step} started but never reported a result: did it take effect?"
            )
        if self.kind == RequestKind.LOOP:
            return f"suspected loop after step {self.step}: {self.payload.get('message')}"
        if self.kind == RequestKind.APPROVAL:
            return (
                f"{self.payload.get('effect', 'a')} call {self.payload.get('tool')!r} by "
                f"{self.node!r} at step {self.step} needs approval"
            )
        if self.kind == RequestKind.QUESTION:
            return f"{self.node!r} asks at step {self.step}: {self.payload.get('prompt')}"
        if self.kind == RequestKind.CONFLICT:
            calls = self.payload.get("calls") or []
            return (
                f"{len(calls)} calls at step {self.step} conflict over "
                f"{', '.join(self.payload.get('resources') or [])}: choose which run"
            )
        if self.kind in (RequestKind.BEFORE, RequestKind.AFTER):
            nodes = ", ".join(self.payload.get("nodes") or [self.node])
            return f"breakpoint {self.kind} {nodes} at step {self.step}"
        return f"{self.kind} request from {self.node!r} at step {self.step}"


class AnswerKind(StrEnum):
    """What a recorded answer says (the ``answer`` field of its stored JSON)."""

    DONE = "done"
    RETRY = "retry"
    ABORT = "abort"
    CONTINUE = "continue"
    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"
    VALUE = "value"
    CHOOSE = "choose"
    EXPIRED = "expired"  # nobody answered in time (written by the run, not a person)


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


@dataclass(frozen=True, slots=True)
class Approve:
    """Let the held call run, once, with exactly the arguments in the request (for a
    breakpoint or a suspected loop: go on, like :class:`Continue`)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the held call: it never runs, and its caller gets a rejection with
    ``reason`` (for a breakpoint or a suspected loop: stop the run, like :class:`Abort`)."""

    reason: str = "rejected by an operator"


@dataclass(frozen=True, slots=True)
class Edit:
    """Approve the held call with changed ``arguments`` (the whole set, checked against the
    tool's schema); its caller is told the arguments were changed."""

    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True, init=False)
class Choose:
    """Settle an escalated conflict: the calls (by the keys in the request's payload) that
    run, in this order (calls that conflict with each other one at a time); every other
    call of the conflict loses."""

    keys: tuple[str, ...]

    def __init__(self, *keys: str) -> None:
        object.__setattr__(self, "keys", tuple(keys))


Answer = Done | Retry | Continue | Abort | Approve | Reject | Edit | Choose


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def aborted(row: RequestRow) -> bool:
    """Tell whether a stored request was answered with an abort (the run stopped there: a
    later resume asks it again)."""
    return loads_object(row.answer).get("answer") == AnswerKind.ABORT


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
