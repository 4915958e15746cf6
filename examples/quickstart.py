"""Quickstart: a small research team as an orchestra graph.

Run it with ``python examples/quickstart.py``; ``orchestra demo`` runs the same graph with a
live progress table. In one small graph it shows:

- a typed state (a pydantic model) whose list and counter fields merge with reducers;
- fan-out: the planner sends one task per angle to ``research``, and the three tasks run
  concurrently in one step;
- a reviewer *agent* whose verdict (a pydantic model, validated) goes into the state, and a
  route that sends the draft back once for a revision, then moves on;
- a node with ``retry=`` that fails once with a transient error and succeeds on the retry.

No model or API key is needed: the reviewer runs on a ``ScriptedModel`` (a deterministic
model whose answers are a function of the conversation; swap in
``OpenAICompatible(base_url=..., model=...)`` for a real one), and the other nodes are plain
async functions that sleep a little to stand in for real work.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import anyio
import structlog
from pydantic import BaseModel, Field

from orchestra import (
    END,
    START,
    Agent,
    Budget,
    Graph,
    NodeContext,
    RetryPolicy,
    Send,
    add,
    append,
)
from orchestra.models import ModelRequest, ScriptedModel


class Report(BaseModel):
    """The state every node reads; nodes change it only by returning updates."""

    topic: str = Field(min_length=1)
    findings: Annotated[list[str], append] = []  # each researcher appends one finding
    sources: Annotated[int, add] = 0  # each researcher adds the sources it read
    draft: str = ""  # plain fields: the last write wins (two writers in one step is an error)
    revision: int = 0
    feedback: Annotated[list[str], append] = []
    approved: bool = False
    published: str | None = None


ANGLES = {"background": 3, "practice": 4, "risks": 2}  # angle -> sources found


async def plan(state: Report, ctx: NodeContext) -> list[Send]:
    """Fan out: one research task per angle, all running in the next step."""
    return [Send("research", angle) for angle in ANGLES]


async def research(angle: str, ctx: NodeContext) -> dict[str, Any]:
    """Research one angle. A task started by Send gets its payload instead of the state."""
    sources = ANGLES[angle]
    await anyio.sleep(0.05 * sources)  # the three tasks overlap: the step takes 0.2 s
    # The tasks finish in another order (risks first), but writes merge in Send order.
    return {"findings": f"{angle} ({sources} sources)", "sources": sources}


async def draft(state: Report, ctx: NodeContext) -> dict[str, Any]:
    """Write the draft from the findings; a revision answers the reviewer's feedback."""
    text = f"{state.topic}: " + "; ".join(state.findings)
    if state.feedback:
        text += f" [{state.sources} sources cited]"
    return {"draft": text, "revision": state.revision + 1}


class Review(BaseModel):
    """The reviewer's verdict; its fields are state fields, so it is the agent's update."""

    feedback: str  # one item for the append field
    approved: bool


def show_draft(state: Report) -> str:
    """What the reviewer reads each time it is asked (its input message)."""
    return json.dumps({"revision": state.revision, "draft": state.draft})


def reviewer_model(request: ModelRequest) -> str:
    """Stand in for a model: approve a draft that cites its sources (a real model would be
    told the same in its instructions, and would answer with the same JSON)."""
    seen = json.loads(request.messages[-1].content)
    if "cited" not in seen["draft"]:
        verdict = Review(feedback=f"draft {seen['revision']}: cite your sources", approved=False)
    else:
        verdict = Review(feedback=f"draft {seen['revision']}: approved", approved=True)
    return verdict.model_dump_json()


def decide(state: Report) -> str:
    """Route after review: back to draft, or on to publish (both declared below)."""
    return "publish" if state.approved else "draft"


class Publisher:
    """Stands in for a remote service that is unavailable the first ``failures`` times."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures

    async def __call__(self, state: Report, ctx: NodeContext) -> dict[str, Any]:
        await anyio.sleep(0.05)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("publishing service unavailable (simulated)")
        slug = "-".join(state.topic.lower().split())
        return {"published": f"reports/{slug}-r{state.revision}.md"}


def build_graph() -> Graph[Report]:
    """Declare the graph: nodes, edges, and every target a route or a Send can lead to."""
    graph = Graph(Report, name="quickstart")
    graph.add_node("plan", plan, targets=["research"])  # plan may Send to research
    graph.add_node("research", research)
    graph.add_node("draft", draft)
    graph.add_node(
        Agent(
            "review",
            model=ScriptedModel(reviewer_model, name="scripted-reviewer"),
            instructions="Approve the draft only if it cites its sources.",
            input=show_draft,
            output=Review,  # the answer must be this JSON; invalid answers are sent back
        )
    )
    graph.add_node(
        "publish",
        Publisher(failures=1),
        # retry transient errors only: 3 attempts, 0.1 s then 0.2 s apart
        retry=RetryPolicy(attempts=3, backoff=0.1, jitter=0, on=(ConnectionError,)),
    )
    graph.add_edge(START, "plan")
    graph.add_edge("research", "draft")  # draft runs once, after all research tasks
    graph.add_edge("draft", "review")
    graph.add_route("review", decide, targets=["draft", "publish"])
    graph.add_edge("publish", END)
    return graph


async def main() -> None:
    # compile() checks the whole graph first; the budget stops a loop that never ends
    app = build_graph().compile(budget=Budget(steps=20))
    outcome = await app.run(Report(topic="structured concurrency"))
    outcome.raise_for_status()  # a failed run raises its error (naming run, step and node)
    print(f"{outcome.status} after {outcome.steps} steps")
    for name, value in outcome.state:
        print(f"  {name:<10} {value!r}")
    usage = outcome.usage
    print(f"reviewer: {usage.model_calls} model calls, {usage.tokens} tokens")


if __name__ == "__main__":
    # orchestra logs through structlog and never configures it; show warnings (such as the
    # retried publish) on stderr, keeping stdout for the result
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    anyio.run(main)
