"""The guards a run passes at each step's barrier: breakpoints, the loop watch, list caps
and the state-size budget.

Each guard answers with an explicit verdict: ``None`` (go on), a :class:`Halt` (stop the run
after this step, with a status, a reason and the requests an operator answers), or, for an
update that may not be committed, the step's own error (:class:`InvalidUpdateError`,
:class:`BudgetStop`) raised before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .._json import compact_json
from ..errors import InvalidUpdateError
from ..events import LoopDetected
from ..models.base import Message
from ..outcome import RunStatus
from ..safeguards.budgets import Budget, BudgetStop, StateSize
from ..safeguards.caps import field_caps
from ..safeguards.interrupts import Request, aborted, request_id
from ..safeguards.loops import Detection, LoopWatch
from ..specs import NO_PAYLOAD, Effect
from ..state import FieldDelta
from ..store.base import RequestKind, RequestRow, RequestStatus
from ..tools import CallStatus
from .memory import mid_visit
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan
    from ..models.base import ToolCall
    from .gateway import CallOutcome

__all__ = ("Halt", "LoopCheck", "StateGuard", "breakpoint_halt")


@dataclass(frozen=True, slots=True)
class Halt:
    """A guard's verdict: stop the run after this step, saying why (``pending``: the
    requests an operator answers before it goes on; ``event``: what to record)."""

    status: RunStatus
    reason: str
    pending: tuple[Request, ...] = ()
    event: LoopDetected | None = None


def breakpoint_halt(
    plan: Plan[Any],
    run_id: str,
    where: RequestKind,
    step: int,
    tasks: Sequence[Task],
    *,
    ready: Sequence[Task],
    requests: Mapping[str, RequestRow],
    memory: Mapping[str, list[Message]],
) -> Halt | None:
    """Stop at an ``interrupt_before`` / ``interrupt_after`` node unless an operator already
    let this step pass. ``tasks`` are the step's (before) or the finished ones (after)."""
    before = where is RequestKind.BEFORE
    marked = plan.interrupt_before if before else plan.interrupt_after
    if before:  # an agent is stopped before a visit, not before each turn
        tasks = [t for t in tasks if not mid_visit(plan, memory, t)]
    nodes = sorted({t.node for t in tasks if t.node in marked})
    if not nodes:
        return None
    identity = f"{where}:{','.join(nodes)}"
    row = requests.get(request_id(run_id, step, where, 0, identity))
    if row is not None and row.status != RequestStatus.OPEN and not aborted(row):
        return None  # answered: go on
    if row is not None and row.status == RequestStatus.OPEN:  # asked again: as stored
        return Halt(
            RunStatus.INTERRUPTED,
            f"breakpoint {where} {row.task} at step {step}",
            (Request.from_row(row),),
        )
    request = Request.new(
        run_id=run_id,
        kind=where,
        step=step,
        node=", ".join(nodes),
        payload={"nodes": nodes, "tasks": [t.label for t in (tasks if before else ready)]},
        task=where,
        seq=0,
        identity=identity,
    )
    return Halt(
        RunStatus.INTERRUPTED, f"breakpoint {where} {', '.join(nodes)} at step {step}", (request,)
    )


