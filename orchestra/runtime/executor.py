"""The superstep loop.

Layered one concern per method, checks at the top of the loop::

    run_to_end / stream_events   drivers.py: supervise the run (deadline, abort, lease)
      Execution.start()          the run row (with a store), the first step's tasks
      Execution.advance()        budgets, the abort poll, breakpoints; then one step
        _run_step()              think -> act -> merge at the barrier -> guards -> route -> commit
          _think()               the step's tasks: inline when one is ready, else a task group
            NodeRunner.run()     nodes.py: one task, its timeout and retries
          ActPhase.run()         act.py: the agents' proposed tool calls, through the gateway
          StateGuard, LoopCheck  guards.py: caps, state size, loops, breakpoints
      Execution.finish()         the outcome, recorded

Nodes never see each other's writes within a step: every task gets the state as it was at the
start of the step, and the writes are merged at the barrier in (node name, task index) order,
never in completion order, so a replay produces the same state. The state, step and next
tasks change together only once the step is committed, so a cancellation anywhere leaves the
last committed step intact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel

from .._logging import debug_enabled, get_logger
from ..errors import (
    LeaseLostError,
    OrchestraError,
    RunError,
    RunStoreError,
)
from ..events import (
    BudgetWarned,
    Event,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from ..models.base import Message
from ..outcome import RunOutcome, RunStatus, Usage
from ..safeguards.budgets import Budget, BudgetStop, Spend
from ..safeguards.interrupts import Request, StepInterrupted
from ..safeguards.loops import LoopWatch
from ..specs import NodeKind
from ..store.base import RequestKind
from ..tools import Effect
from .act import ActPhase
from .checkpoint import Joins
from .gateway import Gateway
from .guards import Halt, LoopCheck, StateGuard, breakpoint_halt
from .lease import LeaseWatch
from .ledger import Ledger
from .memory import remember
from .meter import Meter
from .nodes import NodeRunner
from .routing import initial_tasks, next_tasks
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan
    from ..store.base import RequestRow
    from .recorder import Recorder

__all__ = ("Execution",)

_now = time.time


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
        restored: Mapping[str, TaskResult] | None = None,
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
        # the results of tasks of the step in flight that finished before a crash
        self.restored: dict[str, TaskResult] = dict(restored or {})
        prior = usage or {}
        self.tasks_run = int(prior.get("tasks", 0))
        self.prior_wall = float(prior.get("wall_seconds", 0.0))
        self.status = RunStatus.RUNNING
        self.error: OrchestraError | None = None
        self.reason: str | None = None
        self.abort_reason: str | None = None
        self.closed = False  # the outcome is recorded
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
        self.lease = LeaseWatch(recorder) if recorder is not None else None
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
            expire=recorder.expire_request if recorder is not None else None,
        )
        self.nodes = NodeRunner(
            graph,
            run_id,
            gateway=self.gateway,
            usage=self._usage,
            emit=self._emit,
            watched=self._watched,
            events=self._events,
        )
        self.pending: list[Request] = []
        self._agents = any(node.kind is NodeKind.AGENT for node in graph.nodes.values())
        # tasks of the step in flight that a failure of the step leaves kept (not re-run)
        self._kept: set[str] = set()
        guard = StateGuard(run_id, state, self.budget, self._budget_warned)
        # none without caps or a size budget: the barrier skips it
        self.state_guard = guard if guard.active else None
        # the step at which the step budget's soft threshold is reached (warned once)
        steps = self.budget.steps
        self._soft_due = (
            max(math.ceil(steps * self.budget.soft), 1)
            if steps is not None and steps * self.budget.soft > step
            else None
        )
        self.loops: LoopCheck | None = None
        if graph.loop_guard is not None:
            watch = LoopWatch(graph.loop_guard, state, step)
            if loop_watch and loop_watch.get("step") == step:
                # the watch of the run this one continues (an interrupt is not a fresh start)
                watch.restore(loop_watch)
            self.loops = LoopCheck(graph, run_id, watch)
        self.act = ActPhase(graph, self.gateway, self.loops)

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
        if self.lease is not None and self.lease.due() and await self.poll_store():
            self.stopped_by_scope()
            return None
        if self.graph.interrupt_before and self._breakpoint(
            RequestKind.BEFORE, self.step + 1, self.tasks
        ):
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
            await self.ledger.release_failed(self.step + 1, effect, self._kept)
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
        self.closed = True
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
                stored["loop_watch"] = self.loops.watch.snapshot(self.step, self.state)
            try:
                await self.recorder.finish(
                    status=status,
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
        return not any(request.kind is RequestKind.LOOP for request in self.pending)

    async def poll_store(self) -> bool:
        """Check for an abort and renew the lease; return True if the run must stop
        (``abort_reason`` or ``error`` says why)."""
        assert self.lease is not None
        stopped = self.status is not RunStatus.RUNNING or self.error is not None
        found = await self.lease.poll(self.step, self._stored_usage, stopped=stopped)
        if found is None:
            return False
        if isinstance(found, str):
            self.abort_reason = found
            self.log.warning("abort_noticed", reason=found, step=self.step)
        else:
            self.error = found
        return True

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
            await self.act.run(tasks, results, step)
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
                    self._kept.clear()
                raise
        if deltas and self.state_guard is not None:
            state, deltas = self.state_guard.check(state, deltas, tasks, results, step)
        joins = dict(self.joins) if self._agents else None
        following = await next_tasks(self.graph, self.run_id, state, tasks, results, step, joins)
        remembered = (
            remember(self.graph, self.run_id, self.memory, joins, self.joins, tasks, results)
            if joins is not None
            else None
        )
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
        self.restored.clear()
        self.ledger.forget(step)
        self.gateway.forget(step)
        if self.loops is not None:
            self._halt_at(
                self.loops.after_step(
                    step, state, deltas, following, tasks, results, agents=self._agents
                )
            )
        if self.graph.interrupt_after and following and self.status is RunStatus.RUNNING:
            # an agent between turns has not finished its visit: it is stopped after its answer
            answered = [t for t, r in zip(tasks, results, strict=True) if not r.again]
            self._breakpoint(RequestKind.AFTER, step, answered)

    def _breakpoint(self, where: RequestKind, step: int, tasks: list[Task]) -> bool:
        """Stop at an ``interrupt_before`` / ``interrupt_after`` node unless an operator
        already let this step pass; return whether the run stopped."""
        halt = breakpoint_halt(
            self.graph,
            self.run_id,
            where,
            step,
            tasks,
            ready=self.tasks,
            requests=self.gateway.requests,
            memory=self.memory,
        )
        return self._halt_at(halt)

    def _halt_at(self, halt: Halt | None) -> bool:
        """Stop the run as a guard said (after this step); return whether it did."""
        if halt is None:
            return False
        self.status, self.reason, self.pending = halt.status, halt.reason, list(halt.pending)
        if halt.event is not None:
            self._emit(halt.event, self._buffer, "warning")
            self._carried.append(halt.event)
        return True

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

        Tasks finished before a crash (pending writes, in ``restored``) are not run again. With a
        store, each task of a multi-task step is kept as a pending write as it finishes.
        """
        restored = self.restored
        if len(tasks) == 1 and not restored:
            if self._kept:
                self._kept = set()
            return [await self.nodes.run(tasks[0], step, self.state, self.memory, buffer)]
        # the tasks that will not run again if this step fails (restored or pending-written)
        self._kept = set(restored)
        results: list[TaskResult | None] = [restored.get(t.label) for t in tasks]
        recorder = self.recorder

        asked: list[Request] = []
        stopped: list[BudgetStop] = []

        async def run_one(i: int, task: Task, group: anyio.abc.TaskGroup) -> None:
            try:
                if self._limiter is not None:
                    async with self._limiter:
                        result = await self.nodes.run(task, step, self.state, self.memory, buffer)
                else:
                    result = await self.nodes.run(task, step, self.state, self.memory, buffer)
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
                    self._kept.add(task.label)
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
                asked.extend(self.act.held([t for t, _ in pairs], [r for _, r in pairs], step))
            raise StepInterrupted(asked)
        return [r if r is not None else TaskResult() for r in results]

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
        if self.meter.called:
            usage.update(self.meter.stored())
        return usage

    def _emit(self, event: Event, buffer: list[Event], level: str = "debug") -> None:
        buffer.append(event)
        if level != "debug" or self._debug:
            data = event.to_dict()
            getattr(self.log, level)(data.pop("event"), **data)
