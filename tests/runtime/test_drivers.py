"""Run and stream: abort and stop-all (a hanging or streamed run stops with the reason, a
closed stream or a cancelled caller records the run aborted, a run whose nodes never yield
still stops and keeps its lease), the events a stream yields, and a bad run id refused."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from durable import Ticks, chain, hanging, run_until, step_one, ticker, uninterrupted
from helpers import LEASE, POLL, NodeFn

from orchestra import END, START, Budget, Graph, NodeContext, NodeError, RunOutcome, RunStatus
from orchestra.errors import RunNotFoundError, RunStatusError, StopAllActiveError
from orchestra.events import NodeFinished, NodeStarted, RunFinished, RunStarted, StepCommitted
from orchestra.store import SQLiteStore, Store
from orchestra.store.base import RunRecord
from runtime.graphs import State, boom, collect, graph_of, parallel, record

pytestmark = pytest.mark.anyio


# -- abort and stop-all ------------------------------------------------------------------


async def test_abort_stops_a_hanging_run_with_the_reason(store: Store) -> None:
    """abort cancels the node in flight; the run ends aborted with the reason."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)

    async def abort() -> None:
        record = await app.abort("r1", "operator says stop")
        assert (record.status, record.abort_requested) == ("running", "operator says stop")

    outcome = await run_until(app, Ticks(), "r1", entered, abort)
    assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "operator says stop")
    record = await store.get_run("r1")
    assert (record.status, record.reason, record.owner) == ("aborted", "operator says stop", None)


async def test_abort_stops_a_streamed_run(store: Store) -> None:
    """abort also stops a run driven through app.stream."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    finished: list[RunFinished] = []

    async def consume() -> None:
        async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
            async for event in events:
                if isinstance(event, RunFinished):
                    finished.append(event)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await entered.wait()
            await app.abort("r1", "stop the stream")
    [event] = finished
    assert (event.status, event.reason) == ("aborted", "stop the stream")
    assert (await store.get_run("r1")).status == "aborted"


async def test_closing_a_stream_early_records_the_run_aborted(store: Store) -> None:
    """A reader that stops reading leaves a run at rest, resumable at once."""
    app = ticker(6).compile(store=store)
    async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
        async for event in events:
            if isinstance(event, StepCommitted) and event.step == 2:
                break
    record = await store.get_run("r1")
    assert (record.status, record.owner, record.step) == ("aborted", None, 2)
    outcome = await app.resume("r1")
    assert outcome.state == await uninterrupted(ticker(6), Ticks())


async def test_closing_a_stream_mid_run_says_the_reader_closed_it(store: Store) -> None:
    """A run whose stream was closed while it ran is stored aborted with that reason."""
    app = ticker(6).compile(store=store)
    async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
        async for event in events:
            if isinstance(event, StepCommitted) and event.step == 2:
                break
    record = await store.get_run("r1")
    assert (record.status, record.reason) == (
        "aborted",
        "the event stream was closed by its reader",
    )


async def test_closing_a_stream_after_a_failed_step_records_the_failure(store: Store) -> None:
    """A reader that stops at a failure leaves the run stored failed with its error, not
    aborted."""

    async def broken(state: Ticks, ctx: NodeContext) -> None:
        raise RuntimeError("broken for good")

    app = chain(("one", step_one), ("broken", broken)).compile(store=store)
    async with contextlib.aclosing(app.stream(Ticks(), run_id="r1")) as events:
        async for event in events:
            if isinstance(event, NodeFinished) and event.error is not None:
                break
    record = await store.get_run("r1")
    assert (record.status, record.reason, record.owner) == ("failed", None, None)
    assert record.error is not None
    assert "broken for good" in record.error


async def test_abort_keeps_the_last_checkpoint(store: Store) -> None:
    """An aborted run's state is the state before the step that was cancelled."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    outcome = await run_until(app, Ticks(), "r1", entered, lambda: app.abort("r1", "stop"))
    assert [r.step for r in await store.checkpoints("r1")] == [0, 1]
    assert await app.load_state("r1") == Ticks(count=1, notes=["one"])
    assert outcome.state == Ticks(count=1, notes=["one"])


