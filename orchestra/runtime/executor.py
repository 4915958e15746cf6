"""The superstep loop.

Layered one concern per method, checks at the top of the loop::

    run_to_end / stream_events   drivers: supervise the run (deadline, abort, lease)
      Execution.start()          the run row (with a store), the first step's tasks
      Execution.advance()        guard (budgets), then one step
        _run_step()              think -> merge at the barrier -> route -> commit
          _think()               the step's tasks: inline when one is ready, else a task group
            _run_task()          one task: timeout, retry, normalise what the node returned
      Execution.finish()         the outcome, recorded

Nodes never see each other's writes within a step: every task gets the state as it was at the
start of the step, and the writes are merged at the barrier in (node name, task index) order,
never in completion order, so a replay produces the same state. The state, step and next
tasks change together only once the step is committed, so a cancellation anywhere leaves the
last committed step intact.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel

from .._json import compact_json
from .._logging import debug_enabled, get_logger
from ..agents import conversation_key, hold_conversation
from ..context import Caller, NodeContext
from ..errors import (
    InvalidUpdateError,
    LeaseLostError,
    NodeError,
    NodeTimeoutError,
    OrchestraError,
    RunError,
    RunStoreError,
    StoreError,
)
from ..events import (
    BudgetWarned,
    Event,
    LoopDetected,
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from ..models.base import Message
from ..outcome import RunOutcome, RunStatus, Usage
from ..safeguards.budgets import Budget, BudgetStop, Spend, StateSize
from ..safeguards.caps import field_caps
from ..safeguards.interrupts import Request, StepInterrupted, aborted, request_id
from ..safeguards.loops import Detection, LoopWatch
from ..specs import NO_PAYLOAD, NodeSpec
from ..state import FieldDelta
from ..store.base import RequestKind
from ..tools import Effect, tool_map
from .checkpoint import Joins, MemoryChange
from .gateway import CallOutcome, Gateway
from .ledger import Ledger
from .meter import Meter
from .routing import initial_tasks, next_tasks, normalize
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan
    from ..models.base import ToolCall
    from ..store.base import RequestRow
    from ..tools import Tool
    from .recorder import Recorder

__all__ = ("Execution",)

_now = time.time


class _NodeTimedOut(TimeoutError):
    """An attempt ran past the node's timeout (internal; becomes NodeTimeoutError)."""


