"""Arbitration through real graphs: agents (on ScriptedModel) proposing conflicting tool calls
in one step, and plain nodes calling ``ctx.call_tool`` at once (DESIGN §3, gateway step 4).

The invariant tests at the end run a real lost-update race (each call reads, yields, then
writes) and show it breaking without arbitration and holding under every policy."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Approve,
    Arbitration,
    Choose,
    Conflict,
    Done,
    Effect,
    Graph,
    NodeContext,
    RunOutcome,
    RunStatus,
    append,
    tool,
)
from orchestra.errors import AnswerError, ToolConflictError
from orchestra.events import ConflictArbitrated, Event, ToolCalled
from orchestra.models import ModelResponse, ScriptedModel, ToolCall
from orchestra.store import Store

pytestmark = pytest.mark.anyio

# checkpoints a call waits for the others to have read before it writes: plenty for calls
# started together, and a bounded wait for a call that runs alone
SPINS = 50


class S(BaseModel):
    note: str = ""
    conflicts: Annotated[list[str], append] = []


class World:
    """Shared resources with tools that race: each call reads, then lets every other call in
    flight read too (``window``), then writes. ``expected`` is how many calls may race."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.log: list[str] = []

    async def window(self) -> None:
        """Wait until every expected call has read (or SPINS checkpoints, when alone)."""
        self.arrived += 1
        for _ in range(SPINS):
            if self.arrived >= self.expected:
                break
            await anyio.lowlevel.checkpoint()


class Desk(World):
    """Bookable slots and rooms: ``book(slot, who)`` checks the slot is free, waits, books;
    every successful booking is recorded (two for one slot is a double booking)."""

    def __init__(self, expected: int = 2, *, book_policy: Any = None) -> None:
        super().__init__(expected)
        self.owners: dict[int, str] = {}
        self.bookings: list[tuple[int, str]] = []
        self.rooms: list[str] = []

        @tool(
            effect=Effect.WRITE,
            resources=lambda a: {f"slot:{a['slot']}"},
            arbitration=book_policy,
        )
        async def book(slot: int, who: str) -> str:
            """Book a slot."""
            self.log.append(f"start {who}")
            free = slot not in self.owners
            await self.window()
            self.log.append(f"end {who}")
            if not free:
                return "taken"
            self.owners[slot] = who
            self.bookings.append((slot, who))
            return f"{who} booked {slot}"

        @tool(effect=Effect.READ, resources=lambda a: {f"slot:{a['slot']}"})
        async def peek(slot: int, who: str) -> str | None:
            """Who has a slot."""
            self.log.append(f"start {who}")
            await self.window()
            self.log.append(f"end {who}")
            return self.owners.get(slot)

        @tool(effect=Effect.WRITE, resources=lambda a: {f"room:{a['room']}"})
        async def reserve(room: str, who: str) -> str:
            """Reserve a room."""
            self.rooms.append(who)
            return f"{who} has room {room}"

        self.tools = [book, peek, reserve]

    def double_booked(self) -> list[int]:
        return [slot for slot, n in Counter(s for s, _ in self.bookings).items() if n > 1]


def book(slot: int, who: str) -> ToolCall:
    return ToolCall(name="book", arguments={"slot": slot, "who": who}, id=f"{who}-book-{slot}")


def reserve(room: str, who: str) -> ToolCall:
    return ToolCall(name="reserve", arguments={"room": room, "who": who}, id=f"{who}-room")


def agents_app(
    world: Desk | Bank,
    calls: Mapping[str, Sequence[ToolCall]],
    priorities: Mapping[str, int] | None = None,
    **options: Any,
) -> tuple[Any, ScriptedModel]:
    """START -> each agent -> END; each agent proposes its calls in its first turn, then
    answers "done"."""
    model = ScriptedModel(
        {name: [ModelResponse(tool_calls=tuple(c)), "done"] for name, c in calls.items()}
    )
    graph: Graph[S] = Graph(S)
    for name in calls:
        priority = (priorities or {}).get(name, 0)
        graph.add_node(Agent(name, model=model, tools=world.tools, priority=priority))
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    return graph.compile(approvals=None, **options), model


