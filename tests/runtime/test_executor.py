"""The superstep executor: the flow of a run, merge order and isolation, failures, timeouts and
retries, concurrency, budgets, input and updates, context and usage, on asyncio and trio."""

from __future__ import annotations

import itertools
import random
import time
from contextlib import aclosing
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import NodeFn
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Budget,
    CompiledGraph,
    Graph,
    NodeContext,
    NodeError,
    RetryPolicy,
    RunStatus,
    Send,
    StateConflictError,
)
from orchestra.errors import InputValidationError, InvalidUpdateError, NodeTimeoutError
from orchestra.events import Event, NodeFinished, NodeRetried, RunFinished, StepCommitted
from runtime.graphs import State, boom, collect, graph_of, join_graph, parallel, record

pytestmark = pytest.mark.anyio


# -- flow -------------------------------------------------------------------------------------


async def test_run_linear_chain_completes() -> None:
    """A chain runs its nodes one per step, in order, and completes."""
    app = graph_of(
        {"a": record(), "b": record(), "c": record()},
        [(START, "a"), ("a", "b"), ("b", "c"), ("c", END)],
    )
    outcome = await app.run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.ok
    assert outcome.error is None
    assert outcome.state.log == ["a", "b", "c"]
    assert outcome.steps == 3
    assert outcome.next == ()


async def test_run_accepts_a_dict_input_and_a_run_id() -> None:
    """run() takes a dict as input and uses the given run id."""
    app = graph_of({"a": record()}, [(START, "a"), ("a", END)])
    outcome = await app.run({"note": "hi"}, run_id="run-42")
    assert outcome.run_id == "run-42"
    assert outcome.state.note == "hi"
    assert isinstance(outcome.state, State)


async def test_run_makes_a_new_run_id_for_every_run() -> None:
    """Runs without a run id get distinct generated ids."""
    app = graph_of({"a": record()}, [(START, "a"), ("a", END)])
    first, second = await app.run(State()), await app.run(State())
    assert first.run_id != second.run_id
    assert len(first.run_id) == 16


async def test_run_does_not_change_the_input_state() -> None:
    """The input state object is left as it was."""
    app = graph_of({"a": record()}, [(START, "a"), ("a", END)])
    given = State(log=["x"])
    outcome = await app.run(given)
    assert given.log == ["x"]
    assert outcome.state.log == ["x", "a"]


# -- merge order and isolation --------------------------------------------------------------


async def test_run_merge_order_is_by_node_name_whatever_the_completion_order() -> None:
    """Writes merge in node-name order for every completion order of the step's nodes."""
    names = ("d", "b", "a", "c")
    completions: set[tuple[str, ...]] = set()
    for order in itertools.permutations(names):
        finished: list[str] = []
        turn = {name: anyio.Event() for name in order}

        def ordered(
            name: str,
            order: tuple[str, ...] = order,
            turn: dict[str, anyio.Event] = turn,
            finished: list[str] = finished,
        ) -> NodeFn:
            async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
                position = order.index(name)
                if position:
                    await turn[order[position - 1]].wait()
                finished.append(name)
                turn[name].set()
                return {"log": name}

            return node

        outcome = await parallel(*names, fn=ordered).run(State())
        completions.add(tuple(finished))
        assert outcome.state.log == ["a", "b", "c", "d"], order
    assert len(completions) == 24


async def test_run_merge_order_of_sends_is_by_task_index_under_random_delays() -> None:
    """Send tasks finishing in random order merge in task-index order."""
    completions: set[tuple[int, ...]] = set()
    for seed in range(15):
        rng = random.Random(seed)
        delays = [rng.uniform(0, 0.004) for _ in range(6)]
        finished: list[int] = []

        async def work(
            payload: int,
            ctx: NodeContext,
            delays: list[float] = delays,
            finished: list[int] = finished,
        ) -> Any:
            await anyio.sleep(delays[payload])
            finished.append(payload)
            return {"log": f"item-{payload}"}

        graph = Graph(State)
        graph.add_node("work", work)
        graph.add_route(START, lambda s: [Send("work", i) for i in range(6)], targets=["work"])
        graph.add_edge("work", END)
        outcome = await graph.compile().run(State())
        completions.add(tuple(finished))
        assert outcome.state.log == [f"item-{i}" for i in range(6)], seed
    assert len(completions) > 1


