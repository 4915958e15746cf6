"""The operator CLI: ``orchestra --version`` and ``orchestra demo`` (more commands to come).

Formatting is kept apart from printing: ``format_*`` functions turn events, outcomes and
errors into strings, :class:`ProgressView`, :func:`progress_table` and :func:`summary_panel`
into rich renderables, and only the ``watch_*`` functions and the commands print. click, rich
and the logging setup load here only; ``import orchestra`` never imports this module.

Exit codes: 0 when the run completed, 1 when it did not or an error stopped the command (one
line on stderr, no traceback unless ``--verbose``), 2 for a usage error.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path
from typing import Any, cast

import anyio
import click
import structlog
from pydantic import BaseModel
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.pretty import Pretty
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ._version import __version__
from .demo import DEFAULT_TOPIC, build_app
from .errors import GraphValidationError, OrchestraError
from .events import (
    Event,
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from .outcome import RunOutcome, RunStatus

__all__ = (
    "ProgressView",
    "Settings",
    "format_duration",
    "format_error",
    "format_event",
    "format_nodes",
    "format_state",
    "main",
    "progress_table",
    "summary_panel",
)

# -- formatting: pure functions, no printing ------------------------------------------------

_STATUS_STYLE = {
    RunStatus.RUNNING: "yellow",
    RunStatus.COMPLETED: "green",
    RunStatus.INTERRUPTED: "yellow",
    RunStatus.ABORTED: "red",
    RunStatus.BUDGET_EXCEEDED: "yellow",
    RunStatus.LOOP_DETECTED: "yellow",
    RunStatus.FAILED: "red",
}
_SECONDS_FIELDS = frozenset({"duration", "delay"})
_UNPRINTED = frozenset({"run_id", "at", "outcome"})
_KIND_WIDTH = 15
_TIMES = "\N{MULTIPLICATION SIGN}"


def format_duration(seconds: float) -> str:
    """Return a duration for people: ``0.25s``, ``12.40s``, ``3m 07s``, ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_nodes(labels: Sequence[str]) -> str:
    """Name a step's tasks briefly: ``research[0], research[1]`` becomes "research \u00d72"."""
    counts: dict[str, int] = {}
    for label in labels:
        name = label.rsplit("[", 1)[0] if label.endswith("]") else label
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(name if n == 1 else f"{name} {_TIMES}{n}" for name, n in counts.items())


def format_error(error: BaseException) -> str:
    """Return an error as one line: its message, with any line breaks folded."""
    if isinstance(error, GraphValidationError):
        count = len(error.problems)
        noun = "problem" if count == 1 else "problems"
        return f"graph {error.graph!r} has {count} {noun}: " + "; ".join(error.problems)
    text = str(error) if isinstance(error, OrchestraError) else f"{type(error).__name__}: {error}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def format_outcome_error(outcome: RunOutcome[Any]) -> str | None:
    """Say in one line why a run did not complete, or return None if it did."""
    if outcome.ok:
        return None
    if outcome.error is not None:
        return format_error(outcome.error)
    reason = f": {outcome.stop_reason}" if outcome.stop_reason else ""
    return f"run {outcome.run_id} stopped at step {outcome.steps}: {outcome.status}{reason}"


def _plain_value(key: str, value: Any) -> str:
    if key in _SECONDS_FIELDS and isinstance(value, int | float):
        return f"{value:.2f}s"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_event(event: Event) -> str:
    """Return one log line for an event: its kind, then ``key=value`` for what it says.

    The run id is shown once, on ``run_started``; timestamps are left out (the lines are
    printed as they happen); defaults (task 0, one attempt, nothing changed, false flags)
    are omitted.
    """
    parts = [f"run={event.run_id}"] if isinstance(event, RunStarted) else []
    for item in fields(event):
        key = item.name
        value = getattr(event, key)
        if key in _UNPRINTED or value is None or value is False or value == ():
            continue
        if (key, value) in (("task", 0), ("attempts", 1)):
            continue
        parts.append(f"{key}={_plain_value(key, value)}")
    kind = event.kind
    if isinstance(event, RunFinished) and event.outcome is not None:
        parts.append(f"wall={format_duration(event.outcome.usage.wall_seconds)}")
    return f"{kind:<{_KIND_WIDTH}} {' '.join(parts)}".rstrip()


def format_state(state: BaseModel) -> list[str]:
    """Return one ``state  field=<json>`` line per field of a (final) state."""
    data = state.model_dump(mode="json")
    return [
        f"{'state':<{_KIND_WIDTH}} {name}={json.dumps(value, ensure_ascii=False)}"
        for name, value in data.items()
    ]


@dataclass(slots=True)
class StepRow:
    """What the progress table knows about one step."""

    step: int
    began: float
    nodes: list[str] = field(default_factory=list)
    known: bool = False  # nodes came from the previous step's ``next``
    status: str = "running"
    duration: float | None = None
    retries: int = 0
    changed: tuple[str, ...] = ()


