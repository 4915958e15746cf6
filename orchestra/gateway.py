"""The tool gateway: the one door to side effects.

Every tool call, an agent's or a node's ``ctx.call_tool``, goes through the same steps in
this order (DESIGN §3):

1. permission: the tool is on the caller's allowlist; a call to any other tool is denied,
   recorded as an event and returned to the caller as an error. It never runs;
2. validation: the arguments against the tool's pydantic schema;
3. approval: a hook (pass-through in this version; the approval policy fills it in);
4. arbitration: a hook that sees every call of the step's act phase at once and decides
   their order (pass-through in this version: they all run concurrently);
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError

from .checkpoint import compact_json
from .errors import RunError, ToolArgumentsError, ToolCallError, ToolDeniedError
from .events import Event, ModelCalled, ToolCalled
from .ledger import DONE, STARTED, Ledger, fingerprint
from .models.base import (
    Message,
    ModelRequest,
    ModelResponse,
    ToolCall,
    estimate_request_tokens,
)
from .safeguards.budgets import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    Reservation,
    Spend,
    price_of,
    worst_output,
)
from .safeguards.interrupts import Request, StepInterrupted, request_id
from .tools import Effect, Tool, ToolContext, describe_validation_error

if TYPE_CHECKING:
    from .models.base import Model
    from .store.base import LedgerEntry

__all__ = ("CallOutcome", "Caller", "Gateway", "Meter")

# statuses of calls that never ran (not counted as tool calls)
NOT_RUN = frozenset({"denied", "invalid_arguments", "in_doubt"})
# failures of a read or write tool that are not recorded: a node retry or a re-run of the
# step calls it again (an irreversible tool's failure is recorded: it never runs twice)
RETRYABLE = frozenset({"error", "timeout"})


@dataclass(slots=True)
class Caller:
    """Who is calling: one task of a step, with its allowlist and its call counter."""

    node: str
    label: str
    step: int
    tools: Mapping[str, Tool]
    seq: int = 0

    def next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq


@dataclass(slots=True)
class CallOutcome:
    """What became of one tool call. ``value`` is the result in JSON form (status ``ok``)."""

    call_id: str
    tool: str
    status: str
    value: Any = None
    error: str | None = None
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        if self.ok:
            return compact_json({"status": "ok", "result": self.value})
        return compact_json({"status": self.status, "error": self.error})

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
        )

    def to_message(self) -> Message:
        """The tool message an agent sees next turn: data, with the tool as its source."""
        if self.ok:
            content = compact_json({"result": self.value})
        else:
            content = compact_json({"error": self.error, "status": self.status})
        return Message(role="tool", name=self.tool, tool_call_id=self.call_id, content=content)

    def raise_for_status(self) -> None:
        if self.status == "denied":
            raise ToolDeniedError(self.tool, self.error or "")
        if self.status == "invalid_arguments":
            raise ToolArgumentsError(self.tool, self.error or "")
        if not self.ok:
            raise ToolCallError(self.tool, self.status, self.error or "")


@dataclass(slots=True)
class Meter:
    """Usage so far: model tokens and calls, tool calls; per agent too."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    model_calls: int = 0
    tool_calls: int = 0
    denied_calls: int = 0
    by_node: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model(self, node: str, input_tokens: int, output_tokens: int, cost: float = 0.0) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cost_usd += cost
        self.model_calls += 1
        mine = self._mine(node)
        mine["input_tokens"] += input_tokens
        mine["output_tokens"] += output_tokens
        mine["model_calls"] += 1
        if cost:
            mine["cost_usd"] = mine.get("cost_usd", 0.0) + cost

    def tool(self, node: str) -> None:
        self.tool_calls += 1
        self._mine(node)["tool_calls"] += 1

    def denied(self, node: str) -> None:
        self.denied_calls += 1
        self._mine(node)["denied_calls"] += 1

    def _mine(self, node: str) -> dict[str, Any]:
        mine = self.by_node.get(node)
        if mine is None:
            mine = self.by_node[node] = dict.fromkeys(
                ("input_tokens", "output_tokens", "model_calls", "tool_calls", "denied_calls"),
                0,
            )
        return mine

    def load(self, usage: Mapping[str, Any]) -> None:
        self.input_tokens = int(usage.get("input_tokens", 0))
        self.output_tokens = int(usage.get("output_tokens", 0))
        self.cost_usd = float(usage.get("cost_usd", 0.0))
        self.model_calls = int(usage.get("model_calls", 0))
        self.tool_calls = int(usage.get("tool_calls", 0))
        self.denied_calls = int(usage.get("denied_calls", 0))
        self.by_node = {k: dict(v) for k, v in usage.get("by_node", {}).items()}

    def totals(self) -> dict[str, Any]:
        """The run's totals (no per-node copies): what the budget check reads each step."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "tool_calls": self.tool_calls,
        }

    def stored(self) -> dict[str, Any]:
        """The counters as the store keeps them (empty while nothing was called)."""
        if not self.model_calls and not self.tool_calls and not self.denied_calls:
            return {}
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 10),
            "model_calls": self.model_calls,
            "tool_calls": self.tool_calls,
            "denied_calls": self.denied_calls,
            "by_node": {k: dict(v) for k, v in self.by_node.items()},
        }


@dataclass(slots=True)
class PlannedCall:
    """A call after permission and validation, as the approval and arbitration hooks see
    it. ``outcome`` is set when it will not run (a hook may set it: rejected, conflict)."""

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


Emit = Callable[[Event, str], None]
ApproveHook = Callable[[Sequence[PlannedCall]], Awaitable[None]]
"""Sees the calls about to run; sets ``outcome`` on those that may not (or interrupts)."""
ArbitrateHook = Callable[[Sequence[PlannedCall]], Sequence[Sequence[PlannedCall]]]
"""Orders the act phase's calls: groups run one after another, the calls of a group at once;
sets ``outcome`` on calls that lose."""


class Gateway:
    """One run's gateway (see the module doc)."""

    def __init__(
        self,
        *,
        run_id: str,
        ledger: Ledger,
        meter: Meter,
        emit: Emit,
        approve: ApproveHook | None = None,
        arbitrate: ArbitrateHook | None = None,
        spend: Spend | None = None,
    ) -> None:
        self.run_id = run_id
        self.ledger = ledger
        self.meter = meter
        self.emit = emit
        self.approve = approve
        self.arbitrate = arbitrate
        self.spend = spend
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
                    from .errors import ModelResponseError

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
        """Make one call now (a node's ``ctx.call_tool``); an in-doubt call interrupts."""
        prepared = self._prepare(caller, call, caller.next_seq())
        if prepared.outcome is None and _status(self._entry(prepared)) != STARTED:
            await self._approve([prepared])
        if prepared.outcome is not None:
            self._report(prepared, prepared.outcome, 0.0)
            return prepared.outcome
        outcome = await self._execute(prepared)
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
        groups = self._arbitrate(runnable)
        runnable = self._report_refused(runnable)
        self._reserve_all(runnable)
        for group in groups:
            group = [item for item in group if item.outcome is None]
            if len(group) == 1:
                item = group[0]
                item.outcome = await self._execute(item)
                continue
            failures: list[RunError] = []
            async with anyio.create_task_group() as tasks:
                for item in group:
                    tasks.start_soon(self._execute_into, item, failures, tasks.cancel_scope)
            if failures:  # the store failed or the run was fenced: the run's own error
                raise failures[0]
        for item in runnable:
            if item.outcome is None:
                item.outcome = CallOutcome(
                    item.call.id,
                    item.call.name,
                    "conflict",
                    error="the arbiter did not schedule this call; it was not made",
                )
                self._release(item)
                self._report(item, item.outcome, 0.0)
        timed_out = [
            p for p in runnable if p.outcome is not None and p.outcome.status == "in_doubt"
        ]
        if timed_out:
            raise StepInterrupted([self._in_doubt_request(p) for p in timed_out])
        return [[p.outcome for p in group if p.outcome is not None] for group in prepared]

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

    async def _approve(self, calls: Sequence[PlannedCall]) -> None:
        """Step 3, approval: the hook's (without one every call passes)."""
        if self.approve is not None and calls:
            await self.approve(calls)

    def _arbitrate(self, calls: Sequence[PlannedCall]) -> Sequence[Sequence[PlannedCall]]:
        """Step 4, arbitration: the hook's order (without one every call runs at once)."""
        if not calls:
            return []
        if self.arbitrate is not None:
            return self.arbitrate(calls)
        return [calls]

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
        if tool.effect is Effect.IRREVERSIBLE:
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
        level = "debug" if outcome.ok else "warning"
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
        return Request(
            id=request_id(self.run_id, caller.step, caller.label, item.seq, "in_doubt", started),
            run_id=self.run_id,
            kind="in_doubt",
            step=caller.step,
            node=caller.label,
            payload={
                "tool": item.call.name,
                "arguments": item.json_arguments,
                "call_id": item.call.id,
                "seq": item.seq,
                "idempotency_key": self.idempotency_key(caller.step, caller.label, item.seq),
            },
            created_at=time.time(),
        )


def _status(entry: LedgerEntry | None) -> str | None:
    return None if entry is None else entry.status
