"""`orchestra demo`: the demo graph, plain or live, with or without a database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.support import FAST, invoke
from orchestra.cli import main

pytestmark = pytest.mark.usefixtures("_isolated")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_plain_completes(backend: str) -> None:
    """The demo runs to completion on both backends, one line per event, then its state."""
    result = invoke(*FAST, "--backend", backend)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run_started ")
    finished = next(line for line in lines if line.startswith("run_finished "))
    assert "status=completed steps=7" in finished
    assert any(line.startswith("node_retried ") and "node=publish" in line for line in lines)
    assert 'state           published="reports/structured-concurrency-r2.md"' in lines
    assert result.stderr == ""


def test_demo_checkpoints_into_the_default_database(tmp_path: Path) -> None:
    """Without --db the demo run is stored in ./orchestra-demo.db, where `runs` finds it."""
    result = invoke(*FAST)
    assert result.exit_code == 0, result.output
    assert "orchestra --db orchestra-demo.db show" in result.stdout
    listed = CliRunner().invoke(main, ["--db", "orchestra-demo.db", "runs", "--json"])
    assert listed.exit_code == 0, listed.output
    (run,) = json.loads(listed.stdout)
    assert run["status"] == "completed"
    assert run["graph"] == "demo"


def test_demo_no_store_writes_no_database(tmp_path: Path) -> None:
    """`demo --no-store` runs without checkpoints and leaves no file behind."""
    result = invoke(*FAST, "--no-store")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "orchestra-demo.db").exists()
    assert "checkpointed" not in result.stdout


def test_demo_is_plain_when_stdout_is_not_a_terminal() -> None:
    """Without --plain, a non-terminal stdout still gets plain lines, not a live table."""
    result = invoke("demo", "--speed", "0")
    assert result.exit_code == 0, result.output
    assert "run_finished    status=completed" in result.stdout
    assert "\x1b[" not in result.stdout


def test_demo_speed_is_read_from_the_environment() -> None:
    """ORCHESTRA_DEMO_SPEED=0 makes the demo skip its pauses."""
    result = invoke("demo", "--plain", ORCHESTRA_DEMO_SPEED="0")
    assert result.exit_code == 0, result.output
    assert "delay=0.00s" in result.stdout


def test_demo_failed_run_exits_1_with_one_line() -> None:
    """A run that fails exits with 1 and says why in one stderr line naming step and node."""
    result = invoke(*FAST, "--failures", "3")
    assert result.exit_code == 1
    assert "run_finished    status=failed steps=6" in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: run ")
    assert "step 7, node 'publish': node failed after 3 attempts: ConnectionError" in line


def test_demo_invalid_input_exits_1_with_one_line() -> None:
    """Input the state model refuses is one error line, before anything runs."""
    result = invoke(*FAST, "--topic", "")
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: input does not fit state model Report: topic")