def nodes_app(
    world: Desk | Bank, calls: Mapping[str, tuple[str, dict[str, Any]]], **options: Any
) -> Any:
    """START -> each node -> END; each node makes its one call with ``ctx.call_tool`` and
    records a conflict it lost in ``state.conflicts``."""

    def make(name: str, tool_name: str, arguments: dict[str, Any]) -> Any:
        async def node(state: S, ctx: NodeContext) -> dict[str, Any] | None:
            try:
                await ctx.call_tool(tool_name, arguments)
            except ToolConflictError as exc:
                return {"conflicts": f"{name}: {exc}"}
            return None

        return node

    graph: Graph[S] = Graph(S)
    for name, (tool_name, arguments) in calls.items():
        graph.add_node(name, make(name, tool_name, arguments), tools=world.tools)
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    return graph.compile(approvals=None, **options)


async def streamed(app: Any, **options: Any) -> tuple[list[Event], RunOutcome[Any]]:
    with anyio.fail_after(5):
        events = [event async for event in app.stream(S(), **options)]
    outcome = events[-1].outcome
    assert outcome is not None
    return events, outcome


def arbitrated(events: Iterable[Event]) -> list[ConflictArbitrated]:
    return [e for e in events if isinstance(e, ConflictArbitrated)]


def tool_results(model: ScriptedModel, agent: str) -> list[dict[str, Any]]:
    """The tool messages the agent saw in its last turn, as data."""
    last = [r for r in model.requests if r.agent == agent][-1]
    return [json.loads(m.content) for m in last.messages if m.role == "tool"]


TWO_BOOK_SLOT_1 = {"alice": [book(1, "alice")], "bob": [book(1, "bob")]}


# -- each policy's outcome -----------------------------------------------------------------------


async def test_arbitration_serialize_runs_conflicting_calls_one_at_a_time_by_priority() -> None:
    """By default both calls run, never overlapping, the higher priority first."""
    desk = Desk()
    app, model = agents_app(desk, TWO_BOOK_SLOT_1, {"bob": 5})
    _, outcome = await streamed(app)
    assert outcome.status is RunStatus.COMPLETED
    assert desk.log == ["start bob", "end bob", "start alice", "end alice"]
    assert tool_results(model, "alice") == [{"result": "taken"}]
    assert tool_results(model, "bob") == [{"result": "bob booked 1"}]


async def test_arbitration_calls_that_do_not_conflict_run_concurrently() -> None:
    """Writers of different slots both start before either ends."""
    desk = Desk()
    app, _ = agents_app(desk, {"alice": [book(1, "alice")], "bob": [book(2, "bob")]})
    events, _ = await streamed(app)
    assert sorted(desk.log[:2]) == ["start alice", "start bob"]
    assert arbitrated(events) == []
    assert len(desk.bookings) == 2


async def test_arbitration_two_readers_of_one_resource_do_not_conflict() -> None:
    """Read-only calls of one slot run together; no conflict is arbitrated."""
    desk = Desk()
    calls = {
        "alice": [ToolCall(name="peek", arguments={"slot": 1, "who": "alice"})],
        "bob": [ToolCall(name="peek", arguments={"slot": 1, "who": "bob"})],
    }
    app, _ = agents_app(desk, calls, arbitration=Arbitration(policy="reject_all"))
    events, _ = await streamed(app)
    assert sorted(desk.log[:2]) == ["start alice", "start bob"]
    assert arbitrated(events) == []


async def test_arbitration_an_agents_own_conflicting_calls_run_in_its_order() -> None:
    """One agent's two calls on one slot conflict too, and run in the order proposed."""
    desk = Desk()
    app, model = agents_app(desk, {"alice": [book(1, "first"), book(1, "second")]})
    events, _ = await streamed(app)
    assert desk.log == ["start first", "end first", "start second", "end second"]
    assert arbitrated(events)[0].run == ("alice#1", "alice#2")
    assert tool_results(model, "alice") == [{"result": "first booked 1"}, {"result": "taken"}]


async def test_arbitration_first_wins_lets_the_first_proposal_run_despite_priority() -> None:
    """Under first_wins alice (first by name) beats bob (higher priority); bob hears why."""
    desk = Desk()
    app, model = agents_app(
        desk, TWO_BOOK_SLOT_1, {"bob": 5}, arbitration=Arbitration(policy="first_wins")
    )
    _, outcome = await streamed(app)
    assert outcome.status is RunStatus.COMPLETED
    assert desk.bookings == [(1, "alice")]
    assert desk.log == ["start alice", "end alice"]
    (lost,) = tool_results(model, "bob")
    assert lost["status"] == "conflict"
    assert "'book' by 'alice' (alice#1)" in lost["error"]
    assert "first_wins" in lost["error"]


