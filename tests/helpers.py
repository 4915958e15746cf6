"""Shared test helpers: short leases and polls for tests that use the stores (see the
``store`` fixture in conftest.py), and where the helper apps in tests/apps live."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

LEASE = 0.3
POLL = 0.02

TESTS = Path(__file__).resolve().parent
APPS = TESTS / "apps"


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Return ``environ`` with the tests folder first on PYTHONPATH, so a helper app started
    as a script (``python tests/apps/crash_app.py``) can import ``apps.crash_child``."""
    path = [str(TESTS), *filter(None, [environ.get("PYTHONPATH")])]
    return {**environ, "PYTHONPATH": os.pathsep.join(path)}
