"""The state, scripts and one-agent / one-node graphs the gateway and ledger tests share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from orchestra import END, START, Agent, Graph
from orchestra.models import Message, ModelResponse, ToolCall


class S(BaseModel):
    request: str = ""
    resolution: str | None = None
    note: str = ""


def calling(*calls: ToolCall, then: str = "done") -> list[ModelResponse | str]:
    """A script: one turn proposing ``calls``, then a final answer."""
    return [ModelResponse(tool_calls=calls), then]


def single_agent(agent: Agent, **options: Any) -> Any:
    """Compile START -> agent -> END."""
    graph: Graph[S] = Graph(S)
    graph.add_node(agent)
    graph.add_edge(START, agent.name)
    graph.add_edge(agent.name, END)
    return graph.compile(approvals=None, **options)


def one_node(fn: Any, tools: Sequence[Any] = (), **options: Any) -> Any:
    """Compile START -> n -> END where ``n`` may call ``tools``."""
    graph: Graph[S] = Graph(S)
    graph.add_node("n", fn, tools=tools)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    return graph.compile(approvals=None, **options)


def tool_messages(messages: Sequence[Message]) -> list[Message]:
    return [m for m in messages if m.role == "tool"]