async def test_arbitration_priority_wins_lets_the_higher_priority_run() -> None:
    """Under priority_wins bob (priority 5) runs; alice is told she lost to bob#1."""
    desk = Desk()
    app, model = agents_app(
        desk, TWO_BOOK_SLOT_1, {"bob": 5}, arbitration=Arbitration(policy="priority_wins")
    )
    await streamed(app)
    assert desk.bookings == [(1, "bob")]
    (lost,) = tool_results(model, "alice")
    assert lost["status"] == "conflict"
    assert "'book' by 'bob' (bob#1)" in lost["error"]


async def test_arbitration_reject_all_runs_none_of_the_conflicting_calls() -> None:
    """Under reject_all no conflicting call is made (both hear why); a free call still runs."""
    desk = Desk()
    calls = {**TWO_BOOK_SLOT_1, "carol": [book(2, "carol")]}
    app, model = agents_app(desk, calls, arbitration=Arbitration(policy="reject_all"))
    await streamed(app)
    assert desk.bookings == [(2, "carol")]
    for agent in ("alice", "bob"):
        (lost,) = tool_results(model, agent)
        assert lost["status"] == "conflict"
        assert "reject_all" in lost["error"]


async def test_arbitration_losing_calls_are_tool_called_events_with_status_conflict() -> None:
    """A call that lost is reported as a tool call with status conflict, never run."""
    desk = Desk()
    app, _ = agents_app(desk, TWO_BOOK_SLOT_1, arbitration=Arbitration(policy="first_wins"))
    events, outcome = await streamed(app)
    statuses = {e.node: e.status for e in events if isinstance(e, ToolCalled)}
    assert statuses == {"alice": "ok", "bob": "conflict"}
    assert outcome.usage.tool_calls == 1


async def test_arbitration_custom_arbiter_sees_the_conflict_and_its_order_is_kept() -> None:
    """A custom arbiter gets the calls in priority order; its keys run in its order."""
    seen: list[Conflict] = []

    def lowest_first(conflict: Conflict) -> list[str]:
        seen.append(conflict)
        return [c.key for c in reversed(conflict.calls)]

    desk = Desk()
    app, _ = agents_app(
        desk, TWO_BOOK_SLOT_1, {"bob": 5}, arbitration=Arbitration(policy=lowest_first)
    )
    await streamed(app)
    (conflict,) = seen
    assert [(c.key, c.tool, dict(c.arguments)) for c in conflict.calls] == [
        ("bob#1", "book", {"slot": 1, "who": "bob"}),
        ("alice#1", "book", {"slot": 1, "who": "alice"}),
    ]
    assert conflict.resources == {"slot:1"}
    assert desk.log == ["start alice", "end alice", "start bob", "end bob"]


async def test_arbitration_tool_policy_overrides_the_graphs() -> None:
    """A tool's own arbitration= beats the graph's serialize."""
    desk = Desk(book_policy="reject_all")
    app, _ = agents_app(desk, TWO_BOOK_SLOT_1)
    events, _ = await streamed(app)
    assert desk.bookings == []
    assert arbitrated(events)[0].policy == "reject_all"


async def test_arbitration_per_resource_policy_applies_to_matching_resources() -> None:
    """slot:* follows first_wins while rooms keep the default serialize."""
    desk = Desk()
    calls = {
        "alice": [book(1, "alice"), reserve("A", "alice")],
        "bob": [book(1, "bob"), reserve("A", "bob")],
    }
    app, _ = agents_app(desk, calls, arbitration=Arbitration(per_resource={"slot:*": "first_wins"}))
    events, _ = await streamed(app)
    policies = {e.resources: (e.policy, e.run) for e in arbitrated(events)}
    assert policies == {
        ("slot:1",): ("first_wins", ("alice#1",)),
        ("room:A",): ("serialize", ("alice#2", "bob#2")),
    }
    assert (desk.bookings, desk.rooms) == ([(1, "alice")], ["alice", "bob"])


