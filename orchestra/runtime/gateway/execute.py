"""Making tool calls: the ledger, then the tool under its timeout, then its result checked.

A call with a recorded result is replayed, never made again; an irreversible call (or an
approved write) is recorded as started before it runs, and a started call without a result
is in doubt: :meth:`CallRunner.in_doubt_request` asks an operator instead of running it again.
A result is validated against the tool's return type and its size capped. Each call is
metered once (a replay of a call this process already counted is not counted again), holds a
budget reservation while it runs, and is reported as a :class:`~orchestra.events.ToolCalled`
event. Calls that passed arbitration run as chains of waves (:meth:`CallRunner.run_chains`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError

from ...errors import RunError
from ...events import Event, ToolCalled
from ...models.base import ToolCall
from ...safeguards.interrupts import Request
from ...store.base import LedgerKind, LedgerStatus, RequestKind
from ...tools import NOT_RUN, CallStatus, Effect, Tool, ToolContext, describe_validation_error
from ..ledger import Ledger
from ..meter import Meter
from .calls import DECIDED, RETRYABLE, CallOutcome, PlannedCall

if TYPE_CHECKING:
    from ...safeguards.budgets import Spend
    from ...store.base import LedgerEntry

__all__ = ("CallRunner", "Emit", "check_result")

Emit = Callable[[Event, str], None]
"""Takes an event, and the log level it is logged at, into the step's record."""

Chain = Sequence[Sequence[PlannedCall]]
"""Waves of calls run one after another, the calls of a wave at once."""


