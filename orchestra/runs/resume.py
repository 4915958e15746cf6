"""Resume a stored run: check it may go on, load its last checkpoint, and rebuild the
execution that continues it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import GraphChangedError, OrchestraError, RunStatusError, StoreError
from ..outcome import RunStatus
from ..runtime.checkpoint import (
    load_joins,
    load_memory,
    load_result,
    load_state,
    load_tasks,
)
from ..safeguards.budgets import loaded_budget, price_of, stored_budget
from ..safeguards.interrupts import (
    Request,
    aborted,
)
from ..specs import NodeKind
from ..store.base import (
    CheckpointRow,
    LedgerEntry,
    LedgerKind,
    LedgerStatus,
    RequestKind,
    RequestRow,
    RequestStatus,
    RunRecord,
    Store,
    new_owner_id,
)
from ..tools import NOT_RUN
from .answers import apply_answers, check_answers, new_answers, record_answers

if TYPE_CHECKING:
    from ..compile import Plan
    from ..runtime.executor import Execution

__all__ = ("prepare_resume",)


async def prepare_resume(
    app: Plan[Any],
    run_id: str,
    *,
    allow_graph_change: bool,
    answers: Mapping[str, Any] | None = None,
) -> Execution:
    """Check, take the lease of, and load a run; return the Execution that continues it.

    ``answers`` (request id -> answer) are all checked before anything changes; a refused
    one raises :class:`AnswerError` and the run stays as it was.
    """
    from ..runtime.executor import Execution
    from ..runtime.recorder import Recorder

    store = app.require_store()
    record = await _resumable(app, store, run_id, allow_graph_change)
    checked = new_answers(await check_answers(app, store, run_id, answers or {}, same_again=True))
    if checked:  # all or none, before the lease: a refused answer changes nothing
        await record_answers(store, run_id, checked)
    record = await _adopt_limits(app, store, record)
    owner = new_owner_id()
    record = await store.acquire(run_id, owner)
    try:
        stop = await apply_answers(store, run_id, record.epoch)
    except Exception as exc:
        await _fail(store, record, f"could not apply the answers: {type(exc).__name__}: {exc}")
        raise
    loaded = await _load(app, store, record)
    budget, agent_budgets = app.budget, dict(app.agent_budgets)
    if record.budget is not None:  # the run's own limits, as `orchestra budget` left them
        budget, agent_budgets = loaded_budget(record.budget, app.budget, app.agent_budgets)
    execution = Execution(
        app,
        loaded.state,
        run_id=run_id,
        recorder=Recorder(store, app, run_id, owner).resumed(record, loaded.chain),
        step=loaded.step,
        tasks=loaded.tasks,
        restored=loaded.restored,
        usage=loaded.usage,
        memory=loaded.memory,
        joins=loaded.joins,
        budget=budget,
        agent_budgets=agent_budgets,
        events=False,
        requests={row.request_id: row for row in loaded.rows if row.step == loaded.step + 1},
        loop_watch=record.usage.get("loop_watch"),
    )
    execution.ledger.preload(loaded.entries)
    _meter_restored(app, execution, loaded.tasks, loaded.restored, loaded.entries)
    waiting = _waiting(loaded.rows, loaded.step)
    if waiting and stop is None:
        execution.status, execution.pending = RunStatus.INTERRUPTED, waiting
        execution.reason = (
            f"{waiting[0].describe()}: waiting for an answer (Continue() or Abort()) to "
            f"request {waiting[0].id}"
        )
    if stop is not None:
        execution.status, execution.reason = RunStatus.ABORTED, stop
    return execution


async def _resumable(
    app: Plan[Any], store: Store, run_id: str, allow_graph_change: bool
) -> RunRecord:
    """The stored run, if this app may resume it (not completed, the same structure)."""
    record = await store.get_run(run_id)
    if record.status is RunStatus.COMPLETED:
        raise RunStatusError(run_id, record.status, "resume it")
    if record.structure_hash != app.structure_hash and not allow_graph_change:
        raise GraphChangedError(run_id, record.structure_hash, app.structure_hash)
    return record


async def _adopt_limits(app: Plan[Any], store: Store, record: RunRecord) -> RunRecord:
    """Make the limits this resume runs under the run's own (so ``orchestra budget +N`` adds
    to what the run really has), recorded as a budget_raised event."""
    if record.budget is None or record.status is RunStatus.RUNNING:
        return record
    budget, agent_budgets = loaded_budget(record.budget, app.budget, app.agent_budgets)
    effective = stored_budget(budget, agent_budgets)
    if effective == record.budget:
        return record
    return await store.set_budget(
        record.run_id, effective, reason="raised to the limits of the app resuming it"
    )


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What a resume reads back: the last checkpoint and the step in flight's records."""

    chain: list[CheckpointRow]
    state: Any
    memory: dict[str, Any]
    joins: Any
    tasks: list[Any]
    step: int
    usage: dict[str, Any]
    restored: dict[str, Any]  # the step in flight's finished tasks (pending writes)
    entries: list[LedgerEntry]  # the step in flight's ledger
    rows: list[RequestRow]  # every request of the run


