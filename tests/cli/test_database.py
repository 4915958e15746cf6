"""The run database the operator commands open: --db or ORCHESTRA_DB, a missing file or one that
is not a database is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.support import cli, only_line
from orchestra.cli import main

pytestmark = pytest.mark.usefixtures("_isolated")


# -- the operator commands on a run database --------------------------------------------------

RUN_COMMANDS = [
    ["runs"],
    ["show", "r"],
    ["resume", "r"],
    ["abort", "r", "--reason", "x"],
    ["stop-all", "--yes"],
    ["checkpoints", "r"],
    ["fork", "r", "--step", "1"],
    ["prune", "--older-than", "1d", "--yes"],
    ["db", "check"],
]


def test_db_option_is_read_from_the_environment(tmp_path: Path) -> None:
    """--db defaults to $ORCHESTRA_DB; the option on the command line wins."""
    db = tmp_path / "runs.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCHESTRA_DB", str(db))
        assert main.make_context("orchestra", ["demo"]).params["db"] == db
        other = main.make_context("orchestra", ["--db", "other.db", "demo"])
        assert other.params["db"] == Path("other.db")


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_run_commands_need_a_database(command: list[str]) -> None:
    """Without --db or ORCHESTRA_DB every run command says so in one line, exit code 1."""
    result = CliRunner().invoke(main, command, env={"ORCHESTRA_DB": None})
    assert result.exit_code == 1
    assert only_line(result) == "Error: no run database: pass --db PATH or set ORCHESTRA_DB"


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_run_commands_refuse_a_missing_database_file(db: Path, command: list[str]) -> None:
    """A --db path with no file is an error, not a new empty database."""
    result = cli(db, *command)
    assert result.exit_code == 1
    assert only_line(result).startswith(f"Error: {db}: no such database")
    assert not db.exists()


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_run_commands_have_help(command: list[str]) -> None:
    """Every command explains itself with --help."""
    result = CliRunner().invoke(main, [*command[: 2 if command[0] == "db" else 1], "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: main {' '.join(command[:1])}")


def test_a_file_that_is_not_a_database_is_one_line(db: Path) -> None:
    """A foreign file is named in one error line, no traceback."""
    db.write_text("hello")
    result = cli(db, "runs")
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: {db}: not a SQLite database (or it is encrypted or corrupted)"
    )
