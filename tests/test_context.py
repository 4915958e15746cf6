"""NodeContext: what a node sees besides its input, and its doors to tools and models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from orchestra import END, START, Graph, NodeContext, RunStatus, Send, append
from orchestra.models import Message, ModelRequest, ScriptedModel
from orchestra.store import SQLiteStore

pytestmark = pytest.mark.anyio


class Notes(BaseModel):
    text: str = ""
    labels: Annotated[list[str], append] = []


def ask(model: ScriptedModel) -> Any:
    async def node(state: Notes, ctx: NodeContext) -> dict[str, Any]:
        request = ModelRequest(messages=(Message(role="user", content="summarize"),))
        response = await ctx.call_model(model, request)
        return {"text": response.text}

    return node


async def test_context_call_model_is_metered() -> None:
    """A plain node's ctx.call_model counts the call and its tokens in the run's usage."""
    model = ScriptedModel(["a summary"])
    graph = Graph(Notes)
    graph.add_node("sum", ask(model))
    graph.add_edge(START, "sum")
    graph.add_edge("sum", END)
    outcome = await graph.compile().run(Notes())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.text == "a summary"
    assert outcome.usage.model_calls == 1
    assert outcome.usage.by_node["sum"]["model_calls"] == 1
    assert outcome.usage.input_tokens > 0
    assert outcome.usage.output_tokens > 0


async def test_context_call_model_replays_on_resume(tmp_path: Path) -> None:
    """A model call made before a question is replayed from the ledger when the run resumes
    with the answer: not asked again, not billed twice."""
    model = ScriptedModel(["first answer", "second answer"])

    async def node(state: Notes, ctx: NodeContext) -> dict[str, Any]:
        request = ModelRequest(messages=(Message(role="user", content="summarize"),))
        response = await ctx.call_model(model, request)
        verdict = await ctx.interrupt("Keep it?", schema=str)
        return {"text": f"{response.text} ({verdict})"}

    graph = Graph(Notes)
    graph.add_node("sum", node)
    graph.add_edge(START, "sum")
    graph.add_edge("sum", END)
    app = graph.compile(store=SQLiteStore(tmp_path / "runs.db"))
    asked = await app.run(Notes(), run_id="r1")
    assert asked.status is RunStatus.INTERRUPTED
    outcome = await app.resume("r1", answers={asked.pending[0].id: "yes"})
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.text == "first answer (yes)"  # replayed, not asked again
    assert outcome.usage.model_calls == 1


async def test_context_label_names_the_send_task() -> None:
    """ctx.label is the node for an edge-started task and node[i] for a Send task."""
    seen: list[tuple[str, str]] = []

    async def fan(state: Notes, ctx: NodeContext) -> list[Send]:
        seen.append((ctx.node, ctx.label))
        return [Send("work", "x"), Send("work", "y")]

    async def work(item: str, ctx: NodeContext) -> dict[str, Any]:
        seen.append((ctx.node, ctx.label))
        return {"labels": ctx.label}

    graph = Graph(Notes)
    graph.add_node("fan", fan, targets=["work"])
    graph.add_node("work", work)
    graph.add_edge(START, "fan")
    graph.add_edge("work", END)
    outcome = await graph.compile().run(Notes())
    assert outcome.status is RunStatus.COMPLETED
    assert seen[0] == ("fan", "fan")
    assert sorted(seen[1:]) == [("work", "work[0]"), ("work", "work[1]")]


async def test_context_outside_a_run_refuses_calls() -> None:
    """A context made by hand has no gateway: its calls say they work only in a node."""
    ctx = NodeContext(run_id="r", step=1, node="n", task=0, state=Notes(), usage=lambda: None)
    request = ModelRequest(messages=(Message(role="user", content="hi"),))
    with pytest.raises(RuntimeError, match="only inside a running node"):
        await ctx.call_model(ScriptedModel(["x"]), request)
    with pytest.raises(RuntimeError, match="only inside a running node"):
        await ctx.call_tool("anything")
    assert ctx.label == "n"


async def test_context_call_model_refuses_what_is_not_a_model_or_a_request() -> None:
    """ctx.call_model says what is wrong with its arguments, and calls nothing."""
    model = ScriptedModel(["never used"])
    seen: list[str] = []

    async def node(state: Notes, ctx: NodeContext) -> dict[str, Any]:
        request = ModelRequest(messages=(Message(role="user", content="hi"),))
        for args in (("not a model", request), (model, {"messages": []})):
            with pytest.raises(TypeError) as info:
                await ctx.call_model(*args)
            seen.append(str(info.value))
        return {}

    graph = Graph(Notes)
    graph.add_node("n", node)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    outcome = await graph.compile().run(Notes())
    assert outcome.status is RunStatus.COMPLETED
    assert seen[0].startswith("ctx.call_model needs a Model")
    assert seen[1] == "ctx.call_model needs a ModelRequest, got dict"
    assert outcome.usage.model_calls == 0
