"""Loggers, imported lazily: structlog (with rich, which it pulls in) costs ~70 ms to import,
so ``import orchestra`` does not pay for it; the first run does."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ("debug_enabled", "get_logger")


def get_logger(name: str) -> Any:
    """Return ``structlog.get_logger(name)``; a library never configures logging."""
    import structlog

    return structlog.get_logger(name)


def debug_enabled(log: Any) -> bool:
    """Tell whether ``log`` would emit debug events (so callers can skip building them).

    Until the application configures structlog, orchestra's per-node and per-step debug
    events are not sent: structlog's default prints every level to stdout, and a first script
    would drown in them. Run-level events (info and above) always go out.
    """
    import structlog

    if not structlog.is_configured():
        return False
    check = getattr(log, "is_enabled_for", None) or getattr(log, "isEnabledFor", None)
    if check is None:
        return True
    try:
        return bool(check(logging.DEBUG))
    except Exception:
        return True
