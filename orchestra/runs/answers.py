"""Answers to a stopped run's requests: checked (every one before anything changes),
recorded all or none, and applied when the run resumes."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .._json import compact_json, loads_object
from ..errors import AnswerError, ToolArgumentsError
from ..events import RequestAnswered
from ..safeguards.interrupts import (
    Abort,
    AnswerKind,
    Approve,
    Choose,
    Continue,
    Done,
    Edit,
    Reject,
    Retry,
)
from ..state import describe_validation_error
from ..store.base import (
    LedgerStatus,
    OperatorStore,
    RequestKind,
    RequestRow,
    RequestStatus,
    Store,
    expired,
)
from ..tools import CallStatus

if TYPE_CHECKING:
    from ..compile import Plan
    from ..tools import Tool

__all__ = (
    "CheckedAnswer",
    "answer_requests",
    "apply_answers",
    "check_answers",
    "new_answers",
    "record_answers",
)


@dataclass(frozen=True, slots=True)
class CheckedAnswer:
    """An answer found valid for its request: ``text`` is what is recorded (JSON)."""

    row: RequestRow
    answer: Any
    text: str
    result: Any = None
    recorded: bool = False  # the same answer is recorded already


async def check_answers(
    app: Plan[Any] | None,
    store: OperatorStore,
    run_id: str,
    answers: Mapping[str, Any],
    *,
    same_again: bool = False,
) -> list[CheckedAnswer]:
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
            open_ids = (
                ", ".join(r for r, v in rows.items() if v.status is RequestStatus.OPEN) or "none"
            )
            raise AnswerError(run_id, request_id, f"no such request (open: {open_ids})")
        if row.status is RequestStatus.EXPIRED:
            raise AnswerError(run_id, request_id, "expired; it can no longer be answered")
        if row.status not in (RequestStatus.OPEN, RequestStatus.ANSWERED) or (
            row.status is RequestStatus.ANSWERED and not same_again
        ):
            raise AnswerError(run_id, request_id, "already answered; an answer is used once")
        if row.status is RequestStatus.OPEN and expired(row.expires_at, now):
            raise AnswerError(run_id, request_id, "expired; it can no longer be answered")
        item = _check_one(app, run_id, row, answer)
        if row.status is RequestStatus.ANSWERED:
            # the same answer again (a retried resume whose first try was refused after
            # recording it) is already there; another one is refused
            if row.answer != item.text:
                raise AnswerError(run_id, request_id, "already answered; an answer is used once")
            item = replace(item, recorded=True)
        checked.append(item)
    return checked


_GO_ON = (Continue, Approve)
_STOP = (Abort, Reject)


_BREAKS = (RequestKind.LOOP, RequestKind.BEFORE, RequestKind.AFTER)
"""Requests that stop the run between steps (answered with go on or stop)."""


def _check_one(app: Plan[Any] | None, run_id: str, row: RequestRow, answer: Any) -> CheckedAnswer:
    kind = row.kind
    payload = loads_object(row.payload)

    def refuse(detail: str) -> AnswerError:
        return AnswerError(run_id, row.request_id, detail)

    if kind in _BREAKS:
        if isinstance(answer, _GO_ON):
            return CheckedAnswer(row, answer, compact_json({"answer": AnswerKind.CONTINUE}))
        if isinstance(answer, _STOP):
            text = compact_json({"answer": AnswerKind.ABORT, "reason": answer.reason})
            return CheckedAnswer(row, answer, text)
        what = "a suspected loop" if kind is RequestKind.LOOP else f"a breakpoint ({kind})"
        raise refuse(
            f"{what} is answered with Continue() (or Approve()) to go on, or Abort(reason) "
            f"(or Reject(reason)) to stop the run, got {answer!r:.80}"
        )
    if kind is RequestKind.APPROVAL:
        return _check_approval(app, row, payload, answer, refuse)
    if kind is RequestKind.QUESTION:
        return _check_question(row, payload, answer, refuse)
    if kind is RequestKind.CONFLICT:
        return _check_choice(row, payload, answer, refuse)
    if kind is not RequestKind.IN_DOUBT:
        raise refuse(f"requests of kind {kind!r} are unknown")
    if not isinstance(answer, Done | Retry | Abort):
        raise refuse(
            f"an in-doubt call is resolved with Done(result=...), Retry() or Abort(), "
            f"got {answer!r:.80}"
        )
    if not isinstance(answer, Done):
        said = AnswerKind.RETRY if isinstance(answer, Retry) else AnswerKind.ABORT
        text = compact_json({"answer": said, **_fields(answer)})
        return CheckedAnswer(row, answer, text)
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
    text = compact_json({"answer": AnswerKind.DONE, "result": result})
    return CheckedAnswer(row, answer, text, result)


def _tool(app: Plan[Any] | None, payload: dict[str, Any], refuse: Any) -> Tool:
    name = payload.get("tool")
    if app is None:
        raise refuse(f"checking this answer needs the run's app (tool {name!r}); load it")
    tool = app.tools.get(str(name))
    if tool is None:
        raise refuse(f"this graph has no tool {name!r} any more")
    return tool


def _check_approval(
    app: Plan[Any] | None,
    row: RequestRow,
    payload: dict[str, Any],
    answer: Any,
    refuse: Any,
) -> CheckedAnswer:
    if isinstance(answer, Approve):
        return CheckedAnswer(row, answer, compact_json({"answer": AnswerKind.APPROVE}))
    if isinstance(answer, Reject):
        return CheckedAnswer(
            row, answer, compact_json({"answer": AnswerKind.REJECT, "reason": answer.reason})
        )
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
        checked = tool.check_arguments(answer.arguments)
    except ToolArgumentsError as exc:
        raise refuse(f"the edited arguments do not fit tool {tool.name!r}: {exc.detail}") from exc
    return CheckedAnswer(
        row, answer, compact_json({"answer": AnswerKind.EDIT, "arguments": checked.json})
    )


def _check_question(
    row: RequestRow, payload: dict[str, Any], answer: Any, refuse: Any
) -> CheckedAnswer:
    from ..safeguards.questions import check_answer

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
        text = json.dumps({"answer": AnswerKind.VALUE, "value": value}, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise refuse(f"the answer is not JSON data: {exc}") from exc
    return CheckedAnswer(row, answer, text)


def _check_choice(
    row: RequestRow, payload: dict[str, Any], answer: Any, refuse: Any
) -> CheckedAnswer:
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
    return CheckedAnswer(row, answer, compact_json({"answer": AnswerKind.CHOOSE, "run": keys}))


def _fields(answer: Any) -> dict[str, Any]:
    return {"reason": answer.reason} if isinstance(answer, Abort) else {}


async def record_answers(
    store: OperatorStore, run_id: str, checked: Sequence[CheckedAnswer]
) -> None:
    """Record checked answers, all or none, with a ``request_answered`` event each."""
    from ..runtime.recorder import event_row

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


def new_answers(checked: Sequence[CheckedAnswer]) -> list[CheckedAnswer]:
    """Leave out the answers that are recorded already."""
    return [item for item in checked if not item.recorded]


async def answer_requests(
    app: Plan[Any] | None, store: OperatorStore, run_id: str, answers: Mapping[str, Any]
) -> list[RequestRow]:
    """Check and record answers without resuming the run (the CLI's answer verbs, and
    ``app.answer``); return the requests of the run still open."""
    await store.get_run(run_id)  # an unknown run is said so (RunNotFoundError)
    checked = new_answers(await check_answers(app, store, run_id, answers))
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
    for row in await store.requests(run_id, statuses=(RequestStatus.ANSWERED,)):
        if row.kind is not RequestKind.IN_DOUBT and row.kind not in _BREAKS:
            continue
        answer = loads_object(row.answer)
        said = answer.get("answer")
        if row.kind is RequestKind.IN_DOUBT and said in (AnswerKind.DONE, AnswerKind.RETRY):
            payload = loads_object(row.payload)
            entries = await store.ledger(run_id, row.step)
            entry = next(
                (e for e in entries if e.task == row.task and e.seq == payload.get("seq")), None
            )
            if entry is not None and said == AnswerKind.DONE:
                done_outcome: dict[str, Any] = {
                    "status": CallStatus.OK,
                    "result": answer.get("result"),
                }
                if payload.get("edited"):  # its caller is told the arguments were changed
                    done_outcome["edited_arguments"] = payload.get("arguments")
                outcome = compact_json(done_outcome)
                done = replace(
                    entry, status=LedgerStatus.DONE, result=outcome, finished_at=time.time()
                )
                await store.put_ledger(run_id, epoch, done)
            elif entry is not None and entry.status is LedgerStatus.STARTED:
                await store.delete_ledger(run_id, epoch, row.step, row.task, entry.seq)
        elif said == AnswerKind.ABORT:
            # the run stops here; what it stopped at is asked again by the next resume
            # (a used abort is asked again: a crash before the abort is recorded loses
            # nothing)
            stop = str(answer.get("reason") or "aborted by an operator's answer")
        await store.answer_request(
            run_id,
            epoch,
            row.request_id,
            row.answer or "{}",
            status=RequestStatus.USED,
            expected=RequestStatus.ANSWERED,
        )
    return stop
