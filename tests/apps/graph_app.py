"""Graphs for ``orchestra graph check`` and ``graph render``, at module level for ``module:attr``.

``app`` has two cycles, each with a way out: the agent ``writer`` drafts and ``review`` sends
the draft back until it has been revised twice (``writer -> review -> writer``, through the
route ``verdict``), then ``polish`` goes round on its own (route ``again``) until it is done.
``unguarded`` is the same graph compiled with ``loop_guard=None``; ``straight`` has no cycle.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel

from orchestra import END, START, Agent, Graph, NodeContext, add
from orchestra.models import ModelRequest, ScriptedModel
from orchestra.safeguards.loops import LoopGuard


class Draft(BaseModel):
    text: str = ""
    revisions: Annotated[int, add] = 0
    polished: Annotated[int, add] = 0


def write(request: ModelRequest) -> str:
    return "a draft"


writer_model = ScriptedModel(write)


async def review(state: Draft, ctx: NodeContext) -> dict[str, Any]:
    return {"revisions": 1}


async def polish(state: Draft, ctx: NodeContext) -> dict[str, Any]:
    return {"polished": 1}


def verdict(state: Draft) -> str:
    return "writer" if state.revisions < 2 else "polish"


def again(state: Draft) -> str:
    return "polish" if state.polished < 2 else END


def build() -> Graph[Draft]:
    graph = Graph(Draft, name="drafting")
    graph.add_node(Agent("writer", model=writer_model, output="text"))
    graph.add_node("review", review)
    graph.add_node("polish", polish)
    graph.add_edge(START, "writer")
    graph.add_edge("writer", "review")
    graph.add_route("review", verdict, targets=["writer", "polish", END])
    graph.add_route("polish", again, targets=["polish", END])
    return graph


app = build().compile(loop_guard=LoopGuard(same_call=4, policy={"same_call": "nudge"}))
unguarded = build().compile(loop_guard=None)


def build_straight() -> Graph[Draft]:
    graph = Graph(Draft, name="straight")
    graph.add_node("review", review)
    graph.add_edge(START, "review")
    graph.add_edge("review", END)
    return graph


straight = build_straight().compile()
