"""The gateway's approval and arbitration seams: hooks that see every call of a step's act
phase at once, before anything runs, and can refuse or order them (DESIGN §3 steps 3-4)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from orchestra import Effect, tool
from orchestra.errors import RunStoreError, StoreError
from orchestra.events import Event, ToolCalled
from orchestra.gateway import Caller, CallOutcome, Gateway, Meter, PlannedCall
from orchestra.ledger import Ledger
from orchestra.models import ToolCall

pytestmark = pytest.mark.anyio

log: list[str] = []


@tool(effect=Effect.WRITE, resources=lambda a: {f"slot:{a['slot']}"})
async def book(slot: int, who: str) -> str:
    log.append(f"start {who}")
    await anyio.sleep(0.01)
    log.append(f"end {who}")
    return f"{who} booked {slot}"


@tool(effect=Effect.READ)
async def look(slot: int) -> int:
    return slot


def make_gateway(**hooks: object) -> tuple[Gateway, list[Event]]:
    events: list[Event] = []
    gateway = Gateway(
        run_id="r",
        ledger=Ledger("r"),
        meter=Meter(),
        emit=lambda event, level: events.append(event),
        **hooks,  # type: ignore[arg-type]
    )
    return gateway, events


def callers() -> tuple[Caller, Caller]:
    tools = {"book": book, "look": look}
    return Caller("alice", "alice", 1, tools, seq=1), Caller("bob", "bob", 1, tools, seq=1)


@pytest.fixture(autouse=True)
def clear_log() -> None:
    log.clear()


async def test_gateway_hooks_see_every_call_of_the_act_phase_at_once() -> None:
    """Approval then arbitration each get all runnable calls of the step in one list."""
    seen: list[tuple[str, list[str]]] = []

    async def approve(calls: Sequence[PlannedCall]) -> None:
        seen.append(("approve", [f"{c.caller.node}:{c.call.name}" for c in calls]))

    def arbitrate(calls: Sequence[PlannedCall]) -> list[list[PlannedCall]]:
        seen.append(("arbitrate", [f"{c.caller.node}:{c.call.name}" for c in calls]))
        return [list(calls)]

    gateway, _ = make_gateway(approve=approve, arbitrate=arbitrate)
    alice, bob = callers()
    await gateway.act(
        [
            (alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")]),
            (bob, [ToolCall(name="look", arguments={"slot": 1}, id="b1")]),
        ]
    )
    assert seen == [
        ("approve", ["alice:book", "bob:look"]),
        ("arbitrate", ["alice:book", "bob:look"]),
    ]


async def test_gateway_hooks_see_resource_keys_of_validated_calls() -> None:
    """A planned call carries its validated arguments and the resources they touch."""
    planned: list[PlannedCall] = []

    def arbitrate(calls: Sequence[PlannedCall]) -> list[list[PlannedCall]]:
        planned.extend(calls)
        return [list(calls)]

    gateway, _ = make_gateway(arbitrate=arbitrate)
    alice, _ = callers()
    await gateway.act([(alice, [ToolCall(name="book", arguments='{"slot": "7", "who": "a"}')])])
    assert planned[0].arguments == {"slot": 7, "who": "a"}
    assert planned[0].resources == frozenset({"slot:7"})


async def test_gateway_hooks_never_see_denied_or_invalid_calls() -> None:
    """Calls refused by permission or validation are decided before the hooks run."""
    planned: list[str] = []

    async def approve(calls: Sequence[PlannedCall]) -> None:
        planned.extend(c.call.id for c in calls)

    gateway, _ = make_gateway(approve=approve)
    alice = Caller("alice", "alice", 1, {"look": look}, seq=1)
    outcomes = await gateway.act(
        [
            (
                alice,
                [
                    ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="denied"),
                    ToolCall(name="look", arguments={"slot": "x"}, id="invalid"),
                    ToolCall(name="look", arguments={"slot": 2}, id="fine"),
                ],
            )
        ]
    )
    assert planned == ["fine"]
    assert [o.status for o in outcomes[0]] == ["denied", "invalid_arguments", "ok"]


async def test_gateway_approval_hook_can_refuse_a_call_which_never_runs() -> None:
    """A call whose outcome the approval hook sets is reported and not executed."""

    async def approve(calls: Sequence[PlannedCall]) -> None:
        for item in calls:
            item.outcome = CallOutcome(item.call.id, item.call.name, "rejected", error="no")

    gateway, events = make_gateway(approve=approve)
    alice, _ = callers()
    outcomes = await gateway.act(
        [(alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")])]
    )
    assert outcomes[0][0].status == "rejected"
    assert log == []
    assert [e.status for e in events if isinstance(e, ToolCalled)] == ["rejected"]


async def test_gateway_arbitration_groups_run_one_after_another() -> None:
    """Groups returned by the arbitration hook run in order; a losing call does not run."""

    def arbitrate(calls: Sequence[PlannedCall]) -> list[list[PlannedCall]]:
        first, second, loser = calls
        loser.outcome = CallOutcome(loser.call.id, loser.call.name, "conflict", error="lost")
        return [[second], [first]]

    gateway, _ = make_gateway(arbitrate=arbitrate)
    alice, bob = callers()
    carol = Caller("carol", "carol", 1, {"book": book}, seq=1)
    outcomes = await gateway.act(
        [
            (alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")]),
            (bob, [ToolCall(name="book", arguments={"slot": 1, "who": "b"}, id="b1")]),
            (carol, [ToolCall(name="book", arguments={"slot": 1, "who": "c"}, id="c1")]),
        ]
    )
    assert log == ["start b", "end b", "start a", "end a"]
    assert [o[0].status for o in outcomes] == ["ok", "ok", "conflict"]


async def test_gateway_without_hooks_runs_the_calls_of_a_step_concurrently() -> None:
    """With the pass-through seams every runnable call of the act phase starts at once."""
    gateway, _ = make_gateway()
    alice, bob = callers()
    await gateway.act(
        [
            (alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")]),
            (bob, [ToolCall(name="book", arguments={"slot": 2, "who": "b"}, id="b1")]),
        ]
    )
    assert set(log[:2]) == {"start a", "start b"}


async def test_gateway_call_not_scheduled_by_the_arbiter_gets_a_conflict_result() -> None:
    """A call the arbitration hook leaves out is not made, and its caller is told why."""
    gateway, _ = make_gateway(arbitrate=lambda calls: [])
    alice, _ = callers()
    outcomes = await gateway.act(
        [(alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")])]
    )
    assert outcomes[0][0].status == "conflict"
    assert "did not schedule" in (outcomes[0][0].error or "")
    assert log == []


async def test_gateway_store_failure_during_concurrent_calls_is_the_runs_error() -> None:
    """A ledger write failing while several calls run stops the act phase with that
    RunStoreError itself, not an ExceptionGroup the executor could not read."""

    class FailingLedger(Ledger):
        async def finish(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise RunStoreError(run_id="r", step=1, error=StoreError("disk full"))

    gateway = Gateway(
        run_id="r", ledger=FailingLedger("r"), meter=Meter(), emit=lambda event, level: None
    )
    alice, bob = callers()
    with pytest.raises(RunStoreError, match="disk full"):
        await gateway.act(
            [
                (alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")]),
                (bob, [ToolCall(name="book", arguments={"slot": 2, "who": "b"}, id="b1")]),
            ]
        )
