"""Operations on stored runs that need more than one store call: resume and fork."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

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
from .safeguards.interrupts import (
    Abort,
    Approve,
    Choose,
    Continue,
    Done,
    Edit,
    Reject,
    Request,
    Retry,
    aborted,
)
from .state import describe_validation_error
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
    from .tools import Tool

__all__ = ("answer_requests", "fork_run", "prepare_resume")


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
    checked = _new(await check_answers(app, store, run_id, answers or {}, same_again=True))
    if checked:  # all or none, before the lease: a refused answer changes nothing
        await record_answers(store, run_id, checked)
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
    record = await store.acquire(run_id, owner)
    try:
        stop = await apply_answers(store, run_id, record.epoch)
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
        rows = await store.requests(run_id, statuses=())
        # the requests of the step to run (approvals, questions, conflicts, a breakpoint)
        requests = {row.request_id: row for row in rows if row.step == step + 1}
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
        if row.kind in ("loop", "after")
        and (row.status == "open" or (row.status == "used" and row.step == step and aborted(row)))
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
    recorded: bool = False  # the same answer is recorded already


async def check_answers(
    app: CompiledGraph[Any] | None,
    store: Store,
    run_id: str,
    answers: Mapping[str, Any],
    *,
    same_again: bool = False,
) -> list[_Checked]:
    """Check every answer against the run's open requests; change nothing.

    ``same_again``: an answer identical to the one already recorded for a request not used
    yet is let through (marked ``recorded``): a resume retried after its first try was
    refused once the answers were recorded. Otherwise an answered request refuses any
    answer.

    Without ``app`` (an operator's CLI that could not load it) only answers that need no
    schema can be checked: approve, reject, continue, abort, retry.
    """
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
        if row.status == "expired":
            raise AnswerError(run_id, request_id, "expired; it can no longer be answered")
        if row.status not in ("open", "answered") or (row.status == "answered" and not same_again):
            raise AnswerError(run_id, request_id, "already answered; an answer is used once")
        if row.status == "open" and row.expires_at is not None and row.expires_at <= now:
            raise AnswerError(run_id, request_id, "expired; it can no longer be answered")
        item = _check_one(app, run_id, row, answer)
        if row.status == "answered":
            # the same answer again (a retried resume whose first try was refused after
            # recording it) is already there; another one is refused
            if row.answer != item.text:
                raise AnswerError(run_id, request_id, "already answered; an answer is used once")
            item = replace(item, recorded=True)
        checked.append(item)
    return checked


_GO_ON = (Continue, Approve)
_STOP = (Abort, Reject)


def _check_one(
    app: CompiledGraph[Any] | None, run_id: str, row: RequestRow, answer: Any
) -> _Checked:
    kind = row.kind
    payload = _payload(row)

    def refuse(detail: str) -> AnswerError:
        return AnswerError(run_id, row.request_id, detail)

    if kind in ("loop", "before", "after"):
        if isinstance(answer, _GO_ON):
            return _Checked(row, answer, compact_json({"answer": "continue"}))
        if isinstance(answer, _STOP):
            return _Checked(row, answer, compact_json({"answer": "abort", "reason": answer.reason}))
        what = "a suspected loop" if kind == "loop" else f"a breakpoint ({kind})"
        raise refuse(
            f"{what} is answered with Continue() (or Approve()) to go on, or Abort(reason) "
            f"(or Reject(reason)) to stop the run, got {answer!r:.80}"
        )
    if kind == "approval":
        return _check_approval(app, row, payload, answer, refuse)
    if kind == "question":
        return _check_question(row, payload, answer, refuse)
    if kind == "conflict":
        return _check_choice(row, payload, answer, refuse)
    if kind != "in_doubt":
        raise refuse(f"requests of kind {kind!r} are unknown")
    if not isinstance(answer, Done | Retry | Abort):
        raise refuse(
            f"an in-doubt call is resolved with Done(result=...), Retry() or Abort(), "
            f"got {answer!r:.80}"
        )
    if not isinstance(answer, Done):
        text = compact_json({"answer": type(answer).__name__.lower(), **_fields(answer)})
        return _Checked(row, answer, text)
    tool = _tool(app, payload, refuse)
    try:
        result = tool.dump_result(answer.result)
    except ValidationError as exc:
        raise refuse(
            f"the result does not fit tool {tool.name!r}: "
            f"{describe_validation_error(exc, 'result')}"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise refuse(f"the result is not JSON data: {exc}") from exc
    return _Checked(row, answer, compact_json({"answer": "done", "result": result}), result)


def _payload(row: RequestRow) -> dict[str, Any]:
    try:
        payload = json.loads(row.payload)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _tool(app: CompiledGraph[Any] | None, payload: dict[str, Any], refuse: Any) -> Tool:
    name = payload.get("tool")
    if app is None:
        raise refuse(f"checking this answer needs the run's app (tool {name!r}); load it")
    tool = app.tools.get(str(name))
    if tool is None:
        raise refuse(f"this graph has no tool {name!r} any more")
    return tool


def _check_approval(
    app: CompiledGraph[Any] | None,
    row: RequestRow,
    payload: dict[str, Any],
    answer: Any,
    refuse: Any,
) -> _Checked:
    if isinstance(answer, Approve):
        return _Checked(row, answer, compact_json({"answer": "approve"}))
    if isinstance(answer, Reject):
        return _Checked(row, answer, compact_json({"answer": "reject", "reason": answer.reason}))
    if not isinstance(answer, Edit):
        raise refuse(
            f"an approval is answered with Approve(), Reject(reason=...) or "
            f"Edit(arguments={{...}}), got {answer!r:.80}"
        )
    if not isinstance(answer.arguments, Mapping):
        raise refuse(
            f"Edit(arguments=...) takes the whole set of arguments as a dict, got "
            f"{type(answer.arguments).__name__}"
        )
    tool = _tool(app, payload, refuse)
    try:
        arguments = tool.validate(answer.arguments)
        json_arguments = tool.arguments.model_validate(arguments).model_dump(mode="json")
    except ValidationError as exc:
        raise refuse(
            f"the edited arguments do not fit tool {tool.name!r}: "
            f"{describe_validation_error(exc, 'arguments')}"
        ) from exc
    try:
        tool.resource_keys(json_arguments)
    except Exception as exc:  # the user's resources function refuses them
        raise refuse(
            f"the tool's resources function fails on the edited arguments: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return _Checked(row, answer, compact_json({"answer": "edit", "arguments": json_arguments}))


def _check_question(row: RequestRow, payload: dict[str, Any], answer: Any, refuse: Any) -> _Checked:
    from .safeguards.questions import check_answer

    if isinstance(answer, Approve | Reject | Edit | Choose | Continue | Abort | Done | Retry):
        raise refuse(
            f"a question is answered with a value that fits its schema, not "
            f"{type(answer).__name__}()"
        )
    try:
        value = check_answer(payload.get("schema_ref"), answer)
    except LookupError as exc:
        raise refuse(f"cannot check the answer: its schema is not available here ({exc})") from exc
    except ValueError as exc:
        raise refuse(str(exc)) from exc
    try:
        text = json.dumps({"answer": "value", "value": value}, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise refuse(f"the answer is not JSON data: {exc}") from exc
    return _Checked(row, answer, text)


def _check_choice(row: RequestRow, payload: dict[str, Any], answer: Any, refuse: Any) -> _Checked:
    if isinstance(answer, Choose):
        keys = list(answer.keys)
    elif isinstance(answer, Mapping) and isinstance(answer.get("run"), list):
        keys = list(answer["run"])
    else:
        raise refuse(
            f"a conflict is answered with Choose(key, ...) (or {{'run': [key, ...]}}), "
            f"got {answer!r:.80}"
        )
    known = [str(call.get("key")) for call in payload.get("calls") or []]
    unknown = [k for k in keys if k not in known]
    if unknown or len(set(keys)) != len(keys):
        raise refuse(
            f"choose calls of the conflict, each once: got {keys}; its calls are {', '.join(known)}"
        )
    return _Checked(row, answer, compact_json({"answer": "choose", "run": keys}))


def _fields(answer: Any) -> dict[str, Any]:
    return {"reason": answer.reason} if isinstance(answer, Abort) else {}


async def record_answers(store: Store, run_id: str, checked: Sequence[_Checked]) -> None:
    """Record checked answers, all or none, with a ``request_answered`` event each."""
    from .recorder import event_row

    now = time.time()
    events = [
        event_row(
            RequestAnswered(
                run_id=run_id,
                at=now,
                step=item.row.step,
                node=item.row.task,
                request_id=item.row.request_id,
                request_kind=item.row.kind,
                answer=item.text,
            ),
            item.row.step,
        )
        for item in checked
    ]
    await store.record_answers(run_id, [(c.row.request_id, c.text) for c in checked], events)


def _new(checked: Sequence[_Checked]) -> list[_Checked]:
    return [item for item in checked if not item.recorded]


async def answer_requests(
    app: CompiledGraph[Any] | None, store: Store, run_id: str, answers: Mapping[str, Any]
) -> list[RequestRow]:
    """Check and record answers without resuming the run (the CLI's answer verbs, and
    ``app.answer``); return the requests of the run still open."""
    await store.get_run(run_id)  # an unknown run is said so (RunNotFoundError)
    checked = _new(await check_answers(app, store, run_id, answers))
    if checked:
        await record_answers(store, run_id, checked)
    return await store.requests(run_id)


async def apply_answers(store: Store, run_id: str, epoch: int) -> str | None:
    """Apply, under the lease, the recorded answers a resume acts on before it runs:
    in-doubt calls (to the ledger), breakpoints and suspected loops; mark them used (a
    breakpoint or loop answered with an abort is asked again by the next resume) and
    return the reason if one stops the run. (Approvals, questions and conflicts are used
    by the step itself when it gets to them.) Applying twice, after a crash in between,
    changes nothing more."""
    stop = None
    for row in await store.requests(run_id, statuses=("answered",)):
        if row.kind not in ("in_doubt", "loop", "before", "after"):
            continue
        answer = json.loads(row.answer or "{}")
        said = answer.get("answer")
        if row.kind == "in_doubt" and said in ("done", "retry"):
            payload = _payload(row)
            entries = await store.ledger(run_id, row.step)
            entry = next(
                (e for e in entries if e.task == row.task and e.seq == payload.get("seq")), None
            )
            if entry is not None and said == "done":
                done_outcome: dict[str, Any] = {"status": "ok", "result": answer.get("result")}
                if payload.get("edited"):  # its caller is told the arguments were changed
                    done_outcome["edited_arguments"] = payload.get("arguments")
                outcome = compact_json(done_outcome)
                done = replace(entry, status="done", result=outcome, finished_at=time.time())
                await store.put_ledger(run_id, epoch, done)
            elif entry is not None and entry.status == "started":
                await store.delete_ledger(run_id, epoch, row.step, row.task, entry.seq)
        elif said == "abort":
            # the run stops here; what it stopped at is asked again by the next resume
            # (a used abort is asked again: a crash before the abort is recorded loses
            # nothing)
            stop = str(answer.get("reason") or "aborted by an operator's answer")
        await store.answer_request(
            run_id, epoch, row.request_id, row.answer or "{}", status="used", expected="answered"
        )
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
