"""The Gateway facade built directly (a Ledger, a Meter, an emit callback): model calls
recorded and replayed, a node's tool call run or denied, the act phase's outcomes by caller
in call order, the idempotency key, and forgetting a committed step."""

from __future__ import annotations

import anyio
import pytest

from orchestra import Effect, tool
from orchestra.context import Caller
from orchestra.events import Event, ModelCalled, ToolCalled
from orchestra.models import Message, ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.runtime.gateway import Gateway
from orchestra.runtime.ledger import Ledger
from orchestra.runtime.meter import Meter
from orchestra.store.base import LedgerKind, LedgerStatus
from orchestra.tools import ToolContext

pytestmark = pytest.mark.anyio

ran: list[str] = []
keys: list[str] = []


@tool(effect=Effect.WRITE)
async def echo(text: str, wait: float = 0.0) -> str:
    await anyio.sleep(wait)
    ran.append(text)
    return text.upper()


@tool(effect=Effect.WRITE)
async def charge(amount: int, context: ToolContext) -> str:
    keys.append(context.idempotency_key)
    return f"charged {amount}"


@tool(effect=Effect.READ)
async def secret() -> str:
    ran.append("secret")
    return "hidden"


REQUEST = ModelRequest(messages=(Message(role="user", content="What is 2 + 2?"),), agent="alice")


@pytest.fixture(autouse=True)
def clear() -> None:
    ran.clear()
    keys.clear()


def make_gateway() -> tuple[Gateway, list[Event]]:
    events: list[Event] = []
    gateway = Gateway(
        run_id="run-1",
        ledger=Ledger("run-1"),
        meter=Meter(),
        emit=lambda event, level: events.append(event),
    )
    return gateway, events


def caller(name: str = "alice", *, step: int = 1, seq: int = 0) -> Caller:
    """One task of step ``step``, allowed echo and charge (not secret)."""
    return Caller(name, name, step, {"echo": echo, "charge": charge}, seq=seq)


def echo_call(text: str, call_id: str, wait: float = 0.0) -> ToolCall:
    return ToolCall(name="echo", arguments={"text": text, "wait": wait}, id=call_id)


# -- model calls ----------------------------------------------------------------------------------


async def test_gateway_model_call_returns_the_model_answer() -> None:
    """A model call returns what the model answered."""
    gateway, _ = make_gateway()
    answer = await gateway.model_call(caller(), ScriptedModel(["4"]), REQUEST)
    assert answer.text == "4"


async def test_gateway_model_call_records_the_answer_in_the_ledger() -> None:
    """The answer is recorded as a done model entry at the caller's position."""
    gateway, _ = make_gateway()
    answer = await gateway.model_call(caller(), ScriptedModel(["4"]), REQUEST)
    (entry,) = gateway.ledger.entries(1, "alice")
    assert (entry.kind, entry.name, entry.seq, entry.status) == (
        LedgerKind.MODEL,
        "scripted",
        0,
        LedgerStatus.DONE,
    )
    assert entry.result is not None
    assert ModelResponse.model_validate_json(entry.result) == answer


async def test_gateway_model_call_advances_the_caller_position() -> None:
    """Each model call takes the caller's next position."""
    gateway, _ = make_gateway()
    alice = caller()
    await gateway.model_call(alice, ScriptedModel(["4", "5"]), REQUEST)
    assert alice.seq == 1


async def test_gateway_model_call_at_a_recorded_position_replays_without_calling() -> None:
    """A second call at the same position gets the recorded answer; the model is not
    called again."""
    gateway, _ = make_gateway()
    model = ScriptedModel(["4", "a different answer"])
    first = await gateway.model_call(caller(), model, REQUEST)
    again = await gateway.model_call(caller(), model, REQUEST)
    assert again == first
    assert len(model.requests) == 1