async def test_aborted_run_can_be_resumed(store: Store) -> None:
    """An aborted run resumes from its last checkpoint."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    await run_until(app, Ticks(), "r1", entered, lambda: app.abort("r1", "stop"))

    async def fixed(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": "fixed"}

    outcome = await chain(("one", step_one), ("hang", fixed)).compile(store=store).resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == Ticks(count=1, notes=["one", "fixed"])


async def test_abort_from_another_store_object_stops_the_run(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    """An operator's store on the same file (another process) aborts the run."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=sqlite_store)
    operator = SQLiteStore(tmp_path / "runs.db")
    try:
        outcome = await run_until(
            app, Ticks(), "r1", entered, lambda: operator.request_abort("r1", "from the CLI")
        )
        assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "from the CLI")
        assert (await operator.get_run("r1")).status == "aborted"
    finally:
        await operator.aclose()


def spinner(limit: int) -> Graph[Ticks]:
    """One node looping ``limit`` times that never awaits: while a step runs, the event loop
    gets no turn (CPU-bound work, a blocking library call)."""

    async def spin(state: Ticks, ctx: NodeContext) -> dict[str, Any]:
        sum(range(20_000))
        return {"count": state.count + 1}

    def again(state: Ticks) -> str:
        return "spin" if state.count < limit else END

    graph: Graph[Ticks] = Graph(Ticks, name="spinner")
    graph.add_node("spin", spin)
    graph.add_edge(START, "spin")
    graph.add_route("spin", again, targets=["spin", END])
    return graph


@contextlib.contextmanager
def another_process(path: Path, work: Callable[[SQLiteStore], Awaitable[None]]) -> Iterator[None]:
    """Run ``work`` with its own store on ``path`` in a thread with its own event loop, as
    another process would; on exit, wait for it and raise what it raised."""
    errors: list[Exception] = []

    async def main() -> None:
        with anyio.fail_after(10):
            async with SQLiteStore(path, lease_seconds=LEASE, poll_seconds=POLL) as store:
                await work(store)

    def thread_main() -> None:
        try:
            anyio.run(main)
        except Exception as exc:  # handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if errors:
        raise errors[0]


async def until_step(store: Store, run_id: str, step: int) -> RunRecord:
    """Wait until the run exists and has committed ``step`` (or stopped); return its row."""
    # the run is driven elsewhere: its row is the only thing to watch
    while True:
        with contextlib.suppress(RunNotFoundError):
            record = await store.get_run(run_id)
            if record.step >= step or record.status != "running":
                return record
        await anyio.sleep(0.005)


async def test_abort_stops_a_run_whose_nodes_never_yield(tmp_path: Path) -> None:
    """A run that never gives the event loop a turn still notices an abort between steps."""
    path, limit = tmp_path / "runs.db", 5_000

    async def abort(operator: SQLiteStore) -> None:
        await until_step(operator, "r1", 3)
        await operator.request_abort("r1", "operator says stop")

    async with SQLiteStore(
        path, durability="normal", lease_seconds=LEASE, poll_seconds=POLL
    ) as store:
        app = spinner(limit).compile(store=store, budget=Budget(steps=None))
        with another_process(path, abort):
            outcome = await app.run(Ticks(), run_id="r1")
        assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "operator says stop")
        assert outcome.steps < limit
        assert (await store.get_run("r1")).status == "aborted"


async def test_lease_of_a_run_whose_nodes_never_yield_is_renewed(tmp_path: Path) -> None:
    """A run that never gives the event loop a turn still renews its lease between steps."""
    path = tmp_path / "runs.db"
    seen: list[tuple[RunRecord, float]] = []

    async def observe(observer: SQLiteStore) -> None:
        await until_step(observer, "r1", 1)
        await anyio.sleep(3 * LEASE)  # only renewals keep the lease live this long
        seen.append((await observer.get_run("r1"), time.time()))
        await observer.request_abort("r1", "seen enough")

    async with SQLiteStore(
        path, durability="normal", lease_seconds=LEASE, poll_seconds=POLL
    ) as store:
        app = spinner(20_000).compile(store=store, budget=Budget(steps=None))
        with another_process(path, observe):
            outcome = await app.run(Ticks(), run_id="r1")
    [(record, now)] = seen
    assert record.status == "running"
    assert record.lease_live(now)
    assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "seen enough")


