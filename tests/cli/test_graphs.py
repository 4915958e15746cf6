"""`orchestra graph check` and `orchestra graph render`: the cycles and the loop guard of an
app, and a bad app reference as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apps import graph_app
from click.testing import CliRunner, Result

from orchestra import END
from orchestra.cli import main


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


# -- orchestra graph check / render ---------------------------------------------------------


def test_graph_check_lists_the_cycles_and_the_guard() -> None:
    """The text report has the counts, each cycle with its exits and agents, and the guard."""
    result = invoke("graph", "check", "apps.graph_app:app")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"graph       drafting (structure hash {graph_app.app.structure_hash})" in lines
    assert "nodes       3 (agents: writer)" in lines
    assert "edges       2" in lines
    assert "routes      2" in lines
    assert "cycles      2 cycles, each with a way out" in lines
    assert "cycle 1: writer -> review -> writer" in lines
    assert "  kind      conditional (route verdict after review)" in lines
    assert "  exits     review -> polish (route verdict), review -> END (route verdict)" in lines
    assert lines[lines.index("cycle 1: writer -> review -> writer") + 4].startswith(
        "  agents    writer (model-driven"
    )
    assert "cycle 2: polish -> polish" in lines
    assert "  exits     polish -> END (route again)" in lines
    assert lines[-1] == (
        "loop guard  on: repeats=3, same_call=4, no_progress=off, similar_output=3, "
        "similarity=0.9, window=20, policy=same_call:nudge"
    )


def test_graph_check_json_says_the_same() -> None:
    """--json carries the counts, the cycles with typed links, and the guard's settings."""
    result = invoke("graph", "check", "apps.graph_app:app", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["graph"] == "drafting"
    assert data["structure_hash"] == graph_app.app.structure_hash
    assert (data["nodes"], data["edges"], data["routes"]) == (3, 2, 2)
    assert [cycle["nodes"] for cycle in data["cycles"]] == [["writer", "review"], ["polish"]]
    first = data["cycles"][0]
    assert first["conditional"] is True
    assert first["agents"] == ["writer"]
    assert first["links"][1] == {
        "source": "review",
        "target": "writer",
        "via": "route",
        "label": "verdict",
    }
    assert [exit["target"] for exit in first["exits"]] == ["polish", END]
    assert data["truncated"] is False
    assert data["loop_guard"]["enabled"] is True
    assert data["loop_guard"]["policy"] == {"same_call": "nudge"}


def test_graph_check_says_when_the_loop_guard_is_off() -> None:
    """An app compiled with loop_guard=None is told so, with the budget that still bounds it."""
    result = invoke("graph", "check", "apps.graph_app:unguarded")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "loop guard  off (compiled with loop_guard=None): a run going round a cycle is "
        "stopped only by the budget (steps=1000, wall_seconds=3600)"
    )
    data = json.loads(invoke("graph", "check", "apps.graph_app:unguarded", "--json").stdout)
    assert data["loop_guard"] == {"enabled": False}


def test_graph_check_of_a_graph_without_cycles() -> None:
    """A graph with no cycle says so and exits 0."""
    result = invoke("graph", "check", "apps.graph_app:straight")
    assert result.exit_code == 0, result.output
    assert "cycles      none: no run can go round" in result.stdout.splitlines()


def test_graph_check_limit_says_more_exist() -> None:
    """--limit caps the cycles listed and says that more exist."""
    result = invoke("graph", "check", "apps.graph_app:app", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert (
        "cycles      1+ cycles, each with a way out (only the first 1 shown; raise --limit)"
        in result.stdout.splitlines()
    )
    assert "cycle 2: polish -> polish" not in result.stdout
    data = json.loads(
        invoke("graph", "check", "apps.graph_app:app", "--limit", "1", "--json").stdout
    )
    assert len(data["cycles"]) == 1
    assert data["truncated"] is True


def test_graph_check_loads_an_app_from_a_file_path() -> None:
    """APP may be path/to/file.py:attribute."""
    result = invoke("graph", "check", f"{Path(graph_app.__file__).resolve()}:app")
    assert result.exit_code == 0, result.output
    assert "cycle 2: polish -> polish" in result.stdout


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("apps.graph_app", "app reference 'apps.graph_app' must look like module:attribute or "),
        (
            "apps.graph_app:nothing",
            "cannot import app 'apps.graph_app:nothing': apps.graph_app has no ",
        ),
        ("apps.cli_app:graph", "'apps.cli_app:graph' is a Graph, not a compiled graph"),
        ("/no/such/file.py:app", "cannot import app from /no/such/file.py: no such file"),
    ],
)
@pytest.mark.parametrize("command", ["check", "render"])
def test_graph_commands_with_a_bad_app_are_one_line(command: str, ref: str, error: str) -> None:
    """A bad APP reference is one line on stderr and exit code 1."""
    result = invoke("graph", command, ref)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {error}")
    assert len(result.stderr.splitlines()) == 1


def test_graph_check_of_a_graph_that_does_not_compile(tmp_path: Path) -> None:
    """An app whose graph has an exit-less cycle fails on import: one line naming it."""
    module = tmp_path / "spinning.py"
    module.write_text(
        "from pydantic import BaseModel\n"
        "from orchestra import END, START, Graph\n"
        "class S(BaseModel):\n"
        "    n: int = 0\n"
        "async def step(state, ctx):\n"
        "    return {}\n"
        "graph = Graph(S, name='spinning')\n"
        "graph.add_node('a', step)\n"
        "graph.add_node('b', step)\n"
        "graph.add_edge(START, 'a')\n"
        "graph.add_edge('a', 'b')\n"
        "graph.add_edge('b', 'a')\n"
        "graph.add_edge('b', END)\n"
        "app = graph.compile()\n",
        encoding="utf-8",
    )
    result = invoke("graph", "check", f"{module}:app")
    assert result.exit_code == 1
    assert "graph 'spinning' has 1 problem: cycle a -> b -> a" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_graph_render_prints_the_mermaid_flowchart() -> None:
    """`orchestra graph render APP` prints app.render()."""
    result = invoke("graph", "render", "apps.graph_app:app")
    assert result.exit_code == 0, result.output
    assert result.stdout == graph_app.app.render() + "\n"


@pytest.mark.anyio
async def test_the_drafting_app_leaves_both_cycles() -> None:
    """The checked app runs: each cycle goes round twice, then its route leads out."""
    outcome = await graph_app.app.run({})
    assert outcome.status == "completed"
    assert (outcome.state.text, outcome.state.revisions, outcome.state.polished) == (
        "a draft",
        2,
        2,
    )
