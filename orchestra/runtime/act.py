"""The act phase of a step: every tool call its agents proposed goes through the gateway,
all seen at once (approval and arbitration see the whole phase), and each agent gets the
results as tool messages for its next turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..context import Caller
from ..safeguards.interrupts import Request
from ..tools import tool_map
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan
    from ..models.base import ToolCall
    from ..tools import Tool
    from .gateway import Gateway
    from .guards import LoopCheck

__all__ = ("ActPhase",)


class ActPhase:
    """Runs one run's act phases (the loop watch, if any, sees every call)."""

    __slots__ = ("_allowed", "gateway", "loops", "plan")

    def __init__(self, plan: Plan[Any], gateway: Gateway, loops: LoopCheck | None = None) -> None:
        self.plan = plan
        self.gateway = gateway
        self.loops = loops
        self._allowed: dict[str, Mapping[str, Tool]] = {}

    async def run(self, tasks: Sequence[Task], results: Sequence[TaskResult], step: int) -> None:
        """The act phase: run every tool call the step's agents proposed, through the
        gateway, all seen at once; each agent gets the results as tool messages."""
        batch, owners = self._batch(tasks, results, step)
        outcomes = await self.gateway.act(batch)
        for (caller, calls), result, done in zip(batch, owners, outcomes, strict=True):
            messages = result.messages if result.messages is not None else []
            messages.extend(outcome.to_message() for outcome in done)
            if self.loops is not None:
                messages.extend(self.loops.on_calls(step, caller.label, calls, done))
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
                    priority=getattr(self.plan.nodes[task.node].fn, "priority", 0),
                )
                batch.append((caller, result.calls))
                owners.append(result)
        return batch, owners

    def _tools_of(self, node: str) -> Mapping[str, Tool]:
        allowed = self._allowed.get(node)
        if allowed is None:
            allowed = self._allowed[node] = tool_map(self.plan.nodes[node].tools)
        return allowed

    def held(
        self, tasks: Sequence[Task], results: Sequence[TaskResult], step: int
    ) -> list[Request]:
        """The approval requests these agents' calls would ask, without running anything
        (the step stopped before its act phase for another request: all are asked at once)."""
        batch, _ = self._batch(tasks, results, step)
        return self.gateway.held(batch)
