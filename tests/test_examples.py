"""The examples run as scripts, and the demo graph is the quickstart's graph."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from orchestra import RunStatus
from orchestra.demo import build_app

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
