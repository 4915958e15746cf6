"""The one edited-arguments check (Tool.check_arguments) and the gateway's permission and
validation step: what a tool refuses, the resource keys it computes, and every caller (a
model's proposal, an operator's Edit at answer time and at resume) using the same rule."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import END, START, Edit, Effect, Graph, NodeContext, RunStatus, tool
from orchestra._json import compact_json
from orchestra.context import Caller
from orchestra.errors import AnswerError, ToolArgumentsError
from orchestra.events import ApprovalDecided, Event
from orchestra.models import ToolCall
from orchestra.runtime.gateway.approval import ApprovalStep
from orchestra.runtime.gateway.calls import PlannedCall, prepare
from orchestra.runtime.gateway.execute import CallRunner
from orchestra.runtime.ledger import Ledger
from orchestra.runtime.meter import Meter
from orchestra.safeguards.approvals import Approvals
from orchestra.safeguards.interrupts import StepInterrupted
from orchestra.store import Store
from orchestra.store.base import RequestStatus
from orchestra.tools import CallStatus, Tool


def order_keys(arguments: dict[str, Any]) -> list[str]:
    if arguments["order_id"] == "boom":
        raise RuntimeError("no such shard")
    return [f"order:{arguments['order_id']}"]


@tool(effect=Effect.IRREVERSIBLE, resources=order_keys)
async def refund(order_id: str, amount: float = 1.0) -> str:
    return f"refunded {order_id}"


def caller() -> Caller:
    return Caller("pay", "pay", 1, {"refund": refund})


# -- Tool.check_arguments -------------------------------------------------------------------


def test_check_arguments_returns_validated_json_and_resource_keys() -> None:
    """Accepted arguments come back as the tool gets them, in JSON form, with their keys."""
    checked = refund.check_arguments({"order_id": "7", "amount": "30"})
    assert checked.arguments == {"order_id": "7", "amount": 30.0}
    assert checked.json == {"order_id": "7", "amount": 30.0}
    assert checked.resources == frozenset({"order:7"})


def test_check_arguments_refuses_arguments_that_do_not_fit_the_schema() -> None:
    """A value the schema refuses is named in the error's detail."""
    with pytest.raises(ToolArgumentsError) as caught:
        refund.check_arguments({"order_id": "7", "amount": "lots"})
    assert caught.value.tool == "refund"
    assert caught.value.detail.startswith("amount: ")


def test_check_arguments_refuses_unknown_arguments() -> None:
    """An argument the tool does not take is refused, not dropped."""
    with pytest.raises(ToolArgumentsError, match="admin"):
        refund.check_arguments({"order_id": "7", "admin": True})


def test_check_arguments_refuses_what_is_not_an_object() -> None:
    """Arguments are a JSON object: a list is refused, saying what it got."""
    with pytest.raises(ToolArgumentsError) as caught:
        refund.check_arguments(["7"])
    assert caught.value.detail == "arguments must be a JSON object, got list"


def test_check_arguments_refuses_when_the_resources_function_fails() -> None:
    """The user's resources function failing on the arguments refuses them, naming it."""
    with pytest.raises(ToolArgumentsError) as caught:
        refund.check_arguments({"order_id": "boom"})
    assert caught.value.detail == (
        "the tool's resources function failed: RuntimeError: no such shard"
    )


# -- the gateway's permission and validation ---------------------------------------------------


def test_prepare_takes_checked_arguments_and_resource_keys() -> None:
    """A call that passes carries the checked arguments and their resource keys."""
    item = prepare(caller(), ToolCall(name="refund", arguments='{"order_id": "9"}', id="c"), 1)
    assert item.outcome is None
    assert item.json_arguments == {"order_id": "9", "amount": 1.0}
    assert item.resources == frozenset({"order:9"})


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({"order_id": "boom"}, "resources function failed", id="resources"),
        pytest.param({"amount": 2}, "order_id: ", id="schema"),
        pytest.param("[1]", "must be a JSON object, got list", id="not-an-object"),
    ],
)
def test_prepare_refuses_what_check_arguments_refuses(arguments: Any, error: str) -> None:
    """Arguments the tool refuses make the call invalid_arguments: it is not made."""
    item = prepare(caller(), ToolCall(name="refund", arguments=arguments, id="c"), 1)
    assert item.outcome is not None
    assert item.outcome.status is CallStatus.INVALID_ARGUMENTS
    assert error in (item.outcome.error or "")
    assert (item.outcome.error or "").endswith("; the call was not made")


