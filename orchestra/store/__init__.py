"""Run stores: where runs, checkpoints and events live.

Two contracts: ``RunStore`` (what a run's owner writes and reads under its lease) and
``OperatorStore`` (what an operator reads and does to runs); ``Store`` is both, and every
store implements it. ``SQLiteStore`` is the embedded default (``graph.compile(store=
"runs.db")``); ``MemoryStore`` keeps the same contracts in memory for tests.
"""

from __future__ import annotations

import os
from typing import Any

from .base import CheckpointRow as CheckpointRow
from .base import EventRow as EventRow
from .base import OperatorStore as OperatorStore
from .base import PendingWrite as PendingWrite
from .base import RunRecord as RunRecord
from .base import RunStore as RunStore
from .base import Store as Store
from .memory import MemoryStore as MemoryStore
from .sqlite import SQLiteStore as SQLiteStore

__all__ = (
    "CheckpointRow",
    "EventRow",
    "MemoryStore",
    "OperatorStore",
    "PendingWrite",
    "RunRecord",
    "RunStore",
    "SQLiteStore",
    "Store",
    "as_store",
)


def as_store(store: Any) -> Store:
    """Return ``store`` as a Store: a path (str or PathLike) becomes a SQLiteStore."""
    if isinstance(store, str | os.PathLike):
        return SQLiteStore(store)
    if isinstance(store, Store):
        return store
    raise TypeError(f"store must be a path or a Store, got {type(store).__name__}")
