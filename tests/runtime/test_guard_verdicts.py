"""The guards' verdicts, asked directly: breakpoints (a Halt with a request, or None), the
state guard (caps and the state-size budget) and the loop check after a step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Any

import pytest
from pydantic import BaseModel

from orchestra import END, START, Agent, Budget, Cap, Graph, NodeContext, RunStatus, append
from orchestra.errors import InvalidUpdateError
from orchestra.models import Message, ScriptedModel, ToolCall
from orchestra.runtime.guards import Halt, LoopCheck, StateGuard, breakpoint_halt
from orchestra.runtime.tasks import Task, TaskResult
from orchestra.safeguards.budgets import BudgetStop
from orchestra.safeguards.interrupts import Request
from orchestra.safeguards.loops import LoopGuard, LoopWatch
from orchestra.specs import NO_PAYLOAD
from orchestra.state import FieldDelta
from orchestra.store.base import RequestKind, RequestRow, RequestStatus


class S(BaseModel):
    count: int = 0
    answer: str = ""


async def bump(state: S, ctx: NodeContext) -> dict[str, Any]:
    return {"count": state.count + 1}


def marked() -> Any:
    """Compile START -> a -> b -> helper (an agent) -> END, with breakpoints before a, b and
    helper and after b."""
    graph: Graph[S] = Graph(S)
    graph.add_node("a", bump)
    graph.add_node("b", bump)
    graph.add_node(Agent("helper", model=ScriptedModel(["done"])))
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", "helper")
    graph.add_edge("helper", END)
    return graph.compile(interrupt_before=["a", "b", "helper"], interrupt_after=["b"])


def edge(node: str) -> Task:
    return Task(node, 0, NO_PAYLOAD, node)


def halt(
    app: Any,
    where: RequestKind,
    tasks: Sequence[Task],
    *,
    ready: Sequence[Task] = (),
    requests: dict[str, RequestRow] | None = None,
    memory: dict[str, list[Message]] | None = None,
) -> Halt | None:
    return breakpoint_halt(
        app, "r1", where, 2, tasks, ready=ready, requests=requests or {}, memory=memory or {}
    )


def stored(request: Request, **changes: Any) -> RequestRow:
    """The stored row of ``request``, created earlier, with ``changes``."""
    return dataclasses.replace(request.to_row(), created_at=1.0, **changes)


# -- breakpoint_halt ----------------------------------------------------------------------


def test_breakpoint_halt_is_none_for_nodes_without_a_breakpoint() -> None:
    """A step whose nodes are not marked goes on."""
    assert halt(marked(), RequestKind.AFTER, [edge("a")], ready=[edge("b")]) is None


def test_breakpoint_halt_before_a_marked_node_asks_a_before_request() -> None:
    """Before a marked node, the verdict is an interrupt with one request naming it."""
    verdict = halt(marked(), RequestKind.BEFORE, [edge("b")])
    assert verdict is not None
    assert verdict.status is RunStatus.INTERRUPTED
    [request] = verdict.pending
    assert (request.kind, request.step, request.node) == (RequestKind.BEFORE, 2, "b")
    assert request.payload == {"nodes": ["b"], "tasks": ["b"]}


def test_breakpoint_halt_after_a_marked_node_names_the_tasks_that_are_next() -> None:
    """After a marked node, the request lists the next step's tasks."""
    verdict = halt(marked(), RequestKind.AFTER, [edge("b")], ready=[edge("helper")])
    assert verdict is not None
    [request] = verdict.pending
    assert request.kind == RequestKind.AFTER
    assert request.payload == {"nodes": ["b"], "tasks": ["helper"]}


def test_breakpoint_halt_asks_the_same_request_for_the_same_step() -> None:
    """Asking twice for the same breakpoint gives one request id."""
    first = halt(marked(), RequestKind.BEFORE, [edge("b")])
    second = halt(marked(), RequestKind.BEFORE, [edge("b")])
    assert first is not None
    assert second is not None
    assert first.pending[0].id == second.pending[0].id


def test_breakpoint_halt_asked_again_returns_the_stored_request() -> None:
    """A breakpoint whose request is still open halts with the request as stored."""
    app = marked()
    new = halt(app, RequestKind.BEFORE, [edge("b")])
    assert new is not None
    row = stored(new.pending[0])
    verdict = halt(app, RequestKind.BEFORE, [edge("b")], requests={row.request_id: row})
    assert verdict is not None
    assert verdict.pending == (Request.from_row(row),)
    assert verdict.pending[0].created_at == 1.0


