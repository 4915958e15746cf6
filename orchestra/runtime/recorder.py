"""The run's link to its store: the run row, one commit per step, pending writes, the end.

The executor calls a Recorder only when the graph has a store; without one nothing here runs.
Checkpoints are deltas with a full snapshot whenever the deltas written since the last one
outweigh it (or every ``SNAPSHOT_EVERY`` steps), so storage follows what changed, and loading
replays at most that many deltas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .. import _faults
from .._json import compact_json
from ..errors import InvalidUpdateError, RunStoreError, StoreError
from ..events import Event, NodeFinished, NodeStarted, StepCommitted
from ..outcome import RunStatus
from ..safeguards.budgets import stored_budget
from ..safeguards.interrupts import AnswerKind
from ..state import FieldDelta
from ..store.base import (
    STEP_EVENT_DEFAULTS,
    CheckpointRow,
    EventRow,
    LedgerEntry,
    PendingWrite,
    RequestRow,
    RequestStatus,
    RunRecord,
    RunStore,
    StepCommit,
)
from .checkpoint import MemoryChange, dump_delta, dump_memory, dump_result, dump_state, dump_tasks
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan
    from ..safeguards.interrupts import Request

__all__ = ("Recorder",)

SNAPSHOT_EVERY = 1_000


_SKIP = frozenset({"run_id", "at", "outcome"})
_ROW_STEP: Any = object()
_NO_DEFAULT: Any = object()
_PLANS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _plan(cls: type) -> tuple[tuple[str, Any], ...]:
    """Each stored field of an event class, with the value a step row leaves out (the row's
    step, or the default that :func:`~orchestra.store.base.merge_events` restores)."""
    plan = _PLANS.get(cls)
    if plan is None:
        defaults = STEP_EVENT_DEFAULTS.get(getattr(cls, "kind", ""), {})
        plan = tuple(
            (f.name, _ROW_STEP if f.name == "step" else defaults.get(f.name, _NO_DEFAULT))
            for f in dataclasses.fields(cls)
            if f.name not in _SKIP
        )
        _PLANS[cls] = plan
    return plan


def event_row(event: Event, step: int | None) -> EventRow:
    """Make the stored form of a run-level event (run_id and time are columns)."""
    data = {name: getattr(event, name) for name, _ in _plan(type(event))}
    return EventRow(step=step, kind=event.kind, at=event.at, data=compact_json(data))


def usage_json(usage: dict[str, Any]) -> str:
    """Serialize a usage record (the executor's ``steps``, ``tasks``, ``wall_seconds``, and
    model and tool usage once there is some)."""
    if len(usage) > 3:
        return compact_json(usage)
    return (
        f'{{"steps":{int(usage["steps"])},"tasks":{int(usage["tasks"])},'
        f'"wall_seconds":{float(usage["wall_seconds"])!r}}}'
    )


def step_events(events: Sequence[Event], step: int) -> str | None:
    """Serialize a step's events into one JSON array kept in its checkpoint row.

    Compact by design, since it is written every step: no ``node_started`` (its time is the
    finish time minus the duration), no ``node_finished`` of a task that succeeded at its
    first attempt (``step_committed`` holds every task's duration), no ``step`` equal to the
    row's, no field at its default; :func:`~orchestra.store.base.merge_events` restores the
    left-out fields when events are read.
    """
    items = []
    for event in events:
        if isinstance(event, StepCommitted):
            # its next tasks are the row's tasks column; durations to 0.1 µs
            items.append(
                {
                    "event": event.kind,
                    "at": event.at,
                    "nodes": event.nodes,
                    "changed": event.changed,
                    "duration": round(event.duration, 7),
                    "durations": [round(d, 7) for d in event.durations],
                    **({} if event.step == step else {"step": event.step}),
                }
            )
            continue
        if isinstance(event, NodeStarted) or (
            isinstance(event, NodeFinished) and event.attempts == 1 and event.error is None
        ):
            continue
        item: dict[str, Any] = {"event": event.kind, "at": event.at}
        for name, default in _plan(type(event)):
            value = getattr(event, name)
            if value != (step if default is _ROW_STEP else default):
                item[name] = value
        items.append(item)
    return compact_json(items) if items else None


@contextmanager
def _store_failures(run_id: str, step: int | None) -> Iterator[None]:
    """Turn a store failure during a run into the run's error (RunStoreError)."""
    try:
        yield
    except StoreError as exc:
        raise RunStoreError(run_id=run_id, step=step, error=exc) from exc


class Recorder:
    """Writes one run's history to a store (the run contract), fenced by the run's lease
    epoch."""

    def __init__(self, store: RunStore, graph: Plan[Any], run_id: str, owner: str) -> None:
        self.store = store
        self.graph = graph
        self.run_id = run_id
        self.owner = owner
        self.epoch = 1
        self._snapshot_size = 0
        self._since_bytes = 0
        self._since_steps = 0
        self._had_pending = False

    def resumed(self, record: RunRecord, chain: Sequence[CheckpointRow]) -> Recorder:
        """Continue after ``chain`` (as loaded for resume) under the lease in ``record``."""
        self.epoch = record.epoch
        self._snapshot_size = chain[0].size
        self._since_bytes = sum(row.size for row in chain[1:])
        self._since_steps = len(chain) - 1
        self._had_pending = True  # the crashed step may have left some
        return self

    async def begin(self, state: BaseModel, tasks: Sequence[Task], events: Sequence[Event]) -> None:
        """Write the run row and checkpoint 0 (the input) before any node runs."""
        now = time.time()
        snapshot = dump_state(state)
        self._snapshot_size = len(snapshot)
        record = RunRecord(
            run_id=self.run_id,
            graph=self.graph.name,
            structure_hash=self.graph.structure_hash,
            app_ref=self.graph.app_ref,
            status=RunStatus.RUNNING,
            step=0,
            owner=self.owner,
            epoch=1,
            lease_expires_at=now + self.store.lease_seconds,
            created_at=now,
            updated_at=now,
            usage={},
            budget=stored_budget(self.graph.budget, self.graph.agent_budgets),
        )
        checkpoint = CheckpointRow(
            step=0, snapshot=snapshot, delta=None, tasks=dump_tasks(tasks), created_at=now
        )
        await self.store.create_run(record, checkpoint, [event_row(e, 0) for e in events])
        if _faults.ACTIVE:
            _faults.reach("after_run_created")

    async def pending(self, step: int, task: Task, result: TaskResult) -> None:
        """Keep a finished task of the step in flight, so a crash does not redo it."""
        try:
            text = dump_result(result)
        except (TypeError, ValueError) as exc:
            raise InvalidUpdateError(
                f"its update or Send payload cannot be stored as JSON: {exc}",
                run_id=self.run_id,
                step=step,
                node=task.label,
            ) from exc
        write = PendingWrite(step=step, task=task.label, result=text)
        with _store_failures(self.run_id, step):
            await self.store.put_pending_write(self.run_id, self.epoch, write)
        self._had_pending = True
        if _faults.ACTIVE:
            _faults.reach("after_pending_write", step)

    async def discard_pending(self, step: int) -> None:
        """Forget the finished tasks of a step whose merge failed (a resume reruns them)."""
        if self._had_pending:
            with _store_failures(self.run_id, step):
                await self.store.discard_pending_writes(self.run_id, self.epoch, step)

    async def commit(
        self,
        step: int,
        state: BaseModel,
        deltas: Mapping[str, FieldDelta],
        ran: Sequence[Task],
        tasks: Sequence[Task],
        events: Sequence[Event],
        usage: dict[str, Any],
        memory: MemoryChange | None = None,
    ) -> None:
        """Commit one step in one transaction: the checkpoint, the step's events, usage.

        ``ran`` are the step's tasks (named when a value cannot be stored), ``tasks`` the next
        step's. ``memory`` is what the step changed in the agents' conversations and the join
        progress.
        """
        try:
            delta = dump_delta(self.graph.schema, state, deltas) if deltas else None
            next_tasks = dump_tasks(tasks)
        except (TypeError, ValueError) as exc:
            labels = [t.label for t in ran]
            raise InvalidUpdateError(
                f"the step's changes or its Send payloads cannot be stored as JSON: {exc} "
                f"(written by {', '.join(map(repr, labels))})",
                run_id=self.run_id,
                step=step,
                node=labels[0] if len(labels) == 1 else None,
            ) from exc
        conversations = None
        if memory is not None and not memory.empty:
            conversations = dump_memory(memory, full=False)
        self._since_bytes += len(delta or "") + len(conversations or "")
        self._since_steps += 1
        snapshot = None
        if self._since_bytes > self._snapshot_size or self._since_steps >= SNAPSHOT_EVERY:
            snapshot = dump_state(state)
            delta = None
            if memory is not None:
                conversations = dump_memory(memory, full=True)
            self._snapshot_size = len(snapshot) + len(conversations or "")
            self._since_bytes = self._since_steps = 0
        checkpoint = CheckpointRow(
            step=step,
            snapshot=snapshot,
            delta=delta,
            tasks=next_tasks,
            created_at=time.time(),
            events=step_events(events, step),
            usage=usage_json(usage),
            memory=conversations,
        )
        commit = StepCommit(step=step, checkpoint=checkpoint, had_pending=self._had_pending)
        if _faults.ACTIVE:
            _faults.reach("before_commit", step)
        with _store_failures(self.run_id, step):
            await self.store.commit_step(self.run_id, self.epoch, commit)
        self._had_pending = False
        if _faults.ACTIVE:
            _faults.reach("after_commit", step)

    async def finish(
        self,
        *,
        status: RunStatus,
        reason: str | None,
        error: str | None,
        usage: dict[str, Any],
        events: Sequence[Event],
        step: int,
        requests: Sequence[Request] = (),
    ) -> None:
        """Record how the run ended and release its lease, with its open requests."""
        with _store_failures(self.run_id, step):
            await self.store.finish_run(
                self.run_id,
                self.epoch,
                status=status,
                reason=reason,
                error=error,
                usage=usage,
                events=[event_row(e, getattr(e, "step", step)) for e in events],
                requests=[r.to_row() for r in requests],
            )

    async def put_ledger(self, entry: LedgerEntry) -> None:
        """Record one call in the ledger, durably and fenced."""
        with _store_failures(self.run_id, entry.step):
            await self.store.put_ledger(self.run_id, self.epoch, entry)

    async def delete_ledger(self, entry: LedgerEntry) -> None:
        """Forget one call, fenced."""
        with _store_failures(self.run_id, entry.step):
            await self.store.delete_ledger(
                self.run_id, self.epoch, entry.step, entry.task, entry.seq
            )

    async def abort_requested(self) -> str | None:
        """Return why an abort (or stop-all) was requested for the run, if it was."""
        with _store_failures(self.run_id, None):
            return await self.store.abort_requested(self.run_id)

    async def renew(self, step: int, usage: dict[str, Any]) -> bool:
        """Extend the lease; False means another owner took the run over."""
        with _store_failures(self.run_id, step):
            return await self.store.renew(self.run_id, self.epoch, step=step, usage=usage)

    async def expire_request(self, row: RequestRow) -> None:
        """Mark an unanswered request expired (a held call is then rejected)."""
        # (a StoreError: answered at this very moment; the expiry is applied all the same)
        with contextlib.suppress(StoreError):
            await self.store.answer_request(
                self.run_id,
                self.epoch,
                row.request_id,
                compact_json({"answer": AnswerKind.EXPIRED}),
                status=RequestStatus.EXPIRED,
            )
