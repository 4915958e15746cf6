"""Named fault-injection points for crash tests.

Enabled only by the environment variable ``ORCHESTRA_FAULTS`` (a comma-separated list of
``point`` or ``point@step``); when a listed point is reached the process ends at once with
``os._exit(FAULT_EXIT_CODE)``, as a SIGKILL would, so each crash window can be tested
deterministically. Points: ``after_run_created``, ``after_pending_write``, ``after_call_started``
(an irreversible tool call recorded as started, before it runs), ``after_call_recorded`` (a
model or tool call's result recorded in the ledger), ``before_commit``,
``after_commit``. Unset (always, outside tests), :data:`ACTIVE` is false and the executor
never calls :func:`reach`.
"""

from __future__ import annotations

import os

FAULT_EXIT_CODE = 137


def _parse(spec: str) -> dict[str, int | None]:
    points: dict[str, int | None] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, step = item.partition("@")
        points[name] = int(step) if step else None
    return points


POINTS = _parse(os.environ.get("ORCHESTRA_FAULTS", ""))
ACTIVE = bool(POINTS)


def reach(point: str, step: int | None = None) -> None:
    """End the process if ``point`` (at ``step``) is armed."""
    if point not in POINTS:
        return
    armed = POINTS[point]
    if armed is None or armed == step:
        os._exit(FAULT_EXIT_CODE)
