"""The graph behind ``orchestra demo``: a small research team, no model or API key needed.

It is the graph of ``examples/quickstart.py`` (same state, nodes, edges and routes: a test
compares their structure hashes), with its pauses scaled by ``speed`` and its transient
failures counted by ``failures``, so the CLI can run it slowly enough to watch and the tests
instantly. It uses the public API only; read the example for the commented version.

    plan --Send x3--> research --> draft --> review --route--> draft (once) | publish --> END

``review`` is an agent on a :class:`~orchestra.models.ScriptedModel`: its verdict is a
validated pydantic model written into the state, and its model calls show up as tokens.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from pydantic import BaseModel, Field

from orchestra import (
    END,
    START,
    Agent,
    Budget,
    CompiledGraph,
    Graph,
    NodeContext,
    RetryPolicy,
    Send,
    add,
    append,
)
from orchestra.models import ModelRequest, ScriptedModel

__all__ = ("DEFAULT_TOPIC", "Report", "build_app")

DEFAULT_TOPIC = "structured concurrency"

# angle -> (sources found, seconds of simulated work at speed 1)
ANGLES: dict[str, tuple[int, float]] = {
    "background": (3, 0.45),
    "practice": (4, 0.6),
    "risks": (2, 0.3),
}


# The docstring matches the example's: it is part of the state's JSON schema, hence of the
# graph's structure hash, which a test compares.
class Report(BaseModel):
    """The state every node reads; nodes change it only by returning updates."""

    topic: str = Field(min_length=1)
    findings: Annotated[list[str], append] = []
    sources: Annotated[int, add] = 0
    draft: str = ""
    revision: int = 0
    feedback: Annotated[list[str], append] = []
    approved: bool = False
    published: str | None = None


class Review(BaseModel):
    """The reviewer's verdict; its fields are state fields, so it is the agent's update."""

    feedback: str
    approved: bool


def show_draft(state: Report) -> str:
    """What the reviewer reads each time it is asked (its input message)."""
    return json.dumps({"revision": state.revision, "draft": state.draft})


class _Team:
    """The demo's nodes, sharing the pace of the run and its flaky publishing service."""

    def __init__(self, *, speed: float, failures: int) -> None:
        self.speed = speed
        self.failures = failures

    async def pause(self, seconds: float) -> None:
        if self.speed > 0:
            await anyio.sleep(seconds / self.speed)

    async def plan(self, state: Report, ctx: NodeContext) -> list[Send]:
        await self.pause(0.15)
        return [Send("research", angle) for angle in ANGLES]

    async def research(self, angle: str, ctx: NodeContext) -> dict[str, Any]:
        sources, seconds = ANGLES[angle]
        await self.pause(seconds)
        ctx.log.debug("angle_researched", angle=angle, sources=sources)
        return {"findings": f"{angle} ({sources} sources)", "sources": sources}

    async def draft(self, state: Report, ctx: NodeContext) -> dict[str, Any]:
        await self.pause(0.25)
        text = f"{state.topic}: " + "; ".join(state.findings)
        if state.feedback:
            text += f" [{state.sources} sources cited]"
        return {"draft": text, "revision": state.revision + 1}

    async def reviewer_model(self, request: ModelRequest) -> str:
        """The scripted reviewer: approve a draft that cites its sources."""
        await self.pause(0.2)
        seen = json.loads(request.messages[-1].content)
        if "cited" not in seen["draft"]:
            verdict = Review(
                feedback=f"draft {seen['revision']}: cite your sources", approved=False
            )
        else:
            verdict = Review(feedback=f"draft {seen['revision']}: approved", approved=True)
        return verdict.model_dump_json()

    async def publish(self, state: Report, ctx: NodeContext) -> dict[str, Any]:
        await self.pause(0.1)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("publishing service unavailable (simulated)")
        slug = "-".join(state.topic.lower().split())
        return {"published": f"reports/{slug}-r{state.revision}.md"}


def decide(state: Report) -> str:
    """Send the draft back once more unless the reviewer approved it."""
    return "publish" if state.approved else "draft"


def build_app(*, speed: float = 1.0, failures: int = 1) -> CompiledGraph[Report]:
    """Build and compile the demo graph.

    ``speed`` divides every pause (0 skips them); ``failures`` is how many times publishing
    fails before it works (publish makes 3 attempts, so 3 or more fail the run).
    """
    team = _Team(speed=speed, failures=failures)
    backoff = 0.0 if speed == 0 else 0.3 / speed
    graph = Graph(Report, name="demo")
    graph.add_node("plan", team.plan, targets=["research"])
    graph.add_node("research", team.research)
    graph.add_node("draft", team.draft)
    graph.add_node(
        Agent(
            "review",
            model=ScriptedModel(team.reviewer_model, name="scripted-reviewer"),
            instructions="Approve the draft only if it cites its sources.",
            input=show_draft,
            output=Review,
        )
    )
    graph.add_node(
        "publish",
        team.publish,
        retry=RetryPolicy(attempts=3, backoff=backoff, jitter=0, on=(ConnectionError,)),
    )
    graph.add_edge(START, "plan")
    graph.add_edge("research", "draft")
    graph.add_edge("draft", "review")
    graph.add_route("review", decide, targets=["draft", "publish"])
    graph.add_edge("publish", END)
    return graph.compile(budget=Budget(steps=20))
