"""Running one task: a function node's update and goto, its timeout and retry policy, the
events a runner reports, and an agent's turn."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import END, START, Agent, Command, Graph, NodeContext, RetryPolicy, Send
from orchestra.errors import AgentOutputError, InvalidUpdateError, NodeError, NodeTimeoutError
from orchestra.events import Event, NodeFinished, NodeRetried, NodeStarted
from orchestra.models import Message, ModelResponse, ScriptedModel, ToolCall
from orchestra.runtime.gateway import Gateway
from orchestra.runtime.ledger import Ledger
from orchestra.runtime.meter import Meter
from orchestra.runtime.nodes import NodeRunner
from orchestra.runtime.tasks import Task, TaskResult
from orchestra.specs import NO_PAYLOAD

pytestmark = pytest.mark.anyio

NodeFn = Callable[[Any, NodeContext], Awaitable[Any]]


class S(BaseModel):
    count: int = 0
    answer: str = ""
    seen: list[Any] = []


def app_of(fn: NodeFn | Agent, **options: Any) -> Any:
    """Compile START -> the node (named ``work`` unless an agent) -> END, with a node
    ``other`` a Command may go to."""

    async def other(state: S, ctx: NodeContext) -> None:
        return None

    graph: Graph[S] = Graph(S)
    if isinstance(fn, Agent):
        graph.add_node(fn, targets=["other"])
        name = fn.name
    else:
        graph.add_node("work", fn, targets=["other"], **options)
        name = "work"
    graph.add_node("other", other)
    graph.add_edge(START, name)
    graph.add_edge(name, END)
    graph.add_edge("other", END)
    return graph.compile()


def runner_of(app: Any, *, watched: bool = False) -> NodeRunner:
    """The node runner of run r1 of ``app``, with a real gateway, ledger and meter, as the
    executor makes it; it reports events into the buffer it is given."""
    meter = Meter()
    gateway = Gateway(
        run_id="r1",
        ledger=Ledger("r1"),
        meter=meter,
        emit=lambda event, level: None,
        approvals=app.approvals,
        arbitration=app.arbitration,
    )
    return NodeRunner(
        app,
        "r1",
        gateway=gateway,
        usage=lambda: meter.usage(steps=0, tasks=0, wall_seconds=0.0),
        emit=lambda event, buffer, level: buffer.append(event),
        watched=watched,
        events=True,
    )


async def run_task(
    app: Any,
    task: Task | None = None,
    *,
    state: S | None = None,
    memory: dict[str, list[Message]] | None = None,
    watched: bool = False,
) -> tuple[TaskResult, list[Event]]:
    """Run one task (by default: the edge-started task of ``work``) at step 1."""
    buffer: list[Event] = []
    task = task or Task("work", 0, NO_PAYLOAD, "work")
    result = await runner_of(app, watched=watched).run(task, 1, state or S(), memory or {}, buffer)
    return result, buffer


def failing(times: int, error: type[Exception] = ConnectionError) -> NodeFn:
    """A node that raises ``error`` on its first ``times`` attempts, then counts."""
    attempts: list[int] = []

    async def fn(state: S, ctx: NodeContext) -> dict[str, Any]:
        attempts.append(1)
        if len(attempts) <= times:
            raise error(f"attempt {len(attempts)} failed")
        return {"count": len(attempts)}

    return fn


NO_WAIT = {"backoff": 0.0, "jitter": 0.0}


# -- function nodes -----------------------------------------------------------------------


async def test_node_runner_returns_a_function_nodes_update() -> None:
    """A node's returned dict is the task's update, with no goto and no error."""

    async def fn(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"count": state.count + 1}

    result, _ = await run_task(app_of(fn), state=S(count=2))
    assert (result.update, result.goto, result.error) == ({"count": 3}, (), None)


async def test_node_runner_gives_a_send_task_its_payload() -> None:
    """A task started by Send gets its payload as input; ctx.state is the run state."""

    async def fn(item: Any, ctx: NodeContext) -> dict[str, Any]:
        return {"seen": [item, ctx.state.count]}

    task = Task("work", 1, {"doc": 7}, "work[1]")
    result, _ = await run_task(app_of(fn), task, state=S(count=5))
    assert result.update == {"seen": [{"doc": 7}, 5]}


async def test_node_runner_splits_a_command_into_update_and_goto() -> None:
    """A returned Command gives the update and the declared targets to go to."""

    async def fn(state: S, ctx: NodeContext) -> Command:
        return Command(update={"answer": "yes"}, goto="other")

    result, _ = await run_task(app_of(fn))
    assert (result.update, result.goto) == ({"answer": "yes"}, ("other",))


async def test_node_runner_keeps_send_objects_as_goto() -> None:
    """Returned Send objects are the task's goto, with no update."""

    async def fn(state: S, ctx: NodeContext) -> list[Send]:
        return [Send("other", 1), Send("other", 2)]

    result, _ = await run_task(app_of(fn))
    assert (result.update, result.goto) == (None, (Send("other", 1), Send("other", 2)))