async def test_run_merge_order_puts_edge_task_before_send_tasks_of_a_node() -> None:
    """A node triggered by an edge and by Sends runs the edge task first (index 0)."""
    seen: list[tuple[int, Any]] = []

    async def work(payload: Any, ctx: NodeContext) -> dict[str, Any]:
        await anyio.sleep(0.001 * (3 - ctx.task))
        label = "edge" if isinstance(payload, State) else str(payload)
        seen.append((ctx.task, label))
        return {"log": label}

    graph = Graph(State)
    graph.add_node("split", record())
    graph.add_node("work", work)
    graph.add_edge(START, "split")
    graph.add_edge("split", "work")
    graph.add_route("split", lambda s: [Send("work", "p1"), Send("work", "p2")], targets=["work"])
    graph.add_edge("work", END)
    outcome = await graph.compile().run(State())
    assert sorted(seen) == [(0, "edge"), (1, "p1"), (2, "p2")]
    assert outcome.state.log == ["split", "edge", "p1", "p2"]


async def test_run_nodes_do_not_see_each_others_writes_within_a_step() -> None:
    """A node reads the state as it was at the start of the step, not a sibling's write."""
    wrote = anyio.Event()
    seen: list[tuple[int, int]] = []

    async def writer(state: State, ctx: NodeContext) -> dict[str, Any]:
        wrote.set()
        return {"value": 1}

    async def reader(state: State, ctx: NodeContext) -> dict[str, Any]:
        await wrote.wait()
        await anyio.sleep(0.002)
        seen.append((state.value, ctx.state.value))
        return {"note": "read"}

    app = graph_of(
        {"writer": writer, "reader": reader},
        [(START, "writer"), (START, "reader"), ("writer", END), ("reader", END)],
    )
    outcome = await app.run(State())
    assert seen == [(0, 0)]
    assert outcome.state.value == 1


async def test_run_plain_field_conflict_fails_the_run_naming_nodes_field_and_step() -> None:
    """Two nodes writing one plain field in a step fail the run with StateConflictError."""

    def writes_value(name: str) -> NodeFn:
        async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
            # the first writer by name finishes last: order must not follow completion
            await anyio.sleep(0.005 if name == "alpha" else 0)
            return {"value": len(name)}

        return node

    app = graph_of(
        {"first": record(), "zeta": writes_value("zeta"), "alpha": writes_value("alpha")},
        [
            (START, "first"),
            ("first", "zeta"),
            ("first", "alpha"),
            ("zeta", END),
            ("alpha", END),
        ],
    )
    outcome = await app.run(State(), run_id="clash")
    assert outcome.status is RunStatus.FAILED
    error = outcome.error
    assert isinstance(error, StateConflictError)
    assert error.writers == ("alpha", "zeta")
    assert error.field == "value"
    assert error.step == 2
    assert error.run_id == "clash"
    for part in ("'alpha'", "'zeta'", "'value'", "step 2", "clash"):
        assert part in str(error)
    assert outcome.state.log == ["first"]
    assert outcome.steps == 1


# -- failures ---------------------------------------------------------------------------------


async def test_run_node_exception_fails_the_run_with_node_error() -> None:
    """A node raising fails the run with NodeError naming run, step and node."""
    app = graph_of({"a": record(), "b": boom}, [(START, "a"), ("a", "b"), ("b", END)])
    outcome = await app.run(State(), run_id="r-1")
    assert outcome.status is RunStatus.FAILED
    error = outcome.error
    assert isinstance(error, NodeError)
    assert (error.run_id, error.step, error.node) == ("r-1", 2, "b")
    for part in ("r-1", "step 2", "'b'", "ValueError", "boom"):
        assert part in str(error)


