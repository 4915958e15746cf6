"""JSON helpers shared by every layer: one compact writer, one tolerant reader."""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import to_json

__all__ = ("compact_json", "loads_object", "loads_or_text")


def compact_json(value: Any) -> str:
    """Serialize to compact JSON (anything pydantic-core cannot serialize becomes str)."""
    return to_json(value, fallback=str).decode()


def loads_object(text: str | bytes | None) -> dict[str, Any]:
    """Parse a JSON object read back from a store; anything else (missing, not JSON, not an
    object) is an empty dict, so a damaged row reads as "nothing said"."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def loads_or_text(text: str | None) -> Any:
    """Parse JSON read back from a store, keeping text that is not JSON as it is (so an
    operator can still see it); None stays None."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
