"""`orchestra budget`: raising (+N) or setting (N) a stopped run's limits, and `orchestra
show` printing them. Runs are written through the store API, with a stored budget."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from cli.support import cli, only_line
from orchestra.cli import main
from orchestra.cli.budgets import format_budget, format_budget_diff, parse_limit
from orchestra.safeguards.budgets import Budget
from orchestra.store import CheckpointRow, EventRow, RunRecord, SQLiteStore

RUN = "budget-run-1"
LIMITS: dict[str, Any] = {
    "run": Budget(steps=40, tokens=50_000, cost_usd=0.5).to_dict(),
    "agents": {"writer": Budget(steps=5, tokens=10_000).to_dict()},
}
USAGE: dict[str, Any] = {
    "steps": 7,
    "tasks": 7,
    "input_tokens": 10_000,
    "output_tokens": 2_345,
    "cost_usd": 0.0213,
    "model_calls": 5,
    "tool_calls": 3,
    "wall_seconds": 12.0,
    "by_node": {
        "writer": {"input_tokens": 8_000, "output_tokens": 1_000, "model_calls": 3},
    },
}


def put_run(
    db: Path,
    run_id: str = RUN,
    *,
    status: str = "budget_exceeded",
    budget: dict[str, Any] | None = LIMITS,
    lease: float | None = None,
) -> None:
    """Store a run stopped at step 7 (or, with ``lease``, running, owned by another
    process whose lease ends in ``lease`` seconds)."""
    now = time.time()
    record = RunRecord(
        run_id=run_id,
        graph="writer",
        structure_hash="abc123",
        app_ref=None,
        status="running" if lease is not None else status,
        step=7,
        owner="elsewhere:1:abc" if lease is not None else None,
        epoch=1,
        lease_expires_at=now + lease if lease is not None else None,
        created_at=now,
        updated_at=now,
        usage=USAGE,
        reason="token budget exhausted" if status == "budget_exceeded" else None,
        budget=budget,
    )
    checkpoint = CheckpointRow(step=7, snapshot='{"n": 7}', delta=None, tasks="[]", created_at=now)

    async def write() -> None:
        async with SQLiteStore(db) as store:
            await store.create_run(record, checkpoint, [])

    anyio.run(write)


def stored(db: Path, run_id: str = RUN) -> tuple[RunRecord, list[EventRow]]:
    async def read() -> tuple[RunRecord, list[EventRow]]:
        async with SQLiteStore(db) as store:
            return await store.get_run(run_id), await store.events(run_id)

    return anyio.run(read)


def assert_unchanged(db: Path, run_id: str = RUN, budget: Any = LIMITS) -> None:
    record, events = stored(db, run_id)
    assert record.budget == budget
    assert [e.kind for e in events if e.kind == "budget_raised"] == []


@pytest.fixture
def db(tmp_path: Path) -> Path:
    made = tmp_path / "runs.db"
    put_run(made)
    return made


# -- raising and setting -------------------------------------------------------------------


def test_budget_raises_limits_by_plus_n(db: Path) -> None:
    """+N raises a limit by N; the others stay; before -> after is printed, with use."""
    result = cli(db, "budget", RUN, "--tokens", "+20000", "--cost", "+0.5")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"budget of run {RUN}:",
        "  tokens        50,000 -> 70,000 (used 12,345)",
        "  cost          $0.50 -> $1.00 (used $0.0213)",
        f"continue the run with `orchestra resume {RUN}`",
    ]
    budget = stored(db)[0].budget
    assert budget is not None
    assert budget["run"] == Budget(steps=40, tokens=70_000, cost_usd=1.0).to_dict()
    assert budget["agents"] == LIMITS["agents"]


def test_budget_sets_limits_to_n(db: Path) -> None:
    """N sets a limit, an unlimited one included."""
    result = cli(db, "budget", RUN, "--steps", "100", "--tool-calls", "10", "--wall", "2h")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:4] == [
        "  tool calls    unlimited -> 10 (used 3)",
        "  steps         40 -> 100 (used 7)",
        "  wall time     1h 00m -> 2h 00m (used 12.00s)",
    ]
    budget = stored(db)[0].budget
    assert budget is not None
    assert (budget["run"]["steps"], budget["run"]["tool_calls"]) == (100, 10)
    assert budget["run"]["wall_seconds"] == 7200.0


def test_budget_records_the_change_and_reason_as_an_event(db: Path) -> None:
    """The run's events hold the budget before and after and the operator's reason."""
    result = cli(db, "budget", RUN, "--tokens", "+1000", "--reason", "report needs more")
    assert result.exit_code == 0, result.output
    record, events = stored(db)
    (event,) = [e for e in events if e.kind == "budget_raised"]
    data = json.loads(event.data)
    assert (event.step, data["reason"]) == (7, "report needs more")
    assert (data["before"], data["after"]) == (LIMITS, record.budget)


def test_budget_of_an_agent(db: Path) -> None:
    """--agent changes that agent's own budget and leaves the run's alone."""
    result = cli(db, "budget", RUN, "--agent", "writer", "--tokens", "+5000", "--steps", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:3] == [
        f"budget of agent 'writer' of run {RUN}:",
        "  tokens        10,000 -> 15,000 (used 9,000)",
        "  steps         5 -> 8 (used 3)",
    ]
    budget = stored(db)[0].budget
    assert budget is not None
    assert budget["run"] == LIMITS["run"]
    assert budget["agents"]["writer"] == Budget(steps=8, tokens=15_000).to_dict()


def test_budget_accepts_a_unique_prefix(db: Path) -> None:
    """A run id may be shortened to a unique prefix, as with the other commands."""
    result = cli(db, "budget", "budget-r", "--tokens", "+1")
    assert result.exit_code == 0, result.output
    assert f"budget of run {RUN}:" in result.stdout


def test_budget_of_a_crashed_run(db: Path) -> None:
    """A running run whose owner's lease expired is at rest: its budget can change."""
    put_run(db, "crashed", lease=-1.0)
    result = cli(db, "budget", "crashed", "--tokens", "+1")
    assert result.exit_code == 0, result.output