async def test_run_node_error_chains_the_original_exception() -> None:
    """The NodeError of a failed node has the node's exception as __cause__."""
    app = graph_of({"b": boom}, [(START, "b"), ("b", END)])
    outcome = await app.run(State())
    assert isinstance(outcome.error, NodeError)
    assert isinstance(outcome.error.__cause__, ValueError)
    assert str(outcome.error.__cause__) == "boom"


async def test_run_node_exception_in_a_parallel_step_fails_the_run() -> None:
    """A node raising while siblings run fails the run and cancels the siblings."""
    finished: list[str] = []

    async def slow(state: State, ctx: NodeContext) -> dict[str, Any]:
        await anyio.sleep(5)
        finished.append("slow")
        return {"log": "slow"}

    started = time.monotonic()
    app = graph_of(
        {"bad": boom, "slow": slow},
        [(START, "bad"), (START, "slow"), ("bad", END), ("slow", END)],
    )
    outcome = await app.run(State())
    assert time.monotonic() - started < 2
    assert isinstance(outcome.error, NodeError)
    assert outcome.error.node == "bad"
    assert finished == []


async def test_run_raise_for_status_raises_the_error_of_a_failed_run() -> None:
    """raise_for_status() raises the run's error when it failed."""
    app = graph_of({"b": boom}, [(START, "b"), ("b", END)])
    outcome = await app.run(State())
    with pytest.raises(NodeError) as caught:
        outcome.raise_for_status()
    assert caught.value is outcome.error


async def test_run_raise_for_status_returns_a_completed_outcome() -> None:
    """raise_for_status() returns the outcome itself when the run completed."""
    app = graph_of({"a": record()}, [(START, "a"), ("a", END)])
    outcome = await app.run(State())
    assert outcome.raise_for_status() is outcome


async def test_run_failed_step_does_not_change_the_state() -> None:
    """When a step fails, the outcome's state is the last committed one."""

    async def write(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"value": state.value + 1, "log": ctx.node}

    app = graph_of(
        {"first": write, "second": write, "bad": boom},
        [
            (START, "first"),
            ("first", "second"),
            ("first", "bad"),
            ("second", END),
            ("bad", END),
        ],
    )
    outcome = await app.run(State())
    assert outcome.status is RunStatus.FAILED
    assert outcome.state.value == 1
    assert outcome.state.log == ["first"]
    assert outcome.steps == 1
    assert set(outcome.next) == {"bad", "second"}


async def test_run_node_timeout_fails_with_node_timeout_error() -> None:
    """A node running past its timeout fails the run with NodeTimeoutError."""

    async def hang(state: State, ctx: NodeContext) -> None:
        await anyio.sleep(5)

    graph = Graph(State)
    graph.add_node("hang", hang, timeout=0.01)
    graph.add_edge(START, "hang")
    graph.add_edge("hang", END)
    started = time.monotonic()
    outcome = await graph.compile().run(State())
    assert time.monotonic() - started < 1
    assert outcome.status is RunStatus.FAILED
    error = outcome.error
    assert isinstance(error, NodeTimeoutError)
    assert isinstance(error, NodeError)
    assert error.node == "hang"
    assert error.timeout == 0.01
    assert isinstance(error.__cause__, TimeoutError)


