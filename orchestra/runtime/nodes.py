"""Running one task of a step: its node (a function or an agent's turn) under the node's
timeout and retry policy, and what it returned made into an update."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel

from ..context import NodeContext
from ..errors import InvalidUpdateError, NodeError, NodeTimeoutError, RunError
from ..events import Event, NodeFinished, NodeRetried, NodeStarted
from ..models.base import Message
from ..outcome import Usage
from ..safeguards.budgets import BudgetStop
from ..safeguards.interrupts import StepInterrupted
from ..specs import NO_PAYLOAD, NodeKind, NodeSpec
from .memory import conversation_key
from .routing import normalize
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan
    from .gateway import Gateway

__all__ = ("NodeRunner",)

_now = time.time
_AGENT = NodeKind.AGENT  # (a module global: cheaper per task than the enum's attribute)

Emit = Callable[[Event, list[Event], str], None]


class _NodeTimedOut(TimeoutError):
    """An attempt ran past the node's timeout (internal; becomes NodeTimeoutError)."""


class NodeRunner:
    """Runs the tasks of one run's steps (one runner per run)."""

    __slots__ = ("emit", "events", "gateway", "plan", "run_id", "usage", "watched")

    def __init__(
        self,
        plan: Plan[Any],
        run_id: str,
        *,
        gateway: Gateway,
        usage: Callable[[], Usage],
        emit: Emit,
        watched: bool,
        events: bool,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self.gateway = gateway
        self.usage = usage
        self.emit = emit
        # node_started / node_finished events are built only for a stream or a debug log;
        # a retried node's finish is stored whenever events are kept
        self.watched = watched
        self.events = events

    async def run(
        self,
        task: Task,
        step: int,
        state: BaseModel,
        memory: Mapping[str, list[Message]],
        buffer: list[Event],
    ) -> TaskResult:
        """Run one task on the step's ``state`` with its node's timeout and retry policy."""
        node = self.plan.nodes[task.node]
        agent = node.fn if node.kind is _AGENT else None
        arg = state if task.payload is NO_PAYLOAD else task.payload
        began = time.monotonic()
        if self.watched:
            started = NodeStarted(
                run_id=self.run_id, at=_now(), step=step, node=task.node, task=task.index
            )
            self.emit(started, buffer, "debug")
        attempts = 0
        while True:
            attempts += 1
            # a fresh context (and call counter) each attempt: a retried node replays its calls
            ctx = NodeContext(
                run_id=self.run_id,
                step=step,
                node=task.node,
                task=task.index,
                state=state,
                usage=self.usage,
                gateway=self.gateway,
                label=task.label,
                tools=node.tools,
            )
            if agent is not None:
                key = conversation_key(task.node, task.label, task.payload)
                call = agent.turn(arg, ctx, memory.get(key, ()))
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
                self._report_finished(task, step, began, attempts, buffer, exc)
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
                    self.emit(retried, buffer, "warning")
                    await anyio.sleep(delay)
                    continue
                error = self._node_error(node, step, attempts, exc)
                self._report_finished(task, step, began, attempts, buffer, error)
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
            if self.watched or (attempts > 1 and self.events):
                self._report_finished(task, step, began, attempts, buffer, None)
            return TaskResult(
                update=out.update,
                messages=out.messages,
                calls=out.calls,
                again=out.again,
                duration=time.monotonic() - began,
            )
        try:
            update, goto = normalize(self.plan, self.run_id, out, node, step, state)
        except InvalidUpdateError as exc:
            self._report_finished(task, step, began, attempts, buffer, exc)
            return TaskResult(error=exc)
        # the store keeps no clean first-attempt finish (step_committed has its duration)
        if self.watched or (attempts > 1 and self.events):
            self._report_finished(task, step, began, attempts, buffer, None)
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

    def _report_finished(
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
        self.emit(event, buffer, "debug" if error is None else "warning")


def _leaves(group: BaseExceptionGroup[Any]) -> list[Any]:
    found: list[Any] = []
    for item in group.exceptions:
        if isinstance(item, BaseExceptionGroup):
            found.extend(_leaves(item))
        else:
            found.append(item)
    return found
