"""The tool gateway: the one door to side effects.

Every tool call, an agent's or a node's ``ctx.call_tool``, goes through the same steps in
this order (DESIGN §3):

1. permission: the tool is on the caller's allowlist; a call to any other tool is denied,
   recorded as an event and returned to the caller as an error. It never runs;
2. validation: the arguments against the tool's pydantic schema;
3. approval: a call the approval policy holds (by default every irreversible one) becomes an
   ``approval`` request bound to its exact tool and arguments; the act phase waits, as a
   whole, until every held call is answered (Approve, Reject, Edit); an approval is used
   once (the approved call is recorded as started before it runs);
4. arbitration: every call of the step's act phase is seen at once; calls whose resources
   overlap, one of them writing, conflict, and the policy decides which run and in what
   order (:mod:`orchestra.safeguards.arbitration`); each decision is an event and is
   recorded in the ledger, so a re-run of the step decides the same. A node's own calls
   (``ctx.call_tool``) take resource locks instead (:mod:`orchestra.safeguards.locks`);
5. ledger: a call with a recorded result is replayed, never re-executed; an irreversible
   call is recorded as started before it runs, and a started call without a result is in
   doubt: the run stops for an operator instead of running it again;
6. execution under the tool's timeout, then the result validated against the tool's return
   type and its size capped; each call is an event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError

from ..._json import compact_json
from ...context import Caller
from ...errors import (
    ArbitrationError,
    RequestExpiredError,
    RunError,
    ToolArgumentsError,
    ToolCallError,
    ToolConflictError,
    ToolDeniedError,
    ToolRejectedError,
)
from ...events import ApprovalDecided, ConflictArbitrated, Event, ModelCalled, ToolCalled
from ...models.base import Message, ModelRequest, ModelResponse, ToolCall, estimate_request_tokens
from ...safeguards.arbitration import Arbitration, Conflict, ProposedCall, plan_calls, strictest
from ...safeguards.budgets import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    Reservation,
    Spend,
    price_of,
    worst_output,
)
from ...safeguards.interrupts import Request, StepInterrupted, request_id
from ...safeguards.locks import Held, ResourceLocks
from ...store.base import RequestKind
from ...tools import Effect, Tool, ToolContext, describe_validation_error
from ..ledger import DONE, STARTED, Ledger, fingerprint
from ..meter import Meter

if TYPE_CHECKING:
    from ...models.base import Model
    from ...safeguards.approvals import Approvals
    from ...store.base import LedgerEntry, RequestRow

__all__ = ("CallOutcome", "Gateway")

# statuses of calls that never ran (not counted as tool calls)
NOT_RUN = frozenset({"denied", "invalid_arguments", "in_doubt", "rejected", "conflict"})
_DECIDED = frozenset({"rejected", "conflict"})
# the ledger's task for the act phase's arbitration decisions
ARBITER = "@arbiter"
# failures of a read or write tool that are not recorded: a node retry or a re-run of the
# step calls it again (an irreversible tool's failure is recorded: it never runs twice)
RETRYABLE = frozenset({"error", "timeout"})


@dataclass(slots=True)
class CallOutcome:
    """What became of one tool call. ``value`` is the result in JSON form (status ``ok``)."""

    call_id: str
    tool: str
    status: str
    value: Any = None
    error: str | None = None
    replayed: bool = False
    edited: dict[str, Any] | None = None  # the arguments an operator changed it to

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        data: dict[str, Any] = (
            {"status": "ok", "result": self.value}
            if self.ok
            else {"status": self.status, "error": self.error}
        )
        if self.edited is not None:
            data["edited_arguments"] = self.edited
        return compact_json(data)

    @classmethod
    def from_json(cls, call_id: str, tool: str, text: str) -> CallOutcome:
        data = json.loads(text)
        return cls(
            call_id=call_id,
            tool=tool,
            status=data["status"],
            value=data.get("result"),
            error=data.get("error"),
            replayed=True,
            edited=data.get("edited_arguments"),
        )

    def to_message(self) -> Message:
        """The tool message an agent sees next turn: data, with the tool as its source."""
        data: dict[str, Any] = (
            {"result": self.value} if self.ok else {"error": self.error, "status": self.status}
        )
        if self.edited is not None:
            data["note"] = "an operator changed the arguments before approving the call"
            data["arguments_used"] = self.edited
        content = compact_json(data)
        return Message(role="tool", name=self.tool, tool_call_id=self.call_id, content=content)

    def raise_for_status(self) -> None:
        if self.status == "denied":
            raise ToolDeniedError(self.tool, self.error or "")
        if self.status == "invalid_arguments":
            raise ToolArgumentsError(self.tool, self.error or "")
        if self.status == "rejected":
            raise ToolRejectedError(self.tool, self.error or "")
        if self.status == "conflict":
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


Emit = Callable[[Event, str], None]
Expire = Callable[["RequestRow"], Awaitable[None]]
"""Marks an open request expired in the store (fenced by the run's lease)."""


class Gateway:
    """One run's gateway (see the module doc)."""

    def __init__(
        self,
        *,
        run_id: str,
        ledger: Ledger,
        meter: Meter,
        emit: Emit,
        approvals: Approvals | None = None,
        arbitration: Arbitration | None = None,
        spend: Spend | None = None,
        requests: Mapping[str, RequestRow] | None = None,
        expire: Expire | None = None,
    ) -> None:
        self.run_id = run_id
        self.ledger = ledger
        self.meter = meter
        self.emit = emit
        self.approvals = approvals
        self.arbitration = arbitration
        self.spend = spend
        # the run's requests a resume found (answered, expired or still open), by id
        self.requests: dict[str, RequestRow] = dict(requests or {})
        self.expire = expire
        self.locks = ResourceLocks()
        self._metered: set[tuple[int, str, int]] = set()

    # -- model calls ----------------------------------------------------------------------

    async def model_call(
        self, caller: Caller, model: Model, request: ModelRequest
    ) -> ModelResponse:
        """Call ``model`` once, or replay its recorded answer."""
        seq = caller.next_seq()
        name = getattr(model, "name", type(model).__name__)
        # the call's identity is the request as the agent asked it (a budget change between a
        # crash and its resume must not make it another call)
        digest = fingerprint(request.model_dump(mode="json"))
        if request.max_tokens is None and self.spend is not None and self.spend.caps(caller.node):
            # a reservation needs a worst case, and the model must be held to it
            request = request.model_copy(update={"max_tokens": DEFAULT_MAX_OUTPUT_TOKENS})
        began = time.monotonic()
        entry = self.ledger.find(
            caller.step,
            caller.label,
            seq,
            kind="model",
            name=name,
            request_hash=digest,
            harmless=True,
        )
        price = price_of(name)
        reservation = None
        if entry is not None and entry.status == DONE and entry.result is not None:
            response = ModelResponse.model_validate_json(entry.result)
            replayed = True
        else:
            spend = self.spend
            if spend is not None:  # the worst case, held until the answer settles it
                reservation = spend.reserve_model(
                    caller.node,
                    estimate_request_tokens(request),
                    worst_output(request.max_tokens),
                    price,
                )
            try:
                response = await model.complete(request)
                if not isinstance(response, ModelResponse):
                    from ...errors import ModelResponseError

                    raise ModelResponseError(
                        name,
                        f"complete() returned {type(response).__name__}, not a ModelResponse",
                    )
            except BaseException:
                if spend is not None and reservation is not None:
                    spend.release(reservation)
                raise
            await self.ledger.finish(
                caller.step,
                caller.label,
                seq,
                kind="model",
                name=name,
                request_hash=digest,
                result=response.model_dump_json(),
            )
            replayed = False
        usage = response.usage
        if self._first_count(caller.step, caller.label, seq, replayed):
            cost = price.cost(usage.input_tokens, usage.output_tokens) if price else 0.0
            self.meter.model(caller.node, usage.input_tokens, usage.output_tokens, cost)
        if self.spend is not None:
            # released only now that the meter counts the real usage: a concurrent call
            # always sees one or the other
            if reservation is not None:
                self.spend.release(reservation)
            self.spend.check_soft(caller.node)
        self.emit(
            ModelCalled(
                run_id=self.run_id,
                at=time.time(),
                step=caller.step,
                node=caller.label,
                model=response.model or name,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                duration=time.monotonic() - began,
                finish_reason=response.finish_reason,
                replayed=replayed,
            ),
            "debug",
        )
        return response

    # -- tool calls -----------------------------------------------------------------------

    async def call(self, caller: Caller, call: ToolCall) -> CallOutcome:
        """Make one call now (a node's ``ctx.call_tool``); an in-doubt call, or one waiting
        for approval, interrupts."""
        prepared = self._prepare(caller, call, caller.next_seq())
        entry = self._entry(prepared) if prepared.outcome is None else None
        if prepared.outcome is None and entry is None:
            await self._approve([prepared])
        if prepared.outcome is not None:
            self._report(prepared, prepared.outcome, 0.0)
            return prepared.outcome
        held = None
        if entry is None and prepared.resources and self.arbitration is not None:
            held = await self._lock(prepared)
            if held is None:
                assert prepared.outcome is not None
                return prepared.outcome
        try:
            outcome = await self._execute(prepared)
        finally:
            if held is not None:
                self.locks.release(held)
        if outcome.status == "in_doubt":
            raise StepInterrupted([self._in_doubt_request(prepared)])
        return outcome

    async def act(
        self, batch: Sequence[tuple[Caller, Sequence[ToolCall]]]
    ) -> list[list[CallOutcome]]:
        """Run the calls the step's agents proposed, all seen at once; return each caller's
        outcomes in the order of its calls."""
        prepared = [
            [self._prepare(caller, call, caller.next_seq()) for call in calls]
            for caller, calls in batch
        ]
        flat = [p for group in prepared for p in group]
        self._report_refused(flat)
        runnable = [p for p in flat if p.outcome is None]
        # a call found in doubt stops the step before anything new runs
        doubtful = [p for p in runnable if _status(self._entry(p)) == STARTED]
        if doubtful:
            for item in doubtful:
                self._report(item, CallOutcome(item.call.id, item.call.name, "in_doubt"), 0.0)
            raise StepInterrupted([self._in_doubt_request(p) for p in doubtful])
        await self._approve(runnable)
        runnable = self._report_refused(runnable)
        chains = await self._arbitrate(runnable)
        runnable = self._report_refused(runnable)
        self._reserve_all(runnable)
        if len(chains) == 1:
            await self._run_chain(chains[0])
        elif chains:
            failures: list[RunError] = []
            async with anyio.create_task_group() as tasks:
                for chain in chains:
                    tasks.start_soon(self._chain_into, chain, failures, tasks.cancel_scope)
            if failures:  # the store failed or the run was fenced: the run's own error
                raise failures[0]
        timed_out = [
            p for p in runnable if p.outcome is not None and p.outcome.status == "in_doubt"
        ]
        if timed_out:
            raise StepInterrupted([self._in_doubt_request(p) for p in timed_out])
        return [[p.outcome for p in group if p.outcome is not None] for group in prepared]

    async def _run_chain(self, waves: Sequence[Sequence[PlannedCall]]) -> None:
        """Run waves one after another, the calls of a wave at once. A call left in doubt
        stops the chain: the calls after it conflict with what it may have changed."""
        for index, wave in enumerate(waves):
            if len(wave) == 1:
                wave[0].outcome = await self._execute(wave[0])
            else:
                failures: list[RunError] = []
                async with anyio.create_task_group() as tasks:
                    for item in wave:
                        tasks.start_soon(self._execute_into, item, failures, tasks.cancel_scope)
                if failures:
                    raise failures[0]
            doubt = next((i for i in wave if i.outcome and i.outcome.status == "in_doubt"), None)
            if doubt is not None:
                for later in (item for rest in waves[index + 1 :] for item in rest):
                    later.outcome = CallOutcome(
                        later.call.id,
                        later.call.name,
                        "conflict",
                        error=f"a call it conflicts with ({doubt.key}) is in doubt; this call "
                        f"was not made",
                    )
                    self._release(later)
                    self._report(later, later.outcome, 0.0)
                return

    async def _chain_into(
        self,
        waves: Sequence[Sequence[PlannedCall]],
        failures: list[RunError],
        scope: anyio.CancelScope,
    ) -> None:
        try:
            await self._run_chain(waves)
        except RunError as exc:  # not an ExceptionGroup: the run stops with this error
            failures.append(exc)
            scope.cancel()

    # -- the steps of one call ------------------------------------------------------------

    def _prepare(self, caller: Caller, call: ToolCall, seq: int) -> PlannedCall:
        """Permission, then validation."""
        prepared = PlannedCall(caller=caller, call=call, seq=seq)
        tool = caller.tools.get(call.name)
        if tool is None:
            allowed = ", ".join(map(repr, caller.tools)) or "none"
            prepared.outcome = CallOutcome(
                call.id,
                call.name,
                "denied",
                error=f"tool {call.name!r} is not available to {caller.node!r} "
                f"(its tools: {allowed}); the call was not made",
            )
            return prepared
        prepared.tool = tool
        arguments: Any = call.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                prepared.outcome = self._invalid(call, f"arguments are not valid JSON: {exc}")
                return prepared
            if not isinstance(arguments, dict):
                prepared.outcome = self._invalid(
                    call, f"arguments must be a JSON object, got {type(arguments).__name__}"
                )
                return prepared
        try:
            prepared.arguments = tool.validate(arguments)
        except ValidationError as exc:
            prepared.outcome = self._invalid(call, describe_validation_error(exc, "arguments"))
            return prepared
        prepared.json_arguments = tool.arguments.model_validate(prepared.arguments).model_dump(
            mode="json"
        )
        try:
            prepared.resources = tool.resource_keys(prepared.json_arguments)
        except Exception as exc:  # the user's resources function: its caller is told
            prepared.outcome = self._invalid(
                call, f"the tool's resources function failed: {type(exc).__name__}: {exc}"
            )
            return prepared
        prepared.request_hash = fingerprint(
            {"tool": tool.name, "arguments": prepared.json_arguments}
        )
        return prepared

    @staticmethod
    def _invalid(call: ToolCall, detail: str) -> CallOutcome:
        return CallOutcome(
            call.id, call.name, "invalid_arguments", error=f"{detail}; the call was not made"
        )

    # -- approval -------------------------------------------------------------------------

    def held(self, batch: Sequence[tuple[Caller, Sequence[ToolCall]]]) -> list[Request]:
        """The approval requests the act phase of ``batch`` would ask, without running or
        reporting anything (the step stopped before its act phase for another request:
        every request is asked at once)."""
        policy = self.approvals
        if policy is None:
            return []
        asked = []
        for caller, calls in batch:
            for call in calls:
                item = self._prepare(caller, call, caller.next_seq())
                if item.outcome is not None or self._entry(item) is not None:
                    continue
                request = self._ask(item, policy, self.requests.get(self._approval_id(item)))
                if request is not None:
                    asked.append(request)
        return asked

    async def _approve(self, calls: Sequence[PlannedCall]) -> None:
        """Step 3: hold the calls the approval policy names until a person answers; apply
        the answers a resume brought (approve, edit, reject; an expired request rejects).
        Every held call without an answer is asked at once; nothing runs meanwhile."""
        policy = self.approvals
        if policy is None or not calls:
            return
        asked = []
        for item in calls:
            if self._entry(item) is not None:
                continue  # the approved call already started, or ran
            row = self.requests.get(self._approval_id(item))
            if row is not None and row.status == "open" and _expired(row):
                if self.expire is not None:
                    await self.expire(row)
                row = replace(row, status="expired")
            request = self._ask(item, policy, row)
            if request is not None:
                asked.append(request)
            elif row is not None:
                self._apply_approval(item, row)
        if asked:
            raise StepInterrupted(asked)

    def _ask(self, item: PlannedCall, policy: Approvals, row: RequestRow | None) -> Request | None:
        """The request a call waits for, if it waits: a new one when the policy holds it,
        the stored one while it is open (once asked, a call waits for its answer even if
        the rule would now let it pass); None once answered, or when it is not held."""
        if row is None:
            return (
                self._approval_request(item, policy) if self._needs_approval(policy, item) else None
            )
        return Request.from_row(row) if row.status == "open" else None

    @staticmethod
    def _needs_approval(policy: Approvals, item: PlannedCall) -> bool:
        assert item.tool is not None
        try:
            return policy.needs(item.caller.node, item.tool, item.json_arguments)
        except Exception:  # the user's rule failed: the safe answer is to ask
            return True

    def _approval_request(self, item: PlannedCall, policy: Approvals) -> Request:
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
            identity=f"approval:{item.request_hash}",
            schema=dict(tool.spec().parameters),
            expires_in=policy.for_caller(caller.node).expires_after,
        )

    def _approval_id(self, item: PlannedCall) -> str:
        """The approval request of a call: bound to its position and what it asks (the
        tool and the arguments as proposed)."""
        caller = item.caller
        return request_id(
            self.run_id, caller.step, caller.label, item.seq, f"approval:{item.request_hash}"
        )

    def _apply_approval(self, item: PlannedCall, row: RequestRow) -> None:
        """Carry out an answered (or expired) approval on the call it holds."""
        tool, call = item.tool, item.call
        assert tool is not None
        answer = _answer(row)
        kind = answer.get("answer")
        reason = None
        if row.status == "expired":
            decision = "expired"
            reason = "its approval request expired unanswered"
        elif kind == "reject":
            decision = "rejected"
            reason = str(answer.get("reason") or "rejected by an operator")
        elif kind == "edit":
            decision = "edited"
            try:
                arguments = tool.validate(answer.get("arguments") or {})
            except ValidationError as exc:  # the tool's schema changed since it was checked
                decision = "rejected"
                reason = (
                    f"the edited arguments no longer fit the tool: "
                    f"{describe_validation_error(exc, 'arguments')}"
                )
            else:
                item.arguments = arguments
                item.json_arguments = tool.arguments.model_validate(arguments).model_dump(
                    mode="json"
                )
                item.resources = tool.resource_keys(item.json_arguments)
                item.edited = item.json_arguments
        else:
            decision = "approved"
        if reason is not None:
            item.outcome = CallOutcome(
                call.id,
                tool.name,
                "rejected",
                error=f"{reason}; the call was not made",
            )
        else:
            item.approved = True
        self.emit(
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

    # -- arbitration ----------------------------------------------------------------------

    async def _arbitrate(self, calls: Sequence[PlannedCall]) -> list[list[list[PlannedCall]]]:
        """Step 4: settle conflicts between the act phase's calls; return chains of waves
        (chains run concurrently, the waves of a chain one after another). Calls that lose
        get their conflict result; a conflict escalated to a person interrupts."""
        if not calls:
            return []
        if self.arbitration is None or len(calls) == 1 or not any(c.resources for c in calls):
            return [[list(calls)]]
        step = calls[0].caller.step
        proposals = [
            ProposedCall(
                key=item.key,
                caller=item.caller.label,
                call_id=item.call.id,
                tool=item.call.name,
                arguments=item.json_arguments,
                resources=item.resources,
                writes=item.writes,
                priority=item.caller.priority,
                index=index,
            )
            for index, item in enumerate(calls)
        ]
        tools = {item.call.name: item.tool for item in calls}
        settled = self._settled(step)
        try:
            plan = plan_calls(
                proposals,
                self.arbitration,
                lambda name: getattr(tools.get(name), "arbitration", None),
                settled,
                _conflict_digest,
            )
        except Exception as exc:  # the user's arbiter: the run stops, naming it
            raise ArbitrationError(
                f"arbitration failed: {type(exc).__name__}: {exc}; no call of the step's "
                f"act phase was made",
                run_id=self.run_id,
                step=step,
            ) from exc
        by_key = {item.key: item for item in calls}
        recorded = self._recorded(step)
        for decision in plan.decisions:
            # replayed: reused from an earlier run of the step (an operator's choice applied
            # for the first time is a new decision, recorded now)
            decision.replayed = decision.digest in recorded
            if not decision.replayed:
                await self.ledger.finish(
                    step,
                    ARBITER,
                    _digest_seq(decision.digest),
                    kind="arbitration",
                    name=decision.policy,
                    request_hash=decision.digest,
                    result=compact_json(decision.to_json()),
                )
            for key, reason in decision.lost.items():
                item = by_key[key]
                item.outcome = CallOutcome(item.call.id, item.call.name, "conflict", error=reason)
            self.emit(
                ConflictArbitrated(
                    run_id=self.run_id,
                    at=time.time(),
                    step=step,
                    policy=decision.policy,
                    resources=tuple(sorted(decision.resources)),
                    calls=compact_json([c.to_dict() for c in decision.calls]),
                    run=tuple(decision.run),
                    lost=compact_json(decision.lost),
                    replayed=decision.replayed,
                ),
                "info",
            )
        if plan.escalated:
            raise StepInterrupted([self._conflict_request(step, c) for c in plan.escalated])
        return [[[by_key[c.key] for c in wave] for wave in chain] for chain in plan.chains]

    def _recorded(self, step: int) -> dict[str, dict[str, Any]]:
        """The decisions an earlier run of this step recorded, by conflict digest."""
        found = {}
        for entry in self.ledger.entries(step, ARBITER):
            if entry.status == DONE and entry.result is not None:
                found[entry.request_hash] = json.loads(entry.result)
        return found

    def _settled(self, step: int) -> dict[str, dict[str, Any]]:
        """Recorded decisions, and operators' choices for escalated conflicts."""
        settled: dict[str, dict[str, Any]] = {}
        for row in self.requests.values():
            if row.kind == "conflict" and row.step == step and row.status == "answered":
                payload = json.loads(row.payload)
                settled[payload["digest"]] = {"run": list(_answer(row).get("run") or [])}
        settled.update(self._recorded(step))
        return settled

    def _conflict_request(self, step: int, conflict: Conflict) -> Request:
        digest = _conflict_digest(conflict)
        keys = [c.key for c in conflict.calls]
        return Request.new(
            run_id=self.run_id,
            kind=RequestKind.CONFLICT,
            step=step,
            task=ARBITER,
            seq=_digest_seq(digest),
            identity="conflict",
            node=", ".join(dict.fromkeys(c.caller for c in conflict.calls)),
            payload={
                "digest": digest,
                "resources": sorted(conflict.resources),
                "calls": [c.to_dict() for c in conflict.calls],
            },
            schema={
                "type": "object",
                "properties": {
                    "run": {
                        "type": "array",
                        "items": {"enum": keys},
                        "uniqueItems": True,
                        "description": "the keys of the calls that run, in order",
                    }
                },
                "required": ["run"],
            },
        )

    # -- a node's own calls: resource locks ------------------------------------------------

    async def _lock(self, item: PlannedCall) -> Held | None:
        """Take the call's resource locks; None when it lost (its outcome is set, recorded
        and reported)."""
        assert item.tool is not None
        assert self.arbitration is not None
        own = item.tool.arbitration
        arbitration = self.arbitration
        policy = (
            own
            if own is not None
            else strictest(arbitration.policy_for((r,)) for r in item.resources)
        )
        name = policy if isinstance(policy, str) else "serialize"
        got = await self.locks.acquire(
            item.resources,
            write=item.writes,
            holder=item.key,
            policy=name,
            priority=item.caller.priority,
        )
        if isinstance(got, Held):
            return got
        holder, resource = got
        outcome = CallOutcome(
            item.call.id,
            item.call.name,
            "conflict",
            error=f"resource {resource} is held by call {holder}; policy {name} let that "
            f"call have it, and this one was not made",
        )
        self.emit(
            ConflictArbitrated(
                run_id=self.run_id,
                at=time.time(),
                step=item.caller.step,
                policy=name,
                resources=(resource,),
                calls=compact_json(
                    [
                        {"key": holder, "holding": True},
                        {
                            "key": item.key,
                            "caller": item.caller.label,
                            "tool": item.call.name,
                            "arguments": item.json_arguments,
                        },
                    ]
                ),
                run=(holder,),
                lost=compact_json({item.key: outcome.error}),
            ),
            "info",
        )
        # recorded: a re-run of the step decides the same
        await self.ledger.finish(
            item.caller.step,
            item.caller.label,
            item.seq,
            kind="tool",
            name=item.call.name,
            request_hash=item.request_hash,
            result=outcome.to_json(),
        )
        item.outcome = outcome
        self._report(item, outcome, 0.0)
        return None

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
        row = self.requests.get(rid)
        if row is not None and row.status == "open" and _expired(row):
            if self.expire is not None:
                await self.expire(row)
            row = replace(row, status="expired")
        if row is not None and row.status == "expired":
            raise RequestExpiredError(self.run_id, rid, prompt)
        problem = None
        if row is not None and row.status == "answered":
            try:
                return validate_answer(schema, _answer(row).get("value"))
            except ValueError as exc:  # the schema changed since the answer was checked
                problem = f"the answer given no longer fits: {exc}"
        payload: dict[str, Any] = {"prompt": prompt, "schema_ref": ref, "seq": seq}
        if problem is not None:
            payload["problem"] = problem
        elif row is not None and row.status == "open":  # asked again: as stored
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

    def _report_refused(self, calls: Sequence[PlannedCall]) -> list[PlannedCall]:
        """Report the calls that will not run; return those that still may."""
        left = []
        for item in calls:
            if item.outcome is None:
                left.append(item)
            else:
                self._report(item, item.outcome, 0.0)
        return left

    def _entry(self, item: PlannedCall) -> LedgerEntry | None:
        assert item.tool is not None
        return self.ledger.find(
            item.caller.step,
            item.caller.label,
            item.seq,
            kind="tool",
            name=item.tool.name,
            request_hash=item.request_hash,
            harmless=item.tool.effect is Effect.READ,
        )

    async def _execute_into(
        self, item: PlannedCall, failures: list[RunError], scope: anyio.CancelScope
    ) -> None:
        try:
            item.outcome = await self._execute(item)
        except RunError as exc:  # not an ExceptionGroup: the run stops with this error
            failures.append(exc)
            scope.cancel()

    async def _execute(self, item: PlannedCall) -> CallOutcome:
        """The ledger, then the call itself under its timeout, then its result checked."""
        tool, caller, call = item.tool, item.caller, item.call
        assert tool is not None
        entry = self._entry(item)
        if entry is not None:
            if entry.status == DONE and entry.result is not None:
                replayed = CallOutcome.from_json(call.id, tool.name, entry.result)
                self._count(item, replayed)
                self._report(item, replayed, 0.0)
                return replayed
            if entry.status == STARTED:
                doubt = CallOutcome(call.id, tool.name, "in_doubt")
                self._report(item, doubt, 0.0)
                return doubt
        if self.spend is not None and item.reservation is None:
            item.reservation = self.spend.reserve_tool(caller.node)
        ran: list[bool] = []
        try:
            return await self._run_tool(item, ran)
        except BaseException:
            # cancelled (an abort, a node timeout) or the store failed: a call that started
            # may have run, so it counts; no reservation outlives its call
            if ran and item.reservation is not None:
                self.meter.tool(caller.node)
            raise
        finally:
            self._release(item)

    async def _run_tool(self, item: PlannedCall, ran: list[bool]) -> CallOutcome:
        """Record an irreversible call as started, run it, check and record the result."""
        tool, caller, call = item.tool, item.caller, item.call
        assert tool is not None
        key = dict(kind="tool", name=tool.name, request_hash=item.request_hash)
        started = None
        if tool.effect is Effect.IRREVERSIBLE or (item.approved and item.writes):
            # an approval is used once: the call is recorded before it runs (a read has no
            # effect to repeat: like any read, it is made again if it failed)
            started = await self.ledger.start(caller.step, caller.label, item.seq, **key)
        context = ToolContext(
            run_id=self.run_id,
            step=caller.step,
            caller=caller.label,
            call_id=call.id,
            idempotency_key=self.idempotency_key(caller.step, caller.label, item.seq),
        )
        began = time.monotonic()
        ran.append(True)
        outcome: CallOutcome | None = None
        try:
            if tool.timeout is None:
                value = await tool.invoke(item.arguments, context)
            else:
                with anyio.move_on_after(tool.timeout) as scope:
                    value = await tool.invoke(item.arguments, context)
                if scope.cancelled_caught:
                    detail = f"no result within {tool.timeout:g}s"
                    if started is not None:
                        # it may have taken effect: never silently retried
                        outcome = CallOutcome(call.id, tool.name, "in_doubt", error=detail)
                        self.meter.tool(caller.node)  # it ran (for all anyone knows)
                        self._release(item)
                        self._report(item, outcome, time.monotonic() - began)
                        return outcome
                    outcome = CallOutcome(call.id, tool.name, "timeout", error=detail)
        except Exception as exc:  # the tool failed: its caller is told, the run goes on
            outcome = CallOutcome(call.id, tool.name, "error", error=f"{type(exc).__name__}: {exc}")
        if outcome is None:
            outcome = self._checked(tool, call, value)
        outcome.edited = item.edited
        if started is not None or outcome.status not in RETRYABLE:
            await self.ledger.finish(
                caller.step,
                caller.label,
                item.seq,
                result=outcome.to_json(),
                started=started,
                **key,
            )
        self._count(item, outcome)
        self._release(item)
        self._report(item, outcome, time.monotonic() - began)
        return outcome

    @staticmethod
    def _checked(tool: Tool, call: ToolCall, value: Any) -> CallOutcome:
        """Validate a result against the tool's return type and cap its size."""
        try:
            data = tool.dump_result(value)
        except ValidationError as exc:
            return CallOutcome(
                call.id,
                tool.name,
                "invalid_result",
                error=f"the result does not fit the tool's return type: "
                f"{describe_validation_error(exc, 'result')}",
            )
        except (TypeError, ValueError) as exc:
            return CallOutcome(
                call.id, tool.name, "invalid_result", error=f"the result is not JSON data: {exc}"
            )
        size = tool.result_size(data)
        if size > tool.max_result_bytes:
            return CallOutcome(
                call.id,
                tool.name,
                "too_large",
                error=f"the result is {size} bytes of JSON, over the tool's cap of "
                f"{tool.max_result_bytes}",
            )
        return CallOutcome(call.id, tool.name, "ok", value=data)

    def idempotency_key(self, step: int, label: str, seq: int) -> str:
        """The key a tool passes to external systems: the same for every re-run of a call."""
        return f"{self.run_id}/{step}/{label}/{seq}"

    def _count(self, item: PlannedCall, outcome: CallOutcome) -> None:
        caller = item.caller
        if outcome.status not in NOT_RUN and self._first_count(
            caller.step, caller.label, item.seq, outcome.replayed
        ):
            self.meter.tool(caller.node)

    def _release(self, item: PlannedCall) -> None:
        if self.spend is not None and item.reservation is not None:
            self.spend.release(item.reservation)
            item.reservation = None
            self.spend.check_soft(item.caller.node)

    def _reserve_all(self, calls: Sequence[PlannedCall]) -> None:
        """Reserve every call that will run, before any runs: a call that does not fit
        stops the step with nothing started (and nothing left reserved)."""
        if self.spend is None:
            return
        taken = []
        try:
            for item in calls:
                entry = self._entry(item)
                if entry is None:
                    item.reservation = self.spend.reserve_tool(item.caller.node)
                    taken.append(item)
        except BaseException:
            for item in taken:
                self._release(item)
            raise

    def _first_count(self, step: int, label: str, seq: int, replayed: bool) -> bool:
        """Tell whether a call is to be metered: a replay of a call this run already
        counted (a node retried in this process) is not counted again."""
        key = (step, label, seq)
        if replayed and key in self._metered:
            return False
        self._metered.add(key)
        return True

    def forget(self, step: int) -> None:
        """Drop what the gateway keeps about a committed step."""
        if self._metered:
            self._metered = {k for k in self._metered if k[0] > step}

    def _report(self, item: PlannedCall, outcome: CallOutcome, duration: float) -> None:
        if outcome.status == "denied":
            self.meter.denied(item.caller.node)
        # a rejection or a lost conflict is a decision, not a failure
        level = "debug" if outcome.ok else "info" if outcome.status in _DECIDED else "warning"
        self.emit(
            ToolCalled(
                run_id=self.run_id,
                at=time.time(),
                step=item.caller.step,
                node=item.caller.label,
                tool=outcome.tool,
                call_id=outcome.call_id,
                status=outcome.status,
                duration=duration,
                error=outcome.error,
                replayed=outcome.replayed,
            ),
            level,
        )

    def _in_doubt_request(self, item: PlannedCall) -> Request:
        caller = item.caller
        entry = self._entry(item)
        # a call retried by an operator and in doubt again is a new question: a new id
        started = entry.created_at if entry is not None else 0.0
        arguments, edited = item.json_arguments, item.edited is not None
        if not edited:  # what ran is what an operator's Edit said, if there was one
            row = self.requests.get(self._approval_id(item))
            if row is not None and row.status == "answered":
                answer = _answer(row)
                if answer.get("answer") == "edit":
                    arguments, edited = answer.get("arguments"), True
        payload = {
            "tool": item.call.name,
            "arguments": arguments,
            "call_id": item.call.id,
            "seq": item.seq,
            "idempotency_key": self.idempotency_key(caller.step, caller.label, item.seq),
        }
        if edited:
            payload["edited"] = True  # by an operator, before approving it
        return Request.new(
            run_id=self.run_id,
            kind=RequestKind.IN_DOUBT,
            step=caller.step,
            node=caller.label,
            payload=payload,
            task=caller.label,
            seq=item.seq,
            identity="in_doubt",
            started=started,
        )


def _status(entry: LedgerEntry | None) -> str | None:
    return None if entry is None else entry.status


def _expired(row: RequestRow) -> bool:
    return row.expires_at is not None and row.expires_at <= time.time()


def _answer(row: RequestRow) -> dict[str, Any]:
    try:
        data = json.loads(row.answer or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _conflict_digest(conflict: Conflict) -> str:
    return fingerprint(
        {
            "policy": conflict.policy,
            "calls": [[c.key, c.tool, dict(c.arguments)] for c in conflict.calls],
        }
    )


def _digest_seq(digest: str) -> int:
    """A ledger position for a conflict's decision: from its digest (one per conflict)."""
    return int(digest[:8], 16)
