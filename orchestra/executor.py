"""The superstep loop.

Layered one concern per method, checks at the top of the loop::

    events()          the run: start, guard, step after step, finish
      _run_step()     one superstep: think (all ready tasks) -> merge -> route
        _think()      run the step's tasks: inline when one is ready, else one task group
          _run_task() one task: timeout, retry, normalise what the node returned
        _route()      the tasks of the next step, from edges, routes, goto and joins

Nodes never see each other's writes within a step: every task gets the state as it was at the
start of the step, and the writes are merged at the barrier in (node name, task index) order,
never in completion order, so a replay produces the same state.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from pydantic import BaseModel

from .context import NodeContext
from .errors import (
    InvalidUpdateError,
    NodeError,
    NodeTimeoutError,
    OrchestraError,
    RouteError,
    RunError,
)
from .events import (
    Event,
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from .graph import END, START, Command, NodeSpec, RouteSpec, Send
from .outcome import RunOutcome, RunStatus, Usage

if TYPE_CHECKING:
    from .compile import CompiledGraph

__all__ = ("Execution",)

_log = structlog.get_logger("orchestra.executor")
_NO_PAYLOAD: Any = object()


@dataclass(slots=True)
class Task:
    """One unit of work in a step: a node, its index among the node's tasks, its input."""

    node: str
    index: int
    payload: Any
    label: str


@dataclass(slots=True)
class TaskResult:
    update: Mapping[str, Any] | None = None
    goto: tuple[str | Send, ...] = ()
    error: OrchestraError | None = None


class _NodeTimedOut(TimeoutError):
    """An attempt ran past the node's timeout (internal; becomes NodeTimeoutError)."""