def test_breakpoint_halt_is_none_once_answered() -> None:
    """A breakpoint an operator let pass does not stop the step again."""
    app = marked()
    new = halt(app, RequestKind.BEFORE, [edge("b")])
    assert new is not None
    row = stored(new.pending[0], status=RequestStatus.ANSWERED, answer='{"answer":"continue"}')
    assert halt(app, RequestKind.BEFORE, [edge("b")], requests={row.request_id: row}) is None


def test_breakpoint_halt_asks_anew_after_an_abort_answer() -> None:
    """A breakpoint answered with an abort stops the run again, with a new request."""
    app = marked()
    new = halt(app, RequestKind.BEFORE, [edge("b")])
    assert new is not None
    row = stored(new.pending[0], status=RequestStatus.ANSWERED, answer='{"answer":"abort"}')
    verdict = halt(app, RequestKind.BEFORE, [edge("b")], requests={row.request_id: row})
    assert verdict is not None
    assert verdict.pending[0].created_at != 1.0


def test_breakpoint_halt_names_every_marked_node_of_the_step() -> None:
    """One request covers every marked node of the step, in name order."""
    verdict = halt(marked(), RequestKind.BEFORE, [edge("b"), edge("a")])
    assert verdict is not None
    [request] = verdict.pending
    assert request.payload["nodes"] == ["a", "b"]


def test_breakpoint_halt_before_lets_an_agent_between_turns_go_on() -> None:
    """An agent is stopped before a visit, not before each turn of it."""
    call = ToolCall(name="lookup", id="c1")
    memory = {"helper": [Message(role="assistant", name="helper", tool_calls=(call,))]}
    assert halt(marked(), RequestKind.BEFORE, [edge("helper")], memory=memory) is None


def test_breakpoint_halt_before_stops_an_agent_starting_a_visit() -> None:
    """An agent whose last visit ended is stopped before its next one."""
    memory = {"helper": [Message(role="assistant", name="helper", content="done")]}
    verdict = halt(marked(), RequestKind.BEFORE, [edge("helper")], memory=memory)
    assert verdict is not None
    assert verdict.pending[0].payload["nodes"] == ["helper"]


# -- StateGuard: caps ---------------------------------------------------------------------


def summarize(items: list[str]) -> list[str]:
    return [f"{len(items)} notes"]


class Capped(BaseModel):
    strict: Annotated[list[str], append, Cap(2)] = []
    recent: Annotated[list[str], append, Cap(2, "drop_oldest")] = []
    summed: Annotated[list[str], append, Cap(2, summarize)] = []
    loose: Annotated[list[str], append, Cap(2, lambda items: items)] = []
    free: Annotated[list[str], append] = []


Warned = list[tuple[str, str, float, float]]


def guard(state: BaseModel, budget: Budget | None = None) -> tuple[StateGuard, Warned]:
    """A state guard for a run starting at ``state``, and the warnings it gives."""
    warned: Warned = []
    made = StateGuard("r1", state, budget or Budget(), lambda *warning: warned.append(warning))
    return made, warned


def written(field: str, value: Any, writer: str = "writer") -> tuple[list[Task], list[TaskResult]]:
    """The tasks and results of a step in which ``writer`` wrote ``field``."""
    return [edge(writer)], [TaskResult(update={field: value})]


def test_state_guard_is_inactive_without_caps_or_a_size_budget() -> None:
    """A state with no capped field and no state_bytes limit has nothing to check."""
    assert not guard(S())[0].active
    assert guard(Capped())[0].active
    assert guard(S(), Budget(state_bytes=1000))[0].active


def test_state_guard_refuses_a_field_over_a_refusing_cap() -> None:
    """Policy 'refuse' raises InvalidUpdateError naming the field and its writer."""
    checker, _ = guard(Capped())
    state = Capped(strict=["a", "b", "c"])
    tasks, results = written("strict", "c")
    with pytest.raises(InvalidUpdateError, match=r"'strict'.*'writer'") as caught:
        checker.check(state, {"strict": FieldDelta("append", ["c"])}, tasks, results, 3)
    assert (caught.value.step, caught.value.node) == (3, "writer")


def test_state_guard_drop_oldest_keeps_the_newest_items() -> None:
    """Policy 'drop_oldest' trims the field to its newest max_items."""
    checker, _ = guard(Capped())
    state = Capped(recent=["a", "b", "c"])
    tasks, results = written("recent", "c")
    held, _ = checker.check(state, {"recent": FieldDelta("append", ["c"])}, tasks, results, 3)
    assert held.recent == ["b", "c"]


def test_state_guard_stores_a_trimmed_field_whole() -> None:
    """A trimmed field's delta is no longer an append: it sets the kept items."""
    checker, _ = guard(Capped())
    state = Capped(recent=["a", "b", "c"])
    tasks, results = written("recent", "c")
    _, deltas = checker.check(state, {"recent": FieldDelta("append", ["c"])}, tasks, results, 3)
    assert deltas == {"recent": FieldDelta("set", ["b", "c"])}


