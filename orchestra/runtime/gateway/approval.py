"""Approval, and a node's questions: the gateway's requests for a person.

A call the approval policy holds (by default every irreversible one) becomes an ``approval``
request bound to its exact tool and arguments (DESIGN §3). The act phase waits, as a whole,
until every held call is answered; a resume brings the answers, which are carried out here:
``Approve`` lets the call run (recorded as started, so the approval is used once), ``Edit``
runs it with the operator's arguments (checked again against the tool), ``Reject`` or an
expired request refuses it. A node's ``ctx.interrupt`` question is asked and answered the
same way (:meth:`ApprovalStep.question`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..._json import loads_object
from ...context import Caller
from ...errors import RequestExpiredError, ToolArgumentsError
from ...events import ApprovalDecided
from ...kinds import ApprovalDecision
from ...models.base import ToolCall
from ...safeguards.interrupts import AnswerKind, Request, StepInterrupted, request_id
from ...store.base import RequestKind, RequestStatus, expired
from ...tools import CallStatus
from ..ledger import fingerprint
from .calls import CallOutcome, PlannedCall, prepare
from .execute import CallRunner

if TYPE_CHECKING:
    from ...safeguards.approvals import Approvals
    from ...store.base import RequestRow

__all__ = ("ApprovalStep", "Expire")

Expire = Callable[["RequestRow"], Awaitable[None]]
"""Marks an open request expired in the store (fenced by the run's lease)."""


class ApprovalStep:
    """Holds calls for approval and carries out the answers; asks a node's questions.

    ``requests`` are the run's requests a resume found (answered, expired or still open),
    by id: the gateway's own dict, shared.
    """

    def __init__(
        self,
        *,
        runner: CallRunner,
        policy: Approvals | None,
        requests: dict[str, RequestRow],
        expire: Expire | None,
    ) -> None:
        self.runner = runner
        self.run_id = runner.run_id
        self.policy = policy
        self.requests = requests
        self.expire = expire

    def held(self, batch: Sequence[tuple[Caller, Sequence[ToolCall]]]) -> list[Request]:
        """The approval requests the act phase of ``batch`` would ask, without running or
        reporting anything."""
        policy = self.policy
        if policy is None:
            return []
        asked = []
        for caller, calls in batch:
            for call in calls:
                item = prepare(caller, call, caller.next_seq())
                if item.outcome is not None or self.runner.entry(item) is not None:
                    continue
                request = self._ask(item, policy, self.requests.get(self._approval_id(item)))
                if request is not None:
                    asked.append(request)
        return asked

    async def approve(self, calls: Sequence[PlannedCall]) -> None:
        """Hold the calls the approval policy names until a person answers; apply the
        answers a resume brought (approve, edit, reject; an expired request rejects).
        Every held call without an answer is asked at once; nothing runs meanwhile."""
        policy = self.policy
        if policy is None or not calls:
            return
        asked = []
        for item in calls:
            if self.runner.entry(item) is not None:
                continue  # the approved call already started, or ran
            row = await self._current(self.requests.get(self._approval_id(item)))
            request = self._ask(item, policy, row)
            if request is not None:
                asked.append(request)
            elif row is not None:
                self._apply(item, row)
        if asked:
            raise StepInterrupted(asked)

    def edit_of(self, item: PlannedCall) -> Any:
        """The arguments an operator's Edit gave the call, if one did (else None)."""
        if item.edited is not None:
            return item.edited
        row = self.requests.get(self._approval_id(item))
        if row is not None and row.status == RequestStatus.ANSWERED:
            answer = loads_object(row.answer)
            if answer.get("answer") == AnswerKind.EDIT:
                return answer.get("arguments")
        return None

    async def _current(self, row: RequestRow | None) -> RequestRow | None:
        """The request as it stands now: an open one past its time is expired (and marked
        so in the store)."""
        if (
            row is not None
            and row.status == RequestStatus.OPEN
            and expired(row.expires_at, time.time())
        ):
            if self.expire is not None:
                await self.expire(row)
            row = replace(row, status=RequestStatus.EXPIRED)
        return row

    def _ask(self, item: PlannedCall, policy: Approvals, row: RequestRow | None) -> Request | None:
        """The request a call waits for, if it waits: a new one when the policy holds it,
        the stored one while it is open (once asked, a call waits for its answer even if
        the rule would now let it pass); None once answered, or when it is not held."""
        if row is None:
            return self._request(item, policy) if _needs_approval(policy, item) else None
        return Request.from_row(row) if row.status == RequestStatus.OPEN else None

    def _request(self, item: PlannedCall, policy: Approvals) -> Request:
        tool, caller = item.tool, item.caller
        assert tool is not None
        return Request.new(
            run_id=self.run_id,
            kind=RequestKind.APPROVAL,
            step=caller.step,
            node=caller.label,
            payload={
                "tool": tool.name,
                "arguments": item.json_arguments,
                "effect": tool.effect.value,
                "resources": sorted(item.resources),
                "call_id": item.call.id,
                "seq": item.seq,
                "request_hash": item.request_hash,
                "agent": caller.node,
            },
            task=caller.label,
            seq=item.seq,
            identity=_approval_identity(item),
            schema=dict(tool.spec().parameters),
            expires_in=policy.for_caller(caller.node).expires_after,
        )

    def _approval_id(self, item: PlannedCall) -> str:
        """The approval request of a call: bound to its position and what it asks (the
        tool and the arguments as proposed)."""
        caller = item.caller
        return request_id(
            self.run_id, caller.step, caller.label, item.seq, _approval_identity(item)
        )

    def _apply(self, item: PlannedCall, row: RequestRow) -> None:
        """Carry out an answered (or expired) approval on the call it holds."""
        tool, call = item.tool, item.call
        assert tool is not None
        answer = loads_object(row.answer)
        kind = answer.get("answer")
        reason = None
        if row.status == RequestStatus.EXPIRED:
            decision = ApprovalDecision.EXPIRED
            reason = "its approval request expired unanswered"
        elif kind == AnswerKind.REJECT:
            decision = ApprovalDecision.REJECTED
            reason = str(answer.get("reason") or "rejected by an operator")
        elif kind == AnswerKind.EDIT:
            decision = ApprovalDecision.EDITED
            try:
                checked = tool.check_arguments(answer.get("arguments") or {})
            except ToolArgumentsError as exc:  # the tool changed since the answer was checked
                decision = ApprovalDecision.REJECTED
                reason = f"the edited arguments no longer fit the tool: {exc.detail}"
            else:
                item.use(checked)
                item.edited = item.json_arguments
        else:
            decision = ApprovalDecision.APPROVED
        if reason is not None:
            item.outcome = CallOutcome(
                call.id, tool.name, CallStatus.REJECTED, error=f"{reason}; the call was not made"
            )
        else:
            item.approved = True
        self.runner.emit(
            ApprovalDecided(
                run_id=self.run_id,
                at=time.time(),
                step=item.caller.step,
                node=item.caller.label,
                tool=tool.name,
                call_id=call.id,
                request_id=row.request_id,
                decision=decision,
                reason=reason,
            ),
            "info",
        )

    # -- questions --------------------------------------------------------------------------

    async def question(
        self,
        caller: Caller,
        prompt: str,
        schema: Any,
        expires_in: float | None,
    ) -> Any:
        """A node's question for a person (``ctx.interrupt``): the validated answer a resume
        brought, or an interrupt asking it."""
        from ...safeguards.questions import answer_schema, schema_ref, validate_answer

        seq = caller.next_seq()
        ref = schema_ref(schema)
        identity = fingerprint({"prompt": prompt, "schema": ref})
        rid = request_id(self.run_id, caller.step, caller.label, seq, f"question:{identity}")
        row = await self._current(self.requests.get(rid))
        if row is not None and row.status == RequestStatus.EXPIRED:
            raise RequestExpiredError(self.run_id, rid, prompt)
        problem = None
        if row is not None and row.status == RequestStatus.ANSWERED:
            try:
                return validate_answer(schema, loads_object(row.answer).get("value"))
            except ValueError as exc:  # the schema changed since the answer was checked
                problem = f"the answer given no longer fits: {exc}"
        payload: dict[str, Any] = {"prompt": prompt, "schema_ref": ref, "seq": seq}
        if problem is not None:
            payload["problem"] = problem
        elif row is not None and row.status == RequestStatus.OPEN:  # asked again: as stored
            raise StepInterrupted([Request.from_row(row)])
        raise StepInterrupted(
            [
                Request.new(
                    run_id=self.run_id,
                    kind=RequestKind.QUESTION,
                    step=caller.step,
                    node=caller.label,
                    payload=payload,
                    task=caller.label,
                    seq=seq,
                    identity=f"question:{identity}",
                    schema=answer_schema(schema),
                    expires_in=expires_in,
                )
            ]
        )


def _needs_approval(policy: Approvals, item: PlannedCall) -> bool:
    assert item.tool is not None
    try:
        return policy.needs(item.caller.node, item.tool, item.json_arguments)
    except Exception:  # the user's rule failed: the safe answer is to ask
        return True


def _approval_identity(item: PlannedCall) -> str:
    """What an approval request asks: this tool with these arguments (their hash)."""
    return f"approval:{item.request_hash}"
