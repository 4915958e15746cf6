"""The demo command: run the demo graph, checkpointed, and watch it live or line by line."""

from __future__ import annotations

import traceback
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from importlib.util import find_spec
from pathlib import Path
from typing import Any, cast

import anyio
import click
from rich.console import Console

from ..demo import DEFAULT_TOPIC, build_app
from ..events import Event
from ..outcome import RunOutcome
from ..store.sqlite import SQLiteStore
from .database import Settings
from .format import format_outcome_error
from .output import watch_live, watch_plain

__all__ = ("DEMO_DB", "demo")


async def _run_demo(
    input: Mapping[str, Any],
    *,
    speed: float,
    failures: int,
    live: bool,
    db: Path | None = None,
) -> RunOutcome[Any]:
    app = build_app(speed=speed, failures=failures)
    if db is not None:
        app = app.with_store(SQLiteStore(db))
    app.validate_input(input)  # bad input is one error line, before any display starts
    stream = cast(AsyncGenerator[Event, None], app.stream(input))
    async with aclosing(stream) as events:
        if live:
            return await watch_live(events, Console())
        return await watch_plain(events, click.echo)


DEMO_DB = "orchestra-demo.db"


@click.command()
@click.option(
    "--topic", default=DEFAULT_TOPIC, show_default=True, help="What the demo team writes about."
)
@click.option(
    "--plain",
    is_flag=True,
    help="One line per event instead of the live table (automatic when stdout is no terminal).",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    envvar="ORCHESTRA_DEMO_SPEED",
    show_envvar=True,
    help="Run the simulated work this many times faster; 0 skips every pause.",
)
@click.option(
    "--failures",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Transient errors publishing hits; 3 or more use up its retries and fail the run.",
)
@click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    show_default=True,
    help="The async library to run on.",
)
@click.option(
    "--no-store",
    is_flag=True,
    help="Do not checkpoint the run (by default it goes to --db, or ./orchestra-demo.db).",
)
@click.pass_obj
def demo(
    settings: Settings,
    topic: str,
    plain: bool,
    speed: float,
    failures: int,
    backend: str,
    no_store: bool,
) -> None:
    """Run a demo graph and watch it: no model or API key needed.

    A planner fans out to three researchers working concurrently, a reviewer sends the draft
    back once, and publishing fails once and succeeds on retry. Every step is checkpointed in
    the embedded SQLite store (--db, default ./orchestra-demo.db), so the operator commands
    work on it afterwards. The same graph, with comments, is examples/quickstart.py.
    """
    if backend == "trio" and find_spec("trio") is None:
        raise click.BadParameter("trio is not installed (pip install trio)", param_hint="--backend")
    live = not plain and Console().is_terminal
    db = None if no_store else (settings.db or Path(DEMO_DB))
    outcome = anyio.run(
        lambda: _run_demo({"topic": topic}, speed=speed, failures=failures, live=live, db=db),
        backend=backend,
    )
    if db is not None:
        click.echo(
            f"\nthe run is checkpointed in {db}; look at it with:\n"
            f"  orchestra --db {db} runs\n"
            f"  orchestra --db {db} show {outcome.run_id}\n"
            f"  orchestra --db {db} checkpoints {outcome.run_id}"
        )
    problem = format_outcome_error(outcome)
    if problem is not None:
        if settings.verbose and outcome.error is not None:
            click.echo("".join(traceback.format_exception(outcome.error)), err=True, nl=False)
        raise click.ClickException(problem)
