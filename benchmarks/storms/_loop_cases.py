"""The loop storm's cases: its graphs, the scripts of their nodes and models (each run's
ground truth), and the loop guards they run under. ``loop.py`` runs and checks them."""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Effect,
    Graph,
    NodeContext,
    Tool,
    ToolContext,
    tool,
)
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.safeguards.loops import LoopGuard

PREFIX = 40  # a loop run first progresses for 0 to this many steps, drawn from its seed
LOOP_CAP = 100  # then has this many steps to be caught (its step budget): else it is missed
NO_PROGRESS = 8  # the stuck cases' LoopGuard(no_progress=...)
PROGRESS_GUARD = LoopGuard(no_progress=NO_PROGRESS, progress=("done",))
REPETITIONS = 3  # target: a repeated state or call is caught by the time it is seen this often


class Work(BaseModel):
    """The state of every loop-storm graph; ``done`` is the stuck cases' progress field."""

    done: int = 0
    tries: int = 0
    stage: str = ""
    draft: str = ""
    review: str = ""
    attempt: str = ""
    answer: str | None = None


@dataclass
class Script:
    """One run's script, and what its nodes and model did (the run's ground truth)."""

    seed: int
    rng: random.Random
    prefix: int | None  # a loop run loops after this step; None: a legitimate run
    step: int = 0  # the last committed step, kept by the stream's reader
    last_change: int = 0  # the last step that changed the state (stuck: the progress field)
    first_repeat: int | None = None  # the step of the first of the repeated calls
    expect: dict[str, Any] = field(default_factory=dict)  # each field's last written value
    model_calls: int = 0
    tool_calls: int = 0  # calls with valid arguments (the ones that run)
    clock_ok: bool = True

    @property
    def now(self) -> int:
        """The step running now: the graphs run one task a step, and the stream's reader
        resumes the run only after it has read the last step's events."""
        return self.step + 1

    def looping(self) -> bool:
        return self.prefix is not None and self.now > self.prefix

    def wrote(self, name: str, old: Any, new: Any, *, marks: bool = True) -> None:
        """Note a write; one that changes the field and ``marks`` moves ``last_change``."""
        self.expect[name] = new
        if marks and new != old:
            self.last_change = self.now


@tool(effect=Effect.READ)
async def lookup(query: str) -> str:
    """Look a term up."""
    return f"notes on {query}"


@tool(effect=Effect.READ)
async def search(query: str, page: int = 1) -> str:
    """Search the web."""
    return f"results {page} for {query}"


@tool(effect=Effect.READ)
async def read_page(url: str, page: int) -> str:
    """Read one page of a document."""
    return f"page {page} of {url}"


WORKSPACES: dict[str, dict[str, str]] = {}  # run id -> path -> content


@tool(effect=Effect.WRITE)
async def write_file(path: str, content: str, ctx: ToolContext) -> str:
    """Write a file of the workspace."""
    WORKSPACES.setdefault(ctx.run_id, {})[path] = content
    return f"wrote {len(content)} characters to {path}"


@tool(effect=Effect.READ)
async def run_tests(ctx: ToolContext) -> str:
    """Run the test suite."""
    edits = len(WORKSPACES.get(ctx.run_id, {}))
    return f"{max(40 - 7 * edits, 0)} of 40 tests failing"


def visit_of(request: ModelRequest) -> tuple[int, int, dict[str, Any]]:
    """An agent's visit (from 1), its turn within the visit (from 0), and the visit's input
    (the state, as the agent was given it)."""
    visit, turn, given = 0, 0, "{}"
    for message in request.messages:
        if message.role == "user" and message.name == "input":
            visit, turn, given = visit + 1, 0, message.content
        elif message.role == "assistant":
            turn += 1
    return visit, turn, json.loads(given)


def build_cycle(script: Script) -> Graph[Work]:
    """Plain nodes a -> b (-> c -> d) -> a; each sets ``stage``, a also counts ``done``. A
    loop run's nodes change nothing after its prefix; a legitimate run ends after 15-40
    rounds."""
    size = script.rng.randint(2, 4)
    rounds = script.rng.randint(15, 40)
    names = ["a", "b", "c", "d"][:size]

    def node(name: str) -> Callable[[Work, NodeContext], Awaitable[dict[str, Any] | None]]:
        async def visit(state: Work, ctx: NodeContext) -> dict[str, Any] | None:
            script.clock_ok = script.clock_ok and ctx.step == script.now
            if script.looping():
                return None
            update: dict[str, Any] = {"stage": name}
            script.wrote("stage", state.stage, name)
            if name == "a":
                update["done"] = state.done + 1
                script.wrote("done", state.done, state.done + 1)
            return update

        return visit

    def again(state: Work) -> str:
        return "a" if script.prefix is not None or state.done < rounds else END

    graph: Graph[Work] = Graph(Work, name="cycle")
    for name in names:
        graph.add_node(name, node(name))
    graph.add_edge(START, "a")
    for one, two in itertools.pairwise(names):
        graph.add_edge(one, two)
    graph.add_route(names[-1], again, targets=["a", END])
    return graph


