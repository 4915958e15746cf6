"""Operations on stored runs that need more than one store call: resume and fork."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    compact_json,
    load_joins,
    load_memory,
    load_result,
    load_state,
    load_tasks,
    replay_json,
    replay_memory,
)
from .errors import (
    AnswerError,
    GraphChangedError,
    OrchestraError,
    RunStatusError,
    StoreError,
)
from .events import RequestAnswered
from .gateway import NOT_RUN
from .outcome import RunStatus
from .safeguards.budgets import loaded_budget, price_of, stored_budget
from .safeguards.interrupts import Abort, Continue, Done, Request, Retry
from .store.base import (
    CheckpointRow,
    EventRow,
    LedgerEntry,
    RequestRow,
    RunRecord,
    Store,
    new_owner_id,
)

if TYPE_CHECKING:
    from .compile import CompiledGraph
    from .executor import Execution

__all__ = ("fork_run", "prepare_resume")


async def prepare_resume(
    app: CompiledGraph[Any],
    run_id: str,
    *,
    allow_graph_change: bool,
    answers: Mapping[str, Any] | None = None,
) -> Execution:
    """Check, take the lease of, and load a run; return the Execution that continues it.

    ``answers`` (request id -> answer) are all checked before anything changes; a refused
    one raises :class:`AnswerError` and the run stays as it was.
    """
    from .executor import Execution
    from .recorder import Recorder

    store = app._require_store()
    record = await store.get_run(run_id)
    if record.status == "completed":
        raise RunStatusError(run_id, record.status, "resume it")
    if record.structure_hash != app.structure_hash and not allow_graph_change:
        raise GraphChangedError(run_id, record.structure_hash, app.structure_hash)
    checked = await check_answers(app, store, run_id, answers or {})
    if record.budget is not None and record.status != "running":
        # the limits this resume runs under become the run's own (so `orchestra budget +N`
        # adds to what the run really has), recorded as a budget_raised event
        budget, agent_budgets = loaded_budget(record.budget, app.budget, app.agent_budgets)
        effective = stored_budget(budget, agent_budgets)
        if effective != record.budget:
            record = await store.set_budget(
                run_id, effective, reason="raised to the limits of the app resuming it"
            )
    owner = new_owner_id()
    # as close to taking the lease as possible: what a refused answer gives back
    previous = await store.get_run(run_id) if checked else record
    record = await store.acquire(run_id, owner)
    try:
        stop = await apply_answers(store, run_id, record.epoch, checked)
    except AnswerError:
        # another resume used an answer first: nothing was used; give the run back as it was
        await store.finish_run(
            run_id,
            record.epoch,
            status=previous.status,
            reason=previous.reason,
            error=previous.error,
            usage=record.usage,
            events=[],
        )
        raise
    except Exception as exc:
        await store.finish_run(
            run_id,
            record.epoch,
            status="failed",
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
    except Exception as exc:
        message = f"could not load the run to resume it: {type(exc).__name__}: {exc}"
        await store.finish_run(
            run_id,
            record.epoch,
            status="failed",
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
        done=done,
        usage=usage,
        memory=memory,
        joins=joins,
        budget=budget,
        agent_budgets=agent_budgets,
        events=False,
    )
    execution.ledger.preload(entries)
    _meter_restored(app, execution, tasks, done, entries)
    # a suspected loop waits for its answer: a resume without one asks again, runs nothing
    answered = {item.row.request_id for item in checked}
    waiting = [
        Request.from_row(row)
        for row in await store.requests(run_id)
        if row.kind == "loop" and row.request_id not in answered
    ]
    if waiting and stop is None:
        execution.status, execution.pending = RunStatus.INTERRUPTED, waiting
        execution.reason = (
            f"a suspected loop waits for an answer (Continue() or Abort()): {waiting[0].id}"
        )
    now = time.time()
    execution._carried.extend(
        RequestAnswered(
            run_id=run_id,
            at=now,
            step=item.row.step,
            node=item.row.task,
            request_id=item.row.request_id,
            request_kind=item.row.kind,
            answer=item.text,
        )
        for item in checked
    )
    if stop is not None:
        execution.status, execution.reason = RunStatus.ABORTED, stop
    return execution


def _meter_restored(
    app: CompiledGraph[Any],
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
        if node is None or entry.task not in done or entry.status != "done" or not entry.result:
            continue
        data = json.loads(entry.result)
        if entry.kind == "model":
            usage = data.get("usage") or {}
            tokens_in, tokens_out = (
                int(usage.get("input_tokens", 0)),
                int(usage.get("output_tokens", 0)),
            )
            price = price_of(entry.name)
            cost = price.cost(tokens_in, tokens_out) if price else 0.0
            execution.meter.model(node, tokens_in, tokens_out, cost)
        elif app.nodes[node].kind != "agent" and data.get("status") not in NOT_RUN:
            execution.meter.tool(node)


@dataclass(frozen=True, slots=True)
class _Checked:
    row: RequestRow
    answer: Any
    text: str
    result: Any = None


async def check_answers(
    app: CompiledGraph[Any], store: Store, run_id: str, answers: Mapping[str, Any]
) -> list[_Checked]:
    """Check every answer against the run's open requests; change nothing."""
    if not answers:
        return []
    if not isinstance(answers, Mapping):
        raise TypeError(f"answers must map request ids to answers, got {type(answers).__name__}")
    rows = {row.request_id: row for row in await store.requests(run_id, statuses=())}
    now = time.time()
    checked = []
    for request_id, answer in answers.items():
        row = rows.get(request_id)
        if row is None:
            open_ids = ", ".join(r for r, v in rows.items() if v.status == "open") or "none"
            raise AnswerError(run_id, request_id, f"no such request (open: {open_ids})")
        if row.status != "open":
            raise AnswerError(run_id, request_id, f"already {row.status}; an answer is used once")
        if row.expires_at is not None and row.expires_at < now:
            raise AnswerError(run_id, request_id, "expired; it can no longer be answered")
        checked.append(_check_one(app, run_id, row, answer))
    return checked