class Execution:
    """One run of a compiled graph, from its input state to its outcome."""

    def __init__(self, graph: CompiledGraph[Any], state: BaseModel, *, run_id: str) -> None:
        self.graph = graph
        self.state = state
        self.run_id = run_id
        self.step = 0
        self.tasks: list[Task] = []
        self.tasks_run = 0
        self.status = RunStatus.RUNNING
        self.error: OrchestraError | None = None
        self.reason: str | None = None
        self.started = 0.0
        self.deadline = float("inf")
        self.log = _log.bind(run_id=run_id, graph=graph.name)
        self._debug = _debug_enabled(self.log)
        self._limiter: anyio.CapacityLimiter | None = None

    # -- the run ----------------------------------------------------------------------------

    async def start(self) -> list[Event]:
        """Begin the run: set its clocks and find the first step's tasks."""
        self.started = time.monotonic()
        wall = self.graph.budget.wall_seconds
        if wall is not None:
            self.deadline = anyio.current_time() + wall
        if self.graph.max_concurrency is not None:
            self._limiter = anyio.CapacityLimiter(self.graph.max_concurrency)
        self.log.info("run_started", step=self.step)
        events: list[Event] = [
            RunStarted(run_id=self.run_id, at=_now(), graph=self.graph.name, step=self.step)
        ]
        try:
            self.tasks = await self._initial_tasks(self.state)
        except RunError as exc:
            self.status, self.error = RunStatus.FAILED, exc
        return events

    async def advance(self) -> list[Event] | None:
        """Run the next step; return its events, or None once the run has stopped.

        The state, step and next tasks change together, only after the step's barrier, so a
        cancellation anywhere in here leaves the last committed step intact.
        """
        if self.status is not RunStatus.RUNNING:
            return None
        if not self.tasks:
            self.status = RunStatus.COMPLETED
            return None
        reason = self.graph.budget.exceeded(steps=self.step, wall_seconds=self._elapsed())
        if reason is not None:
            self.status, self.reason = RunStatus.BUDGET_EXCEEDED, reason
            return None
        buffer: list[Event] = []
        try:
            await self._run_step(self.tasks, buffer)
        except RunError as exc:
            self.status, self.error = RunStatus.FAILED, exc
        return buffer

    def stop_at_deadline(self) -> None:
        """Record that the wall-time deadline cancelled the step in flight."""
        self.status = RunStatus.BUDGET_EXCEEDED
        self.reason = (
            f"wall-time budget of {self.graph.budget.wall_seconds:g}s ran out during step "
            f"{self.step + 1}; that step was discarded"
        )

    def finish(self) -> RunFinished:
        """End the run: log it and return the final event, which carries the outcome."""
        if self.status is RunStatus.RUNNING:  # pragma: no cover - drivers always settle it
            self.status = RunStatus.COMPLETED
        status, error = self.status, self.error
        outcome: RunOutcome[Any] = RunOutcome(
            run_id=self.run_id,
            status=status,
            state=self.state,
            steps=self.step,
            usage=self._usage(),
            error=error,
            stop_reason=self.reason,
            next=(
                tuple(dict.fromkeys(t.node for t in self.tasks))
                if status is not RunStatus.COMPLETED
                else ()
            ),
        )
        level = "info" if error is None else "error"
        getattr(self.log, level)(
            "run_finished",
            status=str(status),
            steps=self.step,
            error=str(error) if error else None,
            reason=self.reason,
        )
        return RunFinished(
            run_id=self.run_id,
            at=_now(),
            status=str(status),
            steps=self.step,
            error=str(error) if error else None,
            outcome=outcome,
        )

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
        writes = [(t.label, r.update) for t, r in zip(tasks, results, strict=True) if r.update]
        state = self.state
        changed: tuple[str, ...] = ()
        if writes:
            state, deltas = self.graph.schema.apply(state, writes, run_id=self.run_id, step=step)
            changed = tuple(deltas)
        next_tasks = await self._route(state, tasks, results, step)
        # the commit: nothing below awaits
        self.state, self.step, self.tasks = state, step, next_tasks
        self.tasks_run += len(tasks)
        event = StepCommitted(
            run_id=self.run_id,
            at=_now(),
            step=step,
            nodes=tuple(t.label for t in tasks),
            changed=changed,
            next=tuple(t.label for t in next_tasks),
            duration=time.monotonic() - began,
        )
        self._emit(event, buffer)

    async def _think(self, tasks: list[Task], step: int, buffer: list[Event]) -> list[TaskResult]:
        """Run every task of the step; one ready task runs inline, without a task group."""
        if len(tasks) == 1:
            return [await self._run_task(tasks[0], step, buffer)]
        results: list[TaskResult | None] = [None] * len(tasks)

        async def run_one(i: int, task: Task, group: anyio.abc.TaskGroup) -> None:
            if self._limiter is not None:
                async with self._limiter:
                    result = await self._run_task(task, step, buffer)
            else:
                result = await self._run_task(task, step, buffer)
            results[i] = result
            if result.error is not None:
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for i, task in enumerate(tasks):
                group.start_soon(run_one, i, task, group, name=task.label)
        failed = [r for r in results if r is not None and r.error is not None]
        if failed:
            return failed[:1]
        return [r if r is not None else TaskResult() for r in results]

    async def _run_task(self, task: Task, step: int, buffer: list[Event]) -> TaskResult:
        """Run one task with its node's timeout and retry policy."""
        node = self.graph.nodes[task.node]
        ctx = NodeContext(
            run_id=self.run_id,
            step=step,
            node=task.node,
            task=task.index,
            state=self.state,
            usage=self._usage,
        )
        arg = self.state if task.payload is _NO_PAYLOAD else task.payload
        began = time.monotonic()
        self._emit(
            NodeStarted(run_id=self.run_id, at=_now(), step=step, node=task.node, task=task.index),
            buffer,
        )
        attempts = 0
        while True:
            attempts += 1
            try:
                if node.timeout is None:
                    out = await node.fn(arg, ctx)
                else:
                    with anyio.move_on_after(node.timeout) as scope:
                        out = await node.fn(arg, ctx)
                    if scope.cancelled_caught:
                        raise _NodeTimedOut(f"no result within {node.timeout:g}s")
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
            break
        try:
            update, goto = self._normalize(out, node, step, task)
        except InvalidUpdateError as exc:
            self._finish(task, step, began, attempts, buffer, exc)
            return TaskResult(error=exc)
        self._finish(task, step, began, attempts, buffer, None)
        return TaskResult(update=update, goto=goto)

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

    def _normalize(
        self, out: Any, node: NodeSpec, step: int, task: Task
    ) -> tuple[Mapping[str, Any] | None, tuple[str | Send, ...]]:
        """Split what a node returned into (update, goto), refusing anything else."""
        if out is None:
            return None, ()
        if isinstance(out, Mapping):
            return out or None, ()
        if isinstance(out, Command):
            update = None if out.update is None else self._as_update(out.update, node, step)
            goto = out.goto
            items = (goto,) if isinstance(goto, str | Send) else tuple(goto)
            return update, self._check_goto(items, node, step)
        if isinstance(out, Send):
            return None, self._check_goto((out,), node, step)
        if isinstance(out, list | tuple) and out and all(isinstance(x, Send) for x in out):
            return None, self._check_goto(tuple(out), node, step)
        return self._as_update(out, node, step), ()

    def _as_update(self, value: Any, node: NodeSpec, step: int) -> Mapping[str, Any] | None:
        if isinstance(value, Mapping):
            return value or None
        if isinstance(value, self.graph.state_model):
            return {name: getattr(value, name) for name in value.model_fields_set} or None
        raise InvalidUpdateError(
            f"node returned {type(value).__name__} {value!r:.80}; return a dict of field "
            f"updates, a {self.graph.state_model.__name__}, a Command, Send objects or None",
            run_id=self.run_id,
            step=step,
            node=node.name,
        )

    def _check_goto(
        self, items: Sequence[Any], node: NodeSpec, step: int
    ) -> tuple[str | Send, ...]:
        for item in items:
            target = item.node if isinstance(item, Send) else item
            if not isinstance(target, str):
                raise InvalidUpdateError(
                    f"goto holds {item!r}; use node names, END or Send objects",
                    run_id=self.run_id,
                    step=step,
                    node=node.name,
                )
            if target not in node.targets:
                declared = ", ".join(repr(t) for t in node.targets) or "none"
                raise InvalidUpdateError(
                    f"goto {target!r} is not a declared target (declared: {declared}); "
                    f"add it with add_node(..., targets=[...])",
                    run_id=self.run_id,
                    step=step,
                    node=node.name,
                )
        return tuple(items)

    # -- routing ----------------------------------------------------------------------------

    async def _initial_tasks(self, state: BaseModel) -> list[Task]:
        triggered = set(self.graph.successors.get(START, ()))
        sends: list[Send] = []
        for route in self.graph.routes.get(START, ()):
            await self._follow(route, state, 0, triggered, sends)
        return self._make_tasks(triggered, sends)

    async def _route(
        self, state: BaseModel, tasks: list[Task], results: list[TaskResult], step: int
    ) -> list[Task]:
        """Find the next step's tasks: static edges, routes, goto, then joins."""
        graph = self.graph
        ran = sorted({t.node for t in tasks}) if len(tasks) > 1 else [tasks[0].node]
        triggered: set[str] = set()
        sends: list[Send] = []
        for name in ran:
            triggered.update(graph.successors.get(name, ()))
            for route in graph.routes.get(name, ()):
                await self._follow(route, state, step, triggered, sends)
        for result in results:
            for item in result.goto:
                if isinstance(item, Send):
                    sends.append(item)
                else:
                    triggered.add(item)
        if graph.joins:
            done = set(ran)
            for join in graph.joins:
                if done.issuperset(join.sources):
                    triggered.add(join.target)
        return self._make_tasks(triggered, sends)

    async def _follow(
        self,
        route: RouteSpec,
        state: BaseModel,
        step: int,
        triggered: set[str],
        sends: list[Send],
    ) -> None:
        """Evaluate one route on the merged state and collect what it chose."""
        try:
            out = route.fn(state)
            if inspect.isawaitable(out):
                out = await out
        except Exception as exc:
            raise RouteError(run_id=self.run_id, step=step, node=route.source, error=exc) from exc
        items = out if isinstance(out, list | tuple) else (out,)
        for item in items:
            if isinstance(item, Send):
                target = item.node
            elif isinstance(item, str):
                target = item
            else:
                raise InvalidUpdateError(
                    f"route returned {item!r}; return a declared target, END, Send objects "
                    f"or a list of them",
                    run_id=self.run_id,
                    step=step,
                    node=route.source,
                )
            if target not in route.targets:
                declared = ", ".join(repr(t) for t in route.targets)
                raise InvalidUpdateError(
                    f"route returned {target!r}, which is not among its declared targets "
                    f"({declared})",
                    run_id=self.run_id,
                    step=step,
                    node=route.source,
                )
            if isinstance(item, Send):
                sends.append(item)
            else:
                triggered.add(item)

    @staticmethod
    def _make_tasks(triggered: set[str], sends: list[Send]) -> list[Task]:
        """Order the next step's tasks by node name; a node's Send tasks follow its edge task."""
        triggered.discard(END)
        if not sends:
            if len(triggered) == 1:
                (name,) = triggered
                return [Task(name, 0, _NO_PAYLOAD, name)]
            return [Task(name, 0, _NO_PAYLOAD, name) for name in sorted(triggered)]
        payloads: dict[str, list[Any]] = defaultdict(list)
        for send in sends:
            if send.node != END:
                payloads[send.node].append(send.payload)
        tasks: list[Task] = []
        for name in sorted(triggered | payloads.keys()):
            inputs = ([_NO_PAYLOAD] if name in triggered else []) + payloads.get(name, [])
            many = len(inputs) > 1
            for index, payload in enumerate(inputs):
                tasks.append(Task(name, index, payload, f"{name}[{index}]" if many else name))
        return tasks

    # -- bookkeeping ------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _usage(self) -> Usage:
        return Usage(steps=self.step, tasks=self.tasks_run, wall_seconds=self._elapsed())

    def _emit(self, event: Event, buffer: list[Event], level: str = "debug") -> None:
        buffer.append(event)
        if level != "debug" or self._debug:
            data = event.to_dict()
            getattr(self.log, level)(data.pop("event"), **data)


