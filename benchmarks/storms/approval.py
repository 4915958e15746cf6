"""Benchmark human approval: runs held for approval, answered by another process.

    .venv/bin/python benchmarks/storms/approval.py [--runs 1000] [--backend asyncio|trio|both]
        [--dir DIR] [--seed 1] [--json]

**Approval storm.** ``--runs`` (1,000; 200 with ``--storm all``) runs per mode, each a node
calling an irreversible tool that the default approval policy holds, are started on one
SQLite file (``compile(store=path)``, its default durability ``full``) and stop
``interrupted``; the first 10 are resumed without an answer (they must stop again). Then
another process, ``benchmarks/storms/_approval_worker.py`` (which defines the app), lists the
open requests and answers the runs one after another, alternating ``app.resume(run,
answers={req: Approve()})`` and ``app.answer(run, {req: Approve()})`` then
``app.resume(run)``. Reported per backend and mode: from just before the answer call to the
tool running (median, p99, max), runs answered and resumed per second, and the checks: every
tool ran exactly once (a log line per execution, from any process), in the answering
process, never before its answer; every run completed, no request left open. A broken check
is status 2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from _shared import BenchmarkError, Storm, expect, main, p99, print_rows

from orchestra import RunStatus
from orchestra.store import SQLiteStore

WORKER = Path(__file__).resolve().parent / "_approval_worker.py"
DEFAULT_RUNS = 1_000  # runs a mode
ALL_APPROVAL_RUNS = 200  # runs a mode when --storm all runs every storm (1,000 alone)
UNANSWERED = 10  # held runs first resumed without an answer (they must stop again)


@dataclass
class ApprovalRun:
    """One run of the approval storm: answered in the other process, checked."""

    order: int
    mode: str  # "resume": resume(answers=...); "answer": answer(), then resume()
    to_ran_ms: float  # from just before the answer call to the tool running
    resume_to_ran_ms: float | None  # "answer": from the answer recorded to the tool running
    to_return_ms: float  # from just before the answer call to the outcome returned
    executions: int  # lines the tool wrote for this run (every process)


async def start_held_runs(db: str, runs: int) -> float:
    """Start ``runs`` runs, each stopped for approval; return the seconds it took."""
    import _approval_worker as worker

    app = worker.compiled(db)
    began = time.perf_counter()
    for order in range(runs):
        outcome = await app.run(worker.Payment(order=order), run_id=f"pay-{order:05d}")
        where = f"run pay-{order:05d}"
        expect(f"{where}: status", outcome.status, RunStatus.INTERRUPTED)
        expect(f"{where}: requests", [r.kind for r in outcome.pending], ["approval"])
        expect(f"{where}: held tool", outcome.pending[0].payload["tool"], "pay")
    return time.perf_counter() - began


async def resume_unanswered(db: str, runs: int) -> None:
    """Resume the first ``runs`` held runs without an answer: each must stop again, asking
    the same request, its tool not run."""
    import _approval_worker as worker

    app = worker.compiled(db)
    for order in range(runs):
        run_id = f"pay-{order:05d}"
        asked = [r.id for r in await app.pending(run_id)]
        outcome = await app.resume(run_id)
        expect(f"{run_id}: resumed without an answer", outcome.status, RunStatus.INTERRUPTED)
        expect(f"{run_id}: asked again", [r.id for r in outcome.pending], asked)
        expect(f"{run_id}: paid without an answer", outcome.state.paid_at, None)


async def stored_statuses(db: str) -> tuple[collections.Counter[str], int]:
    """The runs' statuses in the database, and the requests still open."""
    import _approval_worker as worker

    app = worker.compiled(db)
    assert app.store is not None
    statuses = collections.Counter(r.status for r in await app.store.list_runs())
    return statuses, len(await app.pending())