async def test_node_runner_returns_an_invalid_update_as_the_tasks_error() -> None:
    """A node returning something that is not an update fails its task, not the runner."""

    async def fn(state: S, ctx: NodeContext) -> int:
        return 42

    result, _ = await run_task(app_of(fn))
    assert isinstance(result.error, InvalidUpdateError)
    assert result.update is None


async def test_node_runner_wraps_a_nodes_exception_in_node_error() -> None:
    """An exception from a node is a NodeError naming the node, the original its cause."""
    result, _ = await run_task(app_of(failing(1)))
    assert isinstance(result.error, NodeError)
    assert (result.error.node, result.error.step, result.error.attempts) == ("work", 1, 1)
    assert isinstance(result.error.__cause__, ConnectionError)


# -- timeout ------------------------------------------------------------------------------


async def sleepy(state: S, ctx: NodeContext) -> None:
    await anyio.sleep(10)


async def test_node_runner_times_out_an_attempt() -> None:
    """An attempt past the node's timeout fails the task with a NodeTimeoutError."""
    with anyio.fail_after(5):
        result, _ = await run_task(app_of(sleepy, timeout=0.05))
    assert isinstance(result.error, NodeTimeoutError)
    assert (result.error.timeout, result.error.attempts) == (0.05, 1)


async def test_node_runner_times_out_after_every_attempt() -> None:
    """A node that times out on every attempt fails after its last, saying how many."""
    policy = RetryPolicy(attempts=3, **NO_WAIT)
    with anyio.fail_after(5):
        result, events = await run_task(app_of(sleepy, timeout=0.05, retry=policy))
    assert isinstance(result.error, NodeTimeoutError)
    assert result.error.attempts == 3
    assert [e.attempt for e in events if isinstance(e, NodeRetried)] == [1, 2]


async def test_node_runner_lets_a_fast_attempt_finish_within_its_timeout() -> None:
    """A node that answers within its timeout is not cut short."""

    async def quick(state: S, ctx: NodeContext) -> dict[str, Any]:
        await anyio.sleep(0.01)
        return {"count": 1}

    result, _ = await run_task(app_of(quick, timeout=5))
    assert (result.update, result.error) == ({"count": 1}, None)


# -- retry --------------------------------------------------------------------------------


async def test_node_runner_retries_a_failing_node_until_it_succeeds() -> None:
    """With a RetryPolicy, a failed attempt is tried again; the last attempt's update wins."""
    policy = RetryPolicy(attempts=3, **NO_WAIT)
    result, _ = await run_task(app_of(failing(2), retry=policy))
    assert (result.update, result.error) == ({"count": 3}, None)


async def test_node_runner_reports_each_retry() -> None:
    """Each retry is a NodeRetried event with its attempt, error and delay."""
    policy = RetryPolicy(attempts=3, **NO_WAIT)
    _, events = await run_task(app_of(failing(2), retry=policy))
    retried = [e for e in events if isinstance(e, NodeRetried)]
    assert [(e.node, e.step, e.attempt, e.delay) for e in retried] == [
        ("work", 1, 1, 0.0),
        ("work", 1, 2, 0.0),
    ]
    assert retried[0].error == "ConnectionError: attempt 1 failed"


async def test_node_runner_reports_the_finish_of_a_retried_node() -> None:
    """A node that needed retries reports its finish with the number of attempts."""
    policy = RetryPolicy(attempts=3, **NO_WAIT)
    _, events = await run_task(app_of(failing(2), retry=policy))
    [finished] = [e for e in events if isinstance(e, NodeFinished)]
    assert (finished.attempts, finished.error) == (3, None)


