"""Agent memory: where a task's conversation is kept, how a conversation is held to its cap,
whether an agent is between turns, and what a step changes in the conversations and joins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import BaseModel

from orchestra import END, START, Agent, Cap, Graph, NodeContext
from orchestra.errors import InvalidUpdateError
from orchestra.models import Message, ScriptedModel, ToolCall
from orchestra.runtime.memory import conversation_key, hold_conversation, mid_visit, remember
from orchestra.runtime.tasks import Task, TaskResult
from orchestra.specs import NO_PAYLOAD


class S(BaseModel):
    answer: str = ""


async def work(state: S, ctx: NodeContext) -> None:
    return None


def plan(memory: Cap | None = None) -> Any:
    """Compile START -> helper (an agent, its conversation capped by ``memory``) and
    START -> work (a function node), both -> END."""
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("helper", model=ScriptedModel(["done"]), memory=memory))
    graph.add_node("work", work)
    for name in ("helper", "work"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    return graph.compile()


SYSTEM = Message(role="system", name="system", content="be brief")


def user_input(text: str) -> Message:
    return Message(role="user", name="input", content=text)


def asking(call_id: str) -> Message:
    """An assistant turn proposing one tool call."""
    call = ToolCall(name="lookup", arguments={}, id=call_id)
    return Message(role="assistant", name="helper", tool_calls=(call,))


def result(call_id: str) -> Message:
    return Message(role="tool", name="lookup", tool_call_id=call_id, content='{"result":1}')


def final(text: str) -> Message:
    return Message(role="assistant", name="helper", content=text)


def edge_task(node: str = "helper") -> Task:
    return Task(node, 0, NO_PAYLOAD, node)


def send_task(index: int) -> Task:
    return Task("helper", index, {"item": index}, f"helper[{index}]")


def step(
    app: Any,
    memory: dict[str, list[Message]],
    tasks: Sequence[Task],
    results: Sequence[TaskResult],
    joins: dict[int, frozenset[str]] | None = None,
    previous: dict[int, frozenset[str]] | None = None,
) -> Any:
    return remember(app, "r1", memory, joins or {}, previous or {}, tasks, results)


# -- conversation_key ---------------------------------------------------------------------


def test_conversation_key_is_the_agent_for_a_task_started_by_an_edge() -> None:
    """Every visit started by an edge or a route shares the agent's one conversation."""
    assert conversation_key("helper", "helper", NO_PAYLOAD) == "helper"


def test_conversation_key_is_the_task_for_a_task_started_by_send() -> None:
    """Each Send task has its own conversation, apart from the agent's and from each other."""
    first = conversation_key("helper", "helper[0]", {"item": 1})
    second = conversation_key("helper", "helper[1]", {"item": 1})
    assert (first, second) == ("send:helper[0]", "send:helper[1]")


def test_conversation_key_of_a_send_task_with_no_payload_is_its_own() -> None:
    """A Send whose payload is None is still a Send task (None is a payload)."""
    assert conversation_key("helper", "helper", None) == "send:helper"


# -- hold_conversation --------------------------------------------------------------------


def test_hold_conversation_keeps_the_instructions_and_this_visits_input() -> None:
    """Dropping the oldest keeps the system message and the latest input, not older visits."""
    messages = [
        SYSTEM,
        user_input("first"),
        final("one"),
        user_input("second"),
        asking("c1"),
        result("c1"),
        final("two"),
    ]
    kept = hold_conversation(messages, Cap(4, "drop_oldest"), "r1", "helper")
    assert kept[:2] == [SYSTEM, user_input("second")]


def test_hold_conversation_drops_whole_oldest_turns() -> None:
    """The newest whole turns that fit are kept, in order; older turns are forgotten."""
    messages = [
        SYSTEM,
        user_input("go"),
        asking("c1"),
        result("c1"),
        asking("c2"),
        result("c2"),
        final("done"),
    ]
    kept = hold_conversation(messages, Cap(5, "drop_oldest"), "r1", "helper")
    assert kept == [SYSTEM, user_input("go"), asking("c2"), result("c2"), final("done")]