def approval_storm_backend(
    backend: str, runs: int, folder: Path
) -> tuple[dict[str, Any], list[ApprovalRun]]:
    """One backend: ``runs`` runs a mode held, answered by the worker process, checked."""
    import _approval_worker as worker

    db, log, out = folder / f"{backend}.db", folder / f"{backend}.log", folder / f"{backend}.json"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), log, out):
        stale.unlink(missing_ok=True)
    log.touch()
    previous = os.environ.get(worker.LOG)
    os.environ[worker.LOG] = str(log)
    try:
        held = anyio.run(start_held_runs, str(db), 2 * runs, backend=backend)
        anyio.run(resume_unanswered, str(db), min(UNANSWERED, 2 * runs), backend=backend)
        expect(f"{backend}: tool executions before any answer", log.read_text(), "")
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(WORKER), "--db", str(db), "--out", str(out), "--backend", backend],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            check=False,
        )
        worker_seconds = time.perf_counter() - began
    finally:
        if previous is None:
            os.environ.pop(worker.LOG, None)
        else:
            os.environ[worker.LOG] = previous
    if done.returncode:
        raise BenchmarkError(f"{backend}: the answering process failed:\n{done.stderr[-2000:]}")
    answered = json.loads(out.read_text())
    executions: dict[int, list[float]] = collections.defaultdict(list)
    pids = set()
    for line in log.read_text().splitlines():
        number, at, pid = line.split()
        executions[int(number)].append(float(at))
        pids.add(int(pid))
    expect(f"{backend}: runs listed by the worker", answered["listed"], 2 * runs)
    expect(f"{backend}: processes that ran the tool", pids, {answered["pid"]})
    statuses, still_open = anyio.run(stored_statuses, str(db), backend=backend)
    expect(f"{backend}: stored statuses", dict(statuses), {"completed": 2 * runs})
    expect(f"{backend}: requests still open", still_open, 0)
    checked = []
    for row in answered["runs"]:
        order = int(row["run_id"].removeprefix("pay-"))
        where = f"{backend}, run {row['run_id']}"
        expect(f"{where}: request", (row["kind"], row["tool"]), ("approval", "pay"))
        expect(f"{where}: status", row["status"], str(RunStatus.COMPLETED))
        expect(f"{where}: error", row["error"], None)
        expect(f"{where}: the tool's time in the state", [row["paid_at"]], executions[order])
        recorded = row["recorded_at"]
        checked.append(
            ApprovalRun(
                order=order,
                mode=row["mode"],
                to_ran_ms=(row["paid_at"] - row["answered_at"]) * 1e3,
                resume_to_ran_ms=None if recorded is None else (row["paid_at"] - recorded) * 1e3,
                to_return_ms=(row["returned_at"] - row["answered_at"]) * 1e3,
                executions=len(executions[order]),
            )
        )
    expect(f"{backend}: runs answered", sorted(r.order for r in checked), list(range(2 * runs)))
    context = {
        "database": str(db),
        "durability": SQLiteStore(db).durability,  # what compile(store=path) makes
        "held_runs_per_second": 2 * runs / held,
        "worker_seconds": worker_seconds,
        # the worker's loop, without the floor's commits interleaved in it
        "answering_seconds": answered["last_returned_at"]
        - answered["first_answer_at"]
        - answered["floor_total_seconds"],
        "list_ms": answered["list_seconds"] * 1e3,
        "floor_commit_ms": answered["floor_commit_seconds"] * 1e3,
        "floor_commit_p99_ms": answered["floor_commit_p99_seconds"] * 1e3,
    }
    return context, checked


def summarize_approvals(runs: list[ApprovalRun], context: dict[str, Any]) -> dict[str, Any]:
    to_ran = [r.to_ran_ms for r in runs]
    resumed = [r.resume_to_ran_ms for r in runs if r.resume_to_ran_ms is not None]
    to_return = [r.to_return_ms for r in runs]
    return {
        "runs": len(runs),
        "executions": sum(r.executions for r in runs),
        "ran_once": sum(r.executions == 1 for r in runs),
        "ran_before_answer": sum(r.to_ran_ms < 0 for r in runs),
        "median_to_ran_ms": statistics.median(to_ran),
        "p99_to_ran_ms": p99(to_ran),
        "max_to_ran_ms": max(to_ran),
        "median_resume_to_ran_ms": statistics.median(resumed) if resumed else None,
        "p99_resume_to_ran_ms": p99(resumed) if resumed else None,
        "median_to_return_ms": statistics.median(to_return),
        "runs_per_second": len(runs) / (sum(to_return) / 1e3),
        **context,
    }


