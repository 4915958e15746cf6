"""Loop detection: exact cycles and ping-pong (repeated state with the same next nodes),
an agent repeating one tool call (stop, or nudge once), no progress on chosen fields, no
false positive on a run that progresses, volatile fields, and the guard's configuration."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Abort,
    Agent,
    Budget,
    Continue,
    Done,
    Effect,
    Graph,
    GraphValidationError,
    NodeContext,
    RunStatus,
    Send,
    append,
    tool,
)
from orchestra.errors import AnswerError
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.safeguards.loops import LoopGuard
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    counter: int = 0
    owner: str = ""
    stamp: float = 0.0
    done: int = 0
    answer: str | None = None


def cycle(**compile_options: Any) -> Any:
    """a -> b -> a forever, changing nothing (an exact cycle)."""

    async def a(state: S, ctx: NodeContext) -> None:
        return None

    async def b(state: S, ctx: NodeContext) -> None:
        return None

    graph: Graph[S] = Graph(S)
    graph.add_node("a", a)
    graph.add_node("b", b)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_route("b", lambda state: "a", targets=["a", END])
    return graph.compile(budget=Budget(steps=200), **compile_options)


async def test_loops_exact_cycle_stops_the_run_with_evidence(store: Store) -> None:
    """An exact cycle is stopped loop_detected after the third repetition, checkpointed,
    with the repeating steps as evidence."""
    outcome = await cycle(store=store).run(S(), run_id="r1")
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert outcome.steps <= 6
    assert "came back 3 times" in (outcome.stop_reason or "")
    checkpoints = await store.checkpoints("r1")
    assert checkpoints[-1].step == outcome.steps  # stopped after checkpointing
    (event,) = [e for e in await store.events("r1") if e.kind == "loop_detected"]
    evidence = json.loads(json.loads(event.data)["evidence"])
    assert len(evidence["steps"]) == 3


async def test_loops_ping_pong_between_agents_is_detected() -> None:
    """Two agents handing work back and forth without changing the state are stopped."""
    model = ScriptedModel(lambda request: "over to you")
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model))
    graph.add_node(Agent("b", model=model))
    graph.add_edge(START, "a")
    graph.add_route("a", lambda state: "b", targets=["b", END])
    graph.add_route("b", lambda state: "a", targets=["a", END])
    outcome = await graph.compile(budget=Budget(steps=100)).run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert outcome.steps <= 6


async def test_loops_progressing_loop_is_not_a_loop() -> None:
    """A loop that changes the state every round runs to its end: no false positive."""

    async def count(state: S, ctx: NodeContext) -> dict[str, int]:
        return {"counter": state.counter + 1}

    graph: Graph[S] = Graph(S)
    graph.add_node("count", count)
    graph.add_edge(START, "count")
    graph.add_route(
        "count", lambda state: "count" if state.counter < 150 else END, targets=["count", END]
    )
    outcome = await graph.compile(budget=Budget(steps=500)).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.counter == 150


async def test_loops_volatile_fields_do_not_hide_a_cycle() -> None:
    """A cycle that only refreshes a timestamp is still a cycle when the field is
    volatile, and is not one when it is not."""

    async def tick(state: S, ctx: NodeContext) -> dict[str, float]:
        return {"stamp": time.monotonic()}

    def build(**guard: Any) -> Any:
        graph: Graph[S] = Graph(S)
        graph.add_node("tick", tick)
        graph.add_edge(START, "tick")
        graph.add_route("tick", lambda state: "tick", targets=["tick", END])
        return graph.compile(budget=Budget(steps=30), loop_guard=LoopGuard(**guard))

    caught = await build(volatile=("stamp",)).run(S())
    assert caught.status is RunStatus.LOOP_DETECTED
    missed = await build().run(S())
    assert missed.status is RunStatus.BUDGET_EXCEEDED


@tool(effect=Effect.READ)
async def look(q: str) -> str:
    """Look something up."""
    return "same answer"


def repeating_agent(policy: str, stubborn: bool) -> tuple[Any, ScriptedModel]:
    """An agent that calls look(q="x") every turn; unless ``stubborn``, it answers once
    the framework tells it that it is repeating itself."""

    def answer(request: ModelRequest) -> ModelResponse | str:
        told = any(m.name == "orchestra" for m in request.messages)
        if told and not stubborn:
            return "giving up on the lookup"
        return ModelResponse(tool_calls=(ToolCall(name="look", arguments={"q": "x"}),))

    model = ScriptedModel(answer)
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, tools=[look], output="answer", max_turns=50))
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    guard = LoopGuard(repeats=None, policy={"same_call": policy})
    return graph.compile(loop_guard=guard), model


async def test_loops_same_tool_call_repeated_stops_the_run() -> None:
    """An agent calling the same tool with the same arguments a third time is stopped."""
    app, _ = repeating_agent("stop", stubborn=True)
    outcome = await app.run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert "'a' called look" in (outcome.stop_reason or "")
    assert outcome.usage.tool_calls == 3


async def test_loops_nudge_tells_the_agent_once_and_it_can_change_course() -> None:
    """Under nudge the agent is told what it repeats; it answers and the run completes."""
    app, model = repeating_agent("nudge", stubborn=False)
    outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.answer == "giving up on the lookup"
    nudges = [m for m in model.requests[-1].messages if m.name == "orchestra"]
    assert len(nudges) == 1
    assert "You are repeating yourself" in nudges[0].content


async def test_loops_nudge_then_repeat_stops_the_run() -> None:
    """An agent that ignores the nudge and repeats again is stopped."""
    app, _ = repeating_agent("nudge", stubborn=True)
    outcome = await app.run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert outcome.usage.tool_calls == 4  # 3, the nudge, then one more stops it


async def test_loops_no_progress_on_chosen_fields_is_detected() -> None:
    """No change to the progress fields for N steps stops the run, even while other
    fields change."""

    async def busy(state: S, ctx: NodeContext) -> dict[str, int]:
        return {"counter": state.counter + 1}  # moving, but never getting done

    graph: Graph[S] = Graph(S)
    graph.add_node("busy", busy)
    graph.add_edge(START, "busy")
    graph.add_route("busy", lambda state: "busy", targets=["busy", END])
    guard = LoopGuard(no_progress=5, progress=("done",))
    outcome = await graph.compile(budget=Budget(steps=100), loop_guard=guard).run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert outcome.steps == 5
    assert "no change to 'done' for 5 steps" in (outcome.stop_reason or "")


async def test_loops_guard_off_lets_the_step_budget_stop_it() -> None:
    """loop_guard=None turns the detectors off; the step budget still ends the run."""
    outcome = await cycle(loop_guard=None).run(S())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED


async def test_loops_stopped_run_can_be_resumed_by_an_operator(store: Store) -> None:
    """A run stopped as a loop can be resumed (an operator's decision); it is watched
    afresh, so the same loop stops it again."""
    app = cycle(store=store)
    first = await app.run(S(), run_id="r1")
    second = await app.resume("r1")
    assert second.status is RunStatus.LOOP_DETECTED
    assert second.steps > first.steps


def test_loops_guard_fields_must_be_state_fields() -> None:
    """Progress or volatile fields that the state lacks are compile problems."""
    with pytest.raises(GraphValidationError, match="progress field 'nope'"):
        cycle(loop_guard=LoopGuard(no_progress=3, progress=("nope",)))


def test_loops_guard_rejects_bad_settings() -> None:
    """Bad thresholds, unknown policies and no_progress without fields are refused."""
    for bad in (
        {"repeats": 1},
        {"policy": "shrug"},
        {"policy": {"no_progress": "nudge"}},
        {"policy": {"same_calls": "nudge"}},
        {"repeats": 5, "window": 4},
        {"progress": "done", "no_progress": 3},
        {"no_progress": 3},
        {"policy": {"repeats": "nudge"}},
    ):
        with pytest.raises(ValueError, match=r"LoopGuard|policy|nudge"):
            LoopGuard(**bad)


async def test_loops_interrupt_policy_asks_an_operator(store: Store) -> None:
    """Under interrupt a loop stops the run interrupted with a loop request; Continue()
    lets it go on (watched afresh, so it is asked again), Abort() stops it."""
    app = cycle(store=store, loop_guard=LoopGuard(policy="interrupt"))
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.INTERRUPTED
    (request,) = first.pending
    assert request.kind == "loop"
    assert request.payload["detector"] == "repeats"
    assert "suspected loop" in request.describe()
    second = await app.resume("r1", answers={request.id: Continue()})
    assert second.status is RunStatus.INTERRUPTED
    assert second.steps > first.steps
    (again,) = second.pending
    assert again.id != request.id
    third = await app.resume("r1", answers={again.id: Abort("a real loop")})
    assert third.status is RunStatus.ABORTED
    assert third.stop_reason == "a real loop"


async def test_loops_loop_request_refuses_other_answers(store: Store) -> None:
    """A loop request takes Continue() or Abort(), nothing else."""
    app = cycle(store=store, loop_guard=LoopGuard(policy="interrupt"))
    (request,) = (await app.run(S(), run_id="r1")).pending
    with pytest.raises(AnswerError, match=r"Continue\(\)"):
        await app.resume("r1", answers={request.id: Done("x")})


async def test_loops_invalid_call_repeated_is_a_loop() -> None:
    """An agent repeating a call the gateway refuses (bad arguments) is stopped too."""

    def answer(request: ModelRequest) -> ModelResponse:
        return ModelResponse(tool_calls=(ToolCall(name="look", arguments={"q": 1}),))

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=ScriptedModel(answer), tools=[look], max_turns=50))
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    outcome = await graph.compile(budget=Budget(steps=40)).run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert outcome.steps == 3


async def test_loops_calls_after_a_write_are_not_repetitions() -> None:
    """Tests re-run after each edit (a write call in between) are not a loop, even when
    their result is the same; re-running them with no edit is."""
    files: dict[str, str] = {}

    @tool(effect=Effect.WRITE)
    async def write(path: str, content: str) -> str:
        files[path] = content
        return "written"

    @tool(effect=Effect.READ)
    async def run_tests() -> str:
        return "3 failing"

    def build(edits: bool) -> Any:
        def answer(request: ModelRequest) -> ModelResponse | str:
            turn = request.turn
            if turn >= 16:
                return "done"
            if edits and turn % 2 == 0:
                call = ToolCall(name="write", arguments={"path": "a.py", "content": str(turn)})
            else:
                call = ToolCall(name="run_tests", arguments={})
            return ModelResponse(tool_calls=(call,))

        graph: Graph[S] = Graph(S)
        agent = Agent("a", model=ScriptedModel(answer), tools=[write, run_tests], max_turns=50)
        graph.add_node(agent)
        graph.add_edge(START, "a")
        graph.add_edge("a", END)
        return graph.compile(budget=Budget(steps=40))

    assert (await build(edits=True).run(S())).status is RunStatus.COMPLETED
    assert (await build(edits=False).run(S())).status is RunStatus.LOOP_DETECTED


async def test_loops_long_rounds_between_agents_are_compared() -> None:
    """Agents handing work back and forth with many tool turns a visit are still caught:
    the window counts the steps where the state is compared, not the turns in between."""

    def answer(request: ModelRequest) -> ModelResponse | str:
        since = 0
        for message in reversed(request.messages):
            if message.role == "user" and message.name == "input":
                break
            since += message.role == "assistant"
        if since < 6:
            return ModelResponse(
                tool_calls=(ToolCall(name="look", arguments={"q": f"{request.turn}"}),)
            )
        return "over to you"

    model = ScriptedModel(answer)
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, tools=[look], max_turns=50))
    graph.add_node(Agent("b", model=model, tools=[look], max_turns=50))
    graph.add_edge(START, "a")
    graph.add_route("a", lambda state: "b", targets=["b", END])
    graph.add_route("b", lambda state: "a", targets=["a", END])
    outcome = await graph.compile(budget=Budget(steps=200)).run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert "came back 3 times" in (outcome.stop_reason or "")


async def test_loops_plain_resume_of_a_loop_request_asks_again(store: Store) -> None:
    """A resume without an answer to a suspected loop runs nothing and keeps asking."""
    app = cycle(store=store, loop_guard=LoopGuard(policy="interrupt"))
    first = await app.run(S(), run_id="r1")
    second = await app.resume("r1")
    assert second.status is RunStatus.INTERRUPTED
    assert second.steps == first.steps
    assert [r.id for r in second.pending] == [r.id for r in first.pending]
    assert len(await store.requests("r1")) == 1


async def test_loops_send_chain_carrying_progress_in_its_payload_is_not_a_loop() -> None:
    """A node that hands itself the next item with Send, the state unchanged, progresses:
    the payload is part of what repeats."""
    seen: list[int] = []

    async def work(item: int, ctx: NodeContext) -> Any:
        seen.append(item)
        return Send("work", item + 1) if item < 9 else None

    async def start(state: S, ctx: NodeContext) -> Any:
        return Send("work", 0)

    graph: Graph[S] = Graph(S)
    graph.add_node("start", start, targets=["work"])
    graph.add_node("work", work, targets=["work"])
    graph.add_edge(START, "start")
    graph.add_edge("work", END)
    outcome = await graph.compile().run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert seen == list(range(10))


async def test_loops_same_lookup_once_per_round_of_a_progressing_run_is_not_a_loop() -> None:
    """An agent making the same lookup at the start of each visit, while the state moves
    on between visits, is not repeating itself."""

    def answer(request: ModelRequest) -> ModelResponse | str:
        last = request.messages[-1]
        if last.role == "user":
            return ModelResponse(tool_calls=(ToolCall(name="look", arguments={"q": "guide"}),))
        return "next"

    async def bump(state: S, ctx: NodeContext) -> dict[str, int]:
        return {"counter": state.counter + 1}

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("worker", model=ScriptedModel(answer), tools=[look]))
    graph.add_node("bump", bump)
    graph.add_edge(START, "worker")
    graph.add_edge("worker", "bump")
    graph.add_route("bump", lambda s: "worker" if s.counter < 6 else END, targets=["worker", END])
    outcome = await graph.compile(budget=Budget(steps=100)).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.counter == 6


async def test_loops_writing_the_same_value_is_not_progress() -> None:
    """A progress field written with its old value does not count as progress."""

    async def busy(state: S, ctx: NodeContext) -> dict[str, int]:
        return {"counter": state.counter + 1, "done": state.done}

    graph: Graph[S] = Graph(S)
    graph.add_node("busy", busy)
    graph.add_edge(START, "busy")
    graph.add_route("busy", lambda state: "busy", targets=["busy", END])
    guard = LoopGuard(no_progress=5, progress=("done",))
    outcome = await graph.compile(budget=Budget(steps=60), loop_guard=guard).run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert outcome.steps == 5


async def test_loops_fingerprint_survives_values_pydantic_cannot_serialize() -> None:
    """A dict field holding an arbitrary object does not crash the loop guard."""

    class Bag(BaseModel):
        model_config = {"arbitrary_types_allowed": True}
        things: dict[str, Any] = {}

    async def put(state: Bag, ctx: NodeContext) -> dict[str, Any]:
        return {"things": {"lock": object()}}

    graph: Graph[Bag] = Graph(Bag)
    graph.add_node("put", put)
    graph.add_edge(START, "put")
    graph.add_edge("put", END)
    assert (await graph.compile().run(Bag())).status is RunStatus.COMPLETED


def answering_loop(answers: list[str], **guard: Any) -> Any:
    """An agent visited again and again (a counter moves on), answering from ``answers``."""

    def answer(request: ModelRequest) -> str:
        visits = sum(1 for m in request.messages if m.name == "input")
        return answers[(visits - 1) % len(answers)]

    async def bump(state: S, ctx: NodeContext) -> dict[str, int]:
        return {"counter": state.counter + 1}

    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("writer", model=ScriptedModel(answer), output="answer"))
    graph.add_node("bump", bump)
    graph.add_edge(START, "writer")
    graph.add_edge("writer", "bump")
    graph.add_route("bump", lambda s: "writer" if s.counter < 8 else END, targets=["writer", END])
    return graph.compile(budget=Budget(steps=100), loop_guard=LoopGuard(**guard))


async def test_loops_near_identical_answers_in_a_row_are_a_loop() -> None:
    """An agent giving essentially the same answer three times in a row is stopped, even
    though the state (a counter) moves on."""
    outcome = await answering_loop(
        [
            "I am still looking into the refund for order 42.",
            "I am still looking into the refund for order 42!",
        ]
    ).run(S())
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert "near-identical answers 3 times in a row" in (outcome.stop_reason or "")


async def test_loops_different_or_short_answers_are_not_a_loop() -> None:
    """Answers that differ, or short ones (a label), repeat legitimately."""
    varied = answering_loop(
        [f"Refund {i} approved for order {40 + i}, case closed." for i in range(4)]
    )
    assert (await varied.run(S())).status is RunStatus.COMPLETED
    short = answering_loop(["billing"])
    assert (await short.run(S())).status is RunStatus.COMPLETED
    off = answering_loop(["I am still looking into the refund for order 42."], similar_output=None)
    assert (await off.run(S())).status is RunStatus.COMPLETED


async def test_loops_watch_goes_on_across_interrupts(store: Store) -> None:
    """A resume continues the stopped run's loop watch: an agent repeating the same
    irreversible call, approved by a person each turn, is still stopped at its third
    call instead of looking new after every approval."""
    from orchestra import Approve

    runs: list[int] = []

    @tool(effect=Effect.IRREVERSIBLE)
    async def pay(to: str) -> str:
        """Pay someone."""
        runs.append(1)
        return "paid"

    model = ScriptedModel(
        lambda request: ModelResponse(tool_calls=(ToolCall(name="pay", arguments={"to": "x"}),))
    )
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, tools=[pay], output="answer", max_turns=50))
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    app = graph.compile(store=store, loop_guard=LoopGuard(repeats=None))
    outcome = await app.run(S(), run_id="r1")
    asked = 0
    while outcome.status is RunStatus.INTERRUPTED and asked < 10:
        asked += 1
        outcome = await app.resume("r1", answers={r.id: Approve() for r in outcome.pending})
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert (asked, len(runs)) == (3, 3)


async def test_loops_watch_of_another_state_is_not_taken_over() -> None:
    """A kept watch is used only for the state it was kept with."""
    from orchestra.safeguards.loops import LoopWatch

    guard = LoopGuard()
    watch = LoopWatch(guard, S(counter=1), 0)
    watch.after_step(1, S(counter=1), {}, ("a",), False)
    kept = watch.snapshot(1, S(counter=1))
    assert LoopWatch(guard, S(counter=1), 1).restore(kept)
    assert not LoopWatch(guard, S(counter=2), 1).restore(kept)
    assert not LoopWatch(guard, S(counter=1), 1).restore({**kept, "window": "garbage"})


class Noted(BaseModel):
    notes: Annotated[list[str], append] = []
    answer: str | None = None


async def test_loops_watch_goes_on_across_interrupts_after_appends(store: Store) -> None:
    """The kept watch is taken back when the state has list fields that grew by appends
    (the running fingerprint folds appends in; a resumed one starts from the whole list)."""
    from orchestra import Approve

    runs: list[int] = []

    @tool(effect=Effect.IRREVERSIBLE)
    async def pay(to: str) -> str:
        """Pay someone."""
        runs.append(1)
        return "paid"

    async def intake(state: Noted, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": "ticket opened"}

    model = ScriptedModel(
        lambda request: ModelResponse(tool_calls=(ToolCall(name="pay", arguments={"to": "x"}),))
    )
    graph: Graph[Noted] = Graph(Noted)
    graph.add_node("intake", intake)
    graph.add_node(Agent("a", model=model, tools=[pay], output="answer", max_turns=50))
    graph.add_edge(START, "intake")
    graph.add_edge("intake", "a")
    graph.add_edge("a", END)
    app = graph.compile(store=store, loop_guard=LoopGuard(repeats=None))
    outcome = await app.run(Noted(), run_id="r1")
    asked = 0
    while outcome.status is RunStatus.INTERRUPTED and asked < 10:
        asked += 1
        outcome = await app.resume("r1", answers={r.id: Approve() for r in outcome.pending})
    assert outcome.status is RunStatus.LOOP_DETECTED
    assert (asked, len(runs)) == (3, 3)


async def test_loops_kept_watch_leaves_out_the_step_that_did_not_commit(store: Store) -> None:
    """A step stopped after its act phase (here by the state-size budget) is not counted
    twice when it runs again: one call made once is never a repetition."""

    @tool(effect=Effect.READ)
    async def lookup(q: str) -> str:
        """Look something up."""
        return "found"

    async def grow(state: Noted, ctx: NodeContext) -> dict[str, Any]:
        return {"notes": "x" * 400}

    model = ScriptedModel(
        {
            "a": [
                ModelResponse(tool_calls=(ToolCall(name="lookup", arguments={"q": "1"}),)),
                "done",
            ]
        }
    )
    graph: Graph[Noted] = Graph(Noted)
    graph.add_node(Agent("a", model=model, tools=[lookup], output="answer"))
    graph.add_node("grow", grow)
    for name in ("a", "grow"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    app = graph.compile(store=store, budget=Budget(state_bytes=200))
    outcome = await app.run(Noted(), run_id="r1")
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    for limit in (300, 100_000):  # still too small, then enough
        await app.set_budget("r1", Budget(state_bytes=limit))
        outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED, outcome.stop_reason