def test_budget_json(db: Path) -> None:
    """--json prints the scope's budget before and after, what changed and the stored one."""
    result = cli(db, "budget", RUN, "--cost", "+0.25", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["run_id"], data["agent"], data["changed"]) == (RUN, None, ["cost_usd"])
    assert (data["before"]["cost_usd"], data["after"]["cost_usd"]) == (0.5, 0.75)
    assert data["budget"] == stored(db)[0].budget


def test_budget_that_changes_nothing_writes_nothing(db: Path) -> None:
    """Setting a limit to what it is already says so and stores no event."""
    result = cli(db, "budget", RUN, "--tokens", "50000")
    assert result.exit_code == 0, result.output
    assert "unchanged" in result.stdout
    assert_unchanged(db)


def test_budget_warns_when_the_new_limit_is_already_used_up(db: Path) -> None:
    """A limit set at or under what the run used is flagged: it would stop again at once."""
    result = cli(db, "budget", RUN, "--tokens", "10000")
    assert result.exit_code == 0, result.output
    assert "still used up" in result.stdout


# -- refused, nothing changed --------------------------------------------------------------


def test_budget_refuses_to_raise_an_unlimited_limit(db: Path) -> None:
    """+N on an unlimited limit is an error pointing at N; nothing changes."""
    result = cli(db, "budget", RUN, "--tokens", "+5", "--tool-calls", "+5")
    assert result.exit_code == 1
    assert only_line(result) == (
        "Error: the run's tool calls budget is unlimited: there is nothing to raise; "
        "`--tool-calls N` sets a limit; nothing was changed"
    )
    assert_unchanged(db)


def test_budget_refuses_a_completed_run(db: Path) -> None:
    """A completed run's budget cannot change."""
    put_run(db, "done", status="completed")
    result = cli(db, "budget", "done", "--tokens", "+5")
    assert result.exit_code == 1
    assert only_line(result) == "Error: run done is completed; cannot raise its budget"
    assert_unchanged(db, "done")


