"""The gateway's act phase driven directly on a Gateway (below the executor): which calls
arbitration sees, concurrency without it, and a store failure among concurrent calls."""

from __future__ import annotations

import anyio
import pytest

from orchestra import Arbitration, Effect, tool
from orchestra.context import Caller
from orchestra.errors import RunStoreError, StoreError
from orchestra.events import ConflictArbitrated, Event
from orchestra.models import ToolCall
from orchestra.runtime.gateway import Gateway
from orchestra.runtime.ledger import Ledger
from orchestra.runtime.meter import Meter

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


def make_gateway(arbitration: Arbitration | None = None) -> tuple[Gateway, list[Event]]:
    events: list[Event] = []
    gateway = Gateway(
        run_id="r",
        ledger=Ledger("r"),
        meter=Meter(),
        emit=lambda event, level: events.append(event),
        arbitration=arbitration,
    )
    return gateway, events


def callers() -> tuple[Caller, Caller]:
    tools = {"book": book, "look": look}
    return Caller("alice", "alice", 1, tools, seq=1), Caller("bob", "bob", 1, tools, seq=1)


@pytest.fixture(autouse=True)
def clear_log() -> None:
    log.clear()


async def test_gateway_denied_or_invalid_calls_take_no_part_in_arbitration() -> None:
    """Denied or invalid calls conflict with nothing: the valid call on the slot runs."""
    gateway, events = make_gateway(Arbitration(policy="reject_all"))
    alice, bob = callers()
    carol = Caller("carol", "carol", 1, {"look": look}, seq=1)
    outcomes = await gateway.act(
        [
            (alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="fine")]),
            (bob, [ToolCall(name="book", arguments={"slot": "x", "who": "b"}, id="invalid")]),
            (carol, [ToolCall(name="book", arguments={"slot": 1, "who": "c"}, id="denied")]),
        ]
    )
    assert [o[0].status for o in outcomes] == ["ok", "invalid_arguments", "denied"]
    assert log == ["start a", "end a"]
    assert not [e for e in events if isinstance(e, ConflictArbitrated)]


async def test_gateway_resource_keys_come_from_the_validated_arguments() -> None:
    """Resource keys come from validated arguments: slot "7" conflicts with slot 7."""
    gateway, events = make_gateway(Arbitration(policy="reject_all"))
    alice, bob = callers()
    outcomes = await gateway.act(
        [
            (alice, [ToolCall(name="book", arguments='{"slot": "7", "who": "a"}', id="a1")]),
            (bob, [ToolCall(name="book", arguments={"slot": 7, "who": "b"}, id="b1")]),
        ]
    )
    assert [o[0].status for o in outcomes] == ["conflict", "conflict"]
    (decision,) = [e for e in events if isinstance(e, ConflictArbitrated)]
    assert decision.resources == ("slot:7",)
    assert log == []


async def test_gateway_without_arbitration_runs_the_calls_of_a_step_concurrently() -> None:
    """A gateway without arbitration starts every runnable call of the act phase at once."""
    gateway, _ = make_gateway()
    alice, bob = callers()
    await gateway.act(
        [
            (alice, [ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1")]),
            (bob, [ToolCall(name="book", arguments={"slot": 1, "who": "b"}, id="b1")]),
        ]
    )
    assert set(log[:2]) == {"start a", "start b"}


async def test_gateway_store_failure_during_concurrent_calls_is_the_runs_error() -> None:
    """A ledger failure among concurrent calls raises that RunStoreError, not a group."""

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


async def test_gateway_store_failure_while_serialized_calls_run_is_the_runs_error() -> None:
    """A ledger failure in arbitrated chains raises that RunStoreError, not a group."""

    class FailingLedger(Ledger):
        async def finish(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            if kwargs.get("kind") == "tool":
                raise RunStoreError(run_id="r", step=1, error=StoreError("disk full"))

    gateway = Gateway(
        run_id="r",
        ledger=FailingLedger("r"),
        meter=Meter(),
        emit=lambda event, level: None,
        arbitration=Arbitration(),
    )
    alice, bob = callers()
    with pytest.raises(RunStoreError, match="disk full"):
        await gateway.act(
            [
                (
                    alice,
                    [
                        ToolCall(name="book", arguments={"slot": 1, "who": "a"}, id="a1"),
                        ToolCall(name="book", arguments={"slot": 2, "who": "a2"}, id="a2"),
                    ],
                ),
                (
                    bob,
                    [
                        ToolCall(name="book", arguments={"slot": 1, "who": "b"}, id="b1"),
                        ToolCall(name="book", arguments={"slot": 2, "who": "b2"}, id="b2"),
                    ],
                ),
            ]
        )
