"""The act phase: every call the step's agents proposed goes through the gateway at once,
each agent gets its results as tool messages in call order, and ``held`` lists the
approvals the calls would ask without running anything."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import END, START, Agent, Effect, Graph, tool
from orchestra.models import Message, ScriptedModel, ToolCall
from orchestra.runtime.act import ActPhase
from orchestra.runtime.gateway import Gateway
from orchestra.runtime.guards import LoopCheck
from orchestra.runtime.ledger import Ledger
from orchestra.runtime.meter import Meter
from orchestra.runtime.tasks import Task, TaskResult
from orchestra.safeguards.interrupts import StepInterrupted
from orchestra.safeguards.loops import LoopGuard, LoopWatch
from orchestra.specs import NO_PAYLOAD
from orchestra.store.base import RequestKind

pytestmark = pytest.mark.anyio


class S(BaseModel):
    answer: str = ""


@dataclass
class World:
    """A compiled app whose tools record what they did in ``done``."""

    app: Any
    done: list[str] = field(default_factory=list)


def world() -> World:
    """Compile START -> helper, other, payer (agents) -> END. ``lookup`` (read) waits
    ``wait`` seconds and answers ``key``; ``note`` writes; ``pay`` is irreversible. The
    helper may look up and note, the other may look up, the payer may pay and look up."""
    made = World(app=None)

    @tool(effect=Effect.READ)
    async def lookup(key: str, wait: float = 0.0) -> str:
        """Look something up."""
        await anyio.sleep(wait)
        made.done.append(f"lookup {key}")
        return f"value of {key}"

    @tool
    async def note(text: str) -> str:
        """Write a note."""
        made.done.append(f"note {text}")
        return "noted"

    @tool(effect=Effect.IRREVERSIBLE)
    async def pay(amount: int) -> str:
        """Pay someone."""
        made.done.append(f"pay {amount}")
        return "paid"

    graph: Graph[S] = Graph(S)
    for agent in (
        Agent("helper", model=ScriptedModel([]), tools=[lookup, note]),
        Agent("other", model=ScriptedModel([]), tools=[lookup]),
        Agent("payer", model=ScriptedModel([]), tools=[pay, lookup]),
    ):
        graph.add_node(agent)
        graph.add_edge(START, agent.name)
        graph.add_edge(agent.name, END)
    made.app = graph.compile()
    return made


def phase(app: Any, loops: LoopCheck | None = None) -> ActPhase:
    """The act phase of run r1 of ``app``, over a real gateway, ledger and meter."""
    gateway = Gateway(
        run_id="r1",
        ledger=Ledger("r1"),
        meter=Meter(),
        emit=lambda event, level: None,
        approvals=app.approvals,
        arbitration=app.arbitration,
    )
    return ActPhase(app, gateway, loops)


def call(name: str, call_id: str, **arguments: Any) -> ToolCall:
    return ToolCall(name=name, arguments=arguments, id=call_id)


def turn(agent: str, *calls: ToolCall) -> tuple[Task, TaskResult]:
    """An agent's task and the turn in which it proposed ``calls``."""
    asked = Message(role="assistant", name=agent, tool_calls=calls)
    return Task(agent, 0, NO_PAYLOAD, agent), TaskResult(messages=[asked], calls=calls, again=True)


def split(
    *turns: tuple[Task, TaskResult],
) -> tuple[list[Task], list[TaskResult]]:
    return [t for t, _ in turns], [r for _, r in turns]


def tool_messages(result: TaskResult) -> list[Message]:
    assert result.messages is not None
    return [m for m in result.messages if m.role == "tool"]


def contents(messages: Sequence[Message]) -> list[Any]:
    return [json.loads(m.content) for m in messages]


# -- run ----------------------------------------------------------------------------------


async def test_act_phase_run_gives_an_agent_its_results_as_tool_messages() -> None:
    """Each call's result follows the turn as a tool message, from the tool, for that call."""
    w = world()
    tasks, results = split(turn("helper", call("lookup", "c1", key="a")))
    await phase(w.app).run(tasks, results, 1)
    assert results[0].messages is not None
    assert [m.role for m in results[0].messages] == ["assistant", "tool"]
    [message] = tool_messages(results[0])
    assert (message.name, message.tool_call_id) == ("lookup", "c1")
    assert contents([message]) == [{"result": "value of a"}]


async def test_act_phase_run_keeps_the_order_of_the_calls() -> None:
    """The results come in the order the agent proposed the calls, not the order they end."""
    w = world()
    tasks, results = split(
        turn(
            "helper",
            call("lookup", "slow", key="a", wait=0.2),
            call("lookup", "fast", key="b"),
            call("note", "third", text="x"),
        )
    )
    with anyio.fail_after(5):
        await phase(w.app).run(tasks, results, 1)
    assert [m.tool_call_id for m in tool_messages(results[0])] == ["slow", "fast", "third"]