def test_budget_refuses_a_run_a_live_owner_runs(db: Path) -> None:
    """A run with a live owner runs under the budget it loaded: refused, with what to do."""
    put_run(db, "live", lease=60.0)
    result = cli(db, "budget", "live", "--tokens", "+5")
    assert result.exit_code == 1
    line = only_line(result)
    assert line.startswith("Error: run live is running (owned by elsewhere:1:abc, lease ")
    assert "orchestra abort live" in line
    assert_unchanged(db, "live")


def test_budget_refuses_a_run_stored_without_a_budget(db: Path) -> None:
    """A run from before budgets were stored has none to raise: the error says what to do."""
    put_run(db, "older", budget=None)
    result = cli(db, "budget", "older", "--tokens", "+5")
    assert result.exit_code == 1
    assert only_line(result) == (
        "Error: run older has no stored budget: this run was started before budgets were "
        "stored; resume it with an app compiled with a larger budget"
    )
    assert_unchanged(db, "older", None)


def test_budget_refuses_an_agent_without_a_budget(db: Path) -> None:
    """--agent naming an agent without its own budget is an error listing those that have one."""
    result = cli(db, "budget", RUN, "--agent", "critic", "--tokens", "+5")
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: run {RUN} has no budget for agent 'critic' (agents with their own budget: "
        f"'writer')"
    )
    assert_unchanged(db)


def test_budget_refuses_an_agents_wall_time(db: Path) -> None:
    """Wall time is the run's limit; an agent's budget has none."""
    result = cli(db, "budget", RUN, "--agent", "writer", "--wall", "+60")
    assert result.exit_code == 1
    assert "an agent's budget has no wall-time limit" in only_line(result)
    assert_unchanged(db)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--tokens", "-5"),
        ("--tokens", "+-5"),
        ("--tokens", "lots"),
        ("--tokens", "1.5"),
        ("--tokens", "+"),
        ("--tokens", ""),
        ("--cost", "-0.5"),
        ("--cost", "half"),
        ("--wall", "soon"),
        ("--tool-calls", "1e3"),
    ],
)
def test_budget_refuses_a_bad_value(db: Path, option: str, value: str) -> None:
    """A value that is not +N or N (N >= 0) is one error line; nothing changes, even the
    limits given correctly beside it."""
    result = cli(db, "budget", RUN, "--steps", "+10", option, value)
    assert result.exit_code == 1
    line = only_line(result)
    assert line.startswith(f"Error: {option} {value!r}: expected ")
    assert line.endswith(">= 0, as +N to raise the limit by N or N to set it; nothing was changed")
    assert_unchanged(db)


def test_budget_refuses_a_limit_the_budget_does_not_allow(db: Path) -> None:
    """0 steps is a number, but no budget: one line, nothing changes."""
    result = cli(db, "budget", RUN, "--steps", "0")
    assert result.exit_code == 1
    assert only_line(result) == (
        "Error: Budget.steps must be at least 1, got 0; nothing was changed"
    )
    assert_unchanged(db)


def test_budget_needs_a_limit(db: Path) -> None:
    """Without any limit option it is a usage error (exit code 2)."""
    result = cli(db, "budget", RUN)
    assert result.exit_code == 2
    assert "Error: give at least one limit to change (--steps, --wall, " in result.stderr


def test_budget_of_an_unknown_run(db: Path) -> None:
    """An unknown run is one line."""
    result = cli(db, "budget", "nope", "--tokens", "+5")
    assert result.exit_code == 1
    assert only_line(result).startswith("Error: ")
    assert "nope" in only_line(result)


def test_budget_needs_a_database() -> None:
    """Without --db or ORCHESTRA_DB it says so in one line."""
    result = CliRunner().invoke(main, ["budget", RUN, "--tokens", "+5"], env={"ORCHESTRA_DB": None})
    assert result.exit_code == 1
    assert only_line(result) == "Error: no run database: pass --db PATH or set ORCHESTRA_DB"