class CallRunner:
    """Makes one run's tool calls, records and reports them."""

    def __init__(
        self, *, run_id: str, ledger: Ledger, meter: Meter, emit: Emit, spend: Spend | None
    ) -> None:
        self.run_id = run_id
        self.ledger = ledger
        self.meter = meter
        self.emit = emit
        self.spend = spend
        self._metered: set[tuple[int, str, int]] = set()

    def entry(self, item: PlannedCall) -> LedgerEntry | None:
        """The ledger's entry for the call, if it started or ran before."""
        assert item.tool is not None
        return self.ledger.find(
            item.caller.step,
            item.caller.label,
            item.seq,
            kind=LedgerKind.TOOL,
            name=item.tool.name,
            request_hash=item.request_hash,
            harmless=item.tool.effect is Effect.READ,
        )

    def idempotency_key(self, step: int, label: str, seq: int) -> str:
        """The key a tool passes to external systems: the same for every re-run of a call."""
        return f"{self.run_id}/{step}/{label}/{seq}"

    # -- running ----------------------------------------------------------------------------

    async def run_chains(self, chains: Sequence[Chain]) -> None:
        """Run the chains at once, the waves of each one after another."""
        if len(chains) == 1:
            await self._run_chain(chains[0])
        elif chains:
            failures: list[RunError] = []
            async with anyio.create_task_group() as tasks:
                for chain in chains:
                    tasks.start_soon(self._chain_into, chain, failures, tasks.cancel_scope)
            if failures:  # the store failed or the run was fenced: the run's own error
                raise failures[0]

    async def _run_chain(self, waves: Chain) -> None:
        """Run waves one after another, the calls of a wave at once. A call left in doubt
        stops the chain: the calls after it conflict with what it may have changed."""
        for index, wave in enumerate(waves):
            if len(wave) == 1:
                wave[0].outcome = await self.execute(wave[0])
            else:
                failures: list[RunError] = []
                async with anyio.create_task_group() as tasks:
                    for item in wave:
                        tasks.start_soon(self._execute_into, item, failures, tasks.cancel_scope)
                if failures:
                    raise failures[0]
            doubt = next(
                (i for i in wave if i.outcome and i.outcome.status == CallStatus.IN_DOUBT), None
            )
            if doubt is not None:
                for later in (item for rest in waves[index + 1 :] for item in rest):
                    later.outcome = CallOutcome(
                        later.call.id,
                        later.call.name,
                        CallStatus.CONFLICT,
                        error=f"a call it conflicts with ({doubt.key}) is in doubt; this call "
                        f"was not made",
                    )
                    self.release(later)
                    self.report(later, later.outcome, 0.0)
                return

    async def _chain_into(
        self, waves: Chain, failures: list[RunError], scope: anyio.CancelScope
    ) -> None:
        try:
            await self._run_chain(waves)
        except RunError as exc:  # not an ExceptionGroup: the run stops with this error
            failures.append(exc)
            scope.cancel()

    async def _execute_into(
        self, item: PlannedCall, failures: list[RunError], scope: anyio.CancelScope
    ) -> None:
        try:
            item.outcome = await self.execute(item)
        except RunError as exc:  # not an ExceptionGroup: the run stops with this error
            failures.append(exc)
            scope.cancel()

    async def execute(self, item: PlannedCall) -> CallOutcome:
        """The ledger, then the call itself under its timeout, then its result checked."""
        tool, caller, call = item.tool, item.caller, item.call
        assert tool is not None
        entry = self.entry(item)
        if entry is not None:
            if entry.status == LedgerStatus.DONE and entry.result is not None:
                replayed = CallOutcome.from_json(call.id, tool.name, entry.result)
                self._count(item, replayed)
                self.report(item, replayed, 0.0)
                return replayed
            if entry.status == LedgerStatus.STARTED:
                doubt = CallOutcome(call.id, tool.name, CallStatus.IN_DOUBT)
                self.report(item, doubt, 0.0)
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
            self.release(item)

    async def _run_tool(self, item: PlannedCall, ran: list[bool]) -> CallOutcome:
        """Record an irreversible call as started, run it, check and record the result."""
        tool, caller, call = item.tool, item.caller, item.call
        assert tool is not None
        key: dict[str, Any] = dict(
            kind=LedgerKind.TOOL, name=tool.name, request_hash=item.request_hash
        )
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
                        outcome = CallOutcome(call.id, tool.name, CallStatus.IN_DOUBT, error=detail)
                        self.meter.tool(caller.node)  # it ran (for all anyone knows)
                        self.release(item)
                        self.report(item, outcome, time.monotonic() - began)
                        return outcome
                    outcome = CallOutcome(call.id, tool.name, CallStatus.TIMEOUT, error=detail)
        except Exception as exc:  # the tool failed: its caller is told, the run goes on
            outcome = CallOutcome(
                call.id, tool.name, CallStatus.ERROR, error=f"{type(exc).__name__}: {exc}"
            )
        if outcome is None:
            outcome = check_result(tool, call, value)
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
        self.release(item)
        self.report(item, outcome, time.monotonic() - began)
        return outcome

    # -- metering and reservations ---------------------------------------------------------

    def _count(self, item: PlannedCall, outcome: CallOutcome) -> None:
        caller = item.caller
        if outcome.status not in NOT_RUN and self.first_count(
            caller.step, caller.label, item.seq, outcome.replayed
        ):
            self.meter.tool(caller.node)

    def first_count(self, step: int, label: str, seq: int, replayed: bool) -> bool:
        """Tell whether a call is to be metered: a replay of a call this run already
        counted (a node retried in this process) is not counted again."""
        key = (step, label, seq)
        if replayed and key in self._metered:
            return False
        self._metered.add(key)
        return True

    def forget(self, step: int) -> None:
        """Drop what is kept about the calls of a committed step."""
        if self._metered:
            self._metered = {k for k in self._metered if k[0] > step}

    def reserve_all(self, calls: Sequence[PlannedCall]) -> None:
        """Reserve every call that will run, before any runs: a call that does not fit
        stops the step with nothing started (and nothing left reserved)."""
        if self.spend is None:
            return
        taken = []
        try:
            for item in calls:
                if self.entry(item) is None:
                    item.reservation = self.spend.reserve_tool(item.caller.node)
                    taken.append(item)
        except BaseException:
            for item in taken:
                self.release(item)
            raise

    def release(self, item: PlannedCall) -> None:
        if self.spend is not None and item.reservation is not None:
            self.spend.release(item.reservation)
            item.reservation = None
            self.spend.check_soft(item.caller.node)

    # -- reporting ---------------------------------------------------------------------------

    def report(self, item: PlannedCall, outcome: CallOutcome, duration: float) -> None:
        """Report what became of a call (a ``ToolCalled`` event); count a denied one."""
        if outcome.status == CallStatus.DENIED:
            self.meter.denied(item.caller.node)
        # a rejection or a lost conflict is a decision, not a failure
        level = "debug" if outcome.ok else "info" if outcome.status in DECIDED else "warning"
        self.emit(
            ToolCalled(
                run_id=self.run_id,
                at=time.time(),
                step=item.caller.step,
                node=item.caller.label,
                tool=outcome.tool,
                call_id=outcome.call_id,
                status=str(outcome.status),  # the event holds the value, as stored
                duration=duration,
                error=outcome.error,
                replayed=outcome.replayed,
            ),
            level,
        )

    def report_refused(self, calls: Sequence[PlannedCall]) -> list[PlannedCall]:
        """Report the calls that will not run; return those that still may."""
        left = []
        for item in calls:
            if item.outcome is None:
                left.append(item)
            else:
                self.report(item, item.outcome, 0.0)
        return left

    def in_doubt_request(self, item: PlannedCall, edited: Any = None) -> Request:
        """The operator request for a call that started and has no result. ``edited``: the
        arguments it ran with, when an operator's Edit changed them before approving it."""
        caller = item.caller
        entry = self.entry(item)
        # a call retried by an operator and in doubt again is a new question: a new id
        started = entry.created_at if entry is not None else 0.0
        payload = {
            "tool": item.call.name,
            "arguments": item.json_arguments if edited is None else edited,
            "call_id": item.call.id,
            "seq": item.seq,
            "idempotency_key": self.idempotency_key(caller.step, caller.label, item.seq),
        }
        if edited is not None:
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


def check_result(tool: Tool, call: ToolCall, value: Any) -> CallOutcome:
    """Validate a result against the tool's return type and cap its size."""
    try:
        data = tool.dump_result(value)
    except ValidationError as exc:
        return CallOutcome(
            call.id,
            tool.name,
            CallStatus.INVALID_RESULT,
            error=f"the result does not fit the tool's return type: "
            f"{describe_validation_error(exc, 'result')}",
        )
    except (TypeError, ValueError) as exc:
        return CallOutcome(
            call.id,
            tool.name,
            CallStatus.INVALID_RESULT,
            error=f"the result is not JSON data: {exc}",
        )
    size = tool.result_size(data)
    if size > tool.max_result_bytes:
        return CallOutcome(
            call.id,
            tool.name,
            CallStatus.TOO_LARGE,
            error=f"the result is {size} bytes of JSON, over the tool's cap of "
            f"{tool.max_result_bytes}",
        )
    return CallOutcome(call.id, tool.name, CallStatus.OK, value=data)
