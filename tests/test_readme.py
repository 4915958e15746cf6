"""The README's examples work as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"## {re.escape(heading)}\n.*?```python\n(.*?)```", text, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_readme_define_a_graph_example_runs(tmp_path: Path) -> None:
    """The 'Define a graph' example runs as a script and completes."""
    script = tmp_path / "example.py"
    script.write_text(readme_block("Define a graph"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(
        "completed background of structured concurrency; risks of structured concurrency"
    )


def test_readme_agents_example_runs(tmp_path: Path) -> None:
    """The 'Agents, tools and models' example runs as a script: the agent looks the order
    up, its refund waits for approval, runs once approved, and its answer lands in the
    state, with usage counted."""
    script = tmp_path / "agents.py"
    script.write_text(readme_block("Agents, tools and models"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]
    held, first, second = printed[-3:]
    assert held == "interrupted approval refund {'order_id': '42', 'amount': 30.0}"
    assert first == "completed Refunded 30.00 on order 42."
    input_tokens, output_tokens, tool_calls = map(int, second.split())
    assert input_tokens > 0
    assert output_tokens > 0
    assert tool_calls == 2


def test_readme_quick_start_matches_ci() -> None:
    """The quick start's test command is exactly what .ci/run runs."""
    text = README.read_text(encoding="utf-8")
    commands = re.search(r"## Quick start\n.*?```sh\n(.*?)```", text, re.S)
    assert commands
    lines = [line for line in commands.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert lines[1].strip() in ci
