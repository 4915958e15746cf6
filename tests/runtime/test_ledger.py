"""The ledger through the gateway: a retried node or a resumed step replays its recorded calls;
a failed call runs again."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import streamed

from orchestra import END, START, Effect, Graph, NodeContext, RetryPolicy, RunStatus, tool
from orchestra.events import ToolCalled
from orchestra.kinds import LedgerKind, LedgerStatus
from orchestra.runtime.ledger import Ledger
from orchestra.store import Store
from orchestra.store.records import LedgerEntry
from runtime.gateway.graphs import S, one_node

pytestmark = pytest.mark.anyio


# -- the ledger -----------------------------------------------------------------------------


async def test_gateway_retried_node_replays_its_recorded_call() -> None:
    """A node retried after its tool call replays the call instead of running it again."""
    ran: list[int] = []
    attempts: list[int] = []

    @tool
    async def charge(amount: int) -> str:
        ran.append(amount)
        return f"charged {amount}"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool(charge, amount=5)
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("flaky after the charge")
        return {"resolution": result}

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, tools=[charge], retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    app = graph.compile(approvals=None)
    events, outcome = await streamed(app, S())
    assert outcome.state.resolution == "charged 5"
    assert ran == [5]
    replays = [e.replayed for e in events if isinstance(e, ToolCalled)]
    assert replays == [False, True]


async def test_gateway_resumed_step_replays_recorded_calls(store: Store) -> None:
    """A failed step resumed later replays the tool calls it had made; they do not rerun."""
    ran: list[int] = []
    fail = [True]

    @tool
    async def charge(amount: int) -> str:
        ran.append(amount)
        return f"charged {amount}"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool(charge, amount=5)
        if fail[0]:
            raise ConnectionError("crashed after the charge")
        return {"resolution": result}

    app = one_node(node, [charge], store=store)
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.FAILED
    fail[0] = False
    second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert second.state.resolution == "charged 5"
    assert ran == [5]


def flaky_tool(calls: list[int]) -> Any:
    """A tool that raises ConnectionError on its first call only."""

    @tool
    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("backend down")
        return "ok"

    return flaky


async def test_gateway_retried_node_runs_a_failed_tool_call_again() -> None:
    """A node retried after its tool failed calls the tool again."""
    calls: list[int] = []
    flaky = flaky_tool(calls)

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(flaky)}

    graph: Graph[S] = Graph(S)
    graph.add_node("n", node, tools=[flaky], retry=RetryPolicy(attempts=2, backoff=0))
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    outcome = await graph.compile(approvals=None).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert calls == [1, 1]


async def test_gateway_resume_runs_a_failed_tool_call_again(store: Store) -> None:
    """Resuming a run that failed on a tool error calls the tool again."""
    calls: list[int] = []
    flaky = flaky_tool(calls)

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(flaky)}

    app = one_node(node, [flaky], store=store)
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.FAILED
    second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert calls == [1, 1]


# -- a failed step's calls ----------------------------------------------------------------


async def _released(result: str) -> LedgerEntry:
    """An irreversible call recorded with ``result``, then its step failed."""
    ledger = Ledger("r1")
    await ledger.finish(
        1, "pay", 1, kind=LedgerKind.TOOL, name="refund", request_hash="h", result=result
    )
    await ledger.release_failed(1, lambda name: Effect.IRREVERSIBLE)
    entry = ledger.entries(1, "pay")[0]
    return entry


async def test_ledger_release_failed_puts_an_irreversible_error_in_doubt() -> None:
    """An irreversible call that raised may have taken effect: it becomes in doubt."""
    entry = await _released('{"status":"error","error":"RuntimeError: boom"}')
    assert entry.status is LedgerStatus.STARTED
    assert entry.result is None


async def test_ledger_release_failed_keeps_a_result_that_only_mentions_an_error() -> None:
    """An irreversible call that succeeded stays done even when its result holds the text
    "status":"error" (the call's own status is read, not searched for in the text)."""
    result = '{"status":"ok","result":{"status":"error","note":"upstream said so"}}'
    entry = await _released(result)
    assert entry.status is LedgerStatus.DONE
    assert entry.result == result
