"""Loading a run's app for resume: a compiled graph from module:attr or path.py:attr."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from ..app import CompiledGraph
from ..graph import Graph
from ..store.base import RunRecord
from ..store.sqlite import SQLiteStore
from .format import format_error

__all__ = ("AppLoadError", "app_reference", "load_app", "resume_store")


class AppLoadError(click.ClickException):
    """The app of a run cannot be imported (a CLI error: one line, exit code 1)."""


def app_reference(record: RunRecord, app_ref: str | None) -> str:
    """Return the app reference a run command loads: ``--app``, else the one stored with
    the run (an AppLoadError when there is neither)."""
    ref = app_ref or record.app_ref
    if ref is None:
        raise AppLoadError(
            f"run {record.run_id} has no stored app reference (its graph was not a "
            f"module-level attribute); pass --app module:attribute"
        )
    return ref


def load_app(ref: str, *, stored: bool = False) -> CompiledGraph[Any]:
    """Import the compiled graph named by ``module:attribute`` or ``path/file.py:attribute``.

    For a module the current directory is put on ``sys.path`` first; a file is imported
    under a private module name, with its own directory on ``sys.path`` (as when it runs as
    a script), so its ``if __name__ == "__main__":`` block does not run.
    """
    origin = " (stored with the run; pass --app to load another)" if stored else ""
    target, sep, attribute = ref.rpartition(":")
    if not sep or not target or not all(part.isidentifier() for part in attribute.split(".")):
        raise AppLoadError(
            f"app reference {ref!r} must look like module:attribute or path/to/file.py:attribute"
        )
    try:
        module = _import_file(target) if _is_file_ref(target) else _import_module(target)
    except AppLoadError:
        raise
    except (Exception, SystemExit) as exc:
        raise AppLoadError(f"cannot import app {ref!r}{origin}: {format_error(exc)}") from exc
    app: Any = module
    for part in attribute.split("."):
        if not hasattr(app, part):
            raise AppLoadError(
                f"cannot import app {ref!r}{origin}: {target} has no attribute {part!r}"
            )
        app = getattr(app, part)
    if isinstance(app, Graph):
        raise AppLoadError(
            f"{ref!r} is a Graph, not a compiled graph: point at the result of graph.compile(...)"
        )
    if not isinstance(app, CompiledGraph):
        what = f"the class {app.__name__}" if isinstance(app, type) else f"a {type(app).__name__}"
        raise AppLoadError(f"{ref!r} is {what}, not a CompiledGraph (graph.compile(...))")
    return app


def _is_file_ref(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def _import_file(target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise AppLoadError(f"cannot import app from {target}: no such file")
    name = "_orchestra_app_" + re.sub(r"\W", "_", path.stem)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AppLoadError(f"cannot import app from {target}: not a Python file")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic and dataclasses look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resume_store(app: CompiledGraph[Any], path: Path) -> SQLiteStore:
    """Return the store ``orchestra resume`` binds the app to: ``--db``, with the settings
    (durability, lease, poll interval) of the app's own SQLite store if it has one."""
    own = app.store
    if isinstance(own, SQLiteStore):
        return SQLiteStore(
            path,
            durability=own.durability,
            lease_seconds=own.lease_seconds,
            poll_seconds=own.poll_seconds,
            busy_timeout=own.busy_timeout,
        )
    return SQLiteStore(path)
