"""Benchmark the safeguards against multi-agent failure modes, one *storm* each.

    .venv/bin/python benchmarks/storms [--storm loop|budget|conflict|approval|all]
        [--runs N] [--backend asyncio|trio|both] [--agents N] [--accounts 4] [--turns 5]
        [--dir DIR] [--seed 1] [--json]

(``python benchmarks/storms/__main__.py`` and, from the repository's root, ``python -m
benchmarks.storms`` are the same.) Each storm is a file of this folder and also runs alone,
with the same options but ``--storm``: ``python benchmarks/storms/loop.py --runs 10``.

- ``loop.py``: the loop guard, on loops to catch and legitimate runs to leave be;
- ``budget.py``: agents of one run sharing its token and cost budgets, with reservations and
  with a check-then-call baseline;
- ``conflict.py``: agents whose tool calls conflict over shared accounts, under each
  arbitration policy and without one;
- ``approval.py``: runs held for approval on one SQLite file, answered by another process
  (``_approval_worker.py``).

Each storm's docstring says what it runs, checks and reports. ``--storm all`` (the default)
runs every storm, the approval storm with 200 runs a mode. A wrong result aborts with status
2; a missed target is reported and also exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder, for the storms and _shared: on sys.path already unless run with python -m
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import approval  # noqa: E402
import budget  # noqa: E402
import conflict  # noqa: E402
import loop  # noqa: E402
from _shared import Storm, main  # noqa: E402

STORMS: dict[str, Storm] = {
    s.name: s for s in (loop.STORM, budget.STORM, conflict.STORM, approval.STORM)
}

if __name__ == "__main__":
    sys.exit(main(STORMS, __doc__.split("\n\n")[0]))