class LoopCheck:
    """The loop detectors of one run: agents' calls and answers as they come, the state and
    the next nodes after each committed step (``watch`` keeps what they have seen)."""

    __slots__ = ("found", "plan", "run_id", "watch")

    def __init__(self, plan: Plan[Any], run_id: str, watch: LoopWatch) -> None:
        self.plan = plan
        self.run_id = run_id
        self.watch = watch
        self.found: Detection | None = None  # seen during the step, stops it at the barrier

    def on_calls(
        self, step: int, node: str, calls: Sequence[ToolCall], done: Sequence[CallOutcome]
    ) -> list[Message]:
        """The same-call detector on an agent's calls; return a nudge for the agent, if its
        policy is to nudge and this is the first time."""
        nudges = []
        for call, outcome in zip(calls, done, strict=True):
            if outcome.status in (CallStatus.IN_DOUBT, CallStatus.CONFLICT):
                # (a conflict's result depends on the other calls: trying again is not a
                # repetition; denied and invalid calls repeated are a loop too)
                continue
            tool = self.plan.tools.get(call.name)
            if outcome.ok and tool is not None and tool.effect is not Effect.READ:
                self.watch.changed_world(node, call.name, call.arguments)
            found, nudge = self.watch.on_call(
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
            elif found is not None and self.found is None:
                self.found = found
        return nudges

    def after_step(
        self,
        step: int,
        state: BaseModel,
        changed: Mapping[str, Any],
        following: Sequence[Task],
        tasks: Sequence[Task],
        results: Sequence[TaskResult],
        *,
        agents: bool,
    ) -> Halt | None:
        """The detectors after a committed step: a loop stops the run here."""
        watch = self.watch
        busy = agents and any(r.again for r in results)
        if agents and watch.guard.similar_output is not None:
            for task, result in zip(tasks, results, strict=True):
                if result.again or not result.messages:
                    continue
                last = result.messages[-1]
                if last.role == "assistant" and not last.tool_calls:
                    found = watch.on_output(step, task.label, last.content)
                    if found is not None and self.found is None:
                        self.found = found
        if len(following) == 1 and following[0].payload is NO_PAYLOAD:
            ready: tuple[str, ...] = (following[0].label,)
        else:
            ready = tuple(t.label for t in following)
            payloads = [t.payload for t in following if t.payload is not NO_PAYLOAD]
            if payloads:  # Send tasks are known by their payloads too (they may carry progress)
                ready = (*ready, compact_json(payloads))
        found = watch.after_step(step, state, changed, ready, busy) or self.found
        if found is None or not following:
            return None
        self.found = None
        event = LoopDetected(
            run_id=self.run_id,
            at=time.time(),
            step=step,
            detector=found.detector,
            message=found.message,
            evidence=compact_json(found.evidence),
        )
        if watch.guard.policy_for(found.detector) != "interrupt":
            return Halt(RunStatus.LOOP_DETECTED, f"loop detected: {found.message}", event=event)
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
        return Halt(
            RunStatus.INTERRUPTED,
            f"loop suspected, waiting for an operator: {found.message}",
            (request,),
            event,
        )


Warn = Callable[[str, str, float, float], None]


class StateGuard:
    """Caps on list fields (refuse, drop the oldest, or a hook) and the run's state-size
    budget, applied to a step's merged update before it is committed."""

    __slots__ = ("budget", "caps", "run_id", "size", "warn", "warned")

    def __init__(self, run_id: str, state: BaseModel, budget: Budget, warn: Warn) -> None:
        self.run_id = run_id
        self.budget = budget
        self.caps = field_caps(type(state))
        self.size = StateSize(state) if budget.state_bytes is not None else None
        self.warn = warn
        self.warned = False

    @property
    def active(self) -> bool:
        """Whether there is anything to check (no caps and no size budget: nothing)."""
        return bool(self.caps) or self.size is not None

    def check(
        self,
        state: BaseModel,
        deltas: dict[str, Any],
        tasks: Sequence[Task],
        results: Sequence[TaskResult],
        step: int,
    ) -> tuple[BaseModel, dict[str, Any]]:
        """Return the state and deltas held to their caps; raise if the step may not be
        committed (a refused cap, a state over its size budget)."""
        if self.caps:
            state, deltas = self._apply_caps(state, deltas, tasks, results, step)
        if self.size is not None:
            self._check_size(state, deltas, tasks, results)
        return state, deltas

    def _apply_caps(
        self,
        state: BaseModel,
        deltas: dict[str, Any],
        tasks: Sequence[Task],
        results: Sequence[TaskResult],
        step: int,
    ) -> tuple[BaseModel, dict[str, Any]]:
        trimmed: dict[str, Any] = {}
        for name, cap in self.caps.items():
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

    def _check_size(
        self,
        state: BaseModel,
        deltas: Mapping[str, Any],
        tasks: Sequence[Task],
        results: Sequence[TaskResult],
    ) -> None:
        """Refuse a step whose updates would make the state larger than its budget."""
        size = self.size
        assert size is not None
        limit = self.budget.state_bytes
        total, sizes = size.after(state, deltas)
        # (an update that shrinks a state already over its limit, say a compaction, is fine)
        if limit is not None and total > limit and total > size.total:
            name, (before, after) = max(sizes.items(), key=lambda kv: kv[1][1] - kv[1][0])
            writers = _writers(name, tasks, results)
            raise BudgetStop(
                f"run state-size budget: the update of field {name!r} by "
                f"{', '.join(map(repr, writers)) or 'the step'} would make the state "
                f"{total:,} bytes of JSON (the field {before:,} -> {after:,}), over its limit "
                f"of {limit:,}; the update was refused"
            )
        size.keep(total, sizes)
        if limit is not None and total >= limit * self.budget.soft and not self.warned:
            self.warned = True
            self.warn("run", "state_bytes", float(total), float(limit))


def _writers(name: str, tasks: Sequence[Task], results: Sequence[TaskResult]) -> list[str]:
    """The tasks of a step whose updates wrote field ``name``."""
    return [t.label for t, r in zip(tasks, results, strict=True) if r.update and name in r.update]
