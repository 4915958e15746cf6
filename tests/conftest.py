"""Shared fixtures: every async test runs on asyncio and on trio; ``store`` runs a test on
each store implementation; ``sqlite_store`` is the SQLite one alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import LEASE, POLL

from orchestra.store import MemoryStore, SQLiteStore, Store


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["sqlite", "memory"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[Store]:
    """Yield each store implementation, with a short lease and poll interval."""
    if request.param == "sqlite":
        made: Store = SQLiteStore(tmp_path / "runs.db", lease_seconds=LEASE, poll_seconds=POLL)
    else:
        made = MemoryStore(lease_seconds=LEASE, poll_seconds=POLL)
    yield made
    await made.aclose()


@pytest.fixture
async def sqlite_store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[SQLiteStore]:
    """Yield an SQLite store with a short lease and poll interval."""
    made = SQLiteStore(tmp_path / "runs.db", lease_seconds=LEASE, poll_seconds=POLL)
    yield made
    await made.aclose()
