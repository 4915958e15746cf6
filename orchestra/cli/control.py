"""The commands that steer runs: resume, abort, stop-all, budget."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import anyio
import click

from ..app import CompiledGraph
from ..errors import LeaseHeldError, RunStatusError, StopAllActiveError
from ..outcome import RunOutcome, RunStatus
from ..store.base import OperatorStore, RunRecord
from .budgets import (
    LIMITS,
    apply_changes,
    budget_changes,
    budget_used,
    format_change,
    parse_limit,
    scope_budget,
    stored_with,
)
from .database import (
    Settings,
    db_path,
    find_run,
    json_option,
    open_store,
    run,
    run_id_argument,
)
from .format import format_age, format_outcome_error, format_resumed, format_stopped
from .loading import app_reference, load_app, resume_store
from .output import echo_json
from .records import format_abort, owner_gone, run_status

__all__ = (
    "abort",
    "budget",
    "check_resumable",
    "report_resumed",
    "resume",
    "resume_loaded",
    "stop_all",
    "wait_until_stopped",
)


@click.command()
@run_id_argument
@click.option(
    "--app",
    "app_ref",
    metavar="MODULE:ATTR",
    help="Load the graph from here (module:attribute or path/to/file.py:attribute) instead "
    "of the reference stored with the run.",
)
@click.option(
    "--allow-graph-change",
    is_flag=True,
    help="Resume even if the graph's structure changed since the run started.",
)
@click.pass_obj
def resume(settings: Settings, run_id: str, app_ref: str | None, allow_graph_change: bool) -> None:
    """Continue a stopped or crashed run from its last checkpoint.

    The graph is imported from the module:attribute stored with the run (run from the
    directory the app ran in) or from --app, bound to --db, and resumed. A crashed run's
    lease must expire first. Exits 1 unless the run completes.
    """
    path = db_path(settings)

    async def work() -> tuple[RunOutcome[Any], int]:
        # the store refuses all of these too; checking first keeps the app unimported
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            stopped = await store.stop_all_reason()
        check_resumable(record, stopped)
        ref = app_reference(record, app_ref)
        app = load_app(ref, stored=app_ref is None)
        outcome = await resume_loaded(app, ref, path, record, allow_graph_change=allow_graph_change)
        return outcome, record.step

    outcome, from_step = run(work)
    report_resumed(settings, outcome, from_step)


def check_resumable(record: RunRecord, stopped: str | None) -> None:
    """Refuse to resume a completed run, any run while stop-all is in force (``stopped``:
    its reason), or a run whose owner holds its lease."""
    if record.status == RunStatus.COMPLETED:
        raise RunStatusError(record.run_id, record.status, "resume it")
    if stopped is not None:
        raise StopAllActiveError(stopped)
    _refuse_live_owner(record, time.time())


async def resume_loaded(
    app: CompiledGraph[Any],
    ref: str,
    path: Path,
    record: RunRecord,
    *,
    allow_graph_change: bool,
) -> RunOutcome[Any]:
    """Resume ``record``'s run with its loaded ``app`` bound to the database at ``path``."""
    click.echo(
        f"resuming run {record.run_id} (graph {record.graph}) at step {record.step} with {ref}"
    )
    store = resume_store(app, path)
    try:
        return await app.with_store(store).resume(
            record.run_id, allow_graph_change=allow_graph_change
        )
    finally:
        await store.aclose()


def report_resumed(settings: Settings, outcome: RunOutcome[Any], from_step: int) -> None:
    """Print how a resumed run stopped; exit 1 (one line) unless it completed."""
    for line in format_resumed(outcome, from_step):
        click.echo(line)
    problem = format_outcome_error(outcome)
    if problem is not None:
        if settings.verbose and outcome.error is not None:
            click.echo("".join(traceback.format_exception(outcome.error)), err=True, nl=False)
        raise click.ClickException(problem)