async def test_run_node_timeout_in_a_parallel_step() -> None:
    """A node timing out while a sibling runs fails the run with NodeTimeoutError."""

    async def hang(state: State, ctx: NodeContext) -> None:
        await anyio.sleep(5)

    graph = Graph(State)
    graph.add_node("hang", hang, timeout=0.01)
    graph.add_node("ok", record())
    for name in ("hang", "ok"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    outcome = await graph.compile().run(State())
    assert isinstance(outcome.error, NodeTimeoutError)
    assert outcome.error.node == "hang"
    assert outcome.state.log == []


async def test_run_node_within_its_timeout_succeeds() -> None:
    """A node finishing within its timeout is unaffected by it."""
    graph = Graph(State)
    graph.add_node("quick", record(), timeout=1)
    graph.add_edge(START, "quick")
    graph.add_edge("quick", END)
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.COMPLETED


def flaky(failures: int, error: type[Exception] = ConnectionError) -> tuple[NodeFn, list[int]]:
    """A node failing its first ``failures`` attempts; returns it and its attempt log."""
    attempts: list[int] = []

    async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
        attempts.append(len(attempts) + 1)
        if len(attempts) <= failures:
            raise error(f"attempt {len(attempts)} failed")
        return {"log": "ok"}

    return node, attempts


def retrying(fn: NodeFn, retry: RetryPolicy | int) -> CompiledGraph[Any]:
    graph = Graph(State)
    graph.add_node("flaky", fn, retry=retry)
    graph.add_edge(START, "flaky")
    graph.add_edge("flaky", END)
    return graph.compile()


FAST = {"backoff": 0.001, "jitter": 0.0}


async def test_run_retry_succeeds_on_the_third_attempt() -> None:
    """A node failing twice succeeds on its third attempt with attempts=3."""
    node, attempts = flaky(2)
    outcome = await retrying(node, RetryPolicy(attempts=3, **FAST)).run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert attempts == [1, 2, 3]
    assert outcome.state.log == ["ok"]


async def test_run_retry_gives_up_after_its_attempts() -> None:
    """A node failing every attempt fails the run after exactly `attempts` tries."""
    node, attempts = flaky(10)
    outcome = await retrying(node, RetryPolicy(attempts=3, **FAST)).run(State())
    assert outcome.status is RunStatus.FAILED
    assert attempts == [1, 2, 3]
    assert isinstance(outcome.error, NodeError)
    assert outcome.error.attempts == 3
    assert "after 3 attempts" in str(outcome.error)
    assert isinstance(outcome.error.__cause__, ConnectionError)


async def test_run_retry_does_not_retry_other_exceptions() -> None:
    """An exception not listed in `on` fails the run at the first attempt."""
    node, attempts = flaky(1, error=ValueError)
    policy = RetryPolicy(attempts=3, on=(ConnectionError,), **FAST)
    outcome = await retrying(node, policy).run(State())
    assert outcome.status is RunStatus.FAILED
    assert attempts == [1]
    assert isinstance(outcome.error, NodeError)
    assert outcome.error.attempts == 1


def test_retry_as_a_number_means_that_many_attempts() -> None:
    """retry=N on add_node means a default RetryPolicy with N attempts."""
    node, _ = flaky(1)
    graph = Graph(State)
    graph.add_node("flaky", node, retry=2)
    graph.add_edge(START, "flaky")
    graph.add_edge("flaky", END)
    spec = graph.compile().nodes["flaky"]
    assert spec.retry == RetryPolicy(attempts=2)


async def test_run_retry_also_retries_timeouts() -> None:
    """A timed-out attempt is retried like a failed one."""
    attempts: list[int] = []

    async def slow_then_fast(state: State, ctx: NodeContext) -> dict[str, Any]:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            await anyio.sleep(5)
        return {"log": "ok"}

    graph = Graph(State)
    graph.add_node("n", slow_then_fast, timeout=0.01, retry=RetryPolicy(attempts=2, **FAST))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    outcome = await graph.compile().run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert attempts == [1, 2]


async def test_stream_retry_emits_node_retried_events() -> None:
    """Every retry is reported as a NodeRetried event with its attempt and error."""
    node, _ = flaky(2)
    events = await collect(retrying(node, RetryPolicy(attempts=3, **FAST)), State())
    retried = [e for e in events if isinstance(e, NodeRetried)]
    assert [e.attempt for e in retried] == [1, 2]
    assert [e.delay for e in retried] == [0.001, 0.002]
    assert all(e.node == "flaky" and e.step == 1 for e in retried)
    assert "ConnectionError" in retried[0].error
    assert "attempt 1 failed" in retried[0].error
    finished = next(e for e in events if isinstance(e, NodeFinished))
    assert finished.attempts == 3
    assert finished.error is None


def test_retry_policy_delay_grows_and_is_capped() -> None:
    """RetryPolicy.delay grows by its multiplier up to max_backoff."""
    policy = RetryPolicy(backoff=0.1, multiplier=2, max_backoff=0.3, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]


@pytest.mark.parametrize(
    "options", [{"attempts": 0}, {"backoff": -1}, {"multiplier": 0.5}, {"jitter": 2}]
)
def test_retry_policy_refuses_bad_values(options: dict[str, Any]) -> None:
    """RetryPolicy refuses values that make no sense."""
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**options)


