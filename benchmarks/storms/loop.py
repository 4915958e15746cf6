"""Benchmark the loop guard: loops to catch, legitimate runs to leave be.

    .venv/bin/python benchmarks/storms/loop.py [--runs 40] [--backend asyncio|trio|both]
        [--seed 1] [--json]

**Loop storm.** Runs of small graphs on ``ScriptedModel``, each case ``--runs`` times (40) per
backend, seeded and interleaved, under the loop guard ``compile`` puts on by default (the
stuck cases: ``LoopGuard(no_progress=8, progress=("done",))``). A *loop* run first progresses
for 0-40 steps (drawn from its seed), then loops in one way: an exact cycle of 2-4 plain
nodes; two agents handing the work back and forth unchanged (0-2, or 4-5, lookups a visit);
one agent repeating a tool call (valid, or with invalid arguments); a worker whose attempts
change the state but never the progress field. It has 100 more steps to be caught (its step
budget). As many *legitimate* runs, of the same graphs, progress for 30-160 steps and must not
be flagged: revisits that change the state, a writer and a reviewer exchanging new drafts,
an agent making many different calls (a few twice), an agent editing a file and re-running
the tests, a worker that progresses at most every 8 steps. Each run's nodes and model keep
its ground truth (the step its loop started, the values written, the calls made) and the
result is checked against it; a wrong result aborts with status 2. Reported per case and
backend: loops caught, steps from the loop's start to its detection, repetitions seen (state
or call), false positives, wall time; a missed target exits with status 2.

The cases (graphs, scripts, guards) are in ``_loop_cases.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from _loop_cases import (
    CASES,
    LOOP_CAP,
    NO_PROGRESS,
    PREFIX,
    REPETITIONS,
    WORKSPACES,
    Case,
    Script,
    Work,
)
from _shared import BenchmarkError, Storm, expect, main, p90, print_backend_tables

from orchestra import Budget, RunStatus
from orchestra.events import LoopDetected, RunFinished, StepCommitted


@dataclass
class LoopRun:
    """One run of the loop storm, checked."""

    case: str
    kind: str
    loop: bool
    seed: int
    status: str
    steps: int
    prefix: int | None  # the legitimate steps the script meant to run before looping
    loop_start: int | None  # the first step of the loop (see check_loop_run)
    detector: str | None  # the detector that stopped the run, if one did
    detected_at: int | None
    to_detect: int | None  # steps from the loop's start to its detection, both counted
    repetitions: int | None  # times the repeated state or call was seen (repeats, same_call)
    early: bool  # flagged before its loop started: a false positive
    wall_ms: float


async def loop_run(case: Case, seed: int) -> LoopRun:
    rng = random.Random(f"{seed}/{case.kind}/{case.name}")
    script = Script(seed=seed, rng=rng, prefix=rng.randint(0, PREFIX) if case.loop else None)
    budget = Budget(steps=script.prefix + LOOP_CAP) if script.prefix is not None else Budget()
    options: dict[str, Any] = {"budget": budget}
    if case.guard is not None:
        options["loop_guard"] = case.guard
    app = case.build(script).compile(**options)
    run_id = f"loop-storm-{seed}-{case.kind}-{case.name}"
    found: list[LoopDetected] = []
    finished: RunFinished | None = None
    began = time.perf_counter()
    try:
        async with aclosing(app.stream(Work(), run_id=run_id)) as events:
            async for event in events:
                if isinstance(event, StepCommitted):
                    script.step = event.step
                elif isinstance(event, LoopDetected):
                    found.append(event)
                elif isinstance(event, RunFinished):
                    finished = event
    finally:
        WORKSPACES.pop(run_id, None)
    wall = time.perf_counter() - began
    return check_loop_run(case, script, finished, found, wall)


def check_loop_run(
    case: Case,
    script: Script,
    finished: RunFinished | None,
    found: list[LoopDetected],
    wall: float,
) -> LoopRun:
    """Check one run against its script. A loop starts at the first step after the last
    that changed the state (stuck: the progress field), or, for a repeated call, at the
    step of its first call."""
    where = f"{case.kind}, {case.name}, seed {script.seed}"
    if finished is None or finished.outcome is None:
        raise BenchmarkError(f"{where}: the stream ended without the outcome")
    outcome = finished.outcome
    expect(f"{where}: error", outcome.error, None)
    expect(f"{where}: node steps vs the stream's", script.clock_ok, True)
    expect(f"{where}: steps", outcome.steps, script.step)
    expect(f"{where}: model calls", outcome.usage.model_calls, script.model_calls)
    expect(f"{where}: tool calls run", outcome.usage.tool_calls, script.tool_calls)
    for name, value in script.expect.items():
        expect(f"{where}: state.{name}", getattr(outcome.state, name), value)
    status = outcome.status
    if status is RunStatus.BUDGET_EXCEEDED:
        if script.prefix is None:
            raise BenchmarkError(f"{where}: a legitimate run used its step budget")
        expect(f"{where}: steps of a missed loop", outcome.steps, script.prefix + LOOP_CAP)
    elif status is RunStatus.COMPLETED:
        if case.loop:
            raise BenchmarkError(f"{where}: a loop run completed")
    elif status is not RunStatus.LOOP_DETECTED:
        raise BenchmarkError(f"{where}: status {status}: {outcome.stop_reason}")
    expect(f"{where}: loop_detected events", len(found), int(status is RunStatus.LOOP_DETECTED))
    loop_start = None
    if script.prefix is not None:
        loop_start = script.first_repeat if case.detector == "same_call" else script.last_change + 1
        # (stuck: the check that credits the last good attempt may run one step later)
        if loop_start is None or loop_start > script.prefix + 2:
            raise BenchmarkError(f"{where}: the loop started at {loop_start}, not by its prefix")
    detector = detected_at = to_detect = repetitions = None
    early = False
    if found:
        event = found[0]
        detector, detected_at = event.detector, event.step
        expect(f"{where}: detection step", detected_at, outcome.steps)
        if event.message not in (outcome.stop_reason or ""):
            raise BenchmarkError(f"{where}: stop reason {outcome.stop_reason!r}")
        evidence = json.loads(event.evidence)
        if detector in ("repeats", "same_call"):
            repetitions = len(evidence["steps"])
            expect(f"{where}: the last repetition's step", evidence["steps"][-1], detected_at)
        if loop_start is not None:
            early = detected_at < loop_start
            to_detect = None if early else detected_at - loop_start + 1
    return LoopRun(
        case=case.name,
        kind=case.kind,
        loop=case.loop,
        seed=script.seed,
        status=str(status),
        steps=outcome.steps,
        prefix=script.prefix,
        loop_start=loop_start,
        detector=detector,
        detected_at=detected_at,
        to_detect=to_detect,
        repetitions=repetitions,
        early=early,
        wall_ms=wall * 1e3,
    )


async def loop_storm_runs(runs: int, seed: int) -> list[LoopRun]:
    """Run every case on every seed, interleaved (case 1, case 2, ... then the next seed),
    after a warm-up run of each."""
    for case in CASES:
        await loop_run(case, seed - 1)
    return [await loop_run(case, seed + n) for n in range(runs) for case in CASES]


def summarize_loops(case: Case, runs: list[LoopRun]) -> dict[str, Any]:
    flagged = [r for r in runs if r.detector is not None]
    caught = [r for r in flagged if not r.early]
    to_detect = [r.to_detect for r in caught if r.to_detect is not None]
    repetitions = [r.repetitions for r in caught if r.repetitions is not None]
    detectors = collections.Counter(r.detector for r in flagged)
    endings = collections.Counter(r.status for r in runs if r.detector is None)
    prefixes = [r.prefix for r in runs if r.prefix is not None]
    return {
        "kind": case.kind,
        "case": case.name,
        "loop": case.loop,
        "runs": len(runs),
        "detected": len(caught) if case.loop else None,
        "false_positives": len(flagged) if not case.loop else sum(r.early for r in runs),
        "detectors": dict(detectors),
        "undetected_ended": dict(endings),
        "median_prefix": statistics.median(prefixes) if prefixes else None,
        "min_to_detect": min(to_detect) if to_detect else None,
        "median_to_detect": statistics.median(to_detect) if to_detect else None,
        "max_to_detect": max(to_detect) if to_detect else None,
        "median_repetitions": statistics.median(repetitions) if repetitions else None,
        "max_repetitions": max(repetitions) if repetitions else None,
        "median_steps": statistics.median(r.steps for r in runs),
        "median_wall_ms": statistics.median(r.wall_ms for r in runs),
        "p90_wall_ms": p90([r.wall_ms for r in runs]),
    }


def loop_failures(backend: str, case: Case, summary: dict[str, Any]) -> list[str]:
    """The targets: every loop caught within REPETITIONS (stuck: exactly NO_PROGRESS
    steps), no legitimate run or legitimate prefix flagged."""
    where, runs = f"{backend}, {case.kind}, {case.name}", summary["runs"]
    failures = []
    if summary["false_positives"]:
        what = "legitimate runs" if not case.loop else "loop runs flagged before the loop,"
        failures.append(
            f"{where}: {summary['false_positives']} of {runs} {what} flagged "
            f"({_counts(summary['detectors'])})"
        )
    if case.loop and summary["detected"] < runs:
        failures.append(
            f"{where}: {runs - summary['detected']} of {runs} loops missed (ended "
            f"{_counts(summary['undetected_ended'])})"
        )
    if (summary["max_repetitions"] or 0) > REPETITIONS:
        failures.append(f"{where}: caught after {summary['max_repetitions']} repetitions")
    took = {summary["min_to_detect"], summary["max_to_detect"]} - {None}
    if case.detector == "no_progress" and took - {NO_PROGRESS}:
        low, high = summary["min_to_detect"], summary["max_to_detect"]
        failures.append(f"{where}: caught after {low}..{high} steps, not {NO_PROGRESS}")
    return failures


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counter.items()) or "-"


def loop_storm(args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """Run the loop storm on each backend; return its summaries and missed targets."""
    summaries: dict[str, dict[str, Any]] = {}
    every: list[dict[str, Any]] = []
    failures: list[str] = []
    for backend in backends:
        runs = anyio.run(loop_storm_runs, args.runs, args.seed, backend=backend)
        every.extend({"backend": backend, **asdict(r)} for r in runs)
        for case in CASES:
            mine = [r for r in runs if r.kind == case.kind and r.case == case.name]
            summary = summarize_loops(case, mine)
            summaries[f"{backend}/{case.kind}/{case.name}"] = summary
            failures.extend(loop_failures(backend, case, summary))
    return {"summaries": summaries, "runs": every, "failures": failures}


def _range(low: Any, high: Any) -> str:
    if low is None:
        return "-"
    return f"{low:g}" if low == high else f"{low:g} / {high:g}"


LOOP_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("kind", lambda s: s["kind"]),
    ("case", lambda s: s["case"]),
    ("caught", lambda s: f"{s['detected']}/{s['runs']}" if s["loop"] else "-"),
    ("false pos.", lambda s: f"{s['false_positives']}/{s['runs']}"),
    ("by", lambda s: _counts(s["detectors"])),
    ("steps to catch", lambda s: _range(s["median_to_detect"], s["max_to_detect"])),
    ("repetitions", lambda s: _range(s["median_repetitions"], s["max_repetitions"])),
    ("steps/run", lambda s: f"{s['median_steps']:g}"),
    ("wall ms", lambda s: f"{s['median_wall_ms']:.1f}"),
)


def print_loop_storm(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"loop storm: {args.runs} runs per case and backend (seeds {args.seed}.."
        f"{args.seed + args.runs - 1}); each loop run progresses for 0-{PREFIX} steps, then "
        f"loops for up to {LOOP_CAP}"
    )
    print("steps to catch, repetitions: median / max; steps/run, wall ms: median")
    print_backend_tables(result["summaries"], LOOP_COLUMNS, left=2)
    verdict = "FAIL" if result["failures"] else "PASS"
    print(
        f"targets: every loop caught, within {REPETITIONS} repetitions (stuck: "
        f"{NO_PROGRESS} steps), no legitimate run flagged: {verdict}"
    )


STORM = Storm("loop", loop_storm, print_loop_storm, runs=40)

if __name__ == "__main__":
    sys.exit(main({STORM.name: STORM}, __doc__.split("\n\n")[0]))