def test_state_guard_hook_replaces_the_field() -> None:
    """A hook policy gets the items and its result becomes the field."""
    checker, _ = guard(Capped())
    state = Capped(summed=["a", "b", "c"])
    tasks, results = written("summed", "c")
    held, _ = checker.check(state, {"summed": FieldDelta("append", ["c"])}, tasks, results, 3)
    assert held.summed == ["3 notes"]


def test_state_guard_refuses_a_hook_result_over_the_cap() -> None:
    """A hook that returns more than max_items fails the step."""
    checker, _ = guard(Capped())
    state = Capped(loose=["a", "b", "c"])
    tasks, results = written("loose", "c")
    with pytest.raises(InvalidUpdateError, match="'loose' returned 3 items"):
        checker.check(state, {"loose": FieldDelta("append", ["c"])}, tasks, results, 3)


def test_state_guard_leaves_a_field_within_its_cap() -> None:
    """A capped field at its cap is committed as it is."""
    checker, _ = guard(Capped())
    state = Capped(recent=["a", "b"])
    deltas = {"recent": FieldDelta("append", ["b"])}
    tasks, results = written("recent", "b")
    assert checker.check(state, deltas, tasks, results, 3) == (state, deltas)


def test_state_guard_checks_only_the_fields_the_step_changed() -> None:
    """A field over its cap that the step did not write is not refused by this step."""
    checker, _ = guard(Capped())
    state = Capped(strict=["a", "b", "c"], free=["x"])
    deltas = {"free": FieldDelta("append", ["x"])}
    tasks, results = written("free", "x")
    assert checker.check(state, deltas, tasks, results, 3) == (state, deltas)


# -- StateGuard: the state-size budget ----------------------------------------------------


class Doc(BaseModel):
    title: str = ""
    text: str = ""


def test_state_guard_refuses_an_update_over_the_size_budget() -> None:
    """An update that would make the state larger than state_bytes is a BudgetStop."""
    checker, _ = guard(Doc(), Budget(state_bytes=100))
    state = Doc(text="x" * 200)
    tasks, results = written("text", state.text)
    with pytest.raises(BudgetStop, match="state-size budget"):
        checker.check(state, {"text": FieldDelta("set", state.text)}, tasks, results, 1)


def test_state_guard_size_stop_names_the_field_that_grew_most_and_its_writer() -> None:
    """The BudgetStop names the field whose update grew the state most, and who wrote it."""
    checker, _ = guard(Doc(), Budget(state_bytes=100))
    state = Doc(title="t" * 20, text="x" * 200)
    deltas = {"title": FieldDelta("set", state.title), "text": FieldDelta("set", state.text)}
    tasks = [edge("titler"), edge("writer")]
    results = [TaskResult(update={"title": state.title}), TaskResult(update={"text": state.text})]
    with pytest.raises(BudgetStop) as caught:
        checker.check(state, deltas, tasks, results, 1)
    assert "field 'text' by 'writer'" in caught.value.reason


def test_state_guard_lets_an_update_within_the_size_budget() -> None:
    """An update that keeps the state within state_bytes passes unchanged."""
    checker, _ = guard(Doc(), Budget(state_bytes=100))
    state = Doc(text="x" * 10)
    deltas = {"text": FieldDelta("set", state.text)}
    tasks, results = written("text", state.text)
    assert checker.check(state, deltas, tasks, results, 1) == (state, deltas)


def test_state_guard_lets_a_state_over_its_budget_shrink() -> None:
    """An update that makes a state already over its limit smaller (a compaction) passes."""
    checker, _ = guard(Doc(text="x" * 300), Budget(state_bytes=100))
    state = Doc(text="x" * 200)
    tasks, results = written("text", state.text)
    checker.check(state, {"text": FieldDelta("set", state.text)}, tasks, results, 1)


def test_state_guard_measures_from_the_last_accepted_update() -> None:
    """The size kept after an accepted update is where the next update is measured from."""
    checker, _ = guard(Doc(), Budget(state_bytes=100))
    first = Doc(text="x" * 60)
    tasks, results = written("text", first.text)
    checker.check(first, {"text": FieldDelta("set", first.text)}, tasks, results, 1)
    second = Doc(title="t" * 40, text=first.text)
    tasks, results = written("title", second.title)
    with pytest.raises(BudgetStop, match="'title'"):
        checker.check(second, {"title": FieldDelta("set", second.title)}, tasks, results, 2)


