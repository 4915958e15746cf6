"""The kinds and statuses stores keep and every layer compares: one enum each (a run's own
status is :class:`~orchestra.outcome.RunStatus`), and the one test of expiry."""

from __future__ import annotations

from enum import StrEnum

__all__ = (
    "NOT_RUN",
    "ApprovalDecision",
    "CallStatus",
    "LedgerKind",
    "LedgerStatus",
    "RequestKind",
    "RequestStatus",
    "expired",
)


class RequestStatus(StrEnum):
    """Where a request stands: ``open`` until answered, then ``answered``; ``used`` once a
    resume applied it (in-doubt calls, breakpoints, loops); ``expired`` if nobody answered it
    in time; ``closed`` if the run completed without asking it again."""

    OPEN = "open"
    ANSWERED = "answered"
    USED = "used"
    EXPIRED = "expired"
    CLOSED = "closed"


class RequestKind(StrEnum):
    """What a request asks a person (see :mod:`orchestra.safeguards.interrupts`)."""

    APPROVAL = "approval"
    QUESTION = "question"
    CONFLICT = "conflict"
    BEFORE = "before"
    AFTER = "after"
    LOOP = "loop"
    IN_DOUBT = "in_doubt"


class LedgerStatus(StrEnum):
    """A ledger entry is ``started`` (an irreversible call, written before it runs) or
    ``done`` (its result is recorded)."""

    STARTED = "started"
    DONE = "done"


class LedgerKind(StrEnum):
    """What a ledger entry records: a model call, a tool call, or an arbitration decision."""

    MODEL = "model"
    TOOL = "tool"
    ARBITRATION = "arbitration"


def expired(expires_at: float | None, now: float) -> bool:
    """Tell whether something that expires at ``expires_at`` (None: never) has, at ``now``."""
    return expires_at is not None and expires_at <= now


class ApprovalDecision(StrEnum):
    """What became of a held call at its approval."""

    APPROVED = "approved"
    EDITED = "edited"
    REJECTED = "rejected"
    EXPIRED = "expired"


class CallStatus(StrEnum):
    """What became of one tool call (``ok``, or why it has no result)."""

    OK = "ok"
    DENIED = "denied"  # not on the caller's allowlist: never run
    INVALID_ARGUMENTS = "invalid_arguments"  # did not fit the schema: never run
    REJECTED = "rejected"  # an operator rejected it: never run
    CONFLICT = "conflict"  # lost an arbitration: never run
    IN_DOUBT = "in_doubt"  # started, and nobody knows whether it took effect
    ERROR = "error"  # the tool raised
    TIMEOUT = "timeout"  # no result within the tool's timeout
    INVALID_RESULT = "invalid_result"  # the result did not fit the return type
    TOO_LARGE = "too_large"  # the result was over the tool's size cap


NOT_RUN = frozenset(
    {
        CallStatus.DENIED,
        CallStatus.INVALID_ARGUMENTS,
        CallStatus.IN_DOUBT,
        CallStatus.REJECTED,
        CallStatus.CONFLICT,
    }
)
"""Statuses of calls that never ran (not counted as tool calls)."""
