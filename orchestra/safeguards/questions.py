"""Questions a node asks a person (``await ctx.interrupt(prompt, schema=...)``).

The answer is checked against ``schema`` when it is given (by ``app.resume`` or the CLI, in
any process), so a schema must be findable again by name: ``None`` (any JSON value), a
builtin (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``) or a class defined at
module level (a pydantic model, a dataclass, a TypedDict). The request stores its JSON
schema, for people and tools, and the schema's reference, for checking.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..state import describe_validation_error

__all__ = ("answer_schema", "check_answer", "resolve_schema", "schema_ref", "validate_answer")

_BUILTINS = {t.__name__: t for t in (str, int, float, bool, dict, list)}


def schema_ref(schema: Any) -> str | None:
    """Name ``schema`` so another process can find it again; refuse one it could not."""
    if schema is None:
        return None
    if isinstance(schema, type) and schema in _BUILTINS.values():
        return f"builtins:{schema.__name__}"
    module = getattr(schema, "__module__", None)
    qualname = getattr(schema, "__qualname__", None)
    if not isinstance(schema, type) or not module or not qualname or "<locals>" in qualname:
        raise TypeError(
            f"ctx.interrupt(schema=...) takes None, a builtin (str, int, float, bool, dict, "
            f"list) or a class defined at module level (so an answer can be checked in "
            f"another process), got {schema!r}"
        )
    if module == "__main__":  # a script: known to other processes by its file
        path = getattr(sys.modules.get("__main__"), "__file__", None)
        if path:
            return f"{os.path.realpath(path)}:{qualname}"
    return f"{module}:{qualname}"


def resolve_schema(ref: str | None) -> Any:
    """Find the schema named by :func:`schema_ref` among the loaded modules (importing a
    module by name if needed); raise LookupError if it cannot be found."""
    if ref is None:
        return None
    module_name, _, qualname = ref.rpartition(":")
    if module_name == "builtins" and qualname in _BUILTINS:
        return _BUILTINS[qualname]
    module: Any = None
    if module_name.endswith(".py"):
        wanted = os.path.realpath(module_name)
        module = next(
            (m for m in list(sys.modules.values()) if _file_of(m) == wanted),
            None,
        )
    else:
        module = sys.modules.get(module_name)
        if module is None:
            try:
                import importlib

                module = importlib.import_module(module_name)
            except Exception as exc:
                raise LookupError(f"cannot import {module_name}: {exc}") from exc
    if module is None:
        raise LookupError(f"{module_name} is not loaded (load the run's app first)")
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise LookupError(f"{module_name} has no {qualname}")
    return found


def _file_of(module: Any) -> str | None:
    path = getattr(module, "__file__", None)
    return os.path.realpath(path) if isinstance(path, str) else None


@functools.lru_cache(maxsize=128)
def _adapter(schema: Any) -> TypeAdapter[Any]:
    return TypeAdapter(schema)


def answer_schema(schema: Any) -> dict[str, Any] | None:
    """The JSON schema of a valid answer (None: any JSON value)."""
    if schema is None:
        return None
    return _adapter(schema).json_schema()


def validate_answer(schema: Any, value: Any) -> Any:
    """Return ``value`` validated against ``schema``; raise ValueError saying what is wrong."""
    if schema is None:
        return value
    try:
        return _adapter(schema).validate_python(value)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, "answer")) from exc


def check_answer(ref: str | None, value: Any) -> Any:
    """Check an answer against the schema named ``ref``; return its JSON form."""
    schema = resolve_schema(ref)
    checked = validate_answer(schema, value)
    if schema is None:
        return checked
    return _adapter(schema).dump_python(checked, mode="json")