def build_ping_pong(script: Script, lookups: tuple[int, int]) -> Graph[Work]:
    """A writer and a reviewer agent hand the work back and forth, each first making
    ``lookups`` (a range) distinct lookups a visit. The writer writes a new draft each
    visit, the reviewer "needs work"; a loop run's agents write back what is there after its
    prefix; a legitimate run's reviewer approves at its 15th-30th visit."""
    rounds = script.rng.randint(15, 30)

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        agent = request.agent or ""
        visit, turn, given = visit_of(request)
        if turn < random.Random(f"{script.seed}/{agent}/{visit}").randint(*lookups):
            script.tool_calls += 1
            call = ToolCall(name="lookup", arguments={"query": f"{agent} {visit}.{turn}"})
            return ModelResponse(tool_calls=(call,))
        name = "draft" if agent == "writer" else "review"
        old = given[name]
        if script.looping():
            new = old
        elif agent == "writer":
            new = f"draft {visit}"
        else:
            new = "approved" if script.prefix is None and visit >= rounds else "needs work"
        script.wrote(name, old, new)
        return new

    model = ScriptedModel(answer)
    graph: Graph[Work] = Graph(Work, name="ping_pong")
    graph.add_node(Agent("writer", model=model, tools=[lookup], output="draft"))
    graph.add_node(Agent("reviewer", model=model, tools=[lookup], output="review"))
    graph.add_edge(START, "writer")
    graph.add_edge("writer", "reviewer")
    graph.add_route(
        "reviewer",
        lambda state: END if state.review == "approved" else "writer",
        targets=["writer", END],
    )
    return graph


def one_agent(name: str, model: ScriptedModel, tools: list[Tool]) -> Graph[Work]:
    graph: Graph[Work] = Graph(Work, name=name)
    graph.add_node(Agent("agent", model=model, tools=tools, output="answer", max_turns=1000))
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    return graph


def build_tool_repeat(script: Script, invalid: bool = False) -> Graph[Work]:
    """One agent researching with 1-2 calls a turn (search, read_page, lookup), all with new
    arguments; a legitimate run re-reads a page now and then (never a third time) and
    answers at its 40th-80th turn. After its prefix a loop run's agent calls
    ``read_page(url=.../status, page=1)`` every turn, alone or beside a new call, its
    arguments in either order; ``invalid``: with ``page="first"``, which fails validation."""
    turns = script.rng.randint(40, 80)
    fresh = itertools.count()
    once: list[ToolCall] = []  # calls made once: a legitimate agent may make one again

    def new_call(rng: random.Random) -> ToolCall:
        n = next(fresh)
        name = rng.choice(("search", "read_page", "lookup"))
        if name == "search":
            arguments: dict[str, Any] = {"query": f"topic {n}", "page": 1 + n % 3}
        elif name == "read_page":
            arguments = {"url": f"https://example.org/{n}", "page": 1}
        else:
            arguments = {"query": f"term {n}"}
        call = ToolCall(name=name, arguments=arguments)
        once.append(call)
        return call

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        turn = request.turn
        rng = random.Random(f"{script.seed}/{turn}")
        if script.prefix is None and turn >= turns:
            script.wrote("answer", None, "the research is done")
            return "the research is done"
        if script.looping():
            page: Any = "first" if invalid else 1
            stuck = {"url": "https://example.org/status", "page": page}
            if rng.random() < 0.5:
                stuck = dict(reversed(stuck.items()))
            calls = [ToolCall(name="read_page", arguments=stuck)]
            if rng.random() < 0.5:
                calls.insert(rng.randint(0, 1), new_call(rng))
            if script.first_repeat is None:
                script.first_repeat = script.now
            script.tool_calls += len(calls) - 1 if invalid else len(calls)
        else:
            calls = []
            if script.prefix is None and once and rng.random() < 0.15:
                calls.append(once.pop(rng.randrange(len(once))))  # a second look, no third
            calls.extend(new_call(rng) for _ in range(rng.randint(1, 2)))
            script.tool_calls += len(calls)
        return ModelResponse(tool_calls=tuple(calls))

    return one_agent("tool_repeat", ScriptedModel(answer), [search, read_page, lookup])


