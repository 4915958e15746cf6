"""The examples run as scripts, and the demo graph is the quickstart's graph."""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from orchestra import RunStatus
from orchestra.demo import build_app
from orchestra.store import SQLiteStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@functools.cache
def run_example(path: Path) -> subprocess.CompletedProcess[str]:
    """Run an example as a user would, warnings as errors (once per test session)."""
    return subprocess.run(
        [sys.executable, "-W", "error", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_runs(path: Path) -> None:
    """Every example runs as `python examples/NAME.py` and exits 0."""
    result = run_example(path)
    assert result.returncode == 0, result.stderr


def test_quickstart_prints_the_final_outcome() -> None:
    """The quickstart prints its (deterministic) outcome: status, revision, publication."""
    result = run_example(EXAMPLES / "quickstart.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "completed after 7 steps"
    assert "  revision   2" in lines
    assert "  published  'reports/structured-concurrency-r2.md'" in lines


def test_demo_graph_is_the_quickstart_graph() -> None:
    """`orchestra demo` runs the quickstart's graph: same state, nodes, edges and routes."""
    quickstart = load_example("quickstart")
    assert build_app(speed=0).structure_hash == quickstart.build_graph().compile().structure_hash


@pytest.mark.anyio
async def test_demo_graph_outcome_is_deterministic() -> None:
    """Fan-out writes merge in Send order, the review loops once, publish succeeds on retry."""
    outcome = await build_app(speed=0).run({"topic": "graphs"})
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.steps == 7
    state = outcome.state
    assert state.findings == ["background (3 sources)", "practice (4 sources)", "risks (2 sources)"]
    assert state.sources == 9
    assert state.feedback == ["draft 1: cite your sources", "draft 2: approved"]
    assert state.revision == 2
    assert state.published == "reports/graphs-r2.md"


@pytest.mark.anyio
async def test_demo_graph_fails_when_retries_run_out() -> None:
    """Three transient failures use up publish's three attempts: the run fails there."""
    outcome = await build_app(speed=0, failures=3).run({"topic": "graphs"})
    assert outcome.status is RunStatus.FAILED
    assert outcome.error is not None
    assert "node 'publish'" in str(outcome.error)


def test_support_desk_prints_outcome_usage_and_calls() -> None:
    """The support desk prints the refund waiting for approval, then its outcome, usage,
    each call (one denied) and one refund."""
    result = run_example(EXAMPLES / "support_desk.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        r"waiting for approval: refund\(\{'order_id': '42', 'amount': 30\.0\}\) \[req_\w+\]",
        lines[0],
    )
    assert re.fullmatch(r"  \(an operator: orchestra approve [0-9a-f]+ req_\w+\)", lines[1])
    assert re.fullmatch(r"run [0-9a-f]+: completed after 6 steps", lines[2])
    assert "  queue       billing" in lines
    assert "  notes       ['order 42 (kettle, $30) arrived broken']" in lines
    assert "  resolution  Refunded $30.00 for order 42; the customer keeps the kettle." in lines
    usage = next(line for line in lines if line.startswith("usage: "))
    assert re.fullmatch(
        r"usage: \d+ tokens \(\d+ in, \d+ out\), 6 model calls, 3 tool calls", usage
    )
    agents = [line for line in lines if re.fullmatch(r"  \w+ +\d+ tokens, .*", line)]
    assert [line.split(" tokens, ")[1] for line in agents] == [
        "3 model calls, 1 tool call",
        "3 model calls, 2 tool calls",
    ]
    assert [line.split()[0] for line in agents] == ["triage", "billing"]
    calls = [line.split(maxsplit=2)[2] for line in lines if line.startswith("  step ")]
    assert [call.split(" -> ")[0].split() for call in calls if " tool " in call] == [
        ["triage", "tool", "lookup_order"],
        ["triage", "tool", "refund"],
        ["billing", "tool", "lookup_order"],
        ["billing", "tool", "refund"],
    ]
    assert "triage   tool  refund -> denied: tool 'refund' is not available to 'triage'" in (
        "\n".join(calls)
    )
    assert sum(call.startswith("billing  tool  refund -> ok") for call in calls) == 1
    # the step held for approval ran again on resume: its model call replayed, not re-made
    assert sum(" model scripted: " in call for call in calls) == 7
    assert sum("(replayed from the ledger)" in call for call in calls) == 1
    assert "billing  approval of refund: approved" in calls
    assert "payment system: 1 request, 1 refund" in lines
    (receipt,) = [line for line in lines if line.startswith("  rf_")]
    assert receipt.startswith("  rf_0001  order 42  $30.00  key ")


@pytest.mark.anyio
async def test_support_desk_refunds_once_with_the_calls_idempotency_key(tmp_path: Path) -> None:
    """The refund runs exactly once, recorded in the ledger, keyed by the call's key."""
    desk = load_example("support_desk")
    path = tmp_path / "desk.db"
    await desk.main(path)
    assert desk.PAYMENTS.requests == 1
    ((key, refund),) = desk.PAYMENTS.refunds.items()
    assert refund == {"receipt": "rf_0001", "order_id": "42", "amount": 30.0}
    async with SQLiteStore(path) as store:
        (run,) = await store.list_runs()
        ledger = await store.ledger(run.run_id)
    refunds = [entry for entry in ledger if entry.name == "refund"]
    assert [(entry.task, entry.status) for entry in refunds] == [("billing", "done")]
    assert key.startswith(f"{run.run_id}/")
