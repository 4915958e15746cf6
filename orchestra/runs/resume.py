"""Resume a stored run: check it may go on, load its last checkpoint, and rebuild the
execution that continues it."""

from __future__ import annotations

import json
from collections.abc import Mapping
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
    LedgerEntry,
    LedgerKind,
    LedgerStatus,
    RequestKind,
    RequestStatus,
    new_owner_id,
)
from ..tools import NOT_RUN

if TYPE_CHECKING:
    from ..compile import Plan
    from ..runtime.executor import Execution

from .answers import apply_answers, check_answers, new_answers, record_answers

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
    record = await store.get_run(run_id)
    if record.status is RunStatus.COMPLETED:
        raise RunStatusError(run_id, record.status, "resume it")
    if record.structure_hash != app.structure_hash and not allow_graph_change:
        raise GraphChangedError(run_id, record.structure_hash, app.structure_hash)
    checked = new_answers(await check_answers(app, store, run_id, answers or {}, same_again=True))
    if checked:  # all or none, before the lease: a refused answer changes nothing
        await record_answers(store, run_id, checked)
    if record.budget is not None and record.status is not RunStatus.RUNNING:
        # the limits this resume runs under become the run's own (so `orchestra budget +N`
        # adds to what the run really has), recorded as a budget_raised event
        budget, agent_budgets = loaded_budget(record.budget, app.budget, app.agent_budgets)
        effective = stored_budget(budget, agent_budgets)
        if effective != record.budget:
            record = await store.set_budget(
                run_id, effective, reason="raised to the limits of the app resuming it"
            )
    owner = new_owner_id()
    record = await store.acquire(run_id, owner)
    try:
        stop = await apply_answers(store, run_id, record.epoch)
    except Exception as exc:
        await store.finish_run(
            run_id,
            record.epoch,
            status=RunStatus.FAILED,
            reason=None,
            error=f"could not apply the answers: {type(exc).__name__}: {exc}",
            usage=record.usage,
            events=[],
        )
        raise
    try:
        chain = await store.checkpoint_chain(run_id)
        state = load_state(app.schema, chain)
        memory = load_memory(chain)
        joins = load_joins(chain)
        tasks = load_tasks(chain[-1].tasks)
        missing = sorted({t.node for t in tasks} - set(app.nodes))
        if missing:
            raise StoreError(
                f"run {run_id} is due to run {', '.join(map(repr, missing))} next, which this "
                f"graph does not have"
            )
        step = chain[-1].step
        pending = await store.pending_writes(run_id, step + 1)
        usage = json.loads(chain[-1].usage) if chain[-1].usage else {}
        # a step discarded by the deadline, or a crash, leaves the run row's totals higher
        for key in ("tasks", "wall_seconds"):
            usage[key] = max(usage.get(key, 0), record.usage.get(key, 0))
        done = {write.task: load_result(write.result) for write in pending}
        entries = await store.ledger(run_id, step + 1)
        rows = await store.requests(run_id, statuses=())
        # the requests of the step to run (approvals, questions, conflicts, a breakpoint)
        requests = {row.request_id: row for row in rows if row.step == step + 1}
    except Exception as exc:
        message = f"could not load the run to resume it: {type(exc).__name__}: {exc}"
        await store.finish_run(
            run_id,
            record.epoch,
            status=RunStatus.FAILED,
            reason=None,
            error=message,
            usage=record.usage,
            events=[],
        )
        if isinstance(exc, OrchestraError):
            raise
        raise StoreError(f"run {run_id}: {message}") from exc
    recorder = Recorder(store, app, run_id, owner).resumed(record, chain)
    budget, agent_budgets = app.budget, dict(app.agent_budgets)
    if record.budget is not None:  # the run's own limits, as `orchestra budget` left them
        budget, agent_budgets = loaded_budget(record.budget, app.budget, app.agent_budgets)
    execution = Execution(
        app,
        state,
        run_id=run_id,
        recorder=recorder,
        step=step,
        tasks=tasks,
        restored=done,
        usage=usage,
        memory=memory,
        joins=joins,
        budget=budget,
        agent_budgets=agent_budgets,
        events=False,
        requests=requests,
        loop_watch=record.usage.get("loop_watch"),
    )
    execution.ledger.preload(entries)
    _meter_restored(app, execution, tasks, done, entries)
    # a suspected loop or a breakpoint after a step waits for its answer: a resume
    # without one asks again and runs nothing
    waiting = [
        Request.from_row(row)
        for row in rows
        if row.kind in (RequestKind.LOOP, RequestKind.AFTER)
        and (
            row.status is RequestStatus.OPEN
            or (row.status is RequestStatus.USED and row.step == step and aborted(row))
        )
    ]
    if waiting and stop is None:
        execution.status, execution.pending = RunStatus.INTERRUPTED, waiting
        execution.reason = (
            f"{waiting[0].describe()}: waiting for an answer (Continue() or Abort()) to "
            f"request {waiting[0].id}"
        )
    if stop is not None:
        execution.status, execution.reason = RunStatus.ABORTED, stop
    return execution


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