async def test_act_phase_run_gives_each_agent_its_own_results() -> None:
    """Two agents acting in one step each get the results of their own calls only."""
    w = world()
    tasks, results = split(
        turn("helper", call("lookup", "h1", key="a")),
        turn("other", call("lookup", "o1", key="b"), call("lookup", "o2", key="c")),
    )
    await phase(w.app).run(tasks, results, 1)
    assert contents(tool_messages(results[0])) == [{"result": "value of a"}]
    assert contents(tool_messages(results[1])) == [
        {"result": "value of b"},
        {"result": "value of c"},
    ]


async def test_act_phase_run_returns_a_denied_call_as_an_error_message() -> None:
    """A call to a tool off the agent's allowlist is answered with an error; it never runs."""
    w = world()
    tasks, results = split(turn("other", call("note", "c1", text="x")))
    await phase(w.app).run(tasks, results, 1)
    [message] = contents(tool_messages(results[0]))
    assert message["status"] == "denied"
    assert w.done == []


async def test_act_phase_run_leaves_a_turn_without_calls_alone() -> None:
    """An agent that gave its final answer gets no tool message."""
    w = world()
    final = [Message(role="assistant", name="other", content="done")]
    tasks, results = split(
        turn("helper", call("lookup", "c1", key="a")),
        (Task("other", 0, NO_PAYLOAD, "other"), TaskResult(messages=list(final))),
    )
    await phase(w.app).run(tasks, results, 1)
    assert results[1].messages == final


async def test_act_phase_run_runs_nothing_while_a_call_waits_for_approval() -> None:
    """An irreversible call held for approval stops the phase before any call runs."""
    w = world()
    tasks, results = split(
        turn("helper", call("lookup", "h1", key="a")),
        turn("payer", call("pay", "p1", amount=10)),
    )
    with pytest.raises(StepInterrupted) as caught:
        await phase(w.app).run(tasks, results, 1)
    assert [r.kind for r in caught.value.requests] == [RequestKind.APPROVAL]
    assert w.done == []


async def test_act_phase_run_lets_the_loop_watch_nudge_an_agent() -> None:
    """With a loop watch set to nudge, a repeated call gets a note after its results."""
    w = world()
    guard = LoopGuard(same_call=2, similar_output=None, policy={"same_call": "nudge"})
    act = phase(w.app, LoopCheck(w.app, "r1", LoopWatch(guard, S(), 0)))
    first = split(turn("helper", call("lookup", "c1", key="a")))
    await act.run(*first, 1)
    again = split(turn("helper", call("lookup", "c2", key="a")))
    await act.run(*again, 2)
    first_messages, again_messages = first[1][0].messages, again[1][0].messages
    assert first_messages is not None
    assert again_messages is not None
    assert [m.role for m in first_messages] == ["assistant", "tool"]
    assert [(m.role, m.name) for m in again_messages[1:]] == [
        ("tool", "lookup"),
        ("user", "orchestra"),
    ]


# -- held ---------------------------------------------------------------------------------


async def test_act_phase_held_lists_the_approval_requests_of_the_calls() -> None:
    """held gives the approval request each held call would ask, bound to its arguments."""
    w = world()
    tasks, results = split(
        turn("helper", call("lookup", "h1", key="a")),
        turn("payer", call("pay", "p1", amount=10), call("pay", "p2", amount=20)),
    )
    requests = phase(w.app).held(tasks, results, 1)
    assert [(r.kind, r.node, r.step) for r in requests] == [(RequestKind.APPROVAL, "payer", 1)] * 2
    assert [(r.payload["tool"], r.payload["arguments"]) for r in requests] == [
        ("pay", {"amount": 10}),
        ("pay", {"amount": 20}),
    ]


async def test_act_phase_held_runs_no_tool() -> None:
    """Listing the held calls runs none of the step's calls, held or not."""
    w = world()
    tasks, results = split(
        turn("helper", call("lookup", "h1", key="a")),
        turn("payer", call("pay", "p1", amount=10)),
    )
    phase(w.app).held(tasks, results, 1)
    assert w.done == []


async def test_act_phase_held_adds_no_tool_messages() -> None:
    """Listing the held calls leaves the agents' turns as they were."""
    w = world()
    tasks, results = split(turn("payer", call("pay", "p1", amount=10)))
    before = list(results[0].messages or [])
    phase(w.app).held(tasks, results, 1)
    assert results[0].messages == before


async def test_act_phase_held_is_empty_when_no_call_needs_approval() -> None:
    """Reads and writes are not held by the default policy."""
    w = world()
    tasks, results = split(
        turn("helper", call("lookup", "h1", key="a"), call("note", "n1", text="x"))
    )
    assert phase(w.app).held(tasks, results, 1) == []
