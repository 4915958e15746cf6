"""The commands that look after the database: fork, prune, db check."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import click

from ..outcome import RunStatus
from ..runs.fork import fork_run
from ..store.base import RunRecord
from ..store.base import new_run_id as _new_run_id
from ..store.sqlite import SQLiteStore
from .database import Settings, find_run, open_database, open_store, run, run_id_argument
from .format import format_age, format_bytes, parse_duration
from .output import print_renderables
from .records import RUN_STATUSES, format_prune, format_run_counts, runs_table

__all__ = ("check", "db_group", "fork", "prune", "vacuum")


@click.command()
@run_id_argument
@click.option(
    "--step",
    type=click.IntRange(min=0),
    required=True,
    help="Start the new run from this step's checkpoint (see `orchestra checkpoints RUN`).",
)
@click.option("--run-id", "new_run_id", help="The new run's id (default: a random one).")
@click.pass_obj
def fork(settings: Settings, run_id: str, step: int, new_run_id: str | None) -> None:
    """Start a new run from an earlier checkpoint of a run.

    The new run (status pending) starts from a copy of the state at that step, the
    original is untouched: retry from before a bad decision, with a fixed graph and
    --allow-graph-change if needed. `orchestra resume NEW` runs it.
    """

    async def work() -> RunRecord:
        async with open_store(settings) as store:
            record = await find_run(store, run_id)
            if step > record.step:
                raise click.ClickException(
                    f"run {record.run_id} has no checkpoint at step {step}: its last is step "
                    f"{record.step} (`orchestra checkpoints {record.run_id}` lists them)"
                )
            return await fork_run(store, record.run_id, step, new_run_id or _new_run_id())

    record = run(work)
    click.echo(
        f"forked run {record.parent_run_id} at step {step} into {record.run_id} "
        f"(status {record.status})"
    )
    click.echo(f"resume it with: orchestra --db {settings.db} resume {record.run_id}")


class _Duration(click.ParamType):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option(
    "--older-than",
    type=_Duration(),
    required=True,
    metavar="DURATION",
    help="Delete runs not updated for this long: 30d, 12h, 90m, 45s (or 1d12h).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s for s in RUN_STATUSES if s != RunStatus.RUNNING]),
    default=(str(RunStatus.COMPLETED),),
    show_default=True,
    help="Only runs with this status (repeat for several). Abort a crashed run to prune it.",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-vacuum", is_flag=True, help="Skip VACUUM (faster; the file keeps its size).")
@click.pass_obj
def prune(
    settings: Settings,
    older_than: float,
    statuses: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    no_vacuum: bool,
) -> None:
    """Delete old runs with their checkpoints and events, then VACUUM the database."""
    cutoff = time.time() - older_than
    wanted = [RunStatus(status) for status in statuses]
    which = f"status {' or '.join(statuses)}, not updated for {format_age(older_than)}"

    async def candidates() -> list[RunRecord]:
        async with open_store(settings) as store:
            runs = await store.list_runs(statuses=wanted)
            return [r for r in runs if r.updated_at < cutoff]

    doomed = run(candidates)
    if not doomed:
        click.echo(f"no runs to prune ({which})")
        return
    count = f"{len(doomed)} run{'' if len(doomed) == 1 else 's'}"
    if dry_run:
        click.echo(f"would delete {count} ({which}):")
        print_renderables(runs_table(doomed, time.time()))
        return
    if not yes:
        click.confirm(f"Delete {count} ({which}) from {settings.db}?", abort=True)

    async def work() -> str:
        async with open_database(settings) as store:
            before = store.file_size()
            removed = await store.prune(older_than=cutoff, statuses=wanted)
            if no_vacuum:
                return format_prune(removed, before, None)
            checkpointed = vacuum(store)
            return format_prune(removed, before, store.file_size(), checkpointed=checkpointed)

    click.echo(run(work))


def vacuum(store: SQLiteStore) -> bool:
    """VACUUM the store, then fold the write-ahead log back into the file; return whether
    the log could be emptied (another process reading can delay that)."""
    store.vacuum()
    # in WAL mode VACUUM writes the new file through the log, which grows by the whole
    # database until a checkpoint; TRUNCATE empties it so the space is really given back
    try:
        busy, _, _ = store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.DatabaseError:
        return False
    return not busy


@click.group(name="db")
def db_group() -> None:
    """Look after the run database file."""


@db_group.command()
@click.pass_obj
def check(settings: Settings) -> None:
    """Check the database: schema, integrity, stop-all, runs by status.

    Exits 1 if the integrity check finds a problem.
    """

    async def work() -> tuple[str, str, str | None, list[RunRecord], int]:
        async with open_database(settings) as store:
            return (
                store.schema_version(),
                store.integrity_check(),
                await store.stop_all_reason(),
                await store.list_runs(),
                store.file_size(),
            )

    version, integrity, stopped, records, size = run(work)
    now = time.time()
    click.echo(f"database   {settings.db} ({format_bytes(size)})")
    click.echo(f"schema     {version}")
    click.echo(f"integrity  {integrity.splitlines()[0] if integrity else '?'}")
    click.echo(f"stop-all   {stopped if stopped is not None else 'not in force'}")
    click.echo(f"runs       {format_run_counts(records, now)}")
    if integrity != "ok":
        raise click.ClickException(
            f"{settings.db}: integrity check failed: {'; '.join(integrity.splitlines()[:3])}"
        )
