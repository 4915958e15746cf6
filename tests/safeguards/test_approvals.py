"""The approval policy: which calls it holds (by effect, per tool, per agent, per node), its
checks at compile, and the expiry it gives a request."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from desk import REFUND, Desk, S, billing, call, held_tools, pair, paying, turn

from orchestra import Approvals, GraphValidationError, NodeContext, RunStatus
from orchestra.store import Store

pytestmark = pytest.mark.anyio


# -- which calls are held -------------------------------------------------------------------


async def test_approvals_default_holds_an_irreversible_call() -> None:
    """By default an irreversible call stops the run for approval, and nothing of its turn
    runs meanwhile."""
    desk = Desk()
    script = [turn(call("lookup", "l", order_id="7"), call("note", "n", text="x"), REFUND)]
    app, _ = billing(desk, [*script, "done"])
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.INTERRUPTED
    assert held_tools(outcome.pending) == ["refund"]
    assert desk.ran == []


async def test_approvals_default_holds_no_read_or_write_call() -> None:
    """By default read and write calls run without asking anyone."""
    desk = Desk()
    script = [turn(call("lookup", "l", order_id="7"), call("note", "n", text="x")), "done"]
    app, _ = billing(desk, script)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert sorted(desk.names()) == ["lookup", "note"]


@pytest.mark.parametrize(
    ("require", "held"),
    [
        pytest.param("irreversible", ["refund"], id="irreversible"),
        pytest.param("writes", ["note", "refund"], id="writes"),
        pytest.param("all", ["lookup", "note", "refund"], id="all"),
    ],
)
async def test_approvals_require_level_holds_those_calls(require: str, held: list[str]) -> None:
    """require= names the effects that need approval: irreversible, writes (and
    irreversible), or all."""
    desk = Desk()
    script = [turn(call("lookup", "l", order_id="7"), call("note", "n", text="x"), REFUND)]
    app, _ = billing(desk, [*script, "done"], approvals=Approvals(require=require))
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.INTERRUPTED
    assert held_tools(outcome.pending) == held
    assert desk.ran == []


async def test_approvals_require_none_holds_nothing() -> None:
    """require="none" lets even an irreversible call run without approval."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], approvals=Approvals(require="none"))
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 250.0))]


async def test_approvals_tool_rule_true_holds_a_write_call() -> None:
    """tools={name: True} holds every call of a tool the level would let through."""
    desk = Desk()
    script = [turn(call("note", "n", text="x"), call("lookup", "l", order_id="7")), "done"]
    app, _ = billing(desk, script, approvals=Approvals(tools={"note": True}))
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert held_tools(outcome.pending) == ["note"]
    assert desk.ran == []


async def test_approvals_tool_rule_false_lets_an_irreversible_call_run() -> None:
    """tools={name: False} exempts a tool the level would hold."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], approvals=Approvals(tools={"refund": False}))
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 250.0))]


async def test_approvals_tool_rule_function_decides_by_the_arguments() -> None:
    """A rule function of the arguments holds only the calls it names: refunds over 100."""
    desk = Desk()
    small = call("refund", "small", order_id="1", amount=50)
    large = call("refund", "large", order_id="2", amount=500)
    policy = Approvals(tools={"refund": lambda arguments: arguments["amount"] > 100})
    app, _ = billing(desk, [turn(small, large), "done"], approvals=policy)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    (request,) = outcome.pending
    assert request.payload["call_id"] == "large"
    assert request.payload["arguments"] == {"order_id": "2", "amount": 500}


async def test_approvals_tool_rule_function_lets_a_small_call_run() -> None:
    """A call the rule function does not name runs without approval."""
    desk = Desk()
    small = call("refund", "small", order_id="1", amount=50)
    policy = Approvals(tools={"refund": lambda arguments: arguments["amount"] > 100})
    app, _ = billing(desk, [turn(small), "done"], approvals=policy)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("1", 50.0))]


async def test_approvals_failing_rule_function_asks() -> None:
    """A rule function that raises holds the call: when in doubt, a person decides."""
    desk = Desk()
    policy = Approvals(tools={"note": lambda arguments: arguments["missing"] > 1})
    app, _ = billing(desk, [turn(call("note", "n", text="x")), "done"], approvals=policy)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert held_tools(outcome.pending) == ["note"]
    assert desk.ran == []


async def test_approvals_agent_policy_replaces_the_graph_policy_for_that_agent() -> None:
    """agents={name: Approvals(...)} holds that agent's calls by its own policy only."""
    desk = Desk()
    lookup = turn(call("lookup", "l", order_id="7"))
    policy = Approvals(agents={"a": Approvals(require="all")})
    app, _ = pair(desk, {"a": [lookup, "done"], "b": [lookup, "done"]}, approvals=policy)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert [(r.node, r.payload["tool"]) for r in outcome.pending] == [("a", "lookup")]


