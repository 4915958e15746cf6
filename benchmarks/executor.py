"""Benchmark the superstep executor against its targets and against bare anyio baselines.

Run from the repository root::

    python benchmarks/executor.py [--backend asyncio|trio|both] [--repeat N] [--json]

Three scenarios, each timed end to end around ``await app.run(...)`` (no store, no model):

- ``loop``: two nodes, ``a`` increments a counter and ``b`` does nothing; a route after ``b``
  goes back to ``a`` until the counter reaches 500, so one run is 1,000 supersteps (µs/step);
- ``chain``: 100 nodes in a line, each incrementing a counter (µs/node);
- ``fanout``: one node returns 100 ``Send``s to a worker (each task writes into an ``add`` and
  an ``append`` field), then a join node after the worker (ms/run).

Beside every scenario, in the same process and event loop, the matching floor is measured:
a bare loop of awaited no-op coroutine calls (µs/iteration) for ``loop`` and ``chain``, a bare
anyio task group spawning 100 no-op tasks (ms) for ``fanout``. Repetitions alternate
scenario / baseline (A B A B ...) so the noise of a shared machine hits both alike; the table
reports medians, p90 and the ratio to the baseline. Every run's outcome is checked (status,
steps, counter, totals) so a broken run cannot pass for a fast one.

This script is an application, so it configures logging: structlog is set to WARNING, which
is also what makes orchestra skip building its per-node debug events.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import _common
import anyio
from _common import (
    BenchmarkError,
    CounterState,
    configure_logging,
    expect,
    increment,
    p90,
    revision,
    versions,
)
from pydantic import BaseModel

from orchestra import END, START, Budget, CompiledGraph, Graph, RunOutcome, RunStatus, Send
from orchestra import add as add_reducer
from orchestra import append as append_reducer

LOOP_TURNS = 500  # node a runs this many times, so the loop is 2 * LOOP_TURNS steps
LOOP_STEPS = 2 * LOOP_TURNS
CHAIN_NODES = 100
FANOUT_TASKS = 100
BASELINE_CALLS = 1_000
WARMUP_SECONDS = 0.5

BACKENDS = ("asyncio", "trio")


# -- the graphs -----------------------------------------------------------------------------


def build_loop() -> CompiledGraph[CounterState]:
    return _common.build_loop(CounterState, None, turns=LOOP_TURNS, steps=2 * LOOP_STEPS)


def build_chain() -> CompiledGraph[CounterState]:
    graph = Graph(CounterState, name="chain")
    names = [f"n{i:03d}" for i in range(CHAIN_NODES)]
    for name in names:
        graph.add_node(name, increment)
    for source, target in zip([START, *names], [*names, END], strict=True):
        graph.add_edge(source, target)
    return graph.compile(budget=Budget(steps=2 * CHAIN_NODES))


class FanoutState(BaseModel):
    total: Annotated[int, add_reducer] = 0
    items: Annotated[list[int], append_reducer] = []
    joined: int = -1


async def fan(state: FanoutState, ctx: Any) -> list[Send]:
    return [Send("worker", i) for i in range(FANOUT_TASKS)]


async def worker(item: int, ctx: Any) -> dict[str, int]:
    return {"total": item, "items": item}


async def join(state: FanoutState, ctx: Any) -> dict[str, int]:
    return {"joined": len(state.items)}


def build_fanout() -> CompiledGraph[FanoutState]:
    graph = Graph(FanoutState, name="fanout")
    graph.add_node("fan", fan, targets=["worker"])
    graph.add_node("worker", worker)
    graph.add_node("join", join)
    graph.add_edge(START, "fan")
    graph.add_edge("worker", "join")
    graph.add_edge("join", END)
    return graph.compile()


# -- checks: a wrong run must never be reported as a fast one --------------------------------


def check_completed(outcome: RunOutcome[Any], steps: int) -> None:
    if outcome.error is not None:
        raise BenchmarkError(f"run failed: {outcome.error}") from outcome.error
    expect("status", outcome.status, RunStatus.COMPLETED)
    expect("steps", outcome.steps, steps)


def check_loop(outcome: RunOutcome[Any]) -> None:
    check_completed(outcome, LOOP_STEPS)
    expect("loop counter", outcome.state.counter, LOOP_TURNS)


def check_chain(outcome: RunOutcome[Any]) -> None:
    check_completed(outcome, CHAIN_NODES)
    expect("chain counter", outcome.state.counter, CHAIN_NODES)


def check_fanout(outcome: RunOutcome[Any]) -> None:
    check_completed(outcome, 3)  # fan, the 100 workers, join
    state = outcome.state
    expect("fan-out total", state.total, FANOUT_TASKS * (FANOUT_TASKS - 1) // 2)
    # writes merge in task-index order, never completion order
    expect("fan-out items", state.items, list(range(FANOUT_TASKS)))
    expect("fan-out join", state.joined, FANOUT_TASKS)
    expect("fan-out tasks", outcome.usage.tasks, FANOUT_TASKS + 2)


# -- one timed sample each; checks run after the clock stops --------------------------------


def orchestra_sample(
    app: CompiledGraph[Any], check: Callable[[RunOutcome[Any]], None], per: float
) -> Callable[[], Awaitable[float]]:
    """Return a coroutine function timing one run and returning seconds / ``per``."""

    async def sample() -> float:
        began = time.perf_counter()
        outcome = await app.run({})
        elapsed = time.perf_counter() - began
        check(outcome)
        return elapsed / per

    return sample


async def _noop() -> None:
    pass


async def await_loop_sample() -> float:
    """Await a no-op coroutine BASELINE_CALLS times; return seconds per call."""
    calls = 0
    began = time.perf_counter()
    for _ in range(BASELINE_CALLS):
        await _noop()
        calls += 1
    elapsed = time.perf_counter() - began
    expect("baseline calls", calls, BASELINE_CALLS)
    return elapsed / BASELINE_CALLS


async def task_group_sample() -> float:
    """Spawn FANOUT_TASKS no-op tasks in one anyio task group; return seconds."""
    done = 0

    async def task() -> None:
        nonlocal done
        done += 1

    began = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(FANOUT_TASKS):
            group.start_soon(task)
    elapsed = time.perf_counter() - began
    expect("baseline tasks", done, FANOUT_TASKS)
    return elapsed


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    description: str
    unit: str
    scale: float  # seconds -> unit
    target: float
    sample: Callable[[], Awaitable[float]]
    baseline: str
    baseline_unit: str
    baseline_sample: Callable[[], Awaitable[float]]


@dataclass(slots=True)
class Samples:
    scenario: Scenario
    backend: str
    values: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)


def scenarios() -> list[Scenario]:
    return [
        Scenario(
            name="loop",
            description=f"2-node loop, {LOOP_STEPS} steps",
            unit="µs/step",
            scale=1e6,
            target=20.0,
            sample=orchestra_sample(build_loop(), check_loop, LOOP_STEPS),
            baseline=f"{BASELINE_CALLS} awaited no-op calls",
            baseline_unit="µs/call",
            baseline_sample=await_loop_sample,
        ),
        Scenario(
            name="chain",
            description=f"{CHAIN_NODES}-node linear chain",
            unit="µs/node",
            scale=1e6,
            target=20.0,
            sample=orchestra_sample(build_chain(), check_chain, CHAIN_NODES),
            baseline=f"{BASELINE_CALLS} awaited no-op calls",
            baseline_unit="µs/call",
            baseline_sample=await_loop_sample,
        ),
        Scenario(
            name="fanout",
            description=f"fan-out {FANOUT_TASKS} Sends + join",
            unit="ms/run",
            scale=1e3,
            target=2.5,
            sample=orchestra_sample(build_fanout(), check_fanout, 1),
            baseline=f"task group, {FANOUT_TASKS} no-op tasks",
            baseline_unit="ms",
            baseline_sample=task_group_sample,
        ),
    ]


async def measure(backend: str, repeat: int) -> list[Samples]:
    """Warm up, then take ``repeat`` interleaved scenario/baseline samples of each scenario."""
    plan = scenarios()
    deadline = time.perf_counter() + WARMUP_SECONDS
    warmups = 0
    while warmups < 5 or time.perf_counter() < deadline:
        for scenario in plan:
            await scenario.sample()
            await scenario.baseline_sample()
        warmups += 1
    gc.collect()
    results = [Samples(scenario, backend) for scenario in plan]
    for _ in range(repeat):
        for scenario, samples in zip(plan, results, strict=True):
            samples.values.append(await scenario.sample() * scenario.scale)
            samples.baseline.append(await scenario.baseline_sample() * scenario.scale)
    return results


# -- reporting ------------------------------------------------------------------------------


def summarize(samples: Samples) -> dict[str, Any]:
    scenario = samples.scenario
    median = statistics.median(samples.values)
    baseline = statistics.median(samples.baseline)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "backend": samples.backend,
        "unit": scenario.unit,
        "n": len(samples.values),
        "median": median,
        "p90": p90(samples.values),
        "min": min(samples.values),
        "max": max(samples.values),
        "target": scenario.target,
        "passed": median <= scenario.target,
        "baseline": {
            "description": scenario.baseline,
            "unit": scenario.baseline_unit,
            "median": baseline,
            "p90": p90(samples.baseline),
        },
        "ratio": median / baseline if baseline > 0 else None,
    }


def environment(repeat: int) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions("orchestra", "anyio", "trio", "pydantic", "structlog"),
        "orchestra_revision": revision(),
        "repeat": repeat,
        "logging": "structlog configured to WARNING by this script",
    }


def number(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def render_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    header = (
        "scenario",
        "backend",
        "median",
        "p90",
        "min..max",
        "target",
        "baseline median",
        "ratio",
        "result",
    )
    lines = [
        [
            row["description"],
            row["backend"],
            f"{number(row['median'])} {row['unit']}",
            f"{number(row['p90'])}",
            f"{number(row['min'])}..{number(row['max'])}",
            f"<= {number(row['target'])}",
            f"{number(row['baseline']['median'])} {row['baseline']['unit']}",
            ratio(row["ratio"]),
            "PASS" if row["passed"] else "MISS",
        ]
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    numeric = {2, 3, 4, 5, 6, 7}

    def fmt(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    versions = env["versions"]
    out = [
        f"orchestra {versions['orchestra']} ({env['orchestra_revision']}) executor benchmark, "
        f"{env['date']}: "
        f"Python {env['python']}, anyio {versions['anyio']}, trio {versions['trio']}, "
        f"{env['cpus']} CPUs",
        f"{env['repeat']} interleaved repetitions per scenario (scenario, baseline, ...), "
        f"after a warm-up; {env['logging']}",
        "",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(line) for line in lines),
        "",
        "baselines: 'awaited no-op calls' is a bare `for ...: await noop()` loop (the floor of "
        "a step);",
        "           'task group' is `anyio.create_task_group()` spawning no-op tasks (the floor "
        "of a fan-out).",
        "ratio = orchestra median / baseline median; PASS when the median is within the target.",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument(
        "--repeat", type=int, default=50, help="timed runs per scenario (default 50, min 3)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 3:
        parser.error("--repeat must be at least 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    rows: list[dict[str, Any]] = []
    for backend in backends:
        try:
            results = anyio.run(measure, backend, args.repeat, backend=backend)
        except BenchmarkError as exc:
            print(f"benchmark aborted on {backend}: {exc}", file=sys.stderr)
            return 2
        rows.extend(summarize(samples) for samples in results)
    env = environment(args.repeat)
    if args.json:
        print(json.dumps({"environment": env, "results": rows}, indent=2, ensure_ascii=False))
    else:
        print(render_table(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
