"""Per-field caps on list fields: refuse, drop the oldest, or a hook that compacts; the
capped field is stored whole, so a resumed run has the same state."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Cap,
    Effect,
    Graph,
    GraphValidationError,
    NodeContext,
    RunStatus,
    append,
    extend,
    tool,
)
from orchestra.errors import InvalidUpdateError
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.store import Store

pytestmark = pytest.mark.anyio


def notes_graph(cap: Cap, store: Store | None = None, rounds: int = 8) -> Any:
    class Notes(BaseModel):
        notes: Annotated[list[str], append, cap] = []
        count: int = 0

    async def write(state: Notes, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": f"note {state.count}", "count": state.count + 1}

    graph: Graph[Notes] = Graph(Notes)
    graph.add_node("writer", write)
    graph.add_edge(START, "writer")
    graph.add_route(
        "writer", lambda s: "writer" if s.count < rounds else END, targets=["writer", END]
    )
    return graph.compile(store=store)


async def test_caps_refuse_fails_the_step_naming_field_and_node() -> None:
    """Under refuse, the update that would pass the cap fails the run; its state fits."""
    outcome = await notes_graph(Cap(max_items=3)).run({})
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, InvalidUpdateError)
    assert "field 'notes' would hold 4 items, over its cap of 3" in str(outcome.error)
    assert outcome.error.node == "writer"
    assert len(outcome.state.notes) == 3


async def test_caps_drop_oldest_keeps_the_newest_items(store: Store) -> None:
    """Under drop_oldest the field keeps its newest items, also as stored."""
    app = notes_graph(Cap(max_items=3, policy="drop_oldest"), store=store)
    outcome = await app.run({}, run_id="r1")
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.notes == ["note 5", "note 6", "note 7"]
    assert (await app.load_state("r1")).notes == ["note 5", "note 6", "note 7"]


async def test_caps_hook_compacts_the_field() -> None:
    """A hook replaces the field with what it returns (here: a summary and the newest)."""

    def summarize(items: list[str]) -> list[str]:
        return [f"({len(items) - 1} earlier notes)", items[-1]]

    outcome = await notes_graph(Cap(max_items=3, policy=summarize)).run({})
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.notes[-1] == "note 7"
    assert len(outcome.state.notes) <= 3


async def test_caps_hook_that_returns_too_much_fails_the_step() -> None:
    """A hook whose result is still over the cap fails the step, naming the field."""
    outcome = await notes_graph(Cap(max_items=2, policy=lambda items: items)).run({})
    assert outcome.status is RunStatus.FAILED
    assert "the Cap hook of field 'notes' returned 3 items" in str(outcome.error)


def test_caps_only_on_list_fields_and_valid_settings() -> None:
    """A Cap on a field that is not a list is a compile problem; bad settings are refused."""

    class Bad(BaseModel):
        title: Annotated[str, Cap(max_items=3)] = ""

    graph: Graph[Bad] = Graph(Bad)

    async def node(state: Bad, ctx: NodeContext) -> None:
        return None

    graph.add_node("n", node)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    with pytest.raises(GraphValidationError, match="'title' has a Cap but is not a list"):
        graph.compile()
    for bad in ({"max_items": 0}, {"max_items": 2, "policy": "shrink"}):
        with pytest.raises(ValueError, match="Cap"):
            Cap(**bad)


async def test_caps_apply_to_extend_fields_too() -> None:
    """An extend field is held to its cap the same way."""

    class Items(BaseModel):
        items: Annotated[list[int], extend, Cap(max_items=4, policy="drop_oldest")] = []
        n: int = 0

    async def add(state: Items, ctx: NodeContext) -> dict[str, Any]:
        n = state.n
        return {"items": [n, n + 1, n + 2], "n": n + 3}

    graph: Graph[Items] = Graph(Items)
    graph.add_node("add", add)
    graph.add_edge(START, "add")
    graph.add_route("add", lambda s: "add" if s.n < 12 else END, targets=["add", END])
    outcome = await graph.compile().run({})
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.items == [8, 9, 10, 11]


def chatty(memory: Cap, store: Store | None = None) -> tuple[Any, ScriptedModel]:
    """An agent that looks something up (a new query each turn) for 8 turns, then answers."""

    @tool(effect=Effect.READ)
    async def look(q: str) -> str:
        return f"found {q}"

    calls: list[int] = []

    def answer(request: ModelRequest) -> ModelResponse | str:
        # counted here: the trimmed conversation forgets how many turns it took
        calls.append(1)
        if len(calls) <= 8:
            call = ToolCall(name="look", arguments={"q": f"q{len(calls)}"})
            return ModelResponse(tool_calls=(call,))
        return "done"

    class Work(BaseModel):
        answer: str | None = None

    model = ScriptedModel(answer)
    agent = Agent(
        "a",
        model=model,
        tools=[look],
        instructions="Be brief.",
        output="answer",
        memory=memory,
        max_turns=20,
    )
    graph: Graph[Work] = Graph(Work)
    graph.add_node(agent)
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    return graph.compile(store=store), model


async def test_caps_agent_memory_drop_oldest_keeps_instructions_and_whole_turns(
    store: Store,
) -> None:
    """A capped conversation forgets its oldest turns: the model never sees more than the
    cap, the instructions stay first, no tool result without its call; it is stored so."""
    app, model = chatty(Cap(max_items=6, policy="drop_oldest"), store)
    outcome = await app.run({}, run_id="r1")
    assert outcome.status is RunStatus.COMPLETED
    for request in model.requests:
        # what the step added (an input, or this turn's call and result) may come on top
        assert len(request.messages) <= 6 + 2
        assert request.messages[0].name == "system"
        assert request.messages[1].role != "tool"
    assert len(model.requests[-1].messages) < 8 * 2


async def test_caps_agent_memory_refuse_fails_the_run() -> None:
    """Under refuse, a conversation over its cap fails the run naming the agent."""
    app, _ = chatty(Cap(max_items=4))
    outcome = await app.run({})
    assert outcome.status is RunStatus.FAILED
    assert "agent 'a': its conversation would hold" in str(outcome.error)