async def test_approvals_agent_policy_can_exempt_an_agent() -> None:
    """An agent whose own policy is require="none" is not held; another agent still is."""
    desk = Desk()
    refunding = turn(REFUND)
    policy = Approvals(agents={"b": Approvals(require="none")})
    app, _ = pair(desk, {"a": [refunding, "done"], "b": [refunding, "done"]}, approvals=policy)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert [(r.node, r.payload["tool"]) for r in outcome.pending] == [("a", "refund")]


async def test_approvals_node_policy_applies_to_its_own_calls() -> None:
    """agents= names plain nodes too: their ctx.call_tool calls follow that policy."""
    desk = Desk()

    async def payer(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"note": await ctx.call_tool("refund", order_id="7", amount=250)}

    app = paying(desk, payer, approvals=Approvals(agents={"payer": Approvals(require="none")}))
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert desk.ran == [("refund", ("7", 250.0))]


async def test_approvals_none_turns_the_policy_off() -> None:
    """approvals=None holds nothing."""
    desk = Desk()
    app, _ = billing(desk, [turn(REFUND), "done"], approvals=None)
    with anyio.fail_after(5):
        outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert desk.names() == ["refund"]


# -- the policy's checks at compile ---------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        pytest.param(Approvals(require="sometimes"), "require must be one of", id="require"),
        pytest.param(Approvals(tools={"nope": True}), "no tool 'nope'", id="tool"),
        pytest.param(
            Approvals(tools={"refund": "yes"}),  # type: ignore[dict-item]
            "must be True, False",
            id="rule",
        ),
        pytest.param(Approvals(agents={"ghost": Approvals()}), "'ghost'", id="agent"),
        pytest.param(Approvals(expires_after=0), "expires_after", id="expires-zero"),
        pytest.param(Approvals(expires_after=-1.0), "expires_after", id="expires-negative"),
        pytest.param(
            Approvals(expires_after="1"),  # type: ignore[arg-type]
            "expires_after",
            id="expires-text",
        ),
        pytest.param(
            Approvals(agents={"billing": Approvals(tools={"nope": True})}),
            "approvals.agents['billing']: no tool 'nope'",
            id="agent-policy-tool",
        ),
    ],
)
def test_approvals_compile_rejects_a_bad_policy(policy: Approvals, problem: str) -> None:
    """A bad policy is a compile error naming what is wrong."""
    with pytest.raises(GraphValidationError) as caught:
        billing(Desk(), ["done"], approvals=policy)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_approvals_compile_lists_every_problem_of_a_policy() -> None:
    """Every problem of a policy is reported in one error."""
    policy = Approvals(
        require="sometimes",
        tools={"nope": True},
        agents={"ghost": Approvals()},
        expires_after=0,
    )
    with pytest.raises(GraphValidationError) as caught:
        billing(Desk(), ["done"], approvals=policy)
    problems = caught.value.problems
    assert len(problems) == 4, problems
    for expected in ("require must be one of", "no tool 'nope'", "'ghost'", "expires_after"):
        assert any(expected in p for p in problems), (expected, problems)


def test_approvals_compile_rejects_a_policy_that_is_not_approvals() -> None:
    """approvals= takes an Approvals or None."""
    with pytest.raises(GraphValidationError, match="approvals must be an Approvals"):
        billing(Desk(), ["done"], approvals={"require": "all"})


# -- expiry ---------------------------------------------------------------------------------


async def test_approvals_request_carries_its_expiry(store: Store) -> None:
    """With expires_after, the request says when it expires."""
    desk = Desk()
    policy = Approvals(expires_after=60)
    app, _ = billing(desk, [turn(REFUND), "done"], store=store, approvals=policy)
    before = time.time()
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    (request,) = outcome.pending
    assert request.expires_at is not None
    assert before + 60 <= request.expires_at <= time.time() + 60


async def test_approvals_agent_policy_sets_its_own_expiry(store: Store) -> None:
    """An agent's own policy can give its requests an expiry the graph's policy has not."""
    desk = Desk()
    policy = Approvals(agents={"billing": Approvals(expires_after=60)})
    app, _ = billing(desk, [turn(REFUND), "done"], store=store, approvals=policy)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    (request,) = outcome.pending
    assert request.expires_at is not None