async def test_node_runner_fails_after_the_last_attempt() -> None:
    """A node that fails every attempt is a NodeError after all of them."""
    policy = RetryPolicy(attempts=2, **NO_WAIT)
    result, _ = await run_task(app_of(failing(5), retry=policy))
    assert isinstance(result.error, NodeError)
    assert result.error.attempts == 2


async def test_node_runner_does_not_retry_errors_the_policy_does_not_name() -> None:
    """An error outside the policy's ``on`` fails at once, without a retry."""
    policy = RetryPolicy(attempts=3, on=(ConnectionError,), **NO_WAIT)
    result, events = await run_task(app_of(failing(1, KeyError), retry=policy))
    assert isinstance(result.error, NodeError)
    assert result.error.attempts == 1
    assert not [e for e in events if isinstance(e, NodeRetried)]


async def test_node_runner_does_not_retry_without_a_policy() -> None:
    """A node without a RetryPolicy runs once."""
    result, events = await run_task(app_of(failing(1)))
    assert isinstance(result.error, NodeError)
    assert not [e for e in events if isinstance(e, NodeRetried)]


# -- events -------------------------------------------------------------------------------


async def test_node_runner_reports_nothing_for_a_clean_first_attempt() -> None:
    """Unwatched, a node that succeeds at once adds no event (step_committed covers it)."""

    async def fn(state: S, ctx: NodeContext) -> None:
        return None

    _, events = await run_task(app_of(fn))
    assert events == []


async def test_node_runner_reports_start_and_finish_when_watched() -> None:
    """Watched (a stream, a debug log), a node's start and finish are reported."""

    async def fn(state: S, ctx: NodeContext) -> None:
        return None

    _, events = await run_task(app_of(fn), watched=True)
    assert [type(e) for e in events] == [NodeStarted, NodeFinished]
    assert (events[0].node, events[0].step) == ("work", 1)


# -- an agent's turn ----------------------------------------------------------------------


async def test_node_runner_takes_an_agents_turn() -> None:
    """An agent's final answer is its update, with the messages of the turn."""
    agent = Agent("helper", model=ScriptedModel(["42"]), output="answer", instructions="hi")
    result, _ = await run_task(app_of(agent), Task("helper", 0, NO_PAYLOAD, "helper"))
    assert (result.update, result.again, result.calls) == ({"answer": "42"}, False, ())
    assert result.messages is not None
    assert [(m.role, m.name) for m in result.messages] == [
        ("system", "system"),
        ("user", "input"),
        ("assistant", "helper"),
    ]


async def test_node_runner_returns_an_agents_proposed_calls() -> None:
    """An agent that proposes tool calls gives them, no update, and runs again."""
    call = ToolCall(name="lookup", arguments={"key": "a"}, id="c1")
    agent = Agent("helper", model=ScriptedModel([ModelResponse(tool_calls=(call,))]))
    result, _ = await run_task(app_of(agent), Task("helper", 0, NO_PAYLOAD, "helper"))
    assert (result.calls, result.again, result.update) == ((call,), True, None)


async def test_node_runner_gives_an_agent_its_conversation() -> None:
    """An agent's turn reads its conversation from memory, by its conversation key."""
    model = ScriptedModel(["done"])
    agent = Agent("helper", model=model)
    earlier = [
        Message(role="user", name="input", content="go"),
        Message(role="assistant", name="helper", tool_calls=(ToolCall(name="t", id="c1"),)),
        Message(role="tool", name="t", tool_call_id="c1", content="{}"),
    ]
    memory = {"helper": earlier, "send:helper": [Message(role="user", content="other")]}
    await run_task(app_of(agent), Task("helper", 0, NO_PAYLOAD, "helper"), memory=memory)
    assert list(model.requests[0].messages) == earlier


async def test_node_runner_returns_an_agents_own_error_as_it_is() -> None:
    """An agent's verdict (invalid output) is the task's error, not wrapped in NodeError."""
    agent = Agent("helper", model=ScriptedModel(["not a number"]), output="count", output_retries=0)
    result, _ = await run_task(app_of(agent), Task("helper", 0, NO_PAYLOAD, "helper"))
    assert isinstance(result.error, AgentOutputError)
