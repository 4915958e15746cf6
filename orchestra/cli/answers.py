"""The commands that answer a run's requests: pending, approve, reject, edit, answer, resolve.

Each answer verb checks its answer (against the request's schema, or the tool's) with the
run's app, records it (all or nothing: a refused answer changes nothing) and says what is
still open; ``--resume`` then resumes the run as ``orchestra resume`` does. What each verb
answers, built from its options, is :mod:`.verbs`.
"""

from __future__ import annotations

import time
from typing import Any

import click

from .._json import loads_object
from ..app import CompiledGraph
from ..errors import GraphChangedError
from ..outcome import RunOutcome
from ..runs.answers import answer_requests, check_answers
from ..safeguards.interrupts import Request
from ..store.base import RequestRow, RequestStatus, RunRecord
from .control import check_resumable, report_resumed, resume_loaded
from .database import Settings, db_path, find_run, json_option, open_store, run
from .loading import AppLoadError, app_reference, load_app
from .output import echo_json, print_renderables
from .requests import format_recorded, request_json, requests_table, stored_request, verbs_hint
from .verbs import (
    JSON,
    Verb,
    answer_for,
    answer_verb,
    approve_verb,
    edit_verb,
    reject_verb,
    resolve_verb,
)

__all__ = ("answer", "approve", "edit", "pending", "reject", "resolve")


@click.command()
@click.option("--run", "run_id", metavar="RUN", help="Only this run's requests.")
@json_option
@click.pass_obj
def pending(settings: Settings, run_id: str | None, as_json: bool) -> None:
    """List the open requests of every run (or one): what each asks and how old it is.

    An approval shows the exact call it holds, a question its prompt and the shape of its
    answer, a conflict the calls that compete. Answer them with `orchestra approve`,
    `reject`, `edit`, `answer` or `resolve`, then `orchestra resume RUN`.
    """

    async def work() -> tuple[RunRecord | None, list[RequestRow]]:
        async with open_store(settings) as store:
            record = None if run_id is None else await find_run(store, run_id)
            rows = await store.requests(None if record is None else record.run_id)
            return record, rows

    record, rows = run(work)
    now = time.time()
    requests = [stored_request(row) for row in rows]
    if as_json:
        echo_json([request_json(request, now) for request in requests])
        return
    where = f"run {record.run_id}" if record is not None else str(settings.db)
    if not requests:
        click.echo(f"no open requests in {where}")
        return
    count = len(requests)
    title = f"{count} open request{'' if count == 1 else 's'} in {where}"
    print_renderables(requests_table(requests, now, title=title, runs=record is None))
    live = [request for request in requests if not request.expired(now)]
    if len(live) < len(requests):
        click.echo(
            "expired requests can no longer be answered: `orchestra resume RUN` settles them "
            "(a held call is rejected; a question raises RequestExpiredError in its node)"
        )
    if live:
        click.echo("answer with:")
        for line in verbs_hint([request.kind for request in live]):
            click.echo(line)
        click.echo(
            "then `orchestra resume RUN` (or add --resume); `orchestra show RUN` spells out "
            "the answers of each request"
        )


# -- the answer verbs -------------------------------------------------------------------------


def _request_arguments(command: Any) -> Any:
    command = click.argument("request_id", metavar="REQ")(command)
    return click.argument("run_id", metavar="RUN")(command)


def _resume_options(command: Any) -> Any:
    """The options every answer verb shares: --app, --resume, --allow-graph-change."""
    command = click.option(
        "--allow-graph-change",
        is_flag=True,
        help="With --resume: resume even if the graph's structure changed since the run started.",
    )(command)
    command = click.option(
        "--resume", "resume", is_flag=True, help="Resume the run right after recording."
    )(command)
    return click.option(
        "--app",
        "app_ref",
        metavar="MODULE:ATTR",
        help="Load the graph (to check the answer) from here instead of the reference stored "
        "with the run.",
    )(command)