async def test_run_cancelled_by_its_caller_is_recorded_aborted(store: Store) -> None:
    """A caller that cancels app.run leaves a run at rest, resumable at once."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    with anyio.fail_after(5), anyio.CancelScope() as caller:
        async with anyio.create_task_group() as group:
            group.start_soon(functools.partial(app.run, Ticks(), run_id="r1"))
            await entered.wait()
            caller.cancel()
    record = await store.get_run("r1")
    assert (record.status, record.owner, record.step) == ("aborted", None, 1)
    assert await app.load_state("r1") == Ticks(count=1, notes=["one"])


async def test_abort_of_a_run_at_rest_marks_it_aborted(store: Store) -> None:
    """A run with no owner is aborted at once, its checkpoints kept."""
    app = ticker(6).compile(store=store, budget=Budget(steps=2))
    stopped = await app.run(Ticks(), run_id="r1")
    record = await app.abort("r1", "not needed any more")
    assert (record.status, record.reason) == ("aborted", "not needed any more")
    assert (await store.get_run("r1")).status == "aborted"
    assert await app.load_state("r1") == stopped.state


async def test_abort_of_a_completed_run_raises_run_status_error(store: Store) -> None:
    """A completed run cannot be aborted."""
    app = ticker(2).compile(store=store)
    await app.run(Ticks(), run_id="r1")
    with pytest.raises(RunStatusError):
        await app.abort("r1", "too late")


async def test_stop_all_aborts_a_running_run(store: Store) -> None:
    """stop-all stops a run in flight with its reason."""
    entered = anyio.Event()
    app = chain(("one", step_one), ("hang", hanging(entered))).compile(store=store)
    affected: list[list[str]] = []

    async def stop_all() -> None:
        affected.append(await store.stop_all("maintenance"))

    outcome = await run_until(app, Ticks(), "r1", entered, stop_all)
    assert affected == [["r1"]]
    assert (outcome.status, outcome.stop_reason) == (RunStatus.ABORTED, "maintenance")
    assert (await store.get_run("r1")).status == "aborted"


async def test_stop_all_refuses_new_runs_until_released(store: Store) -> None:
    """Under stop-all no run starts or resumes; after release they do."""
    app = ticker(3).compile(store=store, budget=Budget(steps=1))
    await app.run(Ticks(), run_id="r1")
    await store.stop_all("maintenance")
    with pytest.raises(StopAllActiveError, match="maintenance"):
        await app.run(Ticks(), run_id="r2")
    with pytest.raises(StopAllActiveError):
        await ticker(3).compile(store=store).resume("r1")
    with pytest.raises(RunNotFoundError):
        await store.get_run("r2")
    await store.release_stop_all()
    assert (await app.run(Ticks(), run_id="r2")).status is RunStatus.BUDGET_EXCEEDED
    assert (await ticker(3).compile(store=store).resume("r1")).status is RunStatus.COMPLETED


# -- stream -----------------------------------------------------------------------------------


async def test_stream_yields_events_in_order() -> None:
    """stream() yields RunStarted, per step NodeStarted/NodeFinished/StepCommitted, RunFinished."""
    app = graph_of({"a": record(), "b": record()}, [(START, "a"), ("a", "b"), ("b", END)])
    events = await collect(app, State(), run_id="s-1")
    kinds = [(type(e).__name__, getattr(e, "step", None), getattr(e, "node", None)) for e in events]
    assert kinds == [
        ("RunStarted", 0, None),
        ("NodeStarted", 1, "a"),
        ("NodeFinished", 1, "a"),
        ("StepCommitted", 1, None),
        ("NodeStarted", 2, "b"),
        ("NodeFinished", 2, "b"),
        ("StepCommitted", 2, None),
        ("RunFinished", None, None),
    ]
    assert all(e.run_id == "s-1" for e in events)


async def test_stream_step_committed_names_nodes_changes_and_next() -> None:
    """StepCommitted names the step's tasks, the fields changed and the next tasks."""
    app = graph_of({"a": record(), "b": record()}, [(START, "a"), ("a", "b"), ("b", END)])
    committed = [e for e in await collect(app, State()) if isinstance(e, StepCommitted)]
    assert [(e.nodes, e.changed, e.next) for e in committed] == [
        (("a",), ("log",), ("b",)),
        (("b",), ("log",), ()),
    ]


