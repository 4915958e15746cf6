"""Fork: a copy of a run up to a step, resumed from there."""

from __future__ import annotations

import pytest
from durable import Ticks, ticker

from orchestra import RunStatus
from orchestra.runs.fork import fork_run
from orchestra.store import Store

pytestmark = pytest.mark.anyio


async def test_fork_resumes_from_the_forked_step(store: Store) -> None:
    """A run forked from an earlier checkpoint resumes to the same end."""
    app = ticker(6).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    await fork_run(store, "r1", 2, "f1")
    forked = await app.resume("f1")
    assert forked.status is RunStatus.COMPLETED
    assert forked.state == outcome.state
    assert [r.step for r in await store.checkpoints("f1")] == [2, 3, 4, 5, 6]
