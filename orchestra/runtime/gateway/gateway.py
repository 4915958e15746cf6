"""The tool gateway: the one door to side effects.

Every tool call, an agent's or a node's ``ctx.call_tool``, goes through the same steps in
this order (DESIGN §3), each in its own module:

- permission, then validation (:mod:`.calls`): a call to a tool not on the caller's
  allowlist is denied, one whose arguments the tool refuses is invalid; neither runs;
- approval (:mod:`.approval`): a call the approval policy holds waits for a person's answer;
- arbitration (:mod:`.arbitration`): calls of the act phase on overlapping resources, one
  writing, conflict and the policy decides; a node's own calls take resource locks instead;
- ledger and execution (:mod:`.execute`): a recorded call is replayed, an irreversible one
  recorded as started before it runs, the tool run under its timeout and its result checked.

:class:`Gateway` composes them for one run: :meth:`Gateway.act` for an agent step's act phase
(every proposed call seen at once), :meth:`Gateway.call` for a node's call, and
:meth:`Gateway.model_call` for model calls, which meet the ledger and the budget too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...context import Caller
from ...errors import ModelResponseError
from ...events import ModelCalled
from ...models.base import ModelRequest, ModelResponse, ToolCall, estimate_request_tokens
from ...safeguards.budgets import DEFAULT_MAX_OUTPUT_TOKENS, Spend, price_of, worst_output
from ...safeguards.interrupts import Request, StepInterrupted
from ...store.base import LedgerKind, LedgerStatus
from ...tools import CallStatus
from ..ledger import Ledger, fingerprint
from ..meter import Meter
from .approval import ApprovalStep, Expire
from .arbitration import ArbitrationStep
from .calls import CallOutcome, PlannedCall, prepare
from .execute import CallRunner, Emit

if TYPE_CHECKING:
    from ...models.base import Model
    from ...safeguards.approvals import Approvals
    from ...safeguards.arbitration import Arbitration
    from ...store.base import RequestRow

__all__ = ("Gateway",)

Batch = Sequence[tuple[Caller, Sequence[ToolCall]]]
"""The tool calls a step's agents proposed, by caller."""


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
        self.spend = spend
        # the run's requests a resume found (answered, expired or still open), by id; the
        # approval and arbitration steps read this same dict
        self.requests: dict[str, RequestRow] = dict(requests or {})
        self.runner = CallRunner(run_id=run_id, ledger=ledger, meter=meter, emit=emit, spend=spend)
        self.approval_step = ApprovalStep(
            runner=self.runner, policy=approvals, requests=self.requests, expire=expire
        )
        self.arbitration_step = ArbitrationStep(
            runner=self.runner, policy=arbitration, requests=self.requests
        )

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
            kind=LedgerKind.MODEL,
            name=name,
            request_hash=digest,
            harmless=True,
        )
        price = price_of(name)
        reservation = None
        if entry is not None and entry.status == LedgerStatus.DONE and entry.result is not None:
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
                kind=LedgerKind.MODEL,
                name=name,
                request_hash=digest,
                result=response.model_dump_json(),
            )
            replayed = False
        usage = response.usage
        if self.runner.first_count(caller.step, caller.label, seq, replayed):
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
        prepared = prepare(caller, call, caller.next_seq())
        entry = self.runner.entry(prepared) if prepared.outcome is None else None
        if prepared.outcome is None and entry is None:
            await self.approval_step.approve([prepared])
        if prepared.outcome is not None:
            self.runner.report(prepared, prepared.outcome, 0.0)
            return prepared.outcome
        held = None
        if entry is None and prepared.resources and self.arbitration_step.policy is not None:
            held = await self.arbitration_step.lock(prepared)
            if held is None:
                assert prepared.outcome is not None
                return prepared.outcome
        try:
            outcome = await self.runner.execute(prepared)
        finally:
            if held is not None:
                self.arbitration_step.unlock(held)
        if outcome.status == CallStatus.IN_DOUBT:
            raise StepInterrupted([self._in_doubt(prepared)])
        return outcome

    async def act(self, batch: Batch) -> list[list[CallOutcome]]:
        """Run the calls the step's agents proposed, all seen at once; return each caller's
        outcomes in the order of its calls."""
        runner = self.runner
        prepared = [
            [prepare(caller, call, caller.next_seq()) for call in calls] for caller, calls in batch
        ]
        flat = [p for group in prepared for p in group]
        runner.report_refused(flat)
        runnable = [p for p in flat if p.outcome is None]
        # a call found in doubt stops the step before anything new runs
        doubtful = [p for p in runnable if _started(runner, p)]
        if doubtful:
            for item in doubtful:
                doubt = CallOutcome(item.call.id, item.call.name, CallStatus.IN_DOUBT)
                runner.report(item, doubt, 0.0)
            raise StepInterrupted([self._in_doubt(p) for p in doubtful])
        await self.approval_step.approve(runnable)
        runnable = runner.report_refused(runnable)
        chains = await self.arbitration_step.arbitrate(runnable)
        runnable = runner.report_refused(runnable)
        runner.reserve_all(runnable)
        await runner.run_chains(chains)
        timed_out = [
            p for p in runnable if p.outcome is not None and p.outcome.status == CallStatus.IN_DOUBT
        ]
        if timed_out:
            raise StepInterrupted([self._in_doubt(p) for p in timed_out])
        return [[p.outcome for p in group if p.outcome is not None] for group in prepared]

    def held(self, batch: Batch) -> list[Request]:
        """The approval requests the act phase of ``batch`` would ask, without running or
        reporting anything (the step stopped before its act phase for another request:
        every request is asked at once)."""
        return self.approval_step.held(batch)

    async def question(
        self, caller: Caller, prompt: str, schema: Any, expires_in: float | None
    ) -> Any:
        """A node's question for a person (``ctx.interrupt``): the validated answer a resume
        brought, or an interrupt asking it."""
        return await self.approval_step.question(caller, prompt, schema, expires_in)

    def forget(self, step: int) -> None:
        """Drop what the gateway keeps about a committed step."""
        self.runner.forget(step)

    def idempotency_key(self, step: int, label: str, seq: int) -> str:
        """The key a tool passes to external systems: the same for every re-run of a call."""
        return self.runner.idempotency_key(step, label, seq)

    def _in_doubt(self, item: PlannedCall) -> Request:
        # what ran is what an operator's Edit said, if there was one
        return self.runner.in_doubt_request(item, self.approval_step.edit_of(item))


def _started(runner: CallRunner, item: PlannedCall) -> bool:
    entry = runner.entry(item)
    return entry is not None and entry.status == LedgerStatus.STARTED