class ProgressView:
    """Follow a run's events and render them as a table of steps (a rich renderable).

    Events arrive after each step's barrier; the step in flight is known from the previous
    step's ``next``, so it shows as running, with its time so far from ``clock``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rows: dict[int, StepRow] = {}
        self.run_id = ""
        self.graph = ""
        self.outcome: RunOutcome[Any] | None = None

    def update(self, event: Event) -> None:
        """Take in one event."""
        now = self.clock()
        if isinstance(event, RunStarted):
            self.run_id, self.graph = event.run_id, event.graph
            self._row(event.step + 1, now)
        elif isinstance(event, NodeStarted):
            row = self._row(event.step, now)
            if not row.known:
                row.nodes.append(event.node)
        elif isinstance(event, NodeRetried):
            self._row(event.step, now).retries += 1
        elif isinstance(event, NodeFinished):
            row = self._row(event.step, now)
            if event.error is not None:
                row.status, row.duration = "failed", now - row.began
        elif isinstance(event, StepCommitted):
            row = self._row(event.step, now)
            row.nodes, row.known = list(event.nodes), True
            row.status, row.duration, row.changed = "done", event.duration, event.changed
            if event.next:
                following = self._row(event.step + 1, now)
                following.nodes, following.known = list(event.next), True
        elif isinstance(event, RunFinished):
            self.outcome = event.outcome
            for row in self.rows.values():
                if row.status == "running":
                    # a step that never passed its barrier: it failed, or a safeguard stopped
                    # the run before it started
                    failed = event.status == RunStatus.FAILED
                    row.status = "failed" if failed else event.status
                    row.duration = now - row.began if failed else None

    def _row(self, step: int, now: float) -> StepRow:
        row = self.rows.get(step)
        if row is None:
            row = self.rows[step] = StepRow(step=step, began=now)
        return row

    def __rich__(self) -> Table:
        return progress_table(self, self.clock())


def _status_cell(row: StepRow) -> RenderableType:
    if row.status == "running":
        return Spinner("dots", text=Text("running", style="yellow"), style="yellow")
    if row.status == "done":
        text = Text("✓ done", style="green")
        if row.retries:
            text.append(f" ({row.retries} {'retry' if row.retries == 1 else 'retries'})", "yellow")
        return text
    if row.status == "failed":
        return Text("✗ failed", style="red")
    return Text(f"■ {row.status}", style="yellow")


def progress_table(view: ProgressView, now: float) -> Table:
    """Build the table of a run's steps: step, node(s), status, time and changed fields."""
    title = f"run {view.run_id} · graph {view.graph}" if view.run_id else None
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("step", justify="right", style="bold")
    table.add_column("node(s)")
    table.add_column("status", no_wrap=True, min_width=16)
    table.add_column("time", justify="right")
    table.add_column("changed", style="dim")
    for row in sorted(view.rows.values(), key=lambda r: r.step):
        duration = now - row.began if row.status == "running" else row.duration
        table.add_row(
            str(row.step),
            format_nodes(row.nodes) or "…",
            _status_cell(row),
            "" if duration is None else format_duration(duration),
            ", ".join(row.changed),
        )
    return table


def summary_panel(outcome: RunOutcome[Any]) -> Panel:
    """Build the panel shown when a run ends: status, steps, wall time, final state."""
    style = _STATUS_STYLE.get(outcome.status, "yellow")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    facts.add_row("status", Text(str(outcome.status), style=f"bold {style}"))
    facts.add_row("steps", str(outcome.steps))
    facts.add_row("wall time", format_duration(outcome.usage.wall_seconds))
    if outcome.error is not None:
        facts.add_row("error", Text(format_error(outcome.error), style="red"))
    if outcome.stop_reason:
        facts.add_row("reason", outcome.stop_reason)
    if outcome.next:
        facts.add_row("next", ", ".join(outcome.next))
    state = Table.grid(padding=(0, 2))
    state.add_column(style="cyan", no_wrap=True)
    state.add_column()
    for name, value in outcome.state:
        state.add_row(name, Pretty(value, max_string=200, max_length=20))
    return Panel(
        Group(facts, Text(""), Text("final state", style="bold"), state),
        title=f"run {outcome.run_id}",
        title_align="left",
        border_style=style,
        expand=False,
    )


# -- printing -------------------------------------------------------------------------------


async def watch_plain(events: AsyncIterator[Event], echo: Callable[[str], None]) -> RunOutcome[Any]:
    """Print one line per event as the run goes, then the final state; return the outcome."""
    outcome: RunOutcome[Any] | None = None
    async for event in events:
        echo(format_event(event))
        if isinstance(event, RunFinished):
            outcome = event.outcome
    if outcome is None:  # pragma: no cover - a stream always ends with RunFinished
        raise RuntimeError("the run ended without a run_finished event")
    for line in format_state(outcome.state):
        echo(line)
    return outcome


