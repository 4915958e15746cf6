"""Run stores: where runs, checkpoints and events live.

Two contracts: ``RunStore`` (what a run's owner writes and reads under its lease) and
``OperatorStore`` (what an operator reads and does to runs); ``Store`` is both, and every
store implements it. ``SQLiteStore`` is the embedded default (``graph.compile(store=
"runs.db")``); ``MemoryStore`` keeps the same contracts in memory for tests.
"""

from __future__ import annotations

import os
import typing as _typing
from typing import Any

from .base import CheckpointRow as CheckpointRow
from .base import EventRow as EventRow
from .base import OperatorStore as OperatorStore
from .base import PendingWrite as PendingWrite
from .base import RunRecord as RunRecord
from .base import RunStore as RunStore
from .base import Store as Store

if _typing.TYPE_CHECKING:
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
        from .sqlite import SQLiteStore

        return SQLiteStore(store)
    if isinstance(store, Store):
        return store
    raise TypeError(f"store must be a path or a Store, got {type(store).__name__}")


# the implementations (sqlite3, threads) load on first use: the records and contracts that
# every layer speaks of do not need them
_LAZY = {"MemoryStore": "memory", "SQLiteStore": "sqlite"}

if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'orchestra.store' has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