def test_hold_conversation_never_keeps_a_tool_result_without_its_call() -> None:
    """A turn that does not fit whole is dropped whole, even if its tool result would fit."""
    messages = [SYSTEM, user_input("go"), asking("c1"), result("c1"), final("done")]
    kept = hold_conversation(messages, Cap(4, "drop_oldest"), "r1", "helper")
    assert kept == [SYSTEM, user_input("go"), final("done")]


def test_hold_conversation_keeps_the_results_of_a_call_with_their_call() -> None:
    """A turn with several tool results is kept with all of them or not at all."""
    two = Message(
        role="assistant",
        name="helper",
        tool_calls=(ToolCall(name="lookup", id="a"), ToolCall(name="lookup", id="b")),
    )
    messages = [user_input("go"), asking("c0"), result("c0"), two, result("a"), result("b")]
    kept = hold_conversation(messages, Cap(4, "drop_oldest"), "r1", "helper")
    assert kept == [user_input("go"), two, result("a"), result("b")]


def test_hold_conversation_lets_a_hook_compact_it() -> None:
    """A callable policy gets the messages and its result is the conversation."""
    seen: list[list[Message]] = []

    def compact(messages: list[Message]) -> list[Message]:
        seen.append(messages)
        return [messages[0], Message(role="user", name="orchestra", content="summary")]

    messages = [SYSTEM, user_input("go"), final("a"), final("b")]
    kept = hold_conversation(messages, Cap(2, compact), "r1", "helper")
    assert seen == [messages]
    assert kept == [SYSTEM, Message(role="user", name="orchestra", content="summary")]


def test_hold_conversation_refuses_a_hook_result_over_the_cap() -> None:
    """A hook that returns more messages than the cap fails the step, naming the agent."""
    messages = [SYSTEM, user_input("go"), final("a")]
    with pytest.raises(InvalidUpdateError, match="helper") as caught:
        hold_conversation(messages, Cap(2, lambda m: m), "r1", "helper")
    assert caught.value.node == "helper"


def test_hold_conversation_refuses_a_hook_result_that_is_not_messages() -> None:
    """A hook must return Message objects."""
    messages = [SYSTEM, user_input("go"), final("a")]
    with pytest.raises(InvalidUpdateError, match="Message objects"):
        hold_conversation(messages, Cap(2, lambda m: ["summary"]), "r1", "helper")


def test_hold_conversation_refuse_raises_naming_the_agent() -> None:
    """Policy 'refuse' fails the step with an InvalidUpdateError naming the agent and cap."""
    messages = [SYSTEM, user_input("go"), final("a")]
    with pytest.raises(InvalidUpdateError, match=r"'helper\[1\]'.*cap of 2") as caught:
        hold_conversation(messages, Cap(2, "refuse"), "r1", "helper[1]")
    assert (caught.value.run_id, caught.value.node) == ("r1", "helper[1]")


# -- mid_visit ----------------------------------------------------------------------------


def test_mid_visit_is_false_for_a_function_node() -> None:
    """A function node is never between turns."""
    memory = {"work": [user_input("go"), asking("c1")]}
    assert not mid_visit(plan(), memory, edge_task("work"))


def test_mid_visit_is_false_for_an_agent_without_a_conversation() -> None:
    """An agent that has not started yet is at the start of a visit."""
    assert not mid_visit(plan(), {}, edge_task())


def test_mid_visit_is_false_after_a_final_answer() -> None:
    """An agent whose last message is its final answer starts a new visit."""
    memory = {"helper": [user_input("go"), final("done")]}
    assert not mid_visit(plan(), memory, edge_task())


def test_mid_visit_is_true_while_tool_calls_are_open() -> None:
    """An agent that proposed tool calls is between turns."""
    memory = {"helper": [user_input("go"), asking("c1")]}
    assert mid_visit(plan(), memory, edge_task())


def test_mid_visit_is_true_while_tool_results_wait_for_the_agent() -> None:
    """An agent whose last message is a tool result is between turns."""
    memory = {"helper": [user_input("go"), asking("c1"), result("c1")]}
    assert mid_visit(plan(), memory, edge_task())


def test_mid_visit_reads_a_send_tasks_own_conversation() -> None:
    """A Send task is judged by its own conversation, not the agent's."""
    memory = {"helper": [user_input("go"), asking("c1")]}
    assert not mid_visit(plan(), memory, send_task(0))