async def test_arbitration_strictest_policy_of_a_conflict_applies() -> None:
    """A conflict of a first_wins tool with a reject_all one is settled by reject_all."""
    desk = Desk(book_policy="first_wins")

    @tool(effect=Effect.WRITE, resources=lambda a: {f"slot:{a['slot']}"}, arbitration="reject_all")
    async def cancel(slot: int) -> str:
        desk.owners.pop(slot, None)
        return "cancelled"

    desk.tools.append(cancel)
    calls = {
        "alice": [book(1, "alice")],
        "bob": [ToolCall(name="cancel", arguments={"slot": 1})],
    }
    app, _ = agents_app(desk, calls)
    events, _ = await streamed(app)
    (decision,) = arbitrated(events)
    assert (decision.policy, decision.run) == ("reject_all", ())
    assert desk.bookings == []


async def test_arbitration_without_arbitration_conflicting_calls_overlap() -> None:
    """arbitration=None: calls on one slot run at once (the race the policies prevent)."""
    desk = Desk()
    app, _ = agents_app(desk, TWO_BOOK_SLOT_1, arbitration=None)
    events, _ = await streamed(app)
    assert sorted(desk.log[:2]) == ["start alice", "start bob"]
    assert arbitrated(events) == []


# -- the decision: an event, and the ledger ------------------------------------------------------


async def test_arbitration_decision_is_a_conflict_arbitrated_event() -> None:
    """The event names the step, policy, contested resources, calls, the run and the lost."""
    desk = Desk()
    app, _ = agents_app(
        desk, TWO_BOOK_SLOT_1, {"bob": 5}, arbitration=Arbitration(policy="priority_wins")
    )
    events, _ = await streamed(app)
    (event,) = arbitrated(events)
    assert (event.step, event.policy, event.resources) == (1, "priority_wins", ("slot:1",))
    assert [c["key"] for c in json.loads(event.calls)] == ["bob#1", "alice#1"]
    assert event.run == ("bob#1",)
    assert list(json.loads(event.lost)) == ["alice#1"]
    assert event.replayed is False


async def test_arbitration_decision_is_recorded_in_the_ledger(store: Store) -> None:
    """The step's ledger holds the decision under the task "@arbiter"."""
    desk = Desk()
    app, _ = agents_app(
        desk, TWO_BOOK_SLOT_1, arbitration=Arbitration(policy="first_wins"), store=store
    )
    await streamed(app, run_id="r1")
    (entry,) = [e for e in await store.ledger("r1") if e.task == "@arbiter"]
    assert (entry.step, entry.kind, entry.name, entry.status) == (
        1,
        "arbitration",
        "first_wins",
        "done",
    )
    assert entry.result is not None
    recorded = json.loads(entry.result)
    assert (recorded["policy"], recorded["run"], list(recorded["lost"])) == (
        "first_wins",
        ["alice#1"],
        ["bob#1"],
    )


class Flipper:
    """A non-deterministic arbiter: each time it is asked it picks another call."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self, conflict: Conflict) -> list[str]:
        self.asked += 1
        return [conflict.calls[self.asked % len(conflict.calls)].key]


async def test_arbitration_recorded_decision_is_reused_when_the_step_runs_again(
    store: Store,
) -> None:
    """After an escalation in the same step, the resumed step reuses the arbiter's decision."""
    flip = Flipper()
    desk = Desk()
    calls = {
        "alice": [book(1, "alice"), reserve("A", "alice")],
        "bob": [book(1, "bob"), reserve("A", "bob")],
    }
    arbitration = Arbitration(policy=flip, per_resource={"room:*": "escalate"})
    app, _ = agents_app(desk, calls, arbitration=arbitration, store=store)
    first_events, first = await streamed(app, run_id="r1")
    assert first.status is RunStatus.INTERRUPTED
    (before,) = arbitrated(first_events)
    assert (flip.asked, before.run) == (1, ("bob#1",))
    assert desk.bookings == []
    (request,) = first.pending
    with anyio.fail_after(5):
        second = await app.resume("r1", answers={request.id: Choose("alice#2")})
    assert second.status is RunStatus.COMPLETED
    assert flip.asked == 1
    assert desk.bookings == [(1, "bob")]
    assert desk.rooms == ["alice"]
    rows = [json.loads(e.data) for e in await store.events("r1") if e.kind == "conflict_arbitrated"]
    slot = [(r["run"], r["replayed"]) for r in rows if r["resources"] == ["slot:1"]]
    assert slot == [(["bob#1"], False), (["bob#1"], True)]
    recorded = sorted(
        (e.name, json.loads(e.result or "{}")["run"])
        for e in await store.ledger("r1")
        if e.task == "@arbiter"
    )
    assert recorded == [("Flipper", ["bob#1"]), ("escalate", ["alice#2"])]


