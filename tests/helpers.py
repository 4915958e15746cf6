"""Shared test helpers: short leases and polls for tests that use the stores (see the
``store`` fixture in conftest.py)."""

from __future__ import annotations

LEASE = 0.3
POLL = 0.02