async def test_gateway_model_call_replayed_is_metered_once() -> None:
    """A replayed answer is not counted again: one model call, its tokens once."""
    gateway, _ = make_gateway()
    model = ScriptedModel(["4"])
    answer = await gateway.model_call(caller(), model, REQUEST)
    await gateway.model_call(caller(), model, REQUEST)
    counts = gateway.meter.counts
    assert counts["model_calls"] == 1
    assert counts["input_tokens"] == answer.usage.input_tokens
    assert counts["output_tokens"] == answer.usage.output_tokens


async def test_gateway_model_call_reports_whether_it_replayed() -> None:
    """The ModelCalled events say the first answer was made and the second replayed."""
    gateway, events = make_gateway()
    model = ScriptedModel(["4"])
    await gateway.model_call(caller(), model, REQUEST)
    await gateway.model_call(caller(), model, REQUEST)
    called = [e for e in events if isinstance(e, ModelCalled)]
    assert [(e.node, e.step, e.replayed) for e in called] == [
        ("alice", 1, False),
        ("alice", 1, True),
    ]


async def test_gateway_model_call_of_another_caller_is_not_a_replay() -> None:
    """The same request from another task is its own call."""
    gateway, _ = make_gateway()
    model = ScriptedModel(["4", "four"])
    await gateway.model_call(caller("alice"), model, REQUEST)
    answer = await gateway.model_call(caller("bob"), model, REQUEST)
    assert answer.text == "four"
    assert gateway.meter.counts["model_calls"] == 2


# -- a node's tool call ---------------------------------------------------------------------------


async def test_gateway_call_runs_a_permitted_tool() -> None:
    """A call to a tool on the allowlist runs it and returns its result."""
    gateway, _ = make_gateway()
    outcome = await gateway.call(caller(), echo_call("hi", "c1"))
    assert (outcome.status, outcome.value, outcome.call_id) == ("ok", "HI", "c1")
    assert ran == ["hi"]
    assert gateway.meter.counts["tool_calls"] == 1


async def test_gateway_call_records_the_result_in_the_ledger() -> None:
    """A call's result is recorded at the caller's position."""
    gateway, _ = make_gateway()
    await gateway.call(caller(seq=3), echo_call("hi", "c1"))
    (entry,) = gateway.ledger.entries(1, "alice")
    assert (entry.kind, entry.name, entry.seq, entry.status) == (
        LedgerKind.TOOL,
        "echo",
        3,
        LedgerStatus.DONE,
    )


async def test_gateway_call_at_a_recorded_position_replays_without_running() -> None:
    """The same call again at the same position gets the recorded result; the tool does
    not run twice."""
    gateway, _ = make_gateway()
    await gateway.call(caller(), echo_call("hi", "c1"))
    again = await gateway.call(caller(), echo_call("hi", "c1"))
    assert (again.value, again.replayed) == ("HI", True)
    assert ran == ["hi"]


async def test_gateway_call_denies_a_tool_not_on_the_allowlist() -> None:
    """A call to a tool the caller may not use is denied and never runs."""
    gateway, _ = make_gateway()
    outcome = await gateway.call(caller(), ToolCall(name="secret", id="c1"))
    assert outcome.status == "denied"
    assert outcome.error is not None
    assert "'secret' is not available to 'alice'" in outcome.error
    assert ran == []


async def test_gateway_call_denied_is_counted_as_denied_not_as_a_tool_call() -> None:
    """A denied call counts as denied, for the run and the node, and not as a tool call."""
    gateway, _ = make_gateway()
    await gateway.call(caller(), ToolCall(name="secret", id="c1"))
    meter = gateway.meter
    assert (meter.counts["denied_calls"], meter.counts["tool_calls"]) == (1, 0)
    assert meter.by_node["alice"]["denied_calls"] == 1


async def test_gateway_call_denied_is_reported_and_not_recorded() -> None:
    """A denied call is reported as a ToolCalled event and leaves the ledger empty."""
    gateway, events = make_gateway()
    await gateway.call(caller(), ToolCall(name="secret", id="c1"))
    (reported,) = [e for e in events if isinstance(e, ToolCalled)]
    assert (reported.tool, reported.status, reported.node) == ("secret", "denied", "alice")
    assert gateway.ledger.entries(1, "alice") == []