def _check_one(app: CompiledGraph[Any], run_id: str, row: RequestRow, answer: Any) -> _Checked:
    from pydantic import ValidationError

    from .tools import describe_validation_error

    if row.kind == "loop":
        if not isinstance(answer, Continue | Abort):
            raise AnswerError(
                run_id,
                row.request_id,
                f"a suspected loop is answered with Continue() or Abort(), got {answer!r:.80}",
            )
        text = compact_json({"answer": type(answer).__name__.lower(), **_fields(answer)})
        return _Checked(row, answer, text)
    if row.kind != "in_doubt":
        raise AnswerError(run_id, row.request_id, f"requests of kind {row.kind!r} are unknown")
    if not isinstance(answer, Done | Retry | Abort):
        raise AnswerError(
            run_id,
            row.request_id,
            f"an in-doubt call is resolved with Done(result=...), Retry() or Abort(), "
            f"got {answer!r:.80}",
        )
    if not isinstance(answer, Done):
        text = compact_json({"answer": type(answer).__name__.lower(), **_fields(answer)})
        return _Checked(row, answer, text)
    payload = json.loads(row.payload)
    tool = app.tools.get(payload["tool"])
    if tool is None:
        raise AnswerError(
            run_id, row.request_id, f"this graph has no tool {payload['tool']!r} any more"
        )
    try:
        result = tool.dump_result(answer.result)
    except ValidationError as exc:
        raise AnswerError(
            run_id,
            row.request_id,
            f"the result does not fit tool {tool.name!r}: "
            f"{describe_validation_error(exc, 'result')}",
        ) from exc
    except (TypeError, ValueError) as exc:
        raise AnswerError(run_id, row.request_id, f"the result is not JSON data: {exc}") from exc
    return _Checked(row, answer, compact_json({"answer": "done", "result": result}), result)


def _fields(answer: Any) -> dict[str, Any]:
    return {"reason": answer.reason} if isinstance(answer, Abort) else {}


async def apply_answers(
    store: Store, run_id: str, epoch: int, checked: list[_Checked]
) -> str | None:
    """Record checked answers under the lease; return the reason if one aborts the run.

    All or none: under the lease (no other resume can use an answer meanwhile), every
    request is checked to be still open (another resume may have used one before this one
    got the lease: :class:`AnswerError`, nothing used); then each answer is marked used and
    applied to the ledger. A crash in between leaves the call in doubt, and asking again
    opens the request again.
    """
    if not checked:
        return None
    still_open = {row.request_id for row in await store.requests(run_id)}
    for item in checked:
        if item.row.request_id not in still_open:
            raise AnswerError(run_id, item.row.request_id, "answered meanwhile by another resume")
    stop = None
    for item in checked:
        row, answer = item.row, item.answer
        payload = json.loads(row.payload)
        try:
            await store.answer_request(run_id, epoch, row.request_id, item.text)
        except StoreError as exc:  # (a fenced write raises LeaseLostError, not this)
            raise AnswerError(
                run_id, row.request_id, "answered meanwhile by another resume"
            ) from exc
        if isinstance(answer, Done | Retry):
            entries = await store.ledger(run_id, row.step)
            entry = next(
                (e for e in entries if e.task == row.task and e.seq == payload["seq"]), None
            )
            if entry is not None and isinstance(answer, Done):
                outcome = compact_json({"status": "ok", "result": item.result})
                done = replace(entry, status="done", result=outcome, finished_at=time.time())
                await store.put_ledger(run_id, epoch, done)
            elif entry is not None:
                await store.delete_ledger(run_id, epoch, row.step, row.task, payload["seq"])
        elif isinstance(answer, Abort):
            stop = answer.reason
    return stop


async def fork_run(store: Store, run_id: str, step: int, new_run_id: str) -> RunRecord:
    """Start a new run (status ``pending``) from the checkpoint of ``run_id`` at ``step``.

    Works from the stored JSON alone, so an operator can fork without importing the app;
    ``orchestra resume NEW`` then runs it.
    """
    source = await store.get_run(run_id)
    chain = await store.checkpoint_chain(run_id, step)
    now = time.time()
    snapshot = json.dumps(replay_json(chain), separators=(",", ":"))
    record = replace(
        source,
        run_id=new_run_id,
        status="pending",
        step=step,
        owner=None,
        epoch=0,
        lease_expires_at=None,
        created_at=now,
        updated_at=now,
        usage={"steps": step},
        reason=f"forked from {run_id} at step {step}",
        error=None,
        abort_requested=None,
        parent_run_id=run_id,
        parent_step=step,
    )
    conversations = replay_memory(chain)
    joins = load_joins(chain)
    memory: dict[str, Any] = {"all": conversations} if conversations else {}
    if joins:
        memory["joins"] = {str(k): sorted(v) for k, v in joins.items()}
    checkpoint = CheckpointRow(
        step=step,
        snapshot=snapshot,
        delta=None,
        tasks=chain[-1].tasks,
        created_at=now,
        memory=compact_json(memory) if memory else None,
    )
    event = EventRow(
        step=step,
        kind="run_forked",
        at=now,
        data=json.dumps({"from_run": run_id, "from_step": step}),
    )
    await store.fork(record, checkpoint, [event])
    return record