def approval_storm(args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """Run the approval storm on each backend; return its summaries and broken invariants
    (a tool that ran twice, or not at all, or before its answer)."""
    summaries: dict[str, dict[str, Any]] = {}
    every: list[dict[str, Any]] = []
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="approval-")))
        else:
            folder = Path(args.dir)
            folder.mkdir(parents=True, exist_ok=True)
        for backend in backends:
            context, runs = approval_storm_backend(backend, args.runs, folder)
            every.extend({"backend": backend, **asdict(r)} for r in runs)
            for mode in _approval_modes():
                summary = summarize_approvals([r for r in runs if r.mode == mode], context)
                summaries[f"{backend}/{mode}"] = summary
                where = f"{backend}, {mode}"
                if summary["ran_once"] != summary["runs"]:
                    failures.append(
                        f"{where}: {summary['runs'] - summary['ran_once']} of "
                        f"{summary['runs']} tools did not run exactly once"
                    )
                if summary["ran_before_answer"]:
                    failures.append(
                        f"{where}: {summary['ran_before_answer']} tools ran before their answer"
                    )
    return {"summaries": summaries, "runs": every, "failures": failures}


def _approval_modes() -> tuple[str, ...]:
    import _approval_worker as worker

    return worker.MODES


APPROVAL_MODES = {
    "resume": "resume(run, answers={req: Approve()})",
    "answer": "answer(run, {req: Approve()}); resume(run)",
}
APPROVAL_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("runs (tool ran exactly once)", lambda s: f"{s['runs']} ({s['ran_once']})"),
    ("tools run before their answer", lambda s: f"{s['ran_before_answer']}"),
    ("answer -> tool ran: median / p99 / max",
     lambda s: f"{s['median_to_ran_ms']:.2f} / {s['p99_to_ran_ms']:.2f} / "
     f"{s['max_to_ran_ms']:.1f} ms"),
    ("  answer recorded -> tool ran: median / p99",
     lambda s: "-" if s["median_resume_to_ran_ms"] is None
     else f"{s['median_resume_to_ran_ms']:.2f} / {s['p99_resume_to_ran_ms']:.2f} ms"),
    ("answer -> outcome returned: median", lambda s: f"{s['median_to_return_ms']:.2f} ms"),
    ("runs answered and resumed per second", lambda s: f"{s['runs_per_second']:,.0f}"),
)  # fmt: skip


def print_approval_storm(result: dict[str, Any], args: argparse.Namespace) -> None:
    first = next(iter(result["summaries"].values()))
    print(
        f"approval storm: {args.runs} runs a mode and backend, each held for approval of an "
        f"irreversible tool (default Approvals()), on one SQLite file (durability "
        f"{first['durability']!r}, the store's default), answered one run after another by "
        f"another process, the two modes alternating"
    )
    if args.storm == "all" and args.runs == ALL_APPROVAL_RUNS:
        print(
            f"(--storm all runs {ALL_APPROVAL_RUNS} a mode; --storm approval runs {DEFAULT_RUNS:,})"
        )
    for mode, call in APPROVAL_MODES.items():
        print(f"  {mode}: {call}")
    print_rows(result["summaries"], APPROVAL_ROWS)
    for backend in dict.fromkeys(key.split("/")[0] for key in result["summaries"]):
        s = result["summaries"][f"{backend}/resume"]
        print(
            f"{backend}: {2 * args.runs} runs held at {s['held_runs_per_second']:,.0f}/s; the "
            f"worker took {s['worker_seconds']:.1f} s (start-up, {s['list_ms']:.0f} ms to list "
            f"the open requests, {s['answering_seconds']:.1f} s answering: "
            f"{2 * args.runs / s['answering_seconds']:,.0f} runs/s); floor, interleaved: one "
            f"SQLite commit at synchronous=FULL {s['floor_commit_ms']:.2f} ms median, "
            f"{s['floor_commit_p99_ms']:.2f} ms p99"
        )
    verdict = "FAIL" if result["failures"] else "PASS"
    print(f"targets: every tool ran exactly once, none before its answer: {verdict}")


STORM = Storm(
    "approval",
    approval_storm,
    print_approval_storm,
    runs=DEFAULT_RUNS,
    runs_in_all=ALL_APPROVAL_RUNS,
)

if __name__ == "__main__":
    sys.exit(main({STORM.name: STORM}, __doc__.split("\n\n")[0]))