@click.command()
@_request_arguments
@_resume_options
@click.pass_obj
def approve(
    settings: Settings,
    run_id: str,
    request_id: str,
    app_ref: str | None,
    resume: bool,
    allow_graph_change: bool,
) -> None:
    """Approve a held tool call: it runs once, exactly as asked.

    Also lets a run stopped at a breakpoint or a suspected loop go on. The answer is
    recorded; `orchestra resume RUN` (or --resume) continues the run.
    """
    verb = approve_verb()
    _answer(settings, run_id, request_id, verb, app_ref, resume, allow_graph_change)


@click.command()
@_request_arguments
@click.option("--reason", required=True, help="Why: the agent (or node) that asked is told this.")
@_resume_options
@click.pass_obj
def reject(
    settings: Settings,
    run_id: str,
    request_id: str,
    reason: str,
    app_ref: str | None,
    resume: bool,
    allow_graph_change: bool,
) -> None:
    """Reject a held tool call: it never runs, and its caller gets the reason.

    For a breakpoint or a suspected loop: stop the run (status aborted).
    """
    verb = reject_verb(reason)
    _answer(settings, run_id, request_id, verb, app_ref, resume, allow_graph_change)


@click.command()
@_request_arguments
@click.option(
    "--args",
    "arguments",
    type=JSON,
    required=True,
    help="The call's arguments, the whole set, as a JSON object.",
)
@_resume_options
@click.pass_obj
def edit(
    settings: Settings,
    run_id: str,
    request_id: str,
    arguments: Any,
    app_ref: str | None,
    resume: bool,
    allow_graph_change: bool,
) -> None:
    """Approve a held tool call with changed arguments.

    --args is the whole set of arguments, checked against the tool's schema (the run's app
    is loaded for it); the agent is told its call was changed. E.g.
    `orchestra edit RUN REQ --args '{"order_id": "42", "amount": 20}'`.
    """
    verb = edit_verb(arguments)
    _answer(settings, run_id, request_id, verb, app_ref, resume, allow_graph_change)


@click.command()
@_request_arguments
@click.option(
    "--json",
    "value",
    type=JSON,
    required=True,
    help="The answer, as JSON: a value that fits the question's schema; for a conflict "
    '{"run": [KEY, ...]}.',
)
@_resume_options
@click.pass_obj
def answer(
    settings: Settings,
    run_id: str,
    request_id: str,
    value: Any,
    app_ref: str | None,
    resume: bool,
    allow_graph_change: bool,
) -> None:
    """Answer a question (a node's ctx.interrupt) or settle an escalated conflict.

    A question takes a value that fits its schema (checked with the run's app): e.g.
    `--json '{"carrier": "ups", "days": 2}'`, `--json '"yes"'`. A conflict takes the keys
    of the calls that run, in order: `--json '{"run": ["billing#1"]}'`; the others lose.
    """
    verb = answer_verb(value)
    _answer(settings, run_id, request_id, verb, app_ref, resume, allow_graph_change)


@click.command()
@_request_arguments
@click.option("--done", is_flag=True, help="The call took effect (pass its result with --result).")
@click.option(
    "--result",
    type=JSON,
    default=None,
    help="With --done: what the call returned, as JSON (checked against the tool).",
)
@click.option("--retry", is_flag=True, help="The call did not take effect: run it again.")
@click.option("--abort", is_flag=True, help="Stop the run.")
@click.option("--reason", help="With --abort: why (recorded).")
@_resume_options
@click.pass_obj
def resolve(
    settings: Settings,
    run_id: str,
    request_id: str,
    done: bool,
    result: Any,
    retry: bool,
    abort: bool,
    reason: str | None,
    app_ref: str | None,
    resume: bool,
    allow_graph_change: bool,
) -> None:
    """Resolve an in-doubt call: one that started and never reported (a crash, a timeout).

    Check the outside system for its idempotency key (`orchestra show RUN`), then: --done
    (it took effect; --result is what it returned), --retry (it did not: run it again) or
    --abort (stop the run; also stops a run at a breakpoint or a suspected loop).
    """
    verb = resolve_verb(done=done, result=result, retry=retry, abort=abort, reason=reason)
    _answer(settings, run_id, request_id, verb, app_ref, resume, allow_graph_change)