# -- concurrency ----------------------------------------------------------------------------


async def test_run_runs_a_steps_nodes_concurrently() -> None:
    """Nodes of one step run concurrently: each waits for all the others to start."""
    names = ("a", "b", "c")
    started: list[str] = []
    everyone = anyio.Event()

    def meet(name: str) -> NodeFn:
        async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
            started.append(name)
            if len(started) == len(names):
                everyone.set()
            with anyio.fail_after(1):
                await everyone.wait()
            return {"log": name}

        return node

    outcome = await parallel(*names, fn=meet).run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.log == ["a", "b", "c"]


async def test_run_max_concurrency_limits_running_tasks() -> None:
    """No more than max_concurrency tasks run at once."""
    running = 0
    peak = 0

    async def work(payload: int, ctx: NodeContext) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.002)
        running -= 1
        return {"total": payload}

    graph = Graph(State)
    graph.add_node("work", work)
    graph.add_route(START, lambda s: [Send("work", 1) for _ in range(10)], targets=["work"])
    graph.add_edge("work", END)
    outcome = await graph.compile(max_concurrency=3).run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.total == 10
    assert peak == 3


async def test_run_without_max_concurrency_runs_every_task_at_once() -> None:
    """Without max_concurrency, all of a step's tasks run at once."""
    running = 0
    peak = 0

    async def work(payload: int, ctx: NodeContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.002)
        running -= 1

    graph = Graph(State)
    graph.add_node("work", work)
    graph.add_route(START, lambda s: [Send("work", i) for i in range(10)], targets=["work"])
    graph.add_edge("work", END)
    await graph.compile().run(State())
    assert peak == 10


# -- budgets --------------------------------------------------------------------------------


def endless_counter(**options: Any) -> CompiledGraph[Any]:
    async def count(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"count": state.count + 1}

    graph = Graph(State)
    graph.add_node("count", count)
    graph.add_edge(START, "count")
    graph.add_route("count", lambda s: "count", targets=["count", END])
    return graph.compile(**options)


async def test_run_step_budget_stops_the_run() -> None:
    """A run using up its step budget stops with budget_exceeded, a reason and next nodes."""
    outcome = await endless_counter(budget=Budget(steps=3)).run(State())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert outcome.steps == 3
    assert outcome.state.count == 3
    assert outcome.stop_reason is not None
    assert "step budget" in outcome.stop_reason
    assert outcome.next == ("count",)
    assert outcome.error is None
    assert not outcome.ok


async def test_run_step_budget_allows_exactly_that_many_steps() -> None:
    """A run needing exactly as many steps as its budget allows completes."""
    app = graph_of(
        {"a": record(), "b": record(), "c": record()},
        [(START, "a"), ("a", "b"), ("b", "c"), ("c", END)],
        budget=Budget(steps=3),
    )
    outcome = await app.run(State())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.steps == 3


async def test_run_default_budget_bounds_an_endless_loop() -> None:
    """A graph compiled without a budget still stops after the default step limit."""
    outcome = await endless_counter().run(State())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert outcome.steps == Budget().steps


async def test_run_wall_time_budget_cancels_a_hanging_node() -> None:
    """A node hanging past the wall-time budget is cancelled; the last commit stands."""

    async def hang(state: State, ctx: NodeContext) -> dict[str, Any]:
        await anyio.sleep_forever()
        return {"value": 99}  # pragma: no cover

    async def first(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"value": 1}

    app = graph_of(
        {"first": first, "hang": hang},
        [(START, "first"), ("first", "hang"), ("hang", END)],
        budget=Budget(wall_seconds=0.05),
    )
    started = time.monotonic()
    outcome = await app.run(State())
    assert time.monotonic() - started < 2
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert outcome.state.value == 1
    assert outcome.steps == 1
    assert outcome.stop_reason is not None
    assert "wall-time" in outcome.stop_reason
    assert outcome.next == ("hang",)