def test_state_guard_warns_at_the_soft_limit() -> None:
    """Reaching the soft fraction of state_bytes warns with the size and the limit."""
    checker, warned = guard(Doc(), Budget(state_bytes=100, soft=0.5))
    state = Doc(text="x" * 50)
    tasks, results = written("text", state.text)
    checker.check(state, {"text": FieldDelta("set", state.text)}, tasks, results, 1)
    assert warned == [("run", "state_bytes", float(len(state.model_dump_json())), 100.0)]


def test_state_guard_warns_once() -> None:
    """A later step still over the soft limit does not warn again."""
    checker, warned = guard(Doc(), Budget(state_bytes=100, soft=0.5))
    for size in (50, 60):
        state = Doc(text="x" * size)
        tasks, results = written("text", state.text)
        checker.check(state, {"text": FieldDelta("set", state.text)}, tasks, results, 1)
    assert len(warned) == 1


def test_state_guard_does_not_warn_below_the_soft_limit() -> None:
    """A state under the soft fraction of its limit gives no warning."""
    checker, warned = guard(Doc(), Budget(state_bytes=100, soft=0.5))
    state = Doc(text="x" * 10)
    tasks, results = written("text", state.text)
    checker.check(state, {"text": FieldDelta("set", state.text)}, tasks, results, 1)
    assert warned == []


# -- LoopCheck.after_step -----------------------------------------------------------------


def loop_check(loop_guard: LoopGuard) -> LoopCheck:
    """The loop check of run r1 starting at S(), with ``loop_guard``'s detectors."""
    return LoopCheck(marked(), "r1", LoopWatch(loop_guard, S(), 0))


def after(
    check: LoopCheck,
    step: int,
    following: Sequence[Task] = (edge("a"),),
    *,
    state: S | None = None,
    changed: dict[str, Any] | None = None,
    results: Sequence[TaskResult] = (TaskResult(),),
    agents: bool = False,
) -> Halt | None:
    """Run the check after ``step``, in which task a ran, with ``following`` next."""
    return check.after_step(
        step,
        state or S(),
        changed or {},
        following,
        [edge("a")] * len(results),
        results,
        agents=agents,
    )


REPEATS = LoopGuard(repeats=2, similar_output=None)


def test_loop_check_after_step_is_none_without_a_loop() -> None:
    """A step that changed the state is no repetition."""
    check = loop_check(REPEATS)
    assert after(check, 1) is None
    state = S(count=1)
    assert after(check, 2, state=state, changed={"count": FieldDelta("set", 1)}) is None


def test_loop_check_after_step_stops_a_loop_with_loop_detected() -> None:
    """With policy 'stop', a repetition halts the run as loop_detected, with its event."""
    check = loop_check(REPEATS)
    assert after(check, 1) is None
    verdict = after(check, 2)
    assert verdict is not None
    assert verdict.status is RunStatus.LOOP_DETECTED
    assert verdict.reason.startswith("loop detected: ")
    assert verdict.pending == ()
    assert verdict.event is not None
    assert (verdict.event.run_id, verdict.event.step, verdict.event.detector) == (
        "r1",
        2,
        "repeats",
    )


def test_loop_check_after_step_interrupts_a_loop_with_a_loop_request() -> None:
    """With policy 'interrupt', a repetition halts the run interrupted, asking an operator."""
    check = loop_check(LoopGuard(repeats=2, similar_output=None, policy="interrupt"))
    after(check, 1)
    verdict = after(check, 2)
    assert verdict is not None
    assert verdict.status is RunStatus.INTERRUPTED
    [request] = verdict.pending
    assert (request.kind, request.step, request.node) == (RequestKind.LOOP, 2, "a")
    assert request.payload["detector"] == "repeats"
    assert verdict.event is not None


def test_loop_check_after_step_follows_the_policy_of_the_detector() -> None:
    """A policy per detector applies to that detector only."""
    check = loop_check(LoopGuard(repeats=2, similar_output=None, policy={"repeats": "interrupt"}))
    after(check, 1)
    verdict = after(check, 2)
    assert verdict is not None
    assert verdict.status is RunStatus.INTERRUPTED


def test_loop_check_after_step_is_none_when_nothing_follows() -> None:
    """A loop found at a step with no next tasks does not stop a run that ends anyway."""
    check = loop_check(LoopGuard(no_progress=2, progress=("count",), similar_output=None))
    after(check, 1, following=())
    assert after(check, 2, following=()) is None


def test_loop_check_after_step_does_not_count_agents_between_turns() -> None:
    """A step in which agents use tools (they run again) is not a repetition."""
    check = loop_check(REPEATS)
    busy = (TaskResult(again=True),)
    assert after(check, 1, results=busy, agents=True) is None
    assert after(check, 2, results=busy, agents=True) is None