async def watch_live(
    events: AsyncIterator[Event], console: Console, *, refresh: float = 0.1
) -> RunOutcome[Any]:
    """Show a live table of the run's steps, then its summary panel; return the outcome."""
    view = ProgressView()

    async def tick(live: Live) -> None:
        while True:
            await anyio.sleep(refresh)
            live.refresh()

    # auto_refresh would render from rich's own thread while events mutate the view;
    # refreshing from a task of our own keeps everything on the event loop
    failure: Exception | None = None
    with Live(view, console=console, auto_refresh=False) as live:
        async with anyio.create_task_group() as group:
            group.start_soon(tick, live)
            try:
                async for event in events:
                    view.update(event)
                    live.refresh()
            except Exception as exc:  # re-raised below, not wrapped in an exception group
                failure = exc
            group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if view.outcome is None:  # pragma: no cover - a stream always ends with RunFinished
        raise RuntimeError("the run ended without a run_finished event")
    console.print(summary_panel(view.outcome))
    return view.outcome


async def _run_demo(
    input: Mapping[str, Any], *, speed: float, failures: int, live: bool
) -> RunOutcome[Any]:
    app = build_app(speed=speed, failures=failures)
    app.validate_input(input)  # bad input is one error line, before any display starts
    stream = cast(AsyncGenerator[Event, None], app.stream(input))
    async with aclosing(stream) as events:
        if live:
            return await watch_live(events, Console())
        return await watch_plain(events, click.echo)


# -- logging --------------------------------------------------------------------------------


class _StderrLogger:
    """Write each log line to ``sys.stderr`` as it is at that moment (rich's Live swaps it)."""

    def msg(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def _stderr_logger(*args: Any) -> _StderrLogger:
    return _StderrLogger()


def _drop_run_events(logger: Any, method: str, event_dict: Any) -> Any:
    """Drop the run events the CLI displays itself (``--verbose`` keeps them)."""
    if event_dict.get("event") in _DISPLAYED:
        raise structlog.DropEvent
    return event_dict


_DISPLAYED = frozenset(
    cls.kind
    for cls in (RunStarted, NodeStarted, NodeRetried, NodeFinished, StepCommitted, RunFinished)
)


@contextmanager
def logging_configured(*, verbose: bool) -> Iterator[None]:
    """Route structlog to stderr: warnings and up, or everything with ``verbose``.

    Only the CLI configures logging (a library never does), and it puts the previous
    configuration back on the way out, so invoking the CLI in-process leaves no trace.
    """
    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        renderer,
    ]
    if not verbose:
        processors.insert(0, _drop_run_events)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.WARNING
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


# -- commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The global options, stored on the click context (``ctx.obj``) for every command."""

    db: Path | None = None
    verbose: bool = False


class _Group(click.Group):
    """A command group that reports any error as one line on stderr and exits with 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (Exception, BaseExceptionGroup) as exc:
            verbose = isinstance(ctx.obj, Settings) and ctx.obj.verbose
            error = _cli_error(exc, verbose=verbose)
            if error is exc:
                raise
            raise error from None


def _cli_error(exc: BaseException, *, verbose: bool) -> BaseException:
    """Translate what escaped a command into what click should show (one line, or Abort)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # task groups wrap even a lone error
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(KeyboardInterrupt)
        if rest is None:  # Ctrl-C reached several tasks at once
            return click.Abort()
    if isinstance(exc, KeyboardInterrupt):
        return click.Abort()
    if isinstance(exc, click.ClickException | click.exceptions.Exit | click.Abort):
        return exc
    if isinstance(exc, OrchestraError):
        return click.ClickException(format_error(exc))
    if verbose or not isinstance(exc, Exception):
        return exc
    return click.ClickException(
        f"internal error: {format_error(exc)} (--verbose shows the traceback)"
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="orchestra", message="%(prog)s %(version)s"
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ORCHESTRA_DB",
    show_envvar=True,
    help="The run database (SQLite) the run commands read and write.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Log everything (debug up) to stderr; show tracebacks."
)
@click.pass_context
def main(ctx: click.Context, db: Path | None, verbose: bool) -> None:
    """Run multi-agent graphs, and watch, approve, resume and abort their runs."""
    ctx.obj = Settings(db=db, verbose=verbose)
    ctx.with_resource(logging_configured(verbose=verbose))


@main.command()
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
@click.pass_obj
def demo(
    settings: Settings, topic: str, plain: bool, speed: float, failures: int, backend: str
) -> None:
    """Run a demo graph and watch it: no model or API key needed.

    A planner fans out to three researchers working concurrently, a reviewer sends the draft
    back once, and publishing fails once and succeeds on retry. The same graph, with
    comments, is examples/quickstart.py.
    """
    if backend == "trio" and find_spec("trio") is None:
        raise click.BadParameter("trio is not installed (pip install trio)", param_hint="--backend")
    live = not plain and Console().is_terminal
    outcome = anyio.run(
        lambda: _run_demo({"topic": topic}, speed=speed, failures=failures, live=live),
        backend=backend,
    )
    problem = format_outcome_error(outcome)
    if problem is not None:
        if settings.verbose and outcome.error is not None:
            click.echo("".join(traceback.format_exception(outcome.error)), err=True, nl=False)
        raise click.ClickException(problem)
