"""Compare this checkout with another revision on one benchmark, alternating A B A B.

Run from the repository root::

    python benchmarks/ab.py --base 78dcffd [--rounds 3] executor.py --backend both --repeat 30
    python benchmarks/ab.py --base 78dcffd durable.py --repeat 10

The other revision is checked out once into a temporary git worktree (removed at the end).
Each round runs the benchmark script of this checkout, then the same script of the base, each
in a fresh interpreter with its own tree first on ``sys.path`` (so each imports its own
``orchestra``), with ``--json``. The machine is shared and noisy, so the runs alternate and
the table reports, per scenario and backend, the median over the rounds of each run's median,
with every round's figure beside it. Both trees are byte-compiled first (as an installed
package is), so start-up and import figures do not count compiling the sources.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, script: str, args: list[str]) -> list[dict]:
    """Run one benchmark of ``tree`` with --json; return its result rows."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / script), *args, "--json"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {script} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    # (a script may log a line to stdout before its JSON: the JSON starts at a lone "{")
    text = done.stdout
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    data = json.loads(text[start:])
    if "results" in data:
        return data["results"]
    # agents.py: {"rows": {name: {"median_us": ...}}}
    return [
        {"scenario": name, "median": row["median_us"], "unit": "µs"}
        for name, row in data["rows"].items()
    ]


def key(row: dict) -> tuple[str, str]:
    return (str(row.get("scenario") or row.get("name")), str(row.get("backend", "")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (B)")
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs (default 3)")
    parser.add_argument("script", help="a script in benchmarks/, e.g. executor.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own options")
    options = parser.parse_args()
    seen: dict[tuple[str, str], dict[str, list[float]]] = {}
    units: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="orchestra-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(base), options.base],
            cwd=ROOT,
            check=True,
        )
        try:
            for tree in (ROOT, base):  # both byte-compiled, as an installed package is
                subprocess.run(
                    [sys.executable, "-m", "compileall", "-q", str(tree / "orchestra")],
                    check=True,
                )
            for _ in range(options.rounds):
                for label, tree in (("A", ROOT), ("B", base)):
                    for row in run(tree, options.script, options.args):
                        if not isinstance(row.get("median"), int | float):
                            continue
                        seen.setdefault(key(row), {"A": [], "B": []})[label].append(row["median"])
                        units[key(row)] = str(row.get("unit", ""))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(f"A = this checkout, B = {options.base}; medians of {options.rounds} alternating runs")
    print(f"{'scenario':<28}{'backend':<9}{'unit':<10}{'A':>10}{'B':>10}{'A/B':>7}  rounds A | B")
    for (scenario, backend), figures in seen.items():
        a, b = statistics.median(figures["A"]), statistics.median(figures["B"])
        rounds = " ".join(f"{v:.3g}" for v in figures["A"]) + " | "
        rounds += " ".join(f"{v:.3g}" for v in figures["B"])
        unit = units[(scenario, backend)]
        print(f"{scenario:<28}{backend:<9}{unit:<10}{a:>10.4g}{b:>10.4g}{a / b:>7.2f}  {rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