async def test_stream_wall_time_budget_cancels_a_hanging_node() -> None:
    """stream() also stops a hanging node at the wall-time budget and ends with RunFinished."""

    async def hang(state: State, ctx: NodeContext) -> None:
        await anyio.sleep_forever()

    app = graph_of(
        {"first": record(), "hang": hang},
        [(START, "first"), ("first", "hang"), ("hang", END)],
        budget=Budget(wall_seconds=0.05),
    )
    events = await collect(app, State())
    last = events[-1]
    assert isinstance(last, RunFinished)
    assert last.status == "budget_exceeded"
    assert last.outcome is not None
    assert last.outcome.state.log == ["first"]
    assert [e.step for e in events if isinstance(e, StepCommitted)] == [1]


def test_budget_refuses_bad_limits() -> None:
    """Budget refuses a step limit below 1 and a non-positive wall time."""
    with pytest.raises(ValueError, match="steps"):
        Budget(steps=0)
    with pytest.raises(ValueError, match="wall_seconds"):
        Budget(wall_seconds=0)


# -- input and updates ------------------------------------------------------------------------


async def test_run_invalid_input_raises_before_anything_runs() -> None:
    """Input that does not fit the state model raises InputValidationError; no node runs."""
    ran: list[str] = []

    async def node(state: State, ctx: NodeContext) -> None:
        ran.append("node")

    app = graph_of({"a": node}, [(START, "a"), ("a", END)])
    with pytest.raises(InputValidationError) as caught:
        await app.run({"count": "many"})
    assert "count" in str(caught.value)
    assert caught.value.state_model == "State"
    assert ran == []


async def test_run_input_of_another_model_is_refused() -> None:
    """An instance of a different model is refused as input."""

    class Other(BaseModel):
        count: int = 0

    app = graph_of({"a": record()}, [(START, "a"), ("a", END)])
    with pytest.raises(InputValidationError, match="Other"):
        await app.run(Other())


async def first_event(app: CompiledGraph[Any], input: Any) -> Event:
    async with aclosing(app.stream(input)) as events:
        return await anext(events)


async def test_stream_invalid_input_raises_before_any_event() -> None:
    """stream() with invalid input raises InputValidationError before any event or node."""
    ran: list[str] = []

    async def node(state: State, ctx: NodeContext) -> None:
        ran.append("node")

    app = graph_of({"a": node}, [(START, "a"), ("a", END)])
    with pytest.raises(InputValidationError):
        await first_event(app, {"count": "many"})
    assert ran == []


@pytest.mark.parametrize("returned", ["done", 42, ["a", "b"], object()])
async def test_run_invalid_update_type_fails_the_run(returned: Any) -> None:
    """A node returning something that is not an update fails with InvalidUpdateError."""

    async def node(state: State, ctx: NodeContext) -> Any:
        return returned

    app = graph_of({"bad": node}, [(START, "bad"), ("bad", END)])
    outcome = await app.run(State())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert outcome.error.node == "bad"
    assert outcome.error.step == 1


async def test_run_update_with_an_invalid_value_fails_the_run() -> None:
    """A node writing a value that does not validate fails with InvalidUpdateError."""

    async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"count": "many"}

    app = graph_of({"bad": node}, [(START, "bad"), ("bad", END)])
    outcome = await app.run(State())
    assert isinstance(outcome.error, InvalidUpdateError)
    assert "'count'" in str(outcome.error)


async def test_run_update_to_an_unknown_field_fails_the_run() -> None:
    """A node writing a field the state does not have fails with InvalidUpdateError."""

    async def node(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"colour": "red"}

    app = graph_of({"bad": node}, [(START, "bad"), ("bad", END)])
    outcome = await app.run(State())
    assert isinstance(outcome.error, InvalidUpdateError)
    assert "'colour'" in str(outcome.error)


