"""The commands that steer runs: resume, abort, stop-all."""

from __future__ import annotations

import time
import traceback
from typing import Any

import anyio
import click

from ..errors import LeaseHeldError, RunStatusError, StopAllActiveError
from ..outcome import RunOutcome
from ..store.base import ACTIVE, RunRecord, Store
from .database import Settings, _db_path, _run, _run_id_argument, find_run, open_store
from .format import format_outcome_error, format_resumed
from .loading import load_app, resume_store
from .records import format_abort, owner_gone, run_status

__all__ = ("abort", "resume", "stop_all", "wait_until_stopped")


@click.command()
@_run_id_argument
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
    path = _db_path(settings)

    async def work() -> tuple[RunOutcome[Any], int]:
        # the store refuses all of these too; checking first keeps the app unimported
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            stopped = await store.stop_all_reason()
        if record.status == "completed":
            raise RunStatusError(record.run_id, record.status, "resume it")
        if stopped is not None:
            raise StopAllActiveError(stopped)
        _refuse_live_owner(record, time.time())
        ref = app_ref or record.app_ref
        if ref is None:
            raise click.ClickException(
                f"run {record.run_id} has no stored app reference (its graph was not a "
                f"module-level attribute); pass --app module:attribute"
            )
        app = load_app(ref, stored=app_ref is None)
        click.echo(
            f"resuming run {record.run_id} (graph {record.graph}) at step {record.step} with {ref}"
        )
        store = resume_store(app, path)
        try:
            outcome = await app.with_store(store).resume(
                record.run_id, allow_graph_change=allow_graph_change
            )
        finally:
            await store.aclose()
        return outcome, record.step

    outcome, from_step = _run(work)
    for line in format_resumed(outcome, from_step):
        click.echo(line)
    problem = format_outcome_error(outcome)
    if problem is not None:
        if settings.verbose and outcome.error is not None:
            click.echo("".join(traceback.format_exception(outcome.error)), err=True, nl=False)
        raise click.ClickException(problem)


def _refuse_live_owner(record: RunRecord, now: float) -> None:
    """Refuse to resume a run whose owner holds its lease, before importing its app."""
    if not record.lease_live(now):
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
@_run_id_argument
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
            if record.status == "aborted":
                why = f": {record.reason}" if record.reason else ""
                click.echo(f"run {record.run_id} is already aborted{why}")
                return
            gone = owner_gone(record.owner)
            previous = run_status(record, time.time(), gone=gone)
            record = await store.request_abort(record.run_id, reason)
            click.echo(format_abort(record, previous, time.time(), gone=gone))
            if wait and record.status == ACTIVE:
                with anyio.move_on_after(timeout):
                    record = await wait_until_stopped(store, record.run_id, reason)
                if record.status == ACTIVE:
                    raise click.ClickException(
                        f"run {record.run_id} is still running after {timeout:g}s: its owner "
                        f"has not stopped it (`orchestra show {record.run_id}` tells more)"
                    )
                problem = f": {record.reason}" if record.reason else ""
                click.echo(
                    f"run {record.run_id} stopped at step {record.step}: {record.status}{problem}"
                )

    _run(work)


async def wait_until_stopped(
    store: Store, run_id: str, reason: str, *, poll: float = 0.1
) -> RunRecord:
    """Poll until a run is no longer running (bound it with a cancel scope); if its owner
    dies before it notices the abort, mark the run aborted, since nobody else will."""
    while True:
        record = await store.get_run(run_id)
        if record.status != ACTIVE:
            return record
        if not record.lease_live(time.time()):
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
    path = _db_path(settings)
    if release:

        async def lift() -> bool:
            async with open_store(settings) as store:
                return await store.release_stop_all()

        was = _run(lift)
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
            before = {r.run_id: r for r in await store.list_runs(statuses=[ACTIVE])}
            stopped = await store.stop_all(reason)
            now = time.time()
            results = []
            for run_id in stopped:
                previous = before.get(run_id)
                gone = previous is not None and owner_gone(previous.owner)
                status = ACTIVE if previous is None else run_status(previous, now, gone=gone)
                results.append((await store.get_run(run_id), status, gone))
            return results

    results = _run(work)
    now = time.time()
    click.echo(
        f"stop-all in force ({reason}): {len(results)} running "
        f"run{'' if len(results) == 1 else 's'} told to stop"
    )
    for record, previous, gone in results:
        click.echo(f"  {format_abort(record, previous, now, gone=gone)}")
    click.echo("new runs and resumes are refused until `orchestra stop-all --release`")