# -- escalate ----------------------------------------------------------------------------------


async def escalated(store: Store, desk: Desk | None = None) -> tuple[Any, ScriptedModel, Any]:
    """Run alice and bob booking slot 1 under escalate until it interrupts."""
    desk = desk or Desk()
    app, model = agents_app(
        desk, TWO_BOOK_SLOT_1, {"bob": 5}, arbitration=Arbitration(policy="escalate"), store=store
    )
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    return app, model, request


async def test_arbitration_escalate_interrupts_with_a_conflict_request(store: Store) -> None:
    """Nothing runs; the one request lists the calls by key, with the digest."""
    desk = Desk()
    _, model, request = await escalated(store, desk)
    assert request.kind == "conflict"
    assert request.step == 1
    assert [c["key"] for c in request.payload["calls"]] == ["bob#1", "alice#1"]
    assert request.payload["resources"] == ["slot:1"]
    assert request.payload["digest"]
    assert desk.log == []
    assert len(model.requests) == 2  # the two first turns only
    assert [r.request_id for r in await store.requests("r1")] == [request.id]


async def test_arbitration_escalate_choose_runs_only_the_chosen_call(store: Store) -> None:
    """Choose("alice#1") runs alice's call only; bob hears an operator chose alice#1."""
    desk = Desk()
    app, model, request = await escalated(store, desk)
    with anyio.fail_after(5):
        outcome = await app.resume("r1", answers={request.id: Choose("alice#1")})
    assert outcome.status is RunStatus.COMPLETED
    assert desk.bookings == [(1, "alice")]
    assert desk.log == ["start alice", "end alice"]
    (lost,) = tool_results(model, "bob")
    assert lost["status"] == "conflict"
    assert "an operator chose 'book' by 'alice' (alice#1)" in lost["error"]
    assert await store.requests("r1") == []


async def test_arbitration_escalate_chosen_calls_run_one_at_a_time_in_the_order_given(
    store: Store,
) -> None:
    """Choose("alice#1", "bob#1") runs both, alice first, never overlapping."""
    desk = Desk()
    app, _, request = await escalated(store, desk)
    with anyio.fail_after(5):
        await app.resume("r1", answers={request.id: Choose("alice#1", "bob#1")})
    assert desk.log == ["start alice", "end alice", "start bob", "end bob"]
    assert desk.bookings == [(1, "alice")]


async def test_arbitration_escalate_answered_with_a_run_list(store: Store) -> None:
    """{"run": [key]} answers a conflict request like Choose(key)."""
    desk = Desk()
    app, _, request = await escalated(store, desk)
    with anyio.fail_after(5):
        await app.resume("r1", answers={request.id: {"run": ["bob#1"]}})
    assert desk.bookings == [(1, "bob")]


async def test_arbitration_escalate_choosing_nothing_runs_nothing(store: Store) -> None:
    """Choose() with no key: every call of the conflict loses."""
    desk = Desk()
    app, model, request = await escalated(store, desk)
    with anyio.fail_after(5):
        outcome = await app.resume("r1", answers={request.id: Choose()})
    assert outcome.status is RunStatus.COMPLETED
    assert desk.log == []
    assert [r["status"] for a in ("alice", "bob") for r in tool_results(model, a)] == [
        "conflict",
        "conflict",
    ]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(Choose("carol#1"), "choose calls of the conflict", id="unknown-key"),
        pytest.param(Choose("alice#1", "alice#1"), "each once", id="key-twice"),
        pytest.param(Approve(), "answered with Choose", id="approve"),
        pytest.param(Done("x"), "answered with Choose", id="done"),
        pytest.param({"run": "alice#1"}, "answered with Choose", id="run-not-a-list"),
    ],
)
async def test_arbitration_escalate_invalid_choice_is_refused_and_changes_nothing(
    store: Store, answer: Any, error: str
) -> None:
    """A bad answer raises AnswerError and changes nothing: a good one still works after."""
    desk = Desk()
    app, _, request = await escalated(store, desk)
    with anyio.fail_after(5):
        with pytest.raises(AnswerError, match=error):
            await app.resume("r1", answers={request.id: answer})
        assert [r.request_id for r in await store.requests("r1")] == [request.id]
        assert (await store.get_run("r1")).status == "interrupted"
        assert desk.log == []
        outcome = await app.resume("r1", answers={request.id: Choose("bob#1")})
    assert outcome.status is RunStatus.COMPLETED
    assert desk.bookings == [(1, "bob")]