async def test_run_update_as_a_state_instance_writes_only_the_fields_set() -> None:
    """A node returning a state instance writes only the fields it set explicitly."""

    async def set_value(state: State, ctx: NodeContext) -> State:
        return State(value=2)

    async def set_note(state: State, ctx: NodeContext) -> State:
        return State(note="n")

    app = graph_of(
        {"v": set_value, "n": set_note},
        [(START, "v"), (START, "n"), ("v", END), ("n", END)],
    )
    outcome = await app.run(State(count=5, log=["keep"]))
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.value == 2
    assert outcome.state.note == "n"
    assert outcome.state.count == 5
    assert outcome.state.log == ["keep"]


@pytest.mark.parametrize("input", [State(), {}], ids=["instance", "dict"])
async def test_run_update_as_a_copy_of_the_state_writes_only_what_changed(input: Any) -> None:
    """A node returning ``state.model_copy(update=...)`` changes that field only: reducer
    fields it carries unchanged are not added again."""

    async def first(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {"log": "first", "total": 5}

    async def draft(state: State, ctx: NodeContext) -> State:
        return state.model_copy(update={"note": "done"})

    app = graph_of(
        {"first": first, "draft": draft}, [(START, "first"), ("first", "draft"), ("draft", END)]
    )
    outcome = await app.run(input)
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == State(log=["first"], total=5, note="done")


async def test_run_update_as_a_state_instance_with_a_changed_reducer_field_fails() -> None:
    """A returned state instance whose reducer field changed is refused with
    InvalidUpdateError saying to return a dict."""

    async def add_to_log(state: State, ctx: NodeContext) -> State:
        return state.model_copy(update={"log": [*state.log, "more"]})

    app = graph_of({"add": add_to_log}, [(START, "add"), ("add", END)])
    outcome = await app.run(State(log=["kept"]))
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert (outcome.error.step, outcome.error.node) == (1, "add")
    assert "'log'" in str(outcome.error)
    assert "return a dict" in str(outcome.error)


async def test_run_node_returning_none_changes_nothing() -> None:
    """A node returning None (or an empty dict) leaves the state alone."""

    async def nothing(state: State, ctx: NodeContext) -> None:
        return None

    async def empty(state: State, ctx: NodeContext) -> dict[str, Any]:
        return {}

    app = graph_of({"n": nothing, "e": empty}, [(START, "n"), ("n", "e"), ("e", END)])
    outcome = await app.run(State(value=3))
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state == State(value=3)
    assert outcome.steps == 2


# -- context ----------------------------------------------------------------------------------


async def test_run_context_names_run_step_node_and_usage() -> None:
    """ctx carries the run id, step, node, task and a usage snapshot."""
    seen: list[tuple[str, int, str, int, int]] = []

    async def look(state: State, ctx: NodeContext) -> None:
        seen.append((ctx.run_id, ctx.step, ctx.node, ctx.task, ctx.usage.steps))
        ctx.log.debug("looked")

    app = graph_of({"a": look, "b": look}, [(START, "a"), ("a", "b"), ("b", END)])
    await app.run(State(), run_id="ctx-run")
    assert seen == [("ctx-run", 1, "a", 0, 0), ("ctx-run", 2, "b", 0, 1)]


# -- usage ------------------------------------------------------------------------------------


async def test_run_usage_counts_steps_and_tasks() -> None:
    """The outcome's usage counts the steps and tasks run."""
    outcome = await join_graph([]).run(State())
    assert outcome.usage.steps == 2
    assert outcome.usage.tasks == 3
    assert outcome.usage.wall_seconds >= 0
    assert outcome.usage.tokens == 0


async def test_run_usage_counts_the_tasks_of_a_failed_step() -> None:
    """A failed step's tasks are counted, but not as a committed step."""
    app = graph_of(
        {"a": record(), "b": boom, "c": record()},
        [(START, "a"), ("a", "b"), ("a", "c"), ("b", END), ("c", END)],
    )
    outcome = await app.run(State())
    assert outcome.usage.steps == 1
    assert outcome.usage.tasks == 3