def test_prepare_denies_a_tool_not_on_the_allowlist() -> None:
    """Permission comes first: a tool the caller was not given is denied."""
    item = prepare(caller(), ToolCall(name="wire", arguments={}, id="c"), 1)
    assert item.outcome is not None
    assert item.outcome.status is CallStatus.DENIED


# -- an operator's Edit, carried out by the gateway -----------------------------------------


async def answered_edit(arguments: Any) -> tuple[PlannedCall, list[Event]]:
    """Hold a refund for approval, answer it with Edit(arguments), carry the answer out."""
    events: list[Event] = []
    runner = CallRunner(
        run_id="r",
        ledger=Ledger("r"),
        meter=Meter(),
        emit=lambda event, level: events.append(event),
        spend=None,
    )
    requests: dict[str, Any] = {}
    step = ApprovalStep(runner=runner, policy=Approvals(), requests=requests, expire=None)
    call = ToolCall(name="refund", arguments={"order_id": "7"}, id="c")
    with pytest.raises(StepInterrupted) as caught:
        await step.approve([prepare(caller(), call, 1)])
    (request,) = caught.value.requests
    answer = compact_json({"answer": "edit", "arguments": arguments})
    requests[request.id] = replace(request.to_row(), status=RequestStatus.ANSWERED, answer=answer)
    item = prepare(caller(), call, 1)
    await step.approve([item])
    return item, events


@pytest.mark.anyio
async def test_gateway_edit_recomputes_the_resource_keys() -> None:
    """An edited call touches the resources of its new arguments, not the proposed ones."""
    item, _ = await answered_edit({"order_id": "8", "amount": 2})
    assert item.outcome is None
    assert item.approved
    assert item.edited == {"order_id": "8", "amount": 2.0}
    assert item.resources == frozenset({"order:8"})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({"order_id": "boom"}, "resources function failed", id="resources"),
        pytest.param({"order_id": "8", "amount": "x"}, "amount: ", id="schema"),
    ],
)
async def test_gateway_edit_the_tool_refuses_is_rejected(arguments: Any, error: str) -> None:
    """An edit that no longer fits the tool is a rejection (an event), not a crash."""
    item, events = await answered_edit(arguments)
    assert item.outcome is not None
    assert item.outcome.status is CallStatus.REJECTED
    assert "the edited arguments no longer fit the tool: " in (item.outcome.error or "")
    assert error in (item.outcome.error or "")
    (decided,) = [e for e in events if isinstance(e, ApprovalDecided)]
    assert decided.decision == "rejected"


# -- an operator's Edit, checked when it is answered ------------------------------------------


class S(BaseModel):
    paid: str | None = None


@pytest.mark.anyio
async def test_answer_edit_the_resources_function_refuses_is_refused(store: Store) -> None:
    """runs/answers refuses an Edit with the same rule: nothing is recorded."""

    async def pay(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"paid": await ctx.call_tool("refund", order_id="7")}

    graph: Graph[S] = Graph(S)
    graph.add_node("pay", pay, tools=[refund])
    graph.add_edge(START, "pay")
    graph.add_edge("pay", END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    with pytest.raises(AnswerError, match="resources function failed: RuntimeError"):
        await app.answer("r1", {request.id: Edit(arguments={"order_id": "boom"})})
    assert [r.status for r in await store.requests("r1")] == ["open"]


@pytest.mark.anyio
async def test_every_caller_uses_check_arguments(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proposed call, an Edit answered and an Edit carried out all go through the one
    check."""
    seen: list[Any] = []
    check = Tool.check_arguments

    def spy(self: Tool, arguments: Any) -> Any:
        seen.append(dict(arguments))
        return check(self, arguments)

    monkeypatch.setattr(Tool, "check_arguments", spy)

    async def pay(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"paid": await ctx.call_tool("refund", order_id="7")}

    graph: Graph[S] = Graph(S)
    graph.add_node("pay", pay, tools=[refund])
    graph.add_edge(START, "pay")
    graph.add_edge("pay", END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        (request,) = (await app.run(S(), run_id="r1")).pending
        assert seen == [{"order_id": "7"}]  # proposed
        await app.answer("r1", {request.id: Edit(arguments={"order_id": "8"})})
        assert seen[1:] == [{"order_id": "8"}]  # answered
        done = await app.resume("r1")
    assert done.status is RunStatus.COMPLETED
    assert done.state.paid == "refunded 8"
    # the re-run proposes the call again, then carries out the edit
    assert seen[2:] == [{"order_id": "7"}, {"order_id": "8", "amount": 1.0}]