# -- plain nodes: resource locks --------------------------------------------------------------


def booking_nodes(desk: Desk, **options: Any) -> Any:
    return nodes_app(
        desk,
        {
            "x": ("book", {"slot": 1, "who": "x"}),
            "y": ("book", {"slot": 1, "who": "y"}),
        },
        **options,
    )


async def test_arbitration_plain_nodes_on_one_resource_serialize_by_default() -> None:
    """Parallel nodes calling ctx.call_tool on one slot take turns; both calls run."""
    desk = Desk()
    _, outcome = await streamed(booking_nodes(desk))
    assert outcome.status is RunStatus.COMPLETED
    first, second = desk.log[0].split()[1], desk.log[2].split()[1]
    assert desk.log == [f"start {first}", f"end {first}", f"start {second}", f"end {second}"]
    assert desk.bookings == [(1, first)]
    assert outcome.state.conflicts == []


async def test_arbitration_plain_node_losing_under_first_wins_raises_tool_conflict() -> None:
    """Under first_wins the losing node's ctx.call_tool raises ToolConflictError."""
    desk = Desk()
    app = booking_nodes(desk, arbitration=Arbitration(policy="first_wins"))
    events, outcome = await streamed(app)
    assert outcome.status is RunStatus.COMPLETED
    ((_, winner),) = desk.bookings
    loser = "y" if winner == "x" else "x"
    (conflict,) = outcome.state.conflicts
    assert conflict.startswith(f"{loser}: ")
    assert f"resource slot:1 is held by call {winner}#0" in conflict
    statuses = sorted(e.status for e in events if isinstance(e, ToolCalled))
    assert statuses == ["conflict", "ok"]


async def test_arbitration_plain_nodes_without_arbitration_overlap() -> None:
    """arbitration=None: the nodes' calls run at once."""
    desk = Desk()
    await streamed(booking_nodes(desk, arbitration=None))
    assert sorted(desk.log[:2]) == ["start x", "start y"]


# -- the invariants ------------------------------------------------------------------------------


class Bank(World):
    """Three accounts of 100; ``transfer(src, dst, amount)`` reads both balances, waits,
    then writes both: concurrent transfers sharing an account lose updates."""

    def __init__(self, expected: int = 3) -> None:
        super().__init__(expected)
        self.balances = {"a": 100, "b": 100, "c": 100}
        self.done: list[str] = []

        @tool(
            effect=Effect.WRITE,
            resources=lambda a: {f"acct:{a['src']}", f"acct:{a['dst']}"},
        )
        async def transfer(src: str, dst: str, amount: int) -> str:
            """Move money between accounts."""
            have, get = self.balances[src], self.balances[dst]
            await self.window()
            self.balances[src] = have - amount
            self.balances[dst] = get + amount
            self.done.append(f"{src}->{dst}")
            return "moved"

        self.tools = [transfer]

    def total(self) -> int:
        return sum(self.balances.values())


def transfer(src: str, dst: str, amount: int) -> ToolCall:
    return ToolCall(name="transfer", arguments={"src": src, "dst": dst, "amount": amount})


# a cycle of transfers: every pair shares an account; whatever order racing writes land
# in, the total changes
TRANSFERS = {
    "alice": [transfer("a", "b", 30)],
    "bob": [transfer("b", "c", 20)],
    "carol": [transfer("c", "a", 10)],
}
BOOKINGS = {name: [book(1, name)] for name in ("alice", "bob", "carol")}
PRIORITIES = {"alice": 0, "bob": 2, "carol": 1}


def reversed_keys(conflict: Conflict) -> list[str]:
    """A custom arbiter: every call runs, lowest priority first."""
    return [c.key for c in reversed(conflict.calls)]