async def test_stream_parallel_step_reports_every_node() -> None:
    """A parallel step reports a start and a finish for each node before its commit."""
    events = await collect(parallel("x", "y", "z"), State())
    step_events = events[1:-1]
    assert isinstance(step_events[-1], StepCommitted)
    started = sorted(e.node for e in step_events if isinstance(e, NodeStarted))
    finished = sorted(e.node for e in step_events if isinstance(e, NodeFinished))
    assert started == finished == ["x", "y", "z"]
    assert step_events[-1].nodes == ("x", "y", "z")


async def test_stream_run_finished_carries_the_outcome() -> None:
    """The last streamed event is RunFinished carrying what run() would return."""
    app = graph_of({"a": record()}, [(START, "a"), ("a", END)])
    events = await collect(app, State(), run_id="same")
    first, last = events[0], events[-1]
    assert isinstance(first, RunStarted)
    assert first.graph == "State"
    assert isinstance(last, RunFinished)
    assert last.status == "completed"
    assert last.steps == 1
    assert isinstance(last.outcome, RunOutcome)
    ran = await app.run(State(), run_id="same")
    assert last.outcome.state == ran.state
    assert last.outcome.status is ran.status
    assert last.outcome.steps == ran.steps


async def test_stream_failed_run_reports_the_error() -> None:
    """A failing node's NodeFinished and the RunFinished event carry the error."""
    app = graph_of({"b": boom}, [(START, "b"), ("b", END)])
    events = await collect(app, State())
    finished = next(e for e in events if isinstance(e, NodeFinished))
    assert finished.error is not None
    assert "boom" in finished.error
    last = events[-1]
    assert isinstance(last, RunFinished)
    assert last.status == "failed"
    assert last.error is not None
    assert "boom" in last.error
    assert last.outcome is not None
    assert isinstance(last.outcome.error, NodeError)
    assert not any(isinstance(e, StepCommitted) for e in events)


async def test_stream_stops_when_the_caller_stops_reading() -> None:
    """Closing the stream after a step runs no further nodes."""
    ran: list[str] = []

    def tracked(name: str) -> NodeFn:
        async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
            ran.append(name)
            return {"log": name}

        return node

    app = graph_of({"a": tracked("a"), "b": tracked("b")}, [(START, "a"), ("a", "b"), ("b", END)])
    async with aclosing(app.stream(State())) as events:
        async for event in events:
            if isinstance(event, StepCommitted):
                break
    assert ran == ["a"]


async def test_stream_run_finished_of_a_failed_run_converts_to_a_dict() -> None:
    """The RunFinished event of a failed run turns into a dict like any other event."""
    app = graph_of({"b": boom}, [(START, "b"), ("b", END)])
    last = (await collect(app, State()))[-1]
    data = last.to_dict()
    assert data["event"] == "run_finished"
    assert data["status"] == "failed"
    assert "boom" in data["error"]
    assert "outcome" not in data


@pytest.mark.parametrize("run_id", ["", "   ", 42])
async def test_run_refuses_a_bad_run_id_before_anything_runs(run_id: Any) -> None:
    """A run id that is not a non-empty string is refused before any node runs."""
    ran: list[str] = []

    async def node(state: State, ctx: NodeContext) -> None:
        ran.append(ctx.node)

    app = graph_of({"a": node}, [(START, "a"), ("a", END)])
    with pytest.raises(ValueError, match="run_id must be a non-empty string"):
        await app.run(State(), run_id=run_id)
    assert ran == []
