"""What the operator CLI tests share: invoking the CLI (on a database), running cli_app on
one and reading it back, rendering rich output, and stored rows to format."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import anyio
from apps import cli_app
from click.testing import CliRunner, Result
from rich.console import Console

from orchestra import RunOutcome
from orchestra.cli import main
from orchestra.store import EventRow, RunRecord

FAST = ["demo", "--plain", "--speed", "0"]


def invoke(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env or None)


def render(renderable: Any, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def table_rows(text: str) -> dict[int, str]:
    """Return a rendered table's rows by step, whitespace collapsed."""
    rows = [line.split() for line in text.splitlines()]
    return {int(row[0]): " ".join(row) for row in rows if row and row[0].isdigit()}


def cli(db: Path, *args: str, input: str | None = None) -> Result:
    """Invoke the CLI on ``db`` (ORCHESTRA_DB unset, so only --db counts)."""
    return CliRunner().invoke(
        main, ["--db", str(db), *args], input=input, env={"ORCHESTRA_DB": None}
    )


async def start(db: Path, run_id: str | None = None, **input: Any) -> RunOutcome[Any]:
    """Run the test graph on ``db`` to its end (on the current async backend)."""
    store = cli_app.store_at(str(db))
    try:
        return await cli_app.app.with_store(store).run(input, run_id=run_id)
    finally:
        await store.aclose()


def start_sync(db: Path, run_id: str | None = None, **input: Any) -> RunOutcome[Any]:
    return anyio.run(lambda: start(db, run_id, **input))


async def record_of(db: Path, run_id: str) -> RunRecord:
    store = cli_app.store_at(str(db))
    try:
        return await store.get_run(run_id)
    finally:
        await store.aclose()


def load_state(db: Path, run_id: str) -> Any:
    async def load() -> Any:
        store = cli_app.store_at(str(db))
        try:
            return await cli_app.app.with_store(store).load_state(run_id)
        finally:
            await store.aclose()

    return anyio.run(load)


def only_line(result: Result) -> str:
    (line,) = result.stderr.splitlines()
    return line


NOW = 1_700_000_000.0


def event(kind: str, at: float, row_step: int | None, /, **data: Any) -> EventRow:
    return EventRow(step=row_step, kind=kind, at=at, data=json.dumps(data))


def squeezed(text: str) -> list[str]:
    """The lines of ``text``, whitespace collapsed."""
    return [" ".join(line.split()) for line in text.splitlines()]