def world(kind: str) -> tuple[Bank | Desk, Mapping[str, Sequence[ToolCall]]]:
    if kind == "money":
        return Bank(), TRANSFERS
    return Desk(expected=3), BOOKINGS


def ran(shared: Bank | Desk) -> int:
    """How many calls ran."""
    return len(shared.done) if isinstance(shared, Bank) else len(shared.log) // 2


def violations(shared: Bank | Desk) -> str | None:
    """What broke the invariant (money made or lost, a slot booked twice), or None."""
    if isinstance(shared, Bank):
        total = shared.total()
        return None if total == 300 else f"total is {total}, not 300: {shared.balances}"
    twice = shared.double_booked()
    return f"slots booked twice: {twice} ({shared.bookings})" if twice else None


INVARIANTS = ["money", "booking"]


@pytest.mark.parametrize("kind", INVARIANTS)
async def test_arbitration_invariant_breaks_without_arbitration(kind: str) -> None:
    """With arbitration=None all racing calls run and the invariant is violated."""
    shared, calls = world(kind)
    app, _ = agents_app(shared, calls, PRIORITIES, arbitration=None)
    _, outcome = await streamed(app)
    assert outcome.status is RunStatus.COMPLETED
    assert ran(shared) == 3
    assert violations(shared) is not None


POLICIES: list[Any] = [
    pytest.param("serialize", 3, id="serialize"),
    pytest.param("first_wins", 1, id="first_wins"),
    pytest.param("priority_wins", 1, id="priority_wins"),
    pytest.param("reject_all", 0, id="reject_all"),
    pytest.param("escalate", 3, id="escalate"),
    pytest.param(reversed_keys, 3, id="custom"),
]


@pytest.mark.parametrize(("policy", "runs"), POLICIES)
@pytest.mark.parametrize("kind", INVARIANTS)
async def test_arbitration_invariant_holds_under_every_policy(
    store: Store, kind: str, policy: Any, runs: int
) -> None:
    """Under every policy the same racing calls keep the invariant."""
    shared, calls = world(kind)
    app, _ = agents_app(
        shared, calls, PRIORITIES, arbitration=Arbitration(policy=policy), store=store
    )
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
        if policy == "escalate":
            assert ran(shared) == 0
            (request,) = outcome.pending
            keys = [c["key"] for c in request.payload["calls"]]
            outcome = await app.resume("r1", answers={request.id: Choose(*reversed(keys))})
    assert outcome.status is RunStatus.COMPLETED
    assert ran(shared) == runs
    assert violations(shared) is None


NODE_CALLS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "money": {
        "alice": ("transfer", {"src": "a", "dst": "b", "amount": 30}),
        "bob": ("transfer", {"src": "b", "dst": "c", "amount": 20}),
        "carol": ("transfer", {"src": "c", "dst": "a", "amount": 10}),
    },
    "booking": {name: ("book", {"slot": 1, "who": name}) for name in ("alice", "bob", "carol")},
}


@pytest.mark.parametrize("kind", INVARIANTS)
async def test_arbitration_invariant_breaks_for_plain_nodes_without_arbitration(
    kind: str,
) -> None:
    """Plain nodes making the racing calls with ctx.call_tool break it too, unarbitrated."""
    shared, _ = world(kind)
    _, outcome = await streamed(nodes_app(shared, NODE_CALLS[kind], arbitration=None))
    assert outcome.status is RunStatus.COMPLETED
    assert ran(shared) == 3
    assert violations(shared) is not None


@pytest.mark.parametrize(("policy", "runs"), [("serialize", 3), ("first_wins", 1)])
@pytest.mark.parametrize("kind", INVARIANTS)
async def test_arbitration_invariant_holds_for_plain_nodes_under_locks(
    kind: str, policy: str, runs: int
) -> None:
    """Plain nodes' racing calls keep the invariant under serialize and first_wins."""
    shared, _ = world(kind)
    app = nodes_app(shared, NODE_CALLS[kind], arbitration=Arbitration(policy=policy))
    _, outcome = await streamed(app)
    assert outcome.status is RunStatus.COMPLETED
    assert ran(shared) == runs
    assert len(outcome.state.conflicts) == 3 - runs
    assert violations(shared) is None
