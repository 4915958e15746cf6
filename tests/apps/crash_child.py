"""What the crash-test child apps (crash_app, agent_crash_app, approval_crash_app) share:
quiet logging (stdout carries only the JSON summary), a resume that waits out a dead
owner's lease, the summary fields every child prints, and where the side-effect log is."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from orchestra import CompiledGraph, RunOutcome
from orchestra.errors import LeaseHeldError


def configure_logging() -> None:
    import structlog

    # stdout carries only the JSON summary
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def resume_waiting(
    app: CompiledGraph[Any], run_id: str, *, wait: bool, answers: Mapping[str, Any] | None = None
) -> RunOutcome[Any]:
    """Resume ``run_id``; with ``wait``, wait out a live lease (a killed owner's) for up to
    30 s instead of failing at once."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await app.resume(run_id, answers=answers)
        except LeaseHeldError as exc:
            if not wait or time.monotonic() > deadline:
                raise
            await anyio.sleep(max(exc.expires_in, 0.0) + 0.01)


def summary(outcome: RunOutcome[Any]) -> dict[str, Any]:
    """The fields every child's JSON summary has."""
    return {
        "status": str(outcome.status),
        "steps": outcome.steps,
        "state": outcome.state.model_dump(mode="json"),
        "error_type": type(outcome.error).__name__ if outcome.error else None,
        "error": str(outcome.error) if outcome.error else None,
    }


def effects_path(db: str | os.PathLike[str]) -> Path:
    """Return the side-effect log of the runs in ``db``."""
    return Path(f"{os.fspath(db)}.effects")
