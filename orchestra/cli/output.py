"""Printing and logging for the CLI: live runs, tables, JSON, structlog, errors as one line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import click
import structlog
from rich.console import Console, RenderableType
from rich.live import Live

from ..errors import OrchestraError
from ..events import (
    Event,
    NodeFinished,
    NodeRetried,
    NodeStarted,
    RunFinished,
    RunStarted,
    StepCommitted,
)
from ..outcome import RunOutcome
from .database import Settings
from .format import ProgressView, format_error, format_event, format_state, summary_panel

__all__ = (
    "Group",
    "echo_json",
    "logging_configured",
    "print_renderables",
    "watch_live",
    "watch_plain",
)


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


class Group(click.Group):
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


def _console() -> Console:
    """A console for tables: off a terminal (a pipe, a file), wide enough for one row a line."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)
    return console


def print_renderables(*renderables: RenderableType) -> None:
    """Print rich renderables (tables, panels) to stdout; off a terminal, unpadded."""
    console = _console()
    if console.is_terminal:
        console.print(*renderables)
        return
    # off a terminal, drop the padding rich leaves at the end of table rows
    with console.capture() as capture:
        console.print(*renderables)
    click.echo("\n".join(line.rstrip() for line in capture.get().splitlines()))


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))
