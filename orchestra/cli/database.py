"""The global settings and what the database commands share: opening --db, finding a run.

The commands act as operators: they see the store through the operator contract
(:func:`open_store`); only the file's own upkeep (prune's VACUUM, ``db check``) opens the
SQLite file as such (:func:`open_database`). A resume binds the run's app to the file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import click

from ..errors import RunNotFoundError
from ..store.base import OperatorStore, RunRecord
from ..store.sqlite import SQLiteStore

__all__ = (
    "Settings",
    "db_path",
    "find_run",
    "json_option",
    "open_database",
    "open_store",
    "run",
    "run_id_argument",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The global options, stored on the click context (``ctx.obj``) for every command."""

    db: Path | None = None
    verbose: bool = False


def db_path(settings: Settings) -> Path:
    """Return the ``--db`` path, or fail (one line) when it is not given or does not exist."""
    if settings.db is None:
        raise click.ClickException("no run database: pass --db PATH or set ORCHESTRA_DB")
    if not settings.db.exists():
        raise click.ClickException(
            f"{settings.db}: no such database (a graph compiled with store={str(settings.db)!r} "
            f"creates it on its first run)"
        )
    return settings.db


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[OperatorStore]:
    """Open the ``--db`` store, to act on its runs as an operator (a missing, foreign or
    corrupted file is one error line)."""
    async with open_database(settings) as store:
        yield store


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[SQLiteStore]:
    """Open the ``--db`` file as a SQLiteStore, for what only the file has (its size,
    VACUUM, the integrity check, the schema version)."""
    store = SQLiteStore(db_path(settings))
    try:
        store.conn  # noqa: B018 - open now, so a bad file fails before anything else
        yield store
    finally:
        await store.aclose()


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command's async work to completion and return its result."""
    return anyio.run(fn)


async def find_run(store: OperatorStore, run_id: str) -> RunRecord:
    """Return the run ``run_id``, or the one run whose id starts with it (like git)."""
    try:
        return await store.get_run(run_id)
    except RunNotFoundError:
        if not run_id:
            raise
        matches = [r for r in await store.list_runs() if r.run_id.startswith(run_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise
        names = ", ".join(r.run_id for r in matches[:5])
        more = ", ..." if len(matches) > 5 else ""
        raise click.ClickException(
            f"run id {run_id!r} is ambiguous: {len(matches)} runs start with it ({names}{more})"
        ) from None


run_id_argument = click.argument("run_id", metavar="RUN")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead.")