def test_budget_has_help() -> None:
    """--help explains +N and N and lists every limit."""
    result = CliRunner().invoke(main, ["budget", "--help"])
    assert result.exit_code == 0
    for option in ("--steps", "--wall", "--tokens", "--input-tokens", "--output-tokens"):
        assert option in result.stdout
    for option in ("--cost", "--tool-calls", "--agent", "--reason", "--json"):
        assert option in result.stdout


# -- show ----------------------------------------------------------------------------------


def collapsed(text: str) -> str:
    return " ".join(text.split())


def test_show_prints_the_budget_next_to_usage(db: Path) -> None:
    """`show` names the limits that are set, each with its use, the agents' own too."""
    result = cli(db, "show", RUN)
    assert result.exit_code == 0, result.output
    text = collapsed(result.stdout)
    assert (
        "budget tokens 50,000 (used 12,345), cost $0.50 (used $0.0213), steps 40 (used 7), "
        "wall time 1h 00m (used 12.00s)"
    ) in text
    assert "agent budgets writer tokens 10,000 (used 9,000), steps 5 (used 3)" in text


def test_show_without_a_stored_budget_prints_none(db: Path) -> None:
    """A run stored before budgets shows no budget line."""
    put_run(db, "older", budget=None)
    result = cli(db, "show", "older")
    assert result.exit_code == 0, result.output
    assert not [line for line in result.stdout.splitlines() if "budget " in line.split("  ")[0]]


def test_show_json_includes_the_budget(db: Path) -> None:
    """`show --json` carries the stored budget with the run."""
    result = cli(db, "show", RUN, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"]["budget"] == LIMITS


def test_show_timeline_has_the_budget_change(db: Path) -> None:
    """After `budget`, the timeline shows what the operator changed and why."""
    cli(db, "budget", RUN, "--tokens", "+20000", "--reason", "longer report")
    result = cli(db, "show", RUN)
    assert result.exit_code == 0, result.output
    text = collapsed(result.stdout)
    assert "operator changed the budget" in text
    assert "tokens 50,000 -> 70,000 (longer report)" in text


# -- the pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "amount", "relative"),
    [
        ("tokens", "+20000", 20_000, True),
        ("tokens", "20_000", 20_000, False),
        ("tokens", "20,000", 20_000, False),
        ("cost_usd", "+0.5", 0.5, True),
        ("cost_usd", "$2", 2.0, False),
        ("cost_usd", "+$.25", 0.25, True),
        ("wall_seconds", "90", 90.0, False),
        ("wall_seconds", "+30m", 1800.0, True),
        ("steps", " +5 ", 5, True),
    ],
)
def test_parse_limit_reads_plus_n_and_n(
    name: str, text: str, amount: float, relative: bool
) -> None:
    """+N raises by N, N sets to N; counts, dollars and durations are read as people write
    them."""
    change = parse_limit(name, text)
    assert (change.amount, change.relative) == (amount, relative)
    assert type(change.amount) is type(amount)


def test_format_budget_leaves_out_limits_that_are_not_set() -> None:
    """Only the limits that are set are named, each with its use."""
    limits = Budget(steps=None, wall_seconds=None, tool_calls=4).to_dict()
    assert format_budget(limits, {"tool_calls": 1.0, "steps": 3.0}) == "tool calls 4 (used 1)"
    assert format_budget(Budget(steps=None, wall_seconds=None).to_dict(), {}) == ""


def test_format_budget_diff_names_run_and_agent_changes() -> None:
    """The diff of two stored budgets names each changed limit, the run's first."""
    after = {
        "run": {**LIMITS["run"], "tokens": 60_000},
        "agents": {"writer": {**LIMITS["agents"]["writer"], "tool_calls": 2}},
    }
    assert format_budget_diff(LIMITS, after) == (
        "tokens 50,000 -> 60,000, agent 'writer' tool calls unlimited -> 2"
    )
    assert format_budget_diff(LIMITS, LIMITS) == "no limit changed"