# -- remember -----------------------------------------------------------------------------


def test_remember_adds_an_agents_messages_to_its_conversation() -> None:
    """The turn's messages follow the conversation so far; the change lists them as added."""
    memory = {"helper": [user_input("go"), asking("c1"), result("c1")]}
    change = step(
        plan(), memory, [edge_task()], [TaskResult(messages=[final("done")], again=False)]
    )
    assert change.conversations["helper"] == [*memory["helper"], final("done")]
    assert change.added == {"helper": [final("done")]}


def test_remember_leaves_the_previous_conversations_unchanged() -> None:
    """The step's conversations are new: the memory it started from is not modified."""
    memory = {"helper": [user_input("go")]}
    step(plan(), memory, [edge_task()], [TaskResult(messages=[final("done")])])
    assert memory == {"helper": [user_input("go")]}


def test_remember_keeps_an_edge_started_conversation_after_its_visit() -> None:
    """An agent started by an edge keeps its conversation for its next visit."""
    change = step(plan(), {}, [edge_task()], [TaskResult(messages=[final("done")])])
    assert change.dropped == []
    assert "helper" in change.conversations


def test_remember_drops_a_finished_send_conversation() -> None:
    """A Send-started agent's conversation is forgotten once it gave its final answer."""
    memory = {"send:helper[0]": [user_input("go"), asking("c1"), result("c1")]}
    change = step(plan(), memory, [send_task(0)], [TaskResult(messages=[final("x")])])
    assert change.dropped == ["send:helper[0]"]
    assert "send:helper[0]" not in change.conversations


def test_remember_keeps_a_send_conversation_between_turns() -> None:
    """A Send task that runs again next step keeps its conversation."""
    change = step(
        plan(),
        {},
        [send_task(0)],
        [TaskResult(messages=[user_input("go"), asking("c1"), result("c1")], again=True)],
    )
    assert change.dropped == []
    assert change.conversations["send:helper[0]"][-1] == result("c1")


def test_remember_ignores_function_nodes() -> None:
    """A function node's result adds no conversation."""
    change = step(plan(), {}, [edge_task("work")], [TaskResult(update={"answer": "x"})])
    assert (change.conversations, change.added, change.dropped) == ({}, {}, [])


def test_remember_holds_a_conversation_over_its_cap() -> None:
    """A conversation over its agent's cap is held to it and recorded as replaced."""
    app = plan(Cap(3, "drop_oldest"))
    memory = {"helper": [SYSTEM, user_input("go"), asking("c1"), result("c1")]}
    change = step(app, memory, [edge_task()], [TaskResult(messages=[final("done")])])
    kept = [SYSTEM, user_input("go"), final("done")]
    assert change.conversations["helper"] == kept
    assert change.replaced == {"helper": kept}
    assert "helper" not in change.added


def test_remember_leaves_a_conversation_within_its_cap() -> None:
    """A conversation at its cap is not replaced."""
    app = plan(Cap(3, "drop_oldest"))
    memory = {"helper": [SYSTEM, user_input("go")]}
    change = step(app, memory, [edge_task()], [TaskResult(messages=[final("done")])])
    assert change.replaced is None
    assert change.added == {"helper": [final("done")]}


def test_remember_refuses_a_conversation_over_a_refusing_cap() -> None:
    """An agent whose cap refuses fails the step once its conversation would exceed it."""
    app = plan(Cap(2, "refuse"))
    with pytest.raises(InvalidUpdateError, match="'helper'"):
        step(
            app,
            {"helper": [SYSTEM, user_input("go")]},
            [edge_task()],
            [TaskResult(messages=[final("done")])],
        )


def test_remember_reports_changed_join_progress() -> None:
    """Join progress that differs from the previous step's is marked changed."""
    joins = {0: frozenset({"a"})}
    change = step(plan(), {}, [edge_task("work")], [TaskResult()], joins, {})
    assert change.joins == joins
    assert change.joins_changed


def test_remember_reports_unchanged_join_progress() -> None:
    """Join progress equal to the previous step's is not marked changed."""
    joins = {0: frozenset({"a"})}
    change = step(plan(), {}, [edge_task("work")], [TaskResult()], joins, dict(joins))
    assert not change.joins_changed
    assert change.empty
