"""The operator CLI on agent runs: model and tool calls, token usage, open requests."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from apps import cli_agent_app, cli_app
from rich.console import Console

from cli.support import cli, squeezed
from orchestra import Done, Request, RunOutcome, RunStatus
from orchestra.app import CompiledGraph
from orchestra.cli.history import timeline, timeline_table
from orchestra.cli.records import format_usage, runs_table, usage_by_node
from orchestra.cli.requests import (
    answer_hint,
    format_call,
    request_details,
    request_json,
    requests_table,
    stored_request,
)
from orchestra.store import EventRow, RunRecord, SQLiteStore
from orchestra.store.base import RequestRow

NOW = 1_700_000_000.0


def start(
    db: Path, app: CompiledGraph[Any], run_id: str, answers: dict[str, Any] | None = None
) -> RunOutcome[Any]:
    """Run ``app`` on ``db`` (or resume it with ``answers``) to its end."""

    async def go() -> RunOutcome[Any]:
        async with SQLiteStore(db) as store:
            bound = app.with_store(store)
            if answers is not None:
                return await bound.resume(run_id, answers=answers)
            return await bound.run({}, run_id=run_id)

    return anyio.run(go)


def start_plain(db: Path) -> None:
    """Run the count graph of plain nodes (no agents) on ``db`` as run "plain"."""

    async def go() -> None:
        store = cli_app.store_at(str(db))
        try:
            await cli_app.app.with_store(store).run({"limit": 1}, run_id="plain")
        finally:
            await store.aclose()

    anyio.run(go)


def render(renderable: Any, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def event(kind: str, at: float, step: int, /, **data: Any) -> EventRow:
    return EventRow(step=step, kind=kind, at=at, data=json.dumps({"step": step, **data}))


def request_row(**kwargs: Any) -> RequestRow:
    values: dict[str, Any] = {
        "run_id": "r1",
        "request_id": "req_1",
        "step": 3,
        "task": "billing",
        "kind": "in_doubt",
        "payload": json.dumps(
            {
                "tool": "refund",
                "arguments": {"order_id": "42", "amount": 30.0},
                "call_id": "billing-3-0",
                "seq": 1,
                "idempotency_key": "r1/3/billing/1",
            }
        ),
        "schema": None,
        "status": "open",
        "created_at": NOW - 90,
    }
    values.update(kwargs)
    return RequestRow(**values)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forget the refunds of other tests; keep sys.path and the working directory clean."""
    monkeypatch.setattr(cli_agent_app, "refunds", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def desk(db: Path) -> Path:
    """A database with a completed agent run ("desk") whose triage had a call denied."""
    assert start(db, cli_agent_app.desk, "desk").status is RunStatus.COMPLETED
    assert cli_agent_app.refunds == ["42"]
    return db


@pytest.fixture
def stuck(db: Path) -> tuple[Path, Request]:
    """A database with an interrupted run ("stuck") waiting on one in-doubt call."""
    outcome = start(db, cli_agent_app.stuck, "stuck")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    return db, request


# -- show: the timeline -----------------------------------------------------------------------


def test_show_lists_each_model_call_with_its_tokens(desk: Path) -> None:
    """Every model call is a timeline row: caller, model, took, tokens in and out."""
    result = cli(desk, "show", "desk")
    assert result.exit_code == 0, result.output
    calls = [line.split()[1:] for line in result.stdout.splitlines() if "\u2192 model" in line]
    assert [row[:4] for row in calls] == [
        ["1", "triage", "\u2192", "model"],
        ["2", "triage", "\u2192", "model"],
        ["3", "triage", "\u2192", "model"],
        ["4", "billing", "\u2192", "model"],
        ["5", "billing", "\u2192", "model"],
    ]
    assert all(row[4] == "scripted" and row[-4:-2] == ["tokens", "in,"] for row in calls)
    assert all(row[-1] == "out" for row in calls)


def test_show_lists_each_tool_call_with_its_status(desk: Path) -> None:
    """Every tool call is a timeline row; a denied one says why it did not run."""
    lines = squeezed(cli(desk, "show", "desk").stdout)
    tools = [line.split(" ", 2)[2] for line in lines if "\u2192 tool" in line]
    assert tools[0].startswith("triage \u2192 tool lookup_order ")
    assert tools[0].endswith(" ok")
    assert tools[1].startswith("triage \u2192 tool refund ")
    assert tools[1].endswith(
        " denied: tool 'refund' is not available to 'triage' (its tools: 'lookup_order'); "
        "the call was not made"
    )
    assert tools[2].startswith("billing \u2192 tool refund ")
    assert tools[2].endswith(" ok")
    assert len(tools) == 3


def test_show_marks_calls_replayed_after_an_answer(stuck: tuple[Path, Request]) -> None:
    """Resumed with Done, the in-doubt step's calls come from the ledger and say so."""
    db, request = stuck
    done = start(db, cli_agent_app.stuck, "stuck", answers={request.id: Done(result="wired")})
    assert done.status is RunStatus.COMPLETED
    lines = squeezed(cli(db, "show", "stuck").stdout)
    wire = [line for line in lines if "\u2192 tool wire" in line]
    assert wire[0].endswith(" in_doubt: no result within 0.05s")
    assert wire[1].endswith(" payer \u2192 tool wire ok; replayed from the ledger")
    replayed = [line for line in lines if line.endswith("replayed from the ledger")]
    assert len(replayed) == 2  # the model call and the tool call of step 1


# -- show: usage ------------------------------------------------------------------------------


def test_show_usage_counts_tokens_and_calls_per_agent(desk: Path) -> None:
    """Usage gives tokens in and out, model and tool calls, then one line per agent."""
    lines = squeezed(cli(desk, "show", "desk").stdout)
    usage = next(line for line in lines if line.startswith("usage "))
    assert usage.startswith("usage 5 steps, 5 tasks, ")
    assert ", 5 model calls, 2 tool calls, wall " in usage
    (by_agent,) = [line for line in lines if line.startswith("by agent ")]
    assert by_agent.startswith("by agent triage ")
    assert by_agent.endswith(", 3 model calls, 1 tool call")
    billing = lines[lines.index(by_agent) + 1]
    assert billing.startswith("billing ")
    assert billing.endswith(", 2 model calls, 1 tool call")


def test_show_a_run_without_agents_has_no_agent_usage(db: Path) -> None:
    """A graph of plain nodes shows no token, call or per-agent usage."""
    start_plain(db)
    text = cli(db, "show", "plain").stdout
    assert "tokens" not in text
    assert "by agent" not in text
    assert "open request" not in text


# -- show: open requests ----------------------------------------------------------------------


def test_show_lists_open_requests(stuck: tuple[Path, Request]) -> None:
    """An interrupted run lists each open request: id, kind, node, step, what it asks."""
    db, request = stuck
    result = cli(db, "show", "stuck")
    assert result.exit_code == 0, result.output
    lines = squeezed(result.stdout)
    assert "1 open request: the run waits for an answer" in lines
    row = next(line for line in lines if line.startswith(request.id))
    assert row.startswith(f"{request.id} in_doubt payer 1 ")
    assert row.endswith(
        "irreversible call 'wire' by 'payer' at step 1 started but never reported a result: "
        "did it take effect?"
    )
    details = lines[lines.index(row) + 1]
    assert details == 'wire(account="acme", amount=99.5), idempotency key stuck/1/payer/1'


def test_show_says_how_to_answer_an_open_request(stuck: tuple[Path, Request]) -> None:
    """The hint gives the CLI command of each answer, then the Python call that answers,
    with the run's app."""
    db, request = stuck
    lines = cli(db, "show", "stuck").stdout.splitlines()
    start_at = next(i for i, line in enumerate(lines) if line.startswith("answer with the CLI"))
    resolve = f"orchestra resolve stuck {request.id}"
    assert lines[start_at : start_at + 8] == [
        "answer with the CLI, then `orchestra resume stuck` (or add --resume to the last answer):",
        f"  {resolve} --done --result JSON   it took effect; pass what it returned",
        f"  {resolve} --retry                it did not; run it again, with the same "
        f"idempotency key",
        f"  {resolve} --abort --reason TEXT  stop the run",
        "or from Python, with the run's app (apps.cli_agent_app:stuck) on this database:",
        "  from orchestra import Abort, Done, Retry",
        f'  await app.resume("stuck", answers={{"{request.id}": Done(result=...)}})',
        "  (answers: Done(result=...), Retry(), Abort())",
    ]


def test_show_lists_no_request_once_it_is_answered(stuck: tuple[Path, Request]) -> None:
    """An answered request is no longer listed."""
    db, request = stuck
    start(db, cli_agent_app.stuck, "stuck", answers={request.id: Done(result="wired")})
    text = cli(db, "show", "stuck").stdout
    assert "open request" not in text
    assert "Done(result=...)" not in text  # no answering hint either


def test_show_timeline_has_the_operators_answer(stuck: tuple[Path, Request]) -> None:
    """An answer given on resume is an entry of the timeline: who answered what, how."""
    db, request = stuck
    start(db, cli_agent_app.stuck, "stuck", answers={request.id: Done(result="wired")})
    text = cli(db, "show", "stuck").stdout
    assert "operator answered in_doubt request" in text
    assert f'{request.id} (payer): done, result "wired"' in text


def test_show_json_has_requests_calls_and_usage(stuck: tuple[Path, Request]) -> None:
    """--json carries the open requests, the call entries and the per-agent usage."""
    db, request = stuck
    data = json.loads(cli(db, "show", "stuck", "--json").stdout)
    (listed,) = data["requests"]
    assert listed["id"] == request.id
    assert (listed["kind"], listed["node"], listed["step"]) == ("in_doubt", "payer", 1)
    assert listed["asks"] == request.describe()
    assert listed["payload"] == request.payload
    assert listed["answers"] == ["Done(result=...)", "Retry()", "Abort()"]
    calls = [e for e in data["timeline"] if "\u2192" in e["what"]]
    assert [e["what"] for e in calls] == ["payer \u2192 model scripted", "payer \u2192 tool wire"]
    assert calls[1]["notes"] == "in_doubt: no result within 0.05s"
    kinds = [e["kind"] for e in data["events"]]
    assert "model_called" in kinds
    assert "tool_called" in kinds
    usage = data["run"]["usage"]
    assert usage["model_calls"] == 1
    assert usage["by_node"]["payer"]["model_calls"] == 1


def test_show_json_lists_no_requests_for_a_completed_run(desk: Path) -> None:
    """A run with nothing open has an empty request list."""
    assert json.loads(cli(desk, "show", "desk", "--json").stdout)["requests"] == []


# -- runs -------------------------------------------------------------------------------------


def test_runs_shows_tokens_and_a_dash_for_runs_without(desk: Path) -> None:
    """The runs table shows each run's tokens (in + out); a run without any shows "-"."""
    start_plain(desk)
    result = cli(desk, "runs")
    assert result.exit_code == 0, result.output
    lines = squeezed(result.stdout)
    assert lines[0].split()[:6] == ["run", "id", "graph", "status", "step", "tokens"]
    records = {r["run_id"]: r for r in json.loads(cli(desk, "runs", "--json").stdout)}
    usage = records["desk"]["usage"]
    tokens = usage["input_tokens"] + usage["output_tokens"]
    assert tokens > 0
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["desk"][:5] == ["desk", "desk", "completed", "5", f"{tokens:,}"]
    assert rows["plain"][:5] == ["plain", "count", "completed", "3", "-"]


# -- the formatters ---------------------------------------------------------------------------


def test_timeline_model_call_entry() -> None:
    """A model call: caller and model, its duration, tokens; an unusual finish is named."""
    entries = timeline(
        [
            event("model_called", 1.0, 2, node="a", model="m", input_tokens=1200,
                  output_tokens=5, duration=0.5, finish_reason="tool_calls", replayed=False),
            event("model_called", 2.0, 3, node="a", model="m", input_tokens=10,
                  output_tokens=4000, duration=1.5, finish_reason="length", replayed=False),
        ]
    )  # fmt: skip
    assert [(e.step, e.what, e.duration, e.notes, e.style) for e in entries] == [
        (2, "a \u2192 model m", 0.5, "1,200 tokens in, 5 out", ""),
        (3, "a \u2192 model m", 1.5, "10 tokens in, 4,000 out; finish: length", ""),
    ]


@pytest.mark.parametrize(
    ("status", "error", "notes", "style"),
    [
        ("ok", None, "ok", ""),
        ("denied", "not yours", "denied: not yours", "yellow"),
        ("invalid_arguments", "amount: missing", "invalid_arguments: amount: missing", "yellow"),
        ("error", "ValueError: x", "error: ValueError: x", "red"),
        ("timeout", "no result within 1s", "timeout: no result within 1s", "red"),
        ("in_doubt", "no result within 1s", "in_doubt: no result within 1s", "bold red"),
    ],
)
def test_timeline_tool_call_entry(status: str, error: str | None, notes: str, style: str) -> None:
    """A tool call: caller and tool, its duration, its status (and error), styled by it."""
    (entry,) = timeline(
        [
            event("tool_called", 1.0, 4, node="b", tool="refund", call_id="b-4-0", status=status,
                  duration=0.25, error=error, replayed=False),
        ]
    )  # fmt: skip
    assert (entry.step, entry.what, entry.duration) == (4, "b \u2192 tool refund", 0.25)
    assert (entry.notes, entry.style) == (notes, style)


def test_timeline_replayed_call_has_no_duration() -> None:
    """A call replayed from the ledger took no time of its own: it says replayed instead."""
    (entry,) = timeline(
        [
            event("tool_called", 1.0, 4, node="b", tool="refund", call_id="b-4-0", status="ok",
                  duration=0.0, error=None, replayed=True),
        ]
    )  # fmt: skip
    assert (entry.duration, entry.notes) == (None, "ok; replayed from the ledger")


def test_timeline_calls_come_before_their_step() -> None:
    """Calls are listed in time order, before the step whose barrier they preceded."""
    entries = timeline(
        [
            event("model_called", 1.0, 1, node="a", model="m", input_tokens=1, output_tokens=1,
                  duration=0.1, replayed=False),
            event("tool_called", 1.1, 1, node="a", tool="t", call_id="a-1-0", status="ok",
                  duration=0.1, error=None, replayed=False),
            event("step_committed", 1.2, 1, nodes=["a"], changed=[], next=["a"], duration=0.3),
        ]
    )  # fmt: skip
    assert [e.what for e in entries] == ["a \u2192 model m", "a \u2192 tool t", "a"]
    text = render(timeline_table(entries))
    assert "a \u2192 tool t" in text


def test_format_usage_counts_model_and_tool_calls() -> None:
    """Usage names model and tool calls when there are any, one or many."""
    usage = {"steps": 2, "tasks": 2, "input_tokens": 1000, "output_tokens": 20, "model_calls": 1,
             "tool_calls": 1, "wall_seconds": 0.5}  # fmt: skip
    assert format_usage(usage) == (
        "2 steps, 2 tasks, 1,020 tokens (1,000 in, 20 out), 1 model call, 1 tool call, wall 0.50s"
    )
    usage["model_calls"] = 3
    assert ", 3 model calls, 1 tool call," in format_usage(usage)


def test_usage_by_node_has_one_line_per_agent() -> None:
    """The per-agent breakdown gives each agent's tokens and calls; none without it."""
    usage = {
        "by_node": {
            "triage": {"input_tokens": 90, "output_tokens": 10, "model_calls": 2,
                       "tool_calls": 0},
            "billing": {"input_tokens": 0, "output_tokens": 0, "model_calls": 0,
                        "tool_calls": 0},
        }
    }  # fmt: skip
    table = usage_by_node(usage)
    assert table is not None
    assert squeezed(render(table)) == [
        "triage 100 tokens (90 in, 10 out), 2 model calls",
        "billing nothing used",
    ]
    assert usage_by_node({"steps": 3}) is None


def test_runs_table_shows_a_dash_for_a_run_without_tokens() -> None:
    """In the tokens column a run that used no model shows "-", not 0."""
    base: dict[str, Any] = {
        "graph": "g",
        "structure_hash": "h",
        "app_ref": None,
        "status": "completed",
        "step": 1,
        "owner": None,
        "epoch": 1,
        "lease_expires_at": None,
        "created_at": NOW - 60,
        "updated_at": NOW - 30,
    }
    spent = RunRecord(run_id="r1", usage={"input_tokens": 10, "output_tokens": 5}, **base)
    rows = squeezed(render(runs_table([spent, RunRecord(run_id="r2", **base)], NOW)))
    assert rows[0].split()[:6] == ["run", "id", "graph", "status", "step", "tokens"]
    assert rows[2].split()[:5] == ["r1", "g", "completed", "1", "15"]
    assert rows[3].split()[:5] == ["r2", "g", "completed", "1", "-"]


def test_stored_request_is_the_request_the_run_raised() -> None:
    """A stored row becomes a Request again: same id, kind, node, step and payload."""
    request = stored_request(request_row())
    assert (request.id, request.run_id, request.kind, request.node, request.step) == (
        "req_1",
        "r1",
        "in_doubt",
        "billing",
        3,
    )
    assert request.payload["idempotency_key"] == "r1/3/billing/1"
    assert request.describe().startswith("irreversible call 'refund' by 'billing' at step 3")


def test_request_details_name_the_call_and_its_key() -> None:
    """An in-doubt call is written as code with its idempotency key; others as JSON."""
    assert request_details(stored_request(request_row())) == (
        'refund(order_id="42", amount=30.0), idempotency key r1/3/billing/1'
    )
    custom = stored_request(request_row(kind="custom", payload='{"ask":"ok?"}'))
    assert request_details(custom) == '{"ask":"ok?"}'
    assert custom.describe() == "custom request from 'billing' at step 3"
    assert format_call("ping", {}) == "ping()"
    assert format_call("odd", [1, 2]) == "odd([1,2])"


def test_requests_table_rows() -> None:
    """The table gives id, kind, node, step, age, then what each request asks."""
    text = render(requests_table([stored_request(request_row())], NOW))
    lines = squeezed(text)
    assert lines[0] == "1 open request: the run waits for an answer"
    assert lines[1] == "request id kind node step asked asks"
    assert lines[3].startswith("req_1 in_doubt billing 3 1m ago irreversible call 'refund'")
    assert 'refund(order_id="42", amount=30.0), idempotency key r1/3/billing/1' in lines


def test_request_json_and_answer_hint_for_an_unknown_kind() -> None:
    """A kind this version cannot answer lists no answers and an open-ended hint."""
    custom = stored_request(request_row(kind="custom", payload='{"ask":"ok?"}'))
    data = request_json(custom)
    assert (data["kind"], data["answers"], data["payload"]) == ("custom", [], {"ask": "ok?"})
    assert data["commands"] == []
    assert answer_hint("r1", [custom], None) == [
        "answer from Python, with the run's app on this database:",
        '  await app.resume("r1", answers={"req_1": ...})',
    ]
