"""The stored kinds and statuses: every enum's values pinned exactly (they are written to
databases, so changing one breaks old files), and the one test of expiry."""

from __future__ import annotations

from enum import StrEnum

import pytest

from orchestra.kinds import (
    NOT_RUN,
    ApprovalDecision,
    CallStatus,
    LedgerKind,
    LedgerStatus,
    RequestKind,
    RequestStatus,
    expired,
)


def values(enum: type[StrEnum]) -> dict[str, str]:
    return {member.name: member.value for member in enum}


def test_request_status_values_are_pinned() -> None:
    """RequestStatus stores exactly these strings."""
    assert values(RequestStatus) == {
        "OPEN": "open",
        "ANSWERED": "answered",
        "USED": "used",
        "EXPIRED": "expired",
        "CLOSED": "closed",
    }


def test_request_kind_values_are_pinned() -> None:
    """RequestKind stores exactly these strings."""
    assert values(RequestKind) == {
        "APPROVAL": "approval",
        "QUESTION": "question",
        "CONFLICT": "conflict",
        "BEFORE": "before",
        "AFTER": "after",
        "LOOP": "loop",
        "IN_DOUBT": "in_doubt",
    }


def test_ledger_status_values_are_pinned() -> None:
    """LedgerStatus stores exactly these strings."""
    assert values(LedgerStatus) == {"STARTED": "started", "DONE": "done"}


def test_ledger_kind_values_are_pinned() -> None:
    """LedgerKind stores exactly these strings."""
    assert values(LedgerKind) == {"MODEL": "model", "TOOL": "tool", "ARBITRATION": "arbitration"}


def test_approval_decision_values_are_pinned() -> None:
    """ApprovalDecision stores exactly these strings."""
    assert values(ApprovalDecision) == {
        "APPROVED": "approved",
        "EDITED": "edited",
        "REJECTED": "rejected",
        "EXPIRED": "expired",
    }


def test_call_status_values_are_pinned() -> None:
    """CallStatus stores exactly these strings (in ledger results and events)."""
    assert values(CallStatus) == {
        "OK": "ok",
        "DENIED": "denied",
        "INVALID_ARGUMENTS": "invalid_arguments",
        "REJECTED": "rejected",
        "CONFLICT": "conflict",
        "IN_DOUBT": "in_doubt",
        "ERROR": "error",
        "TIMEOUT": "timeout",
        "INVALID_RESULT": "invalid_result",
        "TOO_LARGE": "too_large",
    }


def test_not_run_holds_the_statuses_of_calls_that_never_ran() -> None:
    """Denied, invalid, in-doubt, rejected and conflicting calls are not counted as run."""
    assert (
        frozenset(
            {
                CallStatus.DENIED,
                CallStatus.INVALID_ARGUMENTS,
                CallStatus.IN_DOUBT,
                CallStatus.REJECTED,
                CallStatus.CONFLICT,
            }
        )
        == NOT_RUN
    )


@pytest.mark.parametrize(
    "enum", [RequestStatus, RequestKind, LedgerStatus, LedgerKind, ApprovalDecision, CallStatus]
)
def test_kind_members_compare_equal_to_their_stored_strings(enum: type[StrEnum]) -> None:
    """Each member equals its value and is read back from it (a stored row round-trips)."""
    for member in enum:
        assert member == member.value
        assert enum(member.value) is member


def test_expired_without_an_expiry_never_expires() -> None:
    """None means no deadline: not expired, however late it is."""
    assert not expired(None, float("inf"))


def test_expired_before_the_deadline_has_not() -> None:
    """Before ``expires_at`` it has not expired."""
    assert not expired(100.0, 99.999)


def test_expired_at_the_deadline_has() -> None:
    """At exactly ``expires_at`` it has expired."""
    assert expired(100.0, 100.0)


def test_expired_after_the_deadline_has() -> None:
    """After ``expires_at`` it has expired."""
    assert expired(100.0, 100.001)
