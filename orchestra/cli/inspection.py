"""The commands that read the run database: runs, show, checkpoints."""

from __future__ import annotations

import time
from dataclasses import asdict

import click
from rich.console import NewLine, RenderableType
from rich.text import Text

from ..outcome import RunStatus
from ..store.base import CheckpointRow, EventRow, RequestRow, RunRecord
from .database import Settings, find_run, json_option, open_store, run, run_id_argument
from .format import format_bytes
from .history import (
    checkpoint_info,
    checkpoint_json,
    checkpoints_table,
    event_data,
    timeline,
    timeline_table,
)
from .output import echo_json, print_renderables
from .records import RUN_STATUSES, format_stop_all, owner_gone, run_json, run_summary, runs_table
from .requests import answer_hint, request_json, requests_table, stored_request

__all__ = ("checkpoints", "runs", "show")


@click.command()
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(RUN_STATUSES),
    help="Only runs with this status (repeat for several).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Show at most this many runs, newest first.",
)
@json_option
@click.pass_obj
def runs(settings: Settings, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List runs, newest first: status, step, age and who owns them.

    A running run whose owner's lease expired shows as "running (stale lease)": its process
    crashed or hangs, and `orchestra resume RUN` takes it over.
    """

    async def work() -> tuple[list[RunRecord], str | None]:
        async with open_store(settings) as store:
            wanted = [RunStatus(status) for status in statuses]
            records = await store.list_runs(statuses=wanted, limit=limit + 1)
            return records, await store.stop_all_reason()

    records, stopped = run(work)
    now = time.time()
    more = len(records) > limit
    records = records[:limit]
    if stopped is not None:
        click.echo(f"Warning: {format_stop_all(stopped)}", err=True)
    gone = {r.owner for r in records if r.owner is not None and owner_gone(r.owner)}
    if as_json:
        echo_json([run_json(r, now, gone=r.owner in gone) for r in records])
        return
    if not records:
        which = f" with status {' or '.join(statuses)}" if statuses else ""
        click.echo(f"no runs{which} in {settings.db}")
        return
    print_renderables(runs_table(records, now, gone=gone))
    if more:
        click.echo(f"(newest {limit} shown; --limit shows more)")


@click.command()
@run_id_argument
@json_option
@click.pass_obj
def show(settings: Settings, run_id: str, as_json: bool) -> None:
    """Show a run: status, owner, usage, open requests and a timeline of its steps, model
    calls and tool calls."""

    async def work() -> tuple[RunRecord, list[EventRow], list[RequestRow]]:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            events = await store.events(record.run_id)
            return record, events, await store.requests(record.run_id)

    record, events, rows = run(work)
    now = time.time()
    gone = owner_gone(record.owner)
    entries = timeline(events)
    requests = [stored_request(row) for row in rows]
    if as_json:
        echo_json(
            {
                "run": run_json(record, now, gone=gone),
                "requests": [request_json(request) for request in requests],
                "timeline": [asdict(entry) for entry in entries],
                "events": [
                    {"step": e.step, "kind": e.kind, "at": e.at, "data": event_data(e)}
                    for e in events
                ],
            }
        )
        return
    waiting: list[RenderableType] = []
    if requests:
        hint = answer_hint(record.run_id, requests, record.app_ref)
        waiting = [requests_table(requests, now), NewLine(), Text("\n".join(hint)), NewLine()]
    print_renderables(
        run_summary(record, events, now, gone=gone),
        "",
        *waiting,
        timeline_table(entries) if entries else "no events stored",
    )


@click.command()
@run_id_argument
@json_option
@click.pass_obj
def checkpoints(settings: Settings, run_id: str, as_json: bool) -> None:
    """List a run's checkpoints: kind, size, changed fields, next tasks."""

    async def work() -> tuple[RunRecord, list[CheckpointRow]]:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            return record, await store.checkpoints(record.run_id)

    record, rows = run(work)
    infos = [checkpoint_info(row) for row in rows]
    if as_json:
        echo_json([checkpoint_json(info) for info in infos])
        return
    total = sum(info.size for info in infos)
    print_renderables(checkpoints_table(infos))
    click.echo(f"{len(infos)} checkpoints of run {record.run_id}, {format_bytes(total)} in all")
