"""Drivers: run an execution to its end, or step by step as a stream of events, under the
run's supervision (its wall-time deadline and, with a store, the abort and lease watcher).

Whatever stops a run (the caller's cancellation, a closed stream, an unexpected exception)
is recorded, so the stored run can be resumed at once rather than after its lease expires.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ..errors import OrchestraError, RunError
from ..events import Event
from ..outcome import RunOutcome, RunStatus
from .executor import Execution

__all__ = ("run_to_end", "stream_events")


async def _watch(execution: Execution, scope: anyio.CancelScope) -> None:
    """Poll the store for an abort request and renew the lease, inside the run's group.

    An abort (or stop-all) cancels ``scope``, the run's cancel scope, within one poll
    interval; losing the lease does too, and the run stops without writing anything more.
    """
    lease = execution.lease
    assert lease is not None
    while True:
        wait = lease.wait()
        if wait > 0:
            await anyio.sleep(wait)
        if await execution.poll_store():
            scope.cancel()
            return


@asynccontextmanager
async def _supervised(execution: Execution) -> AsyncIterator[None]:
    """Run the body under the run's deadline and, with a store, its abort/lease watcher."""
    if execution.recorder is None:
        with anyio.CancelScope(deadline=execution.deadline) as scope:
            yield
    else:
        async with anyio.create_task_group() as group:
            with anyio.CancelScope(deadline=execution.deadline) as scope:
                group.start_soon(_watch, execution, scope, name=f"watch {execution.run_id}")
                yield
            group.cancel_scope.cancel()
    if scope.cancelled_caught:
        execution.stopped_by_scope()


async def run_to_end(execution: Execution) -> RunOutcome[Any]:
    """Drive a run to its end; one supervised scope for the whole run."""
    await execution.start()
    try:
        async with _supervised(execution):
            while await execution.advance() is not None:
                pass
    except anyio.get_cancelled_exc_class():
        await _cancelled_by_caller(execution)
        raise
    except Exception as exc:  # a bug, not a run error: record it rather than hold the lease
        raise await _broke(execution, exc) from None
    outcome = (await execution.finish()).outcome
    assert outcome is not None
    return outcome


async def _cancelled_by_caller(
    execution: Execution, reason: str = "cancelled by the caller"
) -> None:
    """The caller stopped driving the run: record it (a running one as aborted) so that it
    can be resumed at once rather than after its lease expires."""
    if execution.recorder is None or execution.closed:
        return
    if execution.status is RunStatus.RUNNING:
        execution.status = RunStatus.ABORTED
        execution.reason = reason
    with anyio.CancelScope(shield=True):
        try:
            await execution.finish()
        except OrchestraError as exc:  # the cancellation, not this, is what propagates
            execution.log.error("run_not_recorded", error=str(exc))


async def _broke(execution: Execution, exc: Exception) -> Exception:
    """An unexpected exception escaped the run: record it failed so it can be resumed.

    Return the exception to raise: the original, out of the run's own task group."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if execution.recorder is None or execution.closed:
        return exc
    execution.status = RunStatus.FAILED
    execution.error = RunError(
        f"unexpected {type(exc).__name__}: {exc}", run_id=execution.run_id, step=execution.step
    )
    with anyio.CancelScope(shield=True):
        try:
            await execution.finish()
        except OrchestraError as error:
            execution.log.error("run_not_recorded", error=str(error))
    return exc


async def stream_events(execution: Execution) -> AsyncGenerator[Event, None]:
    """Drive a run step by step, yielding each step's events after its barrier.

    No cancel scope or task group stays open across a ``yield``: each step is supervised on
    its own, which costs a few microseconds per step more than :func:`run_to_end`.
    """
    for event in await execution.start():
        yield event
    while True:
        events = None
        try:
            async with _supervised(execution):
                events = await execution.advance()
        except anyio.get_cancelled_exc_class():
            await _cancelled_by_caller(execution)
            raise
        except Exception as exc:
            raise await _broke(execution, exc) from None
        if events is None:
            break
        try:
            for event in events:
                yield event
        except GeneratorExit:
            # the consumer closed the stream: nothing more runs; say so in the store
            await _cancelled_by_caller(execution, "the event stream was closed by its reader")
            raise
    yield await execution.finish()