async def _load(app: Plan[Any], store: Store, record: RunRecord) -> _Loaded:
    """Read the run back; a run that cannot be loaded is marked failed, saying why."""
    run_id = record.run_id
    try:
        chain = await store.checkpoint_chain(run_id)
        tasks = load_tasks(chain[-1].tasks)
        missing = sorted({t.node for t in tasks} - set(app.nodes))
        if missing:
            raise StoreError(
                f"run {run_id} is due to run {', '.join(map(repr, missing))} next, which this "
                f"graph does not have"
            )
        step = chain[-1].step
        usage = json.loads(chain[-1].usage) if chain[-1].usage else {}
        # a step discarded by the deadline, or a crash, leaves the run row's totals higher
        for key in ("tasks", "wall_seconds"):
            usage[key] = max(usage.get(key, 0), record.usage.get(key, 0))
        pending = await store.pending_writes(run_id, step + 1)
        return _Loaded(
            chain=chain,
            state=load_state(app.schema, chain),
            memory=load_memory(chain),
            joins=load_joins(chain),
            tasks=tasks,
            step=step,
            usage=usage,
            restored={write.task: load_result(write.result) for write in pending},
            entries=await store.ledger(run_id, step + 1),
            rows=await store.requests(run_id, statuses=()),
        )
    except Exception as exc:
        message = f"could not load the run to resume it: {type(exc).__name__}: {exc}"
        await _fail(store, record, message)
        if isinstance(exc, OrchestraError):
            raise
        raise StoreError(f"run {run_id}: {message}") from exc


async def _fail(store: Store, record: RunRecord, error: str) -> None:
    """Mark the run failed under the lease this resume took, saying what went wrong."""
    await store.finish_run(
        record.run_id,
        record.epoch,
        status=RunStatus.FAILED,
        reason=None,
        error=error,
        usage=record.usage,
        events=[],
    )


def _waiting(rows: Sequence[RequestRow], step: int) -> list[Request]:
    """A suspected loop or a breakpoint after a step waits for its answer: a resume without
    one asks again and runs nothing."""
    return [
        Request.from_row(row)
        for row in rows
        if row.kind in (RequestKind.LOOP, RequestKind.AFTER)
        and (
            row.status is RequestStatus.OPEN
            or (row.status is RequestStatus.USED and row.step == step and aborted(row))
        )
    ]


def _meter_restored(
    app: Plan[Any],
    execution: Execution,
    tasks: list[Any],
    done: Mapping[str, Any],
    entries: list[LedgerEntry],
) -> None:
    """Count the calls of tasks restored from pending writes: they do not run again, so
    their recorded calls are not replayed (an agent's tool calls are: the act phase runs
    again on them)."""
    if not done:
        return
    nodes = {task.label: task.node for task in tasks}
    for entry in entries:
        node = nodes.get(entry.task)
        if (
            node is None
            or entry.task not in done
            or entry.status is not LedgerStatus.DONE
            or not entry.result
        ):
            continue
        data = json.loads(entry.result)
        if entry.kind is LedgerKind.MODEL:
            usage = data.get("usage") or {}
            tokens_in, tokens_out = (
                int(usage.get("input_tokens", 0)),
                int(usage.get("output_tokens", 0)),
            )
            price = price_of(entry.name)
            cost = price.cost(tokens_in, tokens_out) if price else 0.0
            execution.meter.model(node, tokens_in, tokens_out, cost)
        elif app.nodes[node].kind is not NodeKind.AGENT and data.get("status") not in NOT_RUN:
            execution.meter.tool(node)
