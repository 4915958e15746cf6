"""What the storms share: the command line, the report (text or JSON), the state of the
budget and conflict storms, statistics and result checks (from ``benchmarks/_common.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel

from orchestra import append

# benchmarks/, for _common (shared with the other benchmarks): a storm runs as a script from
# benchmarks/storms/, which alone is on sys.path then
BENCHMARKS = Path(__file__).resolve().parent.parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(1, str(BENCHMARKS))

from _common import (  # noqa: E402
    BenchmarkError,
    configure_logging,
    expect,
    p90,
    revision,
    versions,
)

__all__ = [
    "BenchmarkError",
    "Desk",
    "Storm",
    "configure_logging",
    "expect",
    "main",
    "p90",
    "p99",
    "print_backend_tables",
    "print_rows",
    "revision",
    "versions",
]

Render = Callable[[dict[str, Any]], str]


class Desk(BaseModel):
    """The state of the budget and conflict storms: each agent appends its answer."""

    findings: Annotated[list[str], append] = []


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[-1]


@dataclass(frozen=True)
class Storm:
    """One storm: how to run it on some backends, how to print its result, its defaults."""

    name: str
    run: Callable[[argparse.Namespace, list[str]], dict[str, Any]]
    show: Callable[[dict[str, Any], argparse.Namespace], None]
    runs: int  # default runs per backend and case, mode or policy
    agents: int | None = None  # default concurrent agents per run, if the storm has agents
    runs_in_all: int | None = None  # default runs when --storm all runs every storm


def print_rows(summaries: dict[str, dict[str, Any]], rows: Sequence[tuple[str, Render]]) -> None:
    """One table: a row per ``rows`` label, a column per summary (``backend/mode``)."""
    columns = list(summaries)
    width = max(len(label) for label, _ in rows)
    cells = [[render(summaries[c]) for _, render in rows] for c in columns]
    sizes = [max(len(c), *(len(x) for x in col)) for c, col in zip(columns, cells, strict=True)]
    print(f"{'':<{width}}  " + "  ".join(f"{c:>{n}}" for c, n in zip(columns, sizes, strict=True)))
    print(f"{'-' * width}  " + "  ".join("-" * n for n in sizes))
    for i, (label, _) in enumerate(rows):
        row = "  ".join(f"{col[i]:>{n}}" for col, n in zip(cells, sizes, strict=True))
        print(f"{label:<{width}}  {row}")


def print_backend_tables(
    summaries: dict[str, dict[str, Any]],
    columns: Sequence[tuple[str, Render]],
    *,
    left: int,
    key: str | None = None,
) -> None:
    """A table per backend (the first part of a summary's ``backend/...`` name): a row per
    summary, a column per ``columns`` head; the first ``left`` columns are aligned left, the
    others right. ``key``: a first column of that head, the summary's name after ``backend/``."""
    for backend in dict.fromkeys(name.split("/")[0] for name in summaries):
        rows = [
            ([name.split("/")[1]] if key else []) + [render(s) for _, render in columns]
            for name, s in summaries.items()
            if name.split("/")[0] == backend
        ]
        heads = ([key] if key else []) + [head for head, _ in columns]
        sizes = [max(len(head), *(len(row[i]) for row in rows)) for i, head in enumerate(heads)]
        print(f"\n{backend}")
        for cells in (heads, ["-" * n for n in sizes], *rows):
            print(
                "  ".join(
                    f"{cell:<{n}}" if i < left else f"{cell:>{n}}"
                    for i, (cell, n) in enumerate(zip(cells, sizes, strict=True))
                )
            )


def parser_for(
    storms: dict[str, Storm], description: str, *, choose: bool
) -> argparse.ArgumentParser:
    """The storms' command line; ``choose``: with ``--storm`` (the entry point's)."""
    parser = argparse.ArgumentParser(description=description)
    if choose:
        parser.add_argument("--storm", choices=(*storms, "all"), default="all")
    parser.add_argument(
        "--runs",
        type=int,
        help="runs per backend and case (loop storm, default 40), mode (budget, 50), policy "
        "(conflict, 20) or mode (approval, 1,000; 200 with --storm all)",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="both")
    parser.add_argument(
        "--agents", type=int, help="concurrent agents per run (budget storm 20, conflict 12)"
    )
    parser.add_argument("--accounts", type=int, default=4, help="conflict storm: accounts")
    parser.add_argument(
        "--turns", type=int, default=5, help="conflict storm: batches of transfers per agent"
    )
    parser.add_argument(
        "--dir", help="approval storm: folder for its database (default: a temporary one)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the first run")
    parser.add_argument("--json", action="store_true")
    return parser


def main(storms: dict[str, Storm], description: str, argv: list[str] | None = None) -> int:
    """Run ``storms`` as the command line says: every one (or ``--storm NAME``) when there are
    several, the one otherwise; print the report; return the exit status (2: a storm aborted
    or a target was missed)."""
    choose = len(storms) > 1
    parser = parser_for(storms, description, choose=choose)
    args = parser.parse_args(argv)
    if not choose:
        args.storm = next(iter(storms))
    if (args.runs is not None and args.runs < 1) or (args.agents is not None and args.agents < 2):
        parser.error("--runs must be at least 1 and --agents at least 2")
    if args.accounts < 2 or args.turns < 1:
        parser.error("--accounts must be at least 2 and --turns at least 1")
    # errors only: every run of a storm crosses its soft thresholds (budget_warned warnings)
    configure_logging(logging.ERROR)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    chosen = list(storms) if args.storm == "all" else [args.storm]

    def runs_of(storm: Storm) -> int:
        if args.runs is not None:
            return args.runs
        if args.storm == "all" and storm.runs_in_all is not None:
            return storm.runs_in_all  # a shorter storm when every storm runs
        return storm.runs

    # each storm's own default number of runs and agents, unless --runs / --agents say
    options = {
        name: argparse.Namespace(
            **{
                **vars(args),
                "runs": runs_of(storms[name]),
                "agents": args.agents or storms[name].agents,
            }
        )
        for name in chosen
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in chosen:
            results[name] = storms[name].run(options[name], backends)
    except BenchmarkError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        return 2
    failures = [f"{name}: {f}" for name, result in results.items() for f in result["failures"]]
    if args.json:
        env = {
            "revision": revision(),
            "python": sys.version.split()[0],
            **versions("anyio", "pydantic", "trio"),
            "backends": backends,
            "runs": {name: options[name].runs for name in chosen},
            "agents": {name: options[name].agents for name in chosen if options[name].agents},
            "seed": args.seed,
        }
        print(json.dumps({"environment": env, "storms": results, "failures": failures}, indent=2))
    else:
        print(f"orchestra ({revision()}) failure-mode benchmark, {', '.join(backends)}")
        for name, result in results.items():
            print()
            storms[name].show(result, options[name])
        for failure in failures:
            print(f"invariant broken: {failure}", file=sys.stderr)
    return 2 if failures else 0
