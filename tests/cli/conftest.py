"""Fixtures of the operator CLI tests: a database path, one filled with a completed and a failed
run of cli_app, and ``_isolated``: a fresh cli_app, sys.path and working directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from apps import cli_app

from cli.support import start_sync
from orchestra import RunStatus


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
def filled(db: Path) -> Path:
    """A database with a completed run ("done", retried once) and a failed one ("failed")."""
    assert start_sync(db, "done", limit=3, flaky_at=2).status is RunStatus.COMPLETED
    assert start_sync(db, "failed", limit=3, fail_at=2).status is RunStatus.FAILED
    return db


@pytest.fixture
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forget which ticks failed once; `orchestra resume` puts the app's directory on
    sys.path: keep the test process clean; `orchestra demo` writes ./orchestra-demo.db:
    run in a temporary directory."""
    monkeypatch.setattr(cli_app, "_failed", set())
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