# -- the act phase ---------------------------------------------------------------------------------


async def test_gateway_act_returns_each_callers_outcomes_in_call_order() -> None:
    """Outcomes come back grouped by caller, in the order of each caller's calls, whatever
    order the calls finished in."""
    gateway, _ = make_gateway()
    outcomes = await gateway.act(
        [
            (caller("alice"), [echo_call("a1", "a1", wait=0.05), echo_call("a2", "a2")]),
            (caller("bob"), [echo_call("b1", "b1", wait=0.02)]),
        ]
    )
    assert [[o.call_id for o in group] for group in outcomes] == [["a1", "a2"], ["b1"]]
    assert [[o.value for o in group] for group in outcomes] == [["A1", "A2"], ["B1"]]
    assert ran[0] == "a2"  # the last call proposed finished first


async def test_gateway_act_keeps_a_denied_call_in_its_place() -> None:
    """A denied call among a caller's calls keeps its place in the outcomes."""
    gateway, _ = make_gateway()
    (group,) = await gateway.act(
        [(caller(), [echo_call("x", "c1"), ToolCall(name="secret", id="c2"), echo_call("y", "c3")])]
    )
    assert [(o.call_id, o.status) for o in group] == [
        ("c1", "ok"),
        ("c2", "denied"),
        ("c3", "ok"),
    ]
    assert sorted(ran) == ["x", "y"]


async def test_gateway_act_gives_each_call_its_own_position() -> None:
    """The calls of one caller take consecutive positions in the ledger."""
    gateway, _ = make_gateway()
    await gateway.act([(caller(seq=1), [echo_call("x", "c1"), echo_call("y", "c2")])])
    assert [e.seq for e in gateway.ledger.entries(1, "alice")] == [1, 2]


# -- idempotency keys and forgetting -------------------------------------------------------------


def test_gateway_idempotency_key_names_run_step_task_and_position() -> None:
    """The key is built from the run, the step, the task and the call's position."""
    gateway, _ = make_gateway()
    assert gateway.idempotency_key(3, "alice", 2) == "run-1/3/alice/2"


def test_gateway_idempotency_key_is_stable_and_distinct_per_position() -> None:
    """The same position always gives the same key; another position another key."""
    gateway, _ = make_gateway()
    assert gateway.idempotency_key(1, "alice", 0) == gateway.idempotency_key(1, "alice", 0)
    assert gateway.idempotency_key(1, "alice", 0) != gateway.idempotency_key(1, "alice", 1)


async def test_gateway_idempotency_key_is_what_the_tool_is_given() -> None:
    """A tool that asks for its ToolContext receives the gateway's key for its position."""
    gateway, _ = make_gateway()
    await gateway.call(caller(seq=4), ToolCall(name="charge", arguments={"amount": 5}, id="c1"))
    assert keys == [gateway.idempotency_key(1, "alice", 4)]


async def test_gateway_forget_drops_what_it_kept_about_a_committed_step() -> None:
    """After forget, the gateway no longer remembers having metered the step's calls: a
    replay there is counted as the first count of a new process would be."""
    gateway, _ = make_gateway()
    model = ScriptedModel(["4"])
    await gateway.model_call(caller(step=1), model, REQUEST)
    gateway.forget(1)
    await gateway.model_call(caller(step=1), model, REQUEST)
    assert gateway.meter.counts["model_calls"] == 2
    assert len(model.requests) == 1  # the ledger still replayed it


async def test_gateway_forget_keeps_what_it_knows_about_later_steps() -> None:
    """forget(step) leaves later steps alone: a replay there is still metered once."""
    gateway, _ = make_gateway()
    model = ScriptedModel(["4"])
    await gateway.model_call(caller(step=2), model, REQUEST)
    gateway.forget(1)
    await gateway.model_call(caller(step=2), model, REQUEST)
    assert gateway.meter.counts["model_calls"] == 1