_now = time.time


async def run_to_end(execution: Execution) -> RunOutcome[Any]:
    """Drive a run to its end inside one cancel scope carrying the wall-time deadline."""
    with anyio.CancelScope() as scope:
        await execution.start()
        scope.deadline = execution.deadline
        while await execution.advance() is not None:
            pass
    if scope.cancelled_caught:
        execution.stop_at_deadline()
    outcome = execution.finish().outcome
    assert outcome is not None
    return outcome


async def stream_events(execution: Execution) -> AsyncIterator[Event]:
    """Drive a run step by step, yielding each step's events after its barrier.

    No cancel scope stays open across a ``yield``: each step gets its own scope with the
    run's deadline, which costs a few microseconds per step more than :func:`run_to_end`.
    """
    for event in await execution.start():
        yield event
    while True:
        with anyio.CancelScope(deadline=execution.deadline) as scope:
            events = await execution.advance()
        if scope.cancelled_caught:
            execution.stop_at_deadline()
            break
        if events is None:
            break
        for event in events:
            yield event
    yield execution.finish()


def _debug_enabled(log: Any) -> bool:
    check = getattr(log, "is_enabled_for", None)
    if check is None:
        check = getattr(log, "isEnabledFor", None)
    if check is None:
        return True
    try:
        return bool(check(logging.DEBUG))
    except Exception:
        return True