class Execution:
    """One run of a compiled graph, from its input (or its last checkpoint) to its outcome."""

    def __init__(
        self,
        graph: Plan[Any],
        state: BaseModel,
        *,
        run_id: str,
        recorder: Recorder | None = None,
        step: int = 0,
        tasks: list[Task] | None = None,
        done: Mapping[str, TaskResult] | None = None,
        usage: Mapping[str, Any] | None = None,
        memory: Mapping[str, list[Message]] | None = None,
        joins: Joins | None = None,
        budget: Budget | None = None,
        agent_budgets: Mapping[str, Budget] | None = None,
        events: bool = True,
        requests: Mapping[str, RequestRow] | None = None,
        loop_watch: Mapping[str, Any] | None = None,
    ) -> None:
        self.graph = graph
        self.state = state
        self.run_id = run_id
        self.recorder = recorder
        self.step = step
        self.resumed = tasks is not None
        self.tasks: list[Task] = tasks or []
        self.done: dict[str, TaskResult] = dict(done or {})
        prior = usage or {}
        self.tasks_run = int(prior.get("tasks", 0))
        self.prior_wall = float(prior.get("wall_seconds", 0.0))
        self.status = RunStatus.RUNNING
        self.error: OrchestraError | None = None
        self.reason: str | None = None
        self.abort_reason: str | None = None
        self.finished = False
        self.started = 0.0
        self.deadline = float("inf")
        self.log = get_logger("orchestra.executor").bind(run_id=run_id, graph=graph.name)
        self._debug = debug_enabled(self.log)
        # events are built only when someone reads them: a stream, the store or the log
        self._watched = events or self._debug
        self._events = self._watched or recorder is not None
        self._limiter: anyio.CapacityLimiter | None = None
        self._carried: list[Event] = []
        self._buffer: list[Event] = []
        self._checked = self._renewed = time.monotonic()
        # agents: their conversations, the ledger of calls, usage, the gateway
        self.memory: dict[str, list[Message]] = dict(memory or {})
        self.joins: Joins = dict(joins or {})
        self.meter = Meter(prior)
        self.ledger = Ledger(run_id, recorder)
        self.ledger.read_only = self._read_only
        self.budget = budget if budget is not None else graph.budget
        if agent_budgets is None:
            agent_budgets = graph.agent_budgets
        self._spends = self.budget.limits_spend or self.budget.tool_calls is not None
        self._spends = self._spends or bool(agent_budgets)
        spend = (
            Spend(self.meter, self.budget, agent_budgets, warn=self._budget_warned)
            if self._spends
            else None
        )
        self.gateway = Gateway(
            run_id=run_id,
            ledger=self.ledger,
            meter=self.meter,
            emit=self._report,
            spend=spend,
            approvals=graph.approvals,
            arbitration=graph.arbitration,
            requests=requests,
            expire=self._expire_request if recorder is not None else None,
        )
        self.pending: list[Request] = []
        self._allow: dict[str, Mapping[str, Tool]] = {}
        self._agents = any(node.kind == "agent" for node in graph.nodes.values())
        self._finished: set[str] = set()
        self._size = StateSize(state) if self.budget.state_bytes is not None else None
        self._caps = field_caps(type(state))
        self._size_warned = False
        # the step at which the step budget's soft threshold is reached (warned once)
        steps = self.budget.steps
        self._soft_due = (
            max(math.ceil(steps * self.budget.soft), 1)
            if steps is not None and steps * self.budget.soft > step
            else None
        )
        guard = graph.loop_guard
        self.loops = LoopWatch(guard, state, step) if guard is not None else None
        if self.loops is not None and loop_watch and loop_watch.get("step") == step:
            # the watch of the run this one continues (an interrupt is not a fresh start)
            self.loops.restore(loop_watch)
        self._loop_found: Detection | None = None

    # -- the run ----------------------------------------------------------------------------

    async def start(self) -> list[Event]:
        """Begin the run: clocks, the first step's tasks and, with a store, the run row."""
        self.started = time.monotonic() - self.prior_wall
        wall = self.budget.wall_seconds
        if wall is not None:
            self.deadline = anyio.current_time() + wall - self.prior_wall
        if self.graph.max_concurrency is not None:
            self._limiter = anyio.CapacityLimiter(self.graph.max_concurrency)
        if not self.resumed or (self.step == 0 and not self.tasks):
            # a resumed run still at its input (its START route failed) starts over
            try:
                self.tasks = await initial_tasks(self.graph, self.run_id, self.state)
            except RunError as exc:
                self.status, self.error = RunStatus.FAILED, exc
        event = RunStarted(
            run_id=self.run_id,
            at=_now(),
            graph=self.graph.name,
            step=self.step,
            resumed=self.resumed,
            next=tuple(t.label for t in self.tasks),
        )
        self.log.info("run_resumed" if self.resumed else "run_started", step=self.step)
        if self.resumed:
            self._carried.append(event)  # stored with the first step this owner commits
        elif self.recorder is not None:
            await self.recorder.begin(self.state, self.tasks, [event])
        return [event]

    async def advance(self) -> list[Event] | None:
        """Run the next step; return its events, or None once the run has stopped."""
        if self.status is not RunStatus.RUNNING:
            return None
        if not self.tasks:
            self.status = RunStatus.COMPLETED
            return None
        reason = self.budget.exceeded(
            steps=self.step,
            wall_seconds=self._elapsed(),
            usage=self.meter.counts if self._spends else None,
        )
        if reason is not None:
            self.status, self.reason = RunStatus.BUDGET_EXCEEDED, reason
            return None
        # checked here too, not only by the watcher: nodes that never yield to the event loop
        # would starve it, and a stream's reader may pause between steps
        if self._store_check_due() and await self._poll_store():
            self.stopped_by_scope()
            return None
        if self.graph.interrupt_before and self._breakpoint("before", self.step + 1, self.tasks):
            return None
        buffer: list[Event] = []
        self._buffer = buffer
        if self._soft_due is not None and self.step + 1 >= self._soft_due:
            self._soft_due = None
            self._budget_warned("run", "steps", float(self.step + 1), float(self.budget.steps or 0))
        try:
            await self._run_step(self.tasks, buffer)
        except RunError as exc:  # a node, a merge, or the store (RunStoreError)
            self.status, self.error = RunStatus.FAILED, exc
            self._carried.extend(buffer)  # the failed step's events go into the record
            await self._release_failed_step(exc)
        except BudgetStop as stop:  # a call did not fit a budget: it was not made
            self.status, self.reason = (
                RunStatus.BUDGET_EXCEEDED,
                (
                    f"{stop.reason} (step {self.step + 1} was stopped; its finished calls are "
                    f"kept and replay on resume)"
                ),
            )
            self._carried.extend(buffer)
        except StepInterrupted as signal:  # a person must answer before the step goes on
            self.status, self.pending = RunStatus.INTERRUPTED, signal.requests
            count = len(signal.requests)
            self.reason = (
                f"step {self.step + 1} waits for {count} request{'s' if count != 1 else ''} "
                f"to be answered"
            )
            self._carried.extend(buffer)
        self._buffer = []
        return buffer

    async def _release_failed_step(self, error: RunError) -> None:
        """Let a resume of a failed step make its calls again (see Ledger.release_failed)."""
        if isinstance(error, LeaseLostError | RunStoreError):
            return  # this process may not (or cannot) write any more
        tools = self.graph.tools

        def effect(name: str) -> str | None:
            tool = tools.get(name)
            return None if tool is None else tool.effect.value

        try:
            await self.ledger.release_failed(self.step + 1, effect, self._finished)
        except RunError as exc:  # the run has failed already; say why this did not happen
            self.log.error("failed_step_not_released", error=str(exc))

    def stopped_by_scope(self) -> None:
        """Record why the run's cancel scope stopped the step in flight."""
        self._carried.extend(self._buffer)  # what the stopped step did before it stopped
        self._buffer = []
        if isinstance(self.error, LeaseLostError | RunStoreError):
            self.status = RunStatus.FAILED
        elif self.abort_reason is not None:
            self.status, self.reason = RunStatus.ABORTED, self.abort_reason
        else:
            self.status = RunStatus.BUDGET_EXCEEDED
            self.reason = (
                f"wall-time budget of {self.budget.wall_seconds:g}s ran out during "
                f"step {self.step + 1}; that step was discarded"
            )

    async def finish(self) -> RunFinished:
        """End the run: record and log it; return the final event, which carries the outcome."""
        self.finished = True
        if self.status is RunStatus.RUNNING:  # pragma: no cover - drivers always settle it
            self.status = RunStatus.COMPLETED
        status, error = self.status, self.error
        usage = self._usage()
        outcome: RunOutcome[Any] = RunOutcome(
            run_id=self.run_id,
            status=status,
            state=self.state,
            steps=self.step,
            usage=usage,
            error=error,
            stop_reason=self.reason,
            pending=tuple(self.pending),
            next=(
                tuple(dict.fromkeys(t.node for t in self.tasks))
                if status is not RunStatus.COMPLETED
                else ()
            ),
        )
        event = RunFinished(
            run_id=self.run_id,
            at=_now(),
            status=str(status),
            steps=self.step,
            error=str(error) if error else None,
            reason=self.reason,
            outcome=outcome,
        )
        if self.recorder is not None and not isinstance(error, LeaseLostError):
            stored = self._stored_usage()
            if self.loops is not None and self._keeps_watch(status):
                stored["loop_watch"] = self.loops.snapshot(self.step, self.state)
            try:
                await self.recorder.finish(
                    status=str(status),
                    reason=self.reason,
                    error=str(error) if error else None,
                    usage=stored,
                    events=[*self._carried, event],
                    # after the events of a step that did not commit (failed, interrupted)
                    step=max((getattr(e, "step", 0) for e in self._carried), default=self.step),
                    requests=self.pending,
                )
            except RunError as exc:  # fenced off, or the store failed
                # the outcome stands; the stored run stays as it was (resumable once its
                # lease expires) and the log says why it could not be closed
                self.log.error("run_not_recorded", status=str(status), error=str(exc))
        level = "info" if error is None else "error"
        getattr(self.log, level)(
            "run_finished",
            status=str(status),
            steps=self.step,
            error=str(error) if error else None,
            reason=self.reason,
        )
        return event

    def _keeps_watch(self, status: RunStatus) -> bool:
        """Whether the resume of this run goes on with its loop watch: yes after an
        interrupt, an abort, a budget stop or a failure; not when the run completed, or
        stopped on a loop (an operator who lets it go on has it watched afresh)."""
        if status in (RunStatus.COMPLETED, RunStatus.LOOP_DETECTED):
            return False
        return not any(request.kind == "loop" for request in self.pending)

    async def watch(self, scope: anyio.CancelScope) -> None:
        """Poll the store for an abort request and renew the lease, inside the run's group.

        An abort (or stop-all) cancels ``scope``, the run's cancel scope, within one poll
        interval; losing the lease does too, and the run stops without writing anything more.
        """
        assert self.recorder is not None
        poll = self.recorder.store.poll_seconds
        # the clocks belong to the run, not to this task: a stream starts one watcher per
        # step, and short steps must still be checked and renewed on time
        while True:
            wait = self._checked + poll - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            if await self._poll_store():
                scope.cancel()
                return

    def _store_check_due(self) -> bool:
        recorder = self.recorder
        if recorder is None:
            return False
        return time.monotonic() - self._checked >= recorder.store.poll_seconds

    async def _poll_store(self) -> bool:
        """Check for an abort and renew the lease when due; return True if the run must stop
        (``abort_reason`` or ``error`` says why)."""
        recorder = self.recorder
        assert recorder is not None
        self._checked = time.monotonic()
        if self.status is not RunStatus.RUNNING or self.error is not None:
            return False  # the run already stopped: its own error stands
        try:
            reason = await recorder.abort_requested()
            if reason is not None:
                self.abort_reason = reason
                self.log.warning("abort_noticed", reason=reason, step=self.step)
                return True
            if time.monotonic() - self._renewed >= recorder.store.lease_seconds / 3:
                if not await recorder.renew(self.step, self._stored_usage()):
                    self.error = LeaseLostError(
                        run_id=self.run_id, step=self.step, epoch=recorder.epoch
                    )
                    return True
                self._renewed = time.monotonic()
        except RunStoreError as exc:
            self.error = exc
            return True
        return False

    # -- one step ---------------------------------------------------------------------------

    async def _run_step(self, tasks: list[Task], buffer: list[Event]) -> None:
        """Run one superstep: think, merge at the barrier, route, then commit all at once."""
        step = self.step + 1
        began = time.monotonic()
        results = await self._think(tasks, step, buffer)
        for result in results:
            if result.error is not None:
                self.tasks_run += len(tasks)
                raise result.error
        if self._agents and any(r.calls for r in results):
            await self._act(tasks, results, step)
        writes = [(t.label, r.update) for t, r in zip(tasks, results, strict=True) if r.update]
        state = self.state
        deltas: dict[str, Any] = {}
        if writes:
            try:
                state, deltas = self.graph.schema.apply(
                    state, writes, run_id=self.run_id, step=step
                )
            except RunError:
                if self.recorder is not None:
                    # the finished tasks' writes cannot be merged: a resume must run them
                    # again (with fixed code) rather than replay what failed
                    await self.recorder.discard_pending(step)
                    self._finished.clear()
                raise
        if self._caps and deltas:
            state, deltas = self._apply_caps(state, deltas, tasks, results, step)
        if self._size is not None and deltas:
            self._check_state_size(state, deltas, tasks, results, step)
        joins = dict(self.joins) if self._agents else None
        following = await next_tasks(self.graph, self.run_id, state, tasks, results, step, joins)
        remembered = self._remember(tasks, results, joins) if joins is not None else None
        if self._events:
            event = StepCommitted(
                run_id=self.run_id,
                at=_now(),
                step=step,
                nodes=tuple(t.label for t in tasks),
                changed=tuple(deltas),
                next=tuple(t.label for t in following),
                duration=time.monotonic() - began,
                durations=tuple(r.duration for r in results),
            )
            self._emit(event, buffer)
        if self.recorder is not None:
            recorded = [*self._carried, *buffer] if self._carried else buffer
            usage = self._stored_usage(step, self.tasks_run + len(tasks))
            await self.recorder.commit(
                step, state, deltas, tasks, following, recorded, usage, remembered
            )
            self._carried.clear()
        # the commit: nothing below awaits
        self.state, self.step, self.tasks = state, step, following
        if remembered is not None:
            self.memory, self.joins = remembered.conversations, remembered.joins
        self.tasks_run += len(tasks)
        self.done.clear()
        self.ledger.forget(step)
        self.gateway.forget(step)
        if self.loops is not None:
            self._guard_loops(step, state, deltas, following, results, tasks)
        if self.graph.interrupt_after and following and self.status is RunStatus.RUNNING:
            # an agent between turns has not finished its visit: it is stopped after its answer
            done = [t for t, r in zip(tasks, results, strict=True) if not r.again]
            self._breakpoint("after", step, done)

    def _breakpoint(self, where: str, step: int, tasks: list[Task]) -> bool:
        """Stop at an ``interrupt_before`` / ``interrupt_after`` node unless an operator
        already let this step pass; return whether the run stopped."""
        marked = self.graph.interrupt_before if where == "before" else self.graph.interrupt_after
        if where == "before":  # an agent is stopped before a visit, not before each turn
            tasks = [t for t in tasks if not self._mid_visit(t)]
        nodes = sorted({t.node for t in tasks if t.node in marked})
        if not nodes:
            return False
        rid = request_id(self.run_id, step, where, 0, f"{where}:{','.join(nodes)}")
        row = self.gateway.requests.get(rid)
        if row is not None and row.status != "open" and not aborted(row):
            return False  # answered: go on
        if row is not None and row.status == "open":  # asked again: as stored
            self.status, self.pending = RunStatus.INTERRUPTED, [Request.from_row(row)]
            self.reason = f"breakpoint {where} {row.task} at step {step}"
            return True
        request = Request.new(
            run_id=self.run_id,
            kind=RequestKind(where),
            step=step,
            node=", ".join(nodes),
            payload={
                "nodes": nodes,
                "tasks": [t.label for t in (tasks if where == "before" else self.tasks)],
            },
            task=where,
            seq=0,
            identity=f"{where}:{','.join(nodes)}",
        )
        self.status, self.pending = RunStatus.INTERRUPTED, [request]
        self.reason = f"breakpoint {where} {', '.join(nodes)} at step {step}"
        return True

    def _mid_visit(self, task: Task) -> bool:
        """Tell whether an agent's task is between turns (its tool results wait for it)."""
        if self.graph.nodes[task.node].kind != "agent":
            return False
        history = self.memory.get(conversation_key(task.node, task.label, task.payload))
        if not history:
            return False
        last = history[-1]
        return not (last.role == "assistant" and not last.tool_calls)

    async def _expire_request(self, row: RequestRow) -> None:
        """Mark an unanswered request expired (a held call is then rejected)."""
        assert self.recorder is not None
        store = self.recorder.store
        # (a StoreError: answered at this very moment; the expiry is applied all the same)
        with contextlib.suppress(StoreError):
            await store.answer_request(
                self.run_id,
                self.recorder.epoch,
                row.request_id,
                '{"answer":"expired"}',
                status="expired",
            )

    def _guard_loops(
        self,
        step: int,
        state: BaseModel,
        changed: Mapping[str, Any],
        following: list[Task],
        results: list[TaskResult],
        tasks: list[Task],
    ) -> None:
        """The loop detectors, after the step is committed: a loop stops the run here."""
        assert self.loops is not None
        busy = self._agents and any(r.again for r in results)
        if self._agents and self.loops.guard.similar_output is not None:
            for task, result in zip(tasks, results, strict=True):
                if result.again or not result.messages:
                    continue
                last = result.messages[-1]
                if last.role == "assistant" and not last.tool_calls:
                    found = self.loops.on_output(step, task.label, last.content)
                    if found is not None and self._loop_found is None:
                        self._loop_found = found
        if len(following) == 1 and following[0].payload is NO_PAYLOAD:
            ready: tuple[str, ...] = (following[0].label,)
        else:
            ready = tuple(t.label for t in following)
            payloads = [t.payload for t in following if t.payload is not NO_PAYLOAD]
            if payloads:  # Send tasks are known by their payloads too (they may carry progress)
                ready = (*ready, _payload_key(payloads))
        found = self.loops.after_step(step, state, changed, ready, busy) or self._loop_found
        if found is None or not following:
            return
        self._loop_found = None
        guard = self.graph.loop_guard
        assert guard is not None
        if guard.policy_for(found.detector) == "interrupt":
            request = Request.new(
                run_id=self.run_id,
                kind=RequestKind.LOOP,
                step=step,
                node=", ".join(ready) or "-",
                payload={
                    "detector": found.detector,
                    "message": found.message,
                    "evidence": found.evidence,
                },
                task="loop",
                seq=0,
                identity=found.detector,
            )
            self.status, self.pending = RunStatus.INTERRUPTED, [request]
            self.reason = f"loop suspected, waiting for an operator: {found.message}"
        else:
            self.status, self.reason = RunStatus.LOOP_DETECTED, f"loop detected: {found.message}"
        event = LoopDetected(
            run_id=self.run_id,
            at=_now(),
            step=step,
            detector=found.detector,
            message=found.message,
            evidence=compact_json(found.evidence),
        )
        self._emit(event, self._buffer, "warning")
        self._carried.append(event)

    async def _act(self, tasks: list[Task], results: list[TaskResult], step: int) -> None:
        """The act phase: run every tool call the step's agents proposed, through the
        gateway, all seen at once; each agent gets the results as tool messages."""
        batch, owners = self._batch(tasks, results, step)
        outcomes = await self.gateway.act(batch)
        for (caller, calls), result, done in zip(batch, owners, outcomes, strict=True):
            messages = result.messages if result.messages is not None else []
            messages.extend(outcome.to_message() for outcome in done)
            if self.loops is not None:
                messages.extend(self._watch_calls(step, caller.label, calls, done))
            result.messages = messages

    def _batch(
        self, tasks: Sequence[Task], results: Sequence[TaskResult], step: int
    ) -> tuple[list[tuple[Caller, Sequence[ToolCall]]], list[TaskResult]]:
        """The act phase's calls, with their callers, and the results that proposed them."""
        batch: list[tuple[Caller, Sequence[ToolCall]]] = []
        owners = []
        for task, result in zip(tasks, results, strict=True):
            if result.calls:
                # seq 0 was the turn's model call
                caller = Caller(
                    task.node,
                    task.label,
                    step,
                    self._tools_of(task.node),
                    seq=1,
                    priority=getattr(self.graph.nodes[task.node].fn, "priority", 0),
                )
                batch.append((caller, result.calls))
                owners.append(result)
        return batch, owners

    def _watch_calls(
        self, step: int, node: str, calls: Sequence[ToolCall], done: Sequence[CallOutcome]
    ) -> list[Message]:
        """The same-call detector on an agent's calls; return a nudge for the agent, if its
        policy is to nudge and this is the first time."""
        assert self.loops is not None
        nudges = []
        for call, outcome in zip(calls, done, strict=True):
            if outcome.status in ("in_doubt", "conflict"):
                # (a conflict's result depends on the other calls: trying again is not a
                # repetition; denied and invalid calls repeated are a loop too)
                continue
            tool = self.graph.tools.get(call.name)
            if outcome.ok and tool is not None and tool.effect is not Effect.READ:
                self.loops.changed_world(node, call.name, call.arguments)
            found, nudge = self.loops.on_call(
                step, node, call.name, call.arguments, outcome.to_json()
            )
            if nudge and found is not None:
                nudges.append(
                    Message(
                        role="user",
                        name="orchestra",
                        content=f"You are repeating yourself: {found.message}. Its result "
                        f"will not change. Do something else, or give your final answer; "
                        f"repeating it again stops the run.",
                    )
                )
            elif found is not None and self._loop_found is None:
                self._loop_found = found
        return nudges

    def _remember(self, tasks: list[Task], results: list[TaskResult], joins: Joins) -> MemoryChange:
        """The conversations after the step: the messages its agents added; a finished
        Send-started agent's conversation is dropped. And the join progress after it."""
        added: dict[str, list[Message]] = {}
        dropped: list[str] = []
        for task, result in zip(tasks, results, strict=True):
            if result.messages is None and self.graph.nodes[task.node].kind != "agent":
                continue
            key = conversation_key(task.node, task.label, task.payload)
            if result.messages:
                added[key] = result.messages
            if not result.again and task.payload is not NO_PAYLOAD:
                dropped.append(key)
        change = MemoryChange(self.memory, added, dropped, joins, joins_changed=joins != self.joins)
        if not added and not dropped:
            return change
        memory = change.conversations = dict(self.memory)
        for key, messages in added.items():
            memory[key] = [*memory.get(key, ()), *messages]
        for task in tasks:
            agent = self.graph.nodes[task.node].fn
            cap = getattr(agent, "memory", None)
            key = conversation_key(task.node, task.label, task.payload)
            if cap is None or key not in added or len(memory[key]) <= cap.max_items:
                continue
            kept = hold_conversation(memory[key], cap, self.run_id, task.label)
            memory[key] = kept
            change.replaced = {**(change.replaced or {}), key: kept}
            added.pop(key)
        for key in dropped:
            memory.pop(key, None)
        return change

    def _tools_of(self, node: str) -> Mapping[str, Tool]:
        allowed = self._allow.get(node)
        if allowed is None:
            allowed = self._allow[node] = tool_map(self.graph.nodes[node].tools)
        return allowed

    def _apply_caps(
        self,
        state: BaseModel,
        deltas: dict[str, Any],
        tasks: list[Task],
        results: list[TaskResult],
        step: int,
    ) -> tuple[BaseModel, dict[str, Any]]:
        """Hold capped list fields to their caps (refuse, drop the oldest, or a hook)."""
        trimmed: dict[str, Any] = {}
        for name, cap in self._caps.items():
            if name not in deltas:
                continue
            items = list(getattr(state, name) or ())
            if len(items) <= cap.max_items:
                continue
            writers = _writers(name, tasks, results)
            if cap.policy == "refuse":
                raise InvalidUpdateError(
                    f"field {name!r} would hold {len(items)} items, over its cap of "
                    f"{cap.max_items}; written by {', '.join(map(repr, writers)) or 'the step'} "
                    f"(Cap policy 'refuse': the step was not committed)",
                    run_id=self.run_id,
                    step=step,
                    node=writers[0] if writers else None,
                )
            if cap.policy == "drop_oldest":
                kept = items[-cap.max_items :]
            else:
                assert callable(cap.policy)
                kept = list(cap.policy(items))
                if len(kept) > cap.max_items:
                    raise InvalidUpdateError(
                        f"the Cap hook of field {name!r} returned {len(kept)} items, over the "
                        f"cap of {cap.max_items}",
                        run_id=self.run_id,
                        step=step,
                        node=writers[0] if writers else None,
                    )
            trimmed[name] = kept
        if not trimmed:
            return state, deltas
        state = state.model_copy(update=trimmed)
        deltas = dict(deltas)
        for name, kept in trimmed.items():
            deltas[name] = FieldDelta("set", kept)  # no longer an append: stored whole
        return state, deltas

    def _check_state_size(
        self,
        state: BaseModel,
        deltas: Mapping[str, Any],
        tasks: list[Task],
        results: list[TaskResult],
        step: int,
    ) -> None:
        """Refuse a step whose updates would make the state larger than its budget."""
        assert self._size is not None
        limit = self.budget.state_bytes
        total, sizes = self._size.after(state, deltas)
        # (an update that shrinks a state already over its limit, say a compaction, is fine)
        if limit is not None and total > limit and total > self._size.total:
            name, (before, after) = max(sizes.items(), key=lambda kv: kv[1][1] - kv[1][0])
            writers = _writers(name, tasks, results)
            raise BudgetStop(
                f"run state-size budget: the update of field {name!r} by "
                f"{', '.join(map(repr, writers)) or 'the step'} would make the state "
                f"{total:,} bytes of JSON (the field {before:,} -> {after:,}), over its limit "
                f"of {limit:,}; the update was refused"
            )
        self._size.keep(total, sizes)
        if limit is not None and total >= limit * self.budget.soft and not self._size_warned:
            self._size_warned = True
            self._budget_warned("run", "state_bytes", float(total), float(limit))

    def _read_only(self, name: str) -> bool:
        tool = self.graph.tools.get(name)
        return tool is not None and tool.effect is Effect.READ

    def _budget_warned(self, scope: str, limit: str, used: float, value: float) -> None:
        self._report(
            BudgetWarned(
                run_id=self.run_id,
                at=_now(),
                step=self.step + 1,
                scope=scope,
                limit=limit,
                used=used,
                value=value,
            ),
            "warning",
        )

    def _report(self, event: Event, level: str) -> None:
        """Take an event from the gateway (a model or tool call) into the step's record."""
        if self._events or level != "debug":
            self._emit(event, self._buffer, level)

    async def _think(self, tasks: list[Task], step: int, buffer: list[Event]) -> list[TaskResult]:
        """Run every task of the step; one ready task runs inline, without a task group.

        Tasks finished before a crash (pending writes, in ``done``) are not run again. With a
        store, each task of a multi-task step is kept as a pending write as it finishes.
        """
        done = self.done
        if len(tasks) == 1 and not done:
            if self._finished:
                self._finished = set()
            return [await self._run_task(tasks[0], step, buffer)]
        # the tasks that will not run again if this step fails (restored or pending-written)
        self._finished = set(done)
        results: list[TaskResult | None] = [done.get(t.label) for t in tasks]
        recorder = self.recorder

        asked: list[Request] = []
        stopped: list[BudgetStop] = []

        async def run_one(i: int, task: Task, group: anyio.abc.TaskGroup) -> None:
            try:
                if self._limiter is not None:
                    async with self._limiter:
                        result = await self._run_task(task, step, buffer)
                else:
                    result = await self._run_task(task, step, buffer)
            except StepInterrupted as signal:
                # the other tasks go on: their own requests are gathered, their results kept
                asked.extend(signal.requests)
                return
            except BudgetStop as stop:
                # the others go on too: what they finish is kept (pending writes, ledger)
                stopped.append(stop)
                return
            if result.error is None and recorder is not None:
                try:
                    await recorder.pending(step, task, result)
                    self._finished.add(task.label)
                except RunError as exc:  # fenced off, unserializable, or the store failed
                    result = TaskResult(error=exc)
            results[i] = result
            if result.error is not None:
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for i, task in enumerate(tasks):
                if results[i] is None:
                    group.start_soon(run_one, i, task, group, name=task.label)
        failed = [r for r in results if r is not None and r.error is not None]
        if failed:
            return failed[:1]
        if stopped:
            raise stopped[0]
        if asked:
            if self._agents:  # the agents that did finish: their held calls are asked too
                pairs = [(t, r) for t, r in zip(tasks, results, strict=True) if r is not None]
                batch, _ = self._batch([t for t, _ in pairs], [r for _, r in pairs], step)
                asked.extend(self.gateway.held(batch))
            raise StepInterrupted(asked)
        return [r if r is not None else TaskResult() for r in results]

    async def _run_task(self, task: Task, step: int, buffer: list[Event]) -> TaskResult:
        """Run one task with its node's timeout and retry policy."""
        node = self.graph.nodes[task.node]
        agent = node.fn if node.kind == "agent" else None
        arg = self.state if task.payload is NO_PAYLOAD else task.payload
        began = time.monotonic()
        if self._watched:
            started = NodeStarted(
                run_id=self.run_id, at=_now(), step=step, node=task.node, task=task.index
            )
            self._emit(started, buffer)
        attempts = 0
        while True:
            attempts += 1
            # a fresh context (and call counter) each attempt: a retried node replays its calls
            ctx = NodeContext(
                run_id=self.run_id,
                step=step,
                node=task.node,
                task=task.index,
                state=self.state,
                usage=self._usage,
                gateway=self.gateway,
                label=task.label,
                tools=node.tools,
            )
            if agent is not None:
                key = conversation_key(task.node, task.label, task.payload)
                call = agent.turn(arg, ctx, self.memory.get(key, ()))
            else:
                call = node.fn(arg, ctx)
            try:
                if node.timeout is None:
                    out = await call
                else:
                    with anyio.move_on_after(node.timeout) as scope:
                        out = await call
                    if scope.cancelled_caught:
                        raise _NodeTimedOut(f"no result within {node.timeout:g}s")
            except RunError as exc:  # the framework's own verdict (an agent's, the store's)
                self._finish(task, step, began, attempts, buffer, exc)
                return TaskResult(error=exc)
            except Exception as exc:
                policy = node.retry
                if policy is not None and attempts < policy.attempts and policy.retries(exc):
                    delay = policy.delay(attempts)
                    retried = NodeRetried(
                        run_id=self.run_id,
                        at=_now(),
                        step=step,
                        node=task.node,
                        task=task.index,
                        attempt=attempts,
                        error=f"{type(exc).__name__}: {exc}",
                        delay=delay,
                    )
                    self._emit(retried, buffer, level="warning")
                    await anyio.sleep(delay)
                    continue
                error = self._node_error(node, step, attempts, exc)
                self._finish(task, step, began, attempts, buffer, error)
                return TaskResult(error=error)
            except BaseExceptionGroup as group:
                # a node's own task group holding a budget stop or an interrupt (a group of
                # plain errors is an Exception, handled above): the step's, unwrapped
                stops, _ = group.split(BudgetStop)
                if stops is not None:
                    raise _leaves(stops)[0] from None
                asked, _ = group.split(StepInterrupted)
                if asked is None:
                    raise
                raise StepInterrupted(
                    [r for signal in _leaves(asked) for r in signal.requests]
                ) from None
            break
        if agent is not None:
            if self._watched or (attempts > 1 and self._events):
                self._finish(task, step, began, attempts, buffer, None)
            return TaskResult(
                update=out.update,
                messages=out.messages,
                calls=out.calls,
                again=out.again,
                duration=time.monotonic() - began,
            )
        try:
            update, goto = normalize(self.graph, self.run_id, out, node, step, self.state)
        except InvalidUpdateError as exc:
            self._finish(task, step, began, attempts, buffer, exc)
            return TaskResult(error=exc)
        # the store keeps no clean first-attempt finish (step_committed has its duration)
        if self._watched or (attempts > 1 and self._events):
            self._finish(task, step, began, attempts, buffer, None)
        return TaskResult(update=update, goto=goto, duration=time.monotonic() - began)

    def _node_error(self, node: NodeSpec, step: int, attempts: int, exc: Exception) -> NodeError:
        error: NodeError
        if isinstance(exc, _NodeTimedOut):
            assert node.timeout is not None
            error = NodeTimeoutError(
                run_id=self.run_id,
                step=step,
                node=node.name,
                attempts=attempts,
                timeout=node.timeout,
            )
        else:
            error = NodeError(
                run_id=self.run_id, step=step, node=node.name, attempts=attempts, error=exc
            )
        error.__cause__ = exc
        return error

    def _finish(
        self,
        task: Task,
        step: int,
        began: float,
        attempts: int,
        buffer: list[Event],
        error: BaseException | None,
    ) -> None:
        event = NodeFinished(
            run_id=self.run_id,
            at=_now(),
            step=step,
            node=task.node,
            task=task.index,
            duration=time.monotonic() - began,
            attempts=attempts,
            error=None if error is None else str(error),
        )
        self._emit(event, buffer, level="debug" if error is None else "warning")

    # -- bookkeeping ------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _usage(self) -> Usage:
        return self.meter.usage(steps=self.step, tasks=self.tasks_run, wall_seconds=self._elapsed())

    def _stored_usage(self, step: int | None = None, tasks: int | None = None) -> dict[str, Any]:
        """Usage as the store keeps it (with every checkpoint, so built without a Usage)."""
        usage = {
            "steps": self.step if step is None else step,
            "tasks": self.tasks_run if tasks is None else tasks,
            "wall_seconds": round(self._elapsed(), 6),
        }
        usage.update(self.meter.stored())
        return usage

    def _emit(self, event: Event, buffer: list[Event], level: str = "debug") -> None:
        buffer.append(event)
        if level != "debug" or self._debug:
            data = event.to_dict()
            getattr(self.log, level)(data.pop("event"), **data)


def _writers(name: str, tasks: list[Task], results: list[TaskResult]) -> list[str]:
    """The tasks of a step whose updates wrote field ``name``."""
    return [t.label for t, r in zip(tasks, results, strict=True) if r.update and name in r.update]


def _payload_key(payload: Any) -> str:
    from pydantic_core import to_json

    return to_json(payload, fallback=str).decode()


def _leaves(group: BaseExceptionGroup[Any]) -> list[Any]:
    found: list[Any] = []
    for item in group.exceptions:
        if isinstance(item, BaseExceptionGroup):
            found.extend(_leaves(item))
        else:
            found.append(item)
    return found