def build_edit_test(script: Script) -> Graph[Work]:
    """A coding agent alternates ``write_file`` (a new revision each time) and
    ``run_tests()``, whose result changes with every edit, for 10-25 rounds, then answers."""
    rounds = script.rng.randint(10, 25)

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        turn = request.turn
        if turn >= 2 * rounds:
            script.wrote("answer", None, "all tests pass")
            return "all tests pass"
        script.tool_calls += 1
        if turn % 2:
            return ModelResponse(tool_calls=(ToolCall(name="run_tests", arguments={}),))
        path, content = f"src/module_{turn // 2 % 6}.py", f"# revision {turn // 2}\n"
        call = ToolCall(name="write_file", arguments={"path": path, "content": content})
        return ModelResponse(tool_calls=(call,))

    return one_agent("edit_test", ScriptedModel(answer), [write_file, run_tests])


def build_stuck(script: Script) -> Graph[Work]:
    """A worker agent writes an attempt (after 0-1 lookups), a plain ``check`` node counts
    ``tries`` and, for a good attempt, ``done`` (the progress field). Attempts fail 0-3
    times in a row, never for more than NO_PROGRESS steps; a legitimate run ends at its
    10th-20th good attempt. After its prefix a loop run's attempts all fail (each one
    different, so the state keeps changing)."""
    goal = script.rng.randint(10, 20)
    plan: list[tuple[int, bool]] = []  # per worker visit: lookups, whether the attempt passes
    while len(plan) < 2 * (PREFIX + LOOP_CAP):
        looks = [script.rng.randint(0, 1) for _ in range(script.rng.randint(1, 4))]
        if sum(2 + n for n in looks) <= NO_PROGRESS:  # steps from one progress to the next
            plan.extend((n, i == len(looks) - 1) for i, n in enumerate(looks))

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        visit, turn, given = visit_of(request)
        looks, good = plan[visit - 1]
        if turn < looks:
            script.tool_calls += 1
            call = ToolCall(name="lookup", arguments={"query": f"hint {visit}"})
            return ModelResponse(tool_calls=(call,))
        good = good and not script.looping()
        text = f"attempt {visit} ({'good' if good else 'bad'})"
        script.wrote("attempt", given["attempt"], text, marks=False)
        return text

    async def check(state: Work, ctx: NodeContext) -> dict[str, int]:
        script.clock_ok = script.clock_ok and ctx.step == script.now
        script.wrote("tries", state.tries, state.tries + 1, marks=False)
        if not state.attempt.endswith("(good)"):
            return {"tries": state.tries + 1}
        script.wrote("done", state.done, state.done + 1)
        return {"tries": state.tries + 1, "done": state.done + 1}

    graph: Graph[Work] = Graph(Work, name="stuck")
    graph.add_node(Agent("worker", model=ScriptedModel(answer), tools=[lookup], output="attempt"))
    graph.add_node("check", check)
    graph.add_edge(START, "worker")
    graph.add_edge("worker", "check")
    graph.add_route(
        "check",
        lambda state: END if script.prefix is None and state.done >= goal else "worker",
        targets=["worker", END],
    )
    return graph


@dataclass(frozen=True)
class Case:
    """One kind of run of the loop storm: a loop to catch, or a legitimate run to leave be."""

    kind: str
    name: str
    loop: bool
    build: Callable[[Script], Graph[Work]]
    detector: str | None = None  # the detector meant to catch the loop
    guard: LoopGuard | None = None  # None: compile's default


CASES = (
    Case("cycle", "loop: 2-4 nodes, nothing changes", True, build_cycle, "repeats"),
    Case("cycle", "legit: revisits change the state", False, build_cycle),
    Case(
        "ping-pong",
        "loop: 2 agents, 0-2 lookups a visit",
        True,
        functools.partial(build_ping_pong, lookups=(0, 2)),
        "repeats",
    ),
    Case(
        "ping-pong",
        "loop: 2 agents, 4-5 lookups a visit",
        True,
        functools.partial(build_ping_pong, lookups=(4, 5)),
        "repeats",
    ),
    Case(
        "ping-pong",
        "legit: new draft each round",
        False,
        functools.partial(build_ping_pong, lookups=(0, 2)),
    ),
    Case("tool repeat", "loop: the same call again", True, build_tool_repeat, "same_call"),
    Case(
        "tool repeat",
        "loop: the same invalid call again",
        True,
        functools.partial(build_tool_repeat, invalid=True),
        "same_call",
    ),
    Case("tool repeat", "legit: new calls, a few re-reads", False, build_tool_repeat),
    Case("tool repeat", "legit: edit, run the tests, again", False, build_edit_test),
    Case(
        "stuck",
        "loop: attempts change, done never",
        True,
        build_stuck,
        "no_progress",
        PROGRESS_GUARD,
    ),
    Case(
        "stuck",
        f"legit: done at most every {NO_PROGRESS} steps",
        False,
        build_stuck,
        guard=PROGRESS_GUARD,
    ),
)