def _refuse_live_owner(record: RunRecord, now: float) -> None:
    """Refuse to resume a run whose owner holds its lease, before importing its app."""
    if not record.owned(now):
        return
    assert record.owner is not None
    assert record.lease_expires_at is not None
    left = record.lease_expires_at - now
    if owner_gone(record.owner):
        raise click.ClickException(
            f"run {record.run_id}: its owner {record.owner} has ended, but its lease holds "
            f"for {left:.1f}s more; resume it after that"
        )
    raise LeaseHeldError(record.run_id, record.owner, left)


@click.command()
@run_id_argument
@click.option("--reason", required=True, help="Why: recorded with the run and its events.")
@click.option("--wait", is_flag=True, help="Wait until the run has stopped; print its status.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="With --wait: give up after this many seconds (exit 1).",
)
@click.pass_obj
def abort(settings: Settings, run_id: str, reason: str, wait: bool, timeout: float) -> None:
    """Stop one run (the kill switch).

    A run with a live owner is asked to stop: its owner cancels the step in flight, keeps
    the last checkpoint and records "aborted". Any other run (crashed, interrupted, failed,
    forked) is marked aborted at once. Either way it can be resumed later.
    """

    async def work() -> None:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            if record.status == RunStatus.ABORTED:
                why = f": {record.reason}" if record.reason else ""
                click.echo(f"run {record.run_id} is already aborted{why}")
                return
            gone = owner_gone(record.owner)
            previous = run_status(record, time.time(), gone=gone)
            record = await store.request_abort(record.run_id, reason)
            click.echo(format_abort(record, previous, time.time(), gone=gone))
            if wait and record.status == RunStatus.RUNNING:
                with anyio.move_on_after(timeout):
                    record = await wait_until_stopped(store, record.run_id, reason)
                if record.status == RunStatus.RUNNING:
                    raise click.ClickException(
                        f"run {record.run_id} is still running after {timeout:g}s: its owner "
                        f"has not stopped it (`orchestra show {record.run_id}` tells more)"
                    )
                click.echo(format_stopped(record.run_id, record.step, record.status, record.reason))

    run(work)


async def wait_until_stopped(
    store: OperatorStore, run_id: str, reason: str, *, poll: float = 0.1
) -> RunRecord:
    """Poll until a run is no longer running (bound it with a cancel scope); if its owner
    dies before it notices the abort, mark the run aborted, since nobody else will."""
    while True:
        record = await store.get_run(run_id)
        if record.status != RunStatus.RUNNING:
            return record
        if not record.owned(time.time()):
            return await store.request_abort(run_id, reason)
        await anyio.sleep(poll)


