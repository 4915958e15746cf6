"""Checkpoints through the compiled app: the input as checkpoint 0, the state at every step, and
deltas (what changed, not whole states)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from durable import BLOB, Ticks, ping_pong, ticker

from orchestra import END, START, Graph, NodeContext
from orchestra.store import SQLiteStore, Store

pytestmark = pytest.mark.anyio


async def test_run_writes_its_input_as_checkpoint_0(store: Store) -> None:
    """Checkpoint 0 is the run's input state."""
    app = ticker(3).compile(store=store)
    await app.run(Ticks(notes=["given"]), run_id="r1")
    rows = await store.checkpoints("r1")
    assert [r.step for r in rows] == [0, 1, 2, 3]
    assert await app.load_state("r1", 0) == Ticks(notes=["given"])


async def test_load_state_returns_the_state_at_every_step(store: Store) -> None:
    """Every checkpoint loads as the full state the next step saw."""
    seen: dict[int, Ticks] = {}
    app = ticker(12, seen=seen).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    assert sorted(seen) == list(range(1, 13))
    for step, state in seen.items():
        assert await app.load_state("r1", step - 1) == state
    assert await app.load_state("r1", 12) == outcome.state


async def test_load_state_defaults_to_the_last_checkpoint(store: Store) -> None:
    """Without a step, load_state gives the run's last state."""
    app = ticker(5).compile(store=store)
    outcome = await app.run(Ticks(), run_id="r1")
    assert await app.load_state("r1") == outcome.state


async def test_checkpoints_store_deltas_not_whole_states(store: Store) -> None:
    """With an unchanged 10 KB field, a step stores well under 1 KB."""
    app = ping_pong(100).compile(store=store)
    outcome = await app.run(Ticks(blob=BLOB), run_id="r1")
    assert outcome.steps == 200
    rows = (await store.checkpoints("r1"))[1:]
    stored = sum(r.size + len(r.tasks) + len(r.events or "") for r in rows)
    assert stored / outcome.steps < 1024
    assert await app.load_state("r1") == outcome.state


async def test_sqlite_file_grows_with_what_changed_not_with_the_state(
    sqlite_store: SQLiteStore,
) -> None:
    """200 steps over a state with an unchanged 10 KB field grow the file < 1 KB a step."""
    store = sqlite_store
    store.schema_version()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = store.file_size()
    outcome = await ping_pong(100).compile(store=store).run(Ticks(blob=BLOB))
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert (store.file_size() - before) / outcome.steps < 1024


async def test_append_fields_store_only_the_new_items(store: Store) -> None:
    """A step's checkpoint of an append field holds the items it added, not the list."""

    async def write(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": f"note {ctx.step}"}

    def again(state: Ticks) -> str:
        return "write" if len(state.notes) < 20 else END

    graph: Graph[Ticks] = Graph(Ticks)
    graph.add_node("write", write)
    graph.add_edge(START, "write")
    graph.add_route("write", again, targets=["write", END])
    app = graph.compile(store=store)
    await app.run(Ticks(blob="y" * 2000), run_id="r1")
    deltas = [r for r in await store.checkpoints("r1") if r.delta is not None]
    assert len(deltas) == 20
    for row in deltas:
        assert json.loads(row.delta or "") == {"append": {"notes": [f"note {row.step}"]}}