def _answer(
    settings: Settings,
    run_id: str,
    request_id: str,
    verb: Verb,
    app_ref: str | None,
    resume: bool,
    allow_graph_change: bool,
) -> None:
    """Check and record one answer; say what is still open; resume if asked to."""
    path = db_path(settings)

    async def work() -> tuple[str, list[Request], RunRecord, RunOutcome[Any] | None]:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            rows = await store.requests(record.run_id, statuses=())
            stopped = await store.stop_all_reason()
            row = _find_request(rows, request_id)
            if (
                row is None
                or row.status != RequestStatus.OPEN
                or stored_request(row).expired(time.time())
            ):
                # unknown, answered or expired: refused in the library's words
                known = request_id if row is None else row.request_id
                await check_answers(None, store, record.run_id, {known: verb.answer})
        assert row is not None
        request = stored_request(row)
        given = answer_for(verb, request)
        if resume:  # refused before anything is recorded
            check_resumable(record, stopped)
        need = "this answer is checked with" if verb.needs_app else "--resume needs"
        app, ref = _load(record, app_ref, need=need if verb.needs_app or resume else None)
        changed = app is not None and record.structure_hash != app.structure_hash
        if resume and changed and not allow_graph_change:
            assert app is not None
            raise GraphChangedError(record.run_id, record.structure_hash, app.structure_hash)
        async with open_store(settings) as store:
            still = await answer_requests(app, store, record.run_id, {request.id: given})
            rows = await store.requests(record.run_id, statuses=())
        said = next(loads_object(r.answer) for r in rows if r.request_id == request.id)
        recorded = f"run {record.run_id}, request {request.id}: {format_recorded(request, said)}"
        outcome = None
        if resume:
            assert app is not None
            assert ref is not None
            click.echo(recorded)
            outcome = await resume_loaded(
                app, ref, path, record, allow_graph_change=allow_graph_change
            )
        return recorded, [stored_request(r) for r in still], record, outcome

    recorded, still, record, outcome = run(work)
    if outcome is not None:
        report_resumed(settings, outcome, record.step)
        return
    click.echo(recorded)
    for line in _next_step(record.run_id, still):
        click.echo(line)


def _find_request(rows: list[RequestRow], request_id: str) -> RequestRow | None:
    """The request ``request_id``, or the one whose id starts with it (like run ids)."""
    exact = next((row for row in rows if row.request_id == request_id), None)
    if exact is not None or not request_id:
        return exact
    matches = [row for row in rows if row.request_id.startswith(request_id)]
    if len(matches) > 1:
        names = ", ".join(row.request_id for row in matches[:5])
        raise click.ClickException(
            f"request id {request_id!r} is ambiguous: {len(matches)} requests of the run "
            f"start with it ({names})"
        )
    return matches[0] if matches else None


def _load(
    record: RunRecord, app_ref: str | None, *, need: str | None
) -> tuple[CompiledGraph[Any] | None, str | None]:
    """Load the run's app (``--app``, or the reference stored with the run). When it cannot
    be loaded: an error saying what ``need``s it, or (``need`` None: the answer can be
    checked without it) a note on stderr."""
    try:
        ref = app_reference(record, app_ref)
    except AppLoadError as exc:
        problem = exc.message
    else:
        try:
            return load_app(ref, stored=app_ref is None), ref
        except AppLoadError as exc:
            if app_ref is not None:
                raise
            problem = exc.message
    if need is not None:
        raise click.ClickException(f"{need} the run's app: {problem}")
    click.echo(f"note: {problem}; this answer needs no app, so it is checked without it", err=True)
    return None, None


def _next_step(run_id: str, still: list[Request]) -> list[str]:
    """Say what the run waits for now: nothing (resume it), or the requests still open."""
    if not still:
        return [f"nothing else is open: continue the run with `orchestra resume {run_id}`"]
    count = len(still)
    listed = ", ".join(f"{r.id} ({r.kind})" for r in still)
    return [
        f"{count} request{'' if count == 1 else 's'} of run {run_id} still open: {listed}",
        f"answer {'it' if count == 1 else 'them'} (`orchestra show {run_id}` says how), then "
        f"`orchestra resume {run_id}`",
    ]