@click.command(name="stop-all")
@click.option("--reason", default="stop-all by operator", show_default=True, help="Why: recorded.")
@click.option("--release", is_flag=True, help="Lift stop-all: runs may start and resume again.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def stop_all(settings: Settings, reason: str, release: bool, yes: bool) -> None:
    """Abort every running run in the database and refuse new ones.

    Until `orchestra stop-all --release`, starting or resuming any run on this database
    fails with a clear error. Runs stopped this way can be resumed after the release.
    """
    path = db_path(settings)
    if release:

        async def lift() -> bool:
            async with open_store(settings) as store:
                return await store.release_stop_all()

        was = run(lift)
        click.echo(
            "stop-all released: runs may start again" if was else "stop-all was not in force"
        )
        return
    if not yes:
        click.confirm(
            f"Abort every running run in {path} and refuse new runs until --release?",
            abort=True,
        )

    async def work() -> list[tuple[RunRecord, str, bool]]:
        async with open_store(settings) as store:
            before = {r.run_id: r for r in await store.list_runs(statuses=[RunStatus.RUNNING])}
            stopped = await store.stop_all(reason)
            now = time.time()
            results = []
            for run_id in stopped:
                previous = before.get(run_id)
                gone = previous is not None and owner_gone(previous.owner)
                status = (
                    RunStatus.RUNNING if previous is None else run_status(previous, now, gone=gone)
                )
                results.append((await store.get_run(run_id), status, gone))
            return results

    results = run(work)
    now = time.time()
    click.echo(
        f"stop-all in force ({reason}): {len(results)} running "
        f"run{'' if len(results) == 1 else 's'} told to stop"
    )
    for record, previous, gone in results:
        click.echo(f"  {format_abort(record, previous, now, gone=gone)}")
    click.echo("new runs and resumes are refused until `orchestra stop-all --release`")


# the budget command's options, in the order --help lists them: Budget field, metavar, help
_BUDGET_OPTIONS = (
    ("steps", "[+]N", "Supersteps the run may execute (an agent's: its turns)."),
    ("wall_seconds", "[+]SECONDS", "Wall time from the run's start (90, 30m, 1h)."),
    ("tokens", "[+]N", "Model tokens, input and output together."),
    ("input_tokens", "[+]N", "Model input tokens."),
    ("output_tokens", "[+]N", "Model output tokens."),
    ("cost_usd", "[+]USD", "Dollars, from the price table."),
    ("tool_calls", "[+]N", "Tool calls made."),
    ("state_bytes", "[+]BYTES", "The run state's size as JSON."),
)


def _budget_options(command: Any) -> Any:
    for name, metavar, text in reversed(_BUDGET_OPTIONS):
        command = click.option(LIMITS[name][0], name, metavar=metavar, help=text)(command)
    return command


@click.command()
@run_id_argument
@_budget_options
@click.option(
    "--agent",
    metavar="NAME",
    help="Change this agent's own budget instead of the run's.",
)
@click.option("--reason", help="Why: recorded with the run's events.")
@json_option
@click.pass_obj
def budget(
    settings: Settings,
    run_id: str,
    agent: str | None,
    reason: str | None,
    as_json: bool,
    **limits: str | None,
) -> None:
    """Raise (+N) or set (N) the budget of a stopped run, then resume it.

    E.g. `orchestra budget RUN --tokens +20000 --cost +0.5` gives a run stopped with
    budget_exceeded 20,000 more tokens and 50 cents more; `--steps 200` sets its step limit
    to 200. A limit that is unlimited cannot be raised: set it with N. A running run is
    refused (its owner runs under the budget it loaded): abort it first, or wait until it
    stops. `orchestra resume RUN` then continues the run under the new budget.
    """
    try:
        changes = [parse_limit(name, text) for name, text in limits.items() if text is not None]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if not changes:
        options = ", ".join(LIMITS[name][0] for name, _, _ in _BUDGET_OPTIONS)
        raise click.UsageError(f"give at least one limit to change ({options})")

    async def work() -> tuple[RunRecord, list[tuple[str, Any, Any]], dict[str, Any]]:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            _refuse_budget_change(record, time.time())
            try:
                before = scope_budget(record, agent)
                after = apply_changes(before, changes, agent=agent)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
            changed = budget_changes(before, after)
            result = {"before": before.to_dict(), "after": after.to_dict()}
            if changed:
                stored = stored_with(record, agent, after)
                record = await store.set_budget(record.run_id, stored, reason=reason)
            return record, changed, result

    record, changed, result = run(work)
    if as_json:
        echo_json(
            {
                "run_id": record.run_id,
                "agent": agent,
                **result,
                "changed": [name for name, _, _ in changed],
                "budget": record.budget,
            }
        )
        return
    whose = f"run {record.run_id}" if agent is None else f"agent {agent!r} of run {record.run_id}"
    if not changed:
        click.echo(f"the budget of {whose} is unchanged: it already has those limits")
        return
    used = budget_used(record, agent)
    click.echo(f"budget of {whose}:")
    for name, old, new in changed:
        click.echo(f"  {format_change(name, old, new, used)}")
    click.echo(f"continue the run with `orchestra resume {record.run_id}`")


def _refuse_budget_change(record: RunRecord, now: float) -> None:
    """Refuse to change the budget of a completed run, or of one a live owner runs."""
    if record.status == RunStatus.COMPLETED:
        raise RunStatusError(record.run_id, record.status, "raise its budget")
    if record.status != RunStatus.RUNNING or not record.owned(now):
        return
    assert record.lease_expires_at is not None
    left = format_age(record.lease_expires_at - now)
    raise click.ClickException(
        f"run {record.run_id} is running (owned by {record.owner}, lease {left} left) and "
        f"runs under the budget it loaded; stop it first (`orchestra abort "
        f"{record.run_id} --reason ...`), or wait until it stops, then raise its budget"
    )
