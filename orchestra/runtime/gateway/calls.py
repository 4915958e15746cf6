"""One tool call on its way through the gateway, and the first two steps it meets.

:class:`PlannedCall` is a call as the gateway carries it from step to step; :class:`CallOutcome`
is what became of it (a result, or why there is none), in the form the ledger records, the
caller sees and an agent reads next turn. :func:`prepare` is permission then validation
(DESIGN §3): a call to a tool not on the caller's allowlist is denied, and arguments the tool
refuses (:meth:`~orchestra.tools.Tool.check_arguments`) make it ``invalid_arguments``; either
way it never runs. The statuses are :class:`~orchestra.tools.CallStatus` members.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..._json import compact_json
from ...context import Caller
from ...errors import (
    ToolArgumentsError,
    ToolCallError,
    ToolConflictError,
    ToolDeniedError,
    ToolRejectedError,
)
from ...models.base import Message, ToolCall
from ...safeguards.budgets import Reservation
from ...tools import NOT_RUN, CallStatus, CheckedArguments, Effect, Tool
from ..ledger import fingerprint

__all__ = ("DECIDED", "NOT_RUN", "RETRYABLE", "CallOutcome", "PlannedCall", "prepare")

DECIDED = frozenset({CallStatus.REJECTED, CallStatus.CONFLICT})
"""Statuses of calls a person or an arbiter decided against: a decision, not a failure."""

RETRYABLE = frozenset({CallStatus.ERROR, CallStatus.TIMEOUT})
"""Failures of a read or write tool that are not recorded: a node retry or a re-run of the
step calls it again (an irreversible tool's failure is recorded: it never runs twice)."""


@dataclass(slots=True)
class CallOutcome:
    """What became of one tool call. ``value`` is the result in JSON form (status ``ok``)."""

    call_id: str
    tool: str
    status: CallStatus
    value: Any = None
    error: str | None = None
    replayed: bool = False
    edited: dict[str, Any] | None = None  # the arguments an operator changed it to

    @property
    def ok(self) -> bool:
        """Whether the call ran and its result is valid."""
        return self.status == CallStatus.OK

    def to_json(self) -> str:
        """The outcome as the ledger records it (what a replay reads back)."""
        # stored as its value (a plain string: an enum member costs pydantic-core a slow path)
        status = str(self.status)
        data: dict[str, Any] = (
            {"status": status, "result": self.value}
            if self.ok
            else {"status": status, "error": self.error}
        )
        if self.edited is not None:
            data["edited_arguments"] = self.edited
        return compact_json(data)

    @classmethod
    def from_json(cls, call_id: str, tool: str, text: str) -> CallOutcome:
        """Read a recorded outcome back (a replay)."""
        data = json.loads(text)
        return cls(
            call_id=call_id,
            tool=tool,
            status=CallStatus(data["status"]),
            value=data.get("result"),
            error=data.get("error"),
            replayed=True,
            edited=data.get("edited_arguments"),
        )

    def to_message(self) -> Message:
        """The tool message an agent sees next turn: data, with the tool as its source."""
        data: dict[str, Any] = (
            {"result": self.value} if self.ok else {"error": self.error, "status": str(self.status)}
        )
        if self.edited is not None:
            data["note"] = "an operator changed the arguments before approving the call"
            data["arguments_used"] = self.edited
        content = compact_json(data)
        return Message(role="tool", name=self.tool, tool_call_id=self.call_id, content=content)

    def raise_for_status(self) -> None:
        """Raise the error a node's ``ctx.call_tool`` gets for a call without a result."""
        if self.status == CallStatus.DENIED:
            raise ToolDeniedError(self.tool, self.error or "")
        if self.status == CallStatus.INVALID_ARGUMENTS:
            raise ToolArgumentsError(self.tool, self.error or "")
        if self.status == CallStatus.REJECTED:
            raise ToolRejectedError(self.tool, self.error or "")
        if self.status == CallStatus.CONFLICT:
            raise ToolConflictError(self.tool, self.error or "")
        if not self.ok:
            raise ToolCallError(self.tool, self.status, self.error or "")


@dataclass(slots=True)
class PlannedCall:
    """A call after permission and validation, on its way through approval and
    arbitration. ``outcome`` is set once it is known it will not run (rejected, conflict)."""

    caller: Caller
    call: ToolCall
    seq: int
    tool: Tool | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    json_arguments: Any = None
    resources: frozenset[str] = frozenset()
    request_hash: str = ""
    outcome: CallOutcome | None = None
    reservation: Reservation | None = None
    approved: bool = False  # held by the approval policy and approved: recorded as started
    edited: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.caller.label}#{self.seq}"

    @property
    def writes(self) -> bool:
        return self.tool is not None and self.tool.effect is not Effect.READ

    def use(self, checked: CheckedArguments) -> None:
        """Take checked arguments (the proposed ones, or an operator's edit)."""
        self.arguments = checked.arguments
        self.json_arguments = checked.json
        self.resources = checked.resources

    def refuse(self, status: CallStatus, detail: str) -> None:
        """Settle that the call will not run, saying why."""
        self.outcome = CallOutcome(
            self.call.id, self.call.name, status, error=f"{detail}; the call was not made"
        )


def prepare(caller: Caller, call: ToolCall, seq: int) -> PlannedCall:
    """Permission, then validation: the call as it goes on, or with its refusal set."""
    prepared = PlannedCall(caller=caller, call=call, seq=seq)
    tool = caller.tools.get(call.name)
    if tool is None:
        allowed = ", ".join(map(repr, caller.tools)) or "none"
        prepared.refuse(
            CallStatus.DENIED,
            f"tool {call.name!r} is not available to {caller.node!r} (its tools: {allowed})",
        )
        return prepared
    prepared.tool = tool
    arguments: Any = call.arguments
    if isinstance(arguments, str):  # the model's raw text: not a JSON object yet
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            prepared.refuse(CallStatus.INVALID_ARGUMENTS, f"arguments are not valid JSON: {exc}")
            return prepared
    try:
        prepared.use(tool.check_arguments(arguments))
    except ToolArgumentsError as exc:
        prepared.refuse(CallStatus.INVALID_ARGUMENTS, exc.detail)
        return prepared
    prepared.request_hash = fingerprint({"tool": tool.name, "arguments": prepared.json_arguments})
    return prepared
