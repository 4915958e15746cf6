"""Benchmark durable runs: the SQLite store's cost per step, bytes per step, resume and import.

Run from the repository root::

    python benchmarks/durable.py [--backend asyncio|trio] [--repeat N] [--dir DIR] [--json]

What is measured (public API plus ``orchestra.store``):

- ``loop``: the 2-node loop of 1,000 steps (``a`` increments a counter, ``b`` does nothing, a
  route after ``b`` loops back until 1,000 steps) with ``SQLiteStore(durability="normal")``
  and ``"full"``, µs/step, median and p90 over the repetitions. Baselines, measured in the
  same process and interleaved with the runs: the same graph without a store, and the floor
  of one SQLite WAL commit at ``synchronous=NORMAL`` and ``FULL`` (one small autocommit INSERT
  on a fresh WAL database in the same directory, so on the same file system, created at the
  start and reused across samples exactly like the stores' databases);
- ``bytes/step``: a 1,000-step run whose state holds an unchanged 10 KB field; the growth of
  the pages in use (``page_count - freelist_count``, after ``PRAGMA wal_checkpoint(TRUNCATE)``)
  divided by the steps;
- ``resume``: a run stopped after 1,000 checkpoints resumed in a new process
  (``python -c``), split into interpreter start-up, ``import orchestra``, defining and
  compiling the graph, opening the store, configuring structlog, and ``resume`` until the
  first node runs (the node records ``time.perf_counter()``, a system-wide monotonic clock on
  Linux); median of several;
- ``import``: ``import orchestra`` alone, median over fresh interpreters.

Every timed run is checked after the clock stops (status, steps, counter, checkpoints
stored), so a broken run cannot pass for a fast one. This script is an application, so it
configures structlog to WARNING.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import _common
import anyio
from _common import (
    BenchmarkError,
    CounterState,
    configure_logging,
    expect,
    p90,
    revision,
    versions,
)
from pydantic import BaseModel

from orchestra import CompiledGraph, RunOutcome, RunStatus
from orchestra.store import SQLiteStore

LOOP_TURNS = 500  # node a runs this many times: the loop is 2 * LOOP_TURNS steps
LOOP_STEPS = 2 * LOOP_TURNS
FLOOR_COMMITS = 1_000  # autocommit INSERTs per floor sample
BLOB_BYTES = 10 * 1024
RESUME_SAMPLES = 7
IMPORT_SAMPLES = 10

TARGETS = {
    "normal": 40.0,  # µs/step
    "full": 200.0,  # µs/step
    "bytes": 1024.0,  # B/step ("well under 1 KB")
    "import": 150.0,  # ms
}


# -- the graphs -----------------------------------------------------------------------------


class BlobState(BaseModel):
    counter: int = 0
    blob: str = ""


def build_loop(
    state: type[BaseModel],
    store: SQLiteStore | None,
    *,
    turns: int = LOOP_TURNS,
    steps: int = 2 * LOOP_STEPS,
) -> CompiledGraph[Any]:
    """The 2-node loop: ``2 * turns`` steps, unless the step budget stops it first."""
    return _common.build_loop(state, store, turns=turns, steps=steps)


# -- checks ---------------------------------------------------------------------------------


def check_loop(outcome: RunOutcome[Any]) -> None:
    if outcome.error is not None:
        raise BenchmarkError(f"run failed: {outcome.error}") from outcome.error
    expect("status", outcome.status, RunStatus.COMPLETED)
    expect("steps", outcome.steps, LOOP_STEPS)
    expect("counter", outcome.state.counter, LOOP_TURNS)


async def check_stored(store: SQLiteStore, run_id: str) -> list[Any]:
    record = await store.get_run(run_id)
    expect("stored status", record.status, "completed")
    rows = await store.checkpoints(run_id)
    expect("checkpoints stored", [r.step for r in rows], list(range(LOOP_STEPS + 1)))
    return rows


# -- per-step cost: runs and floors, interleaved --------------------------------------------


async def loop_sample(app: CompiledGraph[Any]) -> float:
    """Time one 1000-step run; return µs/step."""
    run_id = secrets.token_hex(8)
    began = time.perf_counter()
    outcome = await app.run({}, run_id=run_id)
    elapsed = time.perf_counter() - began
    check_loop(outcome)
    if app.store is not None:
        assert isinstance(app.store, SQLiteStore)
        await check_stored(app.store, run_id)
    return elapsed / LOOP_STEPS * 1e6


class CommitFloor:
    """A fresh WAL database, made by this script like the stores' files and reused across
    samples like them (a new file per sample would also time the WAL file growing)."""

    def __init__(self, directory: Path, synchronous: str) -> None:
        self.conn = sqlite3.connect(directory / f"floor-{synchronous.lower()}.db")
        self.conn.isolation_level = None  # autocommit: one INSERT is one transaction
        expect("journal mode", self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0], "wal")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, step INTEGER, data TEXT)")
        self.rows = 0

    def sample(self) -> float:
        """Time FLOOR_COMMITS autocommit INSERTs; return µs/commit."""
        conn = self.conn
        began = time.perf_counter()
        for i in range(FLOOR_COMMITS):
            conn.execute("INSERT INTO t (step, data) VALUES (?, ?)", (i, '{"counter":1}'))
        elapsed = time.perf_counter() - began
        self.rows += FLOOR_COMMITS
        expect("floor rows", conn.execute("SELECT count(*) FROM t").fetchone()[0], self.rows)
        return elapsed / FLOOR_COMMITS * 1e6

    def close(self) -> None:
        self.conn.close()


async def measure_steps(directory: Path, repeat: int) -> dict[str, list[float]]:
    """Take ``repeat`` samples of each run and floor, interleaved, after a warm-up."""
    stores = {d: SQLiteStore(directory / f"loop-{d}.db", durability=d) for d in ("normal", "full")}
    floors = {f"floor_{d}": CommitFloor(directory, d.upper()) for d in ("normal", "full")}
    bare = build_loop(CounterState, None)
    apps = {d: build_loop(CounterState, store) for d, store in stores.items()}

    async def sample(name: str) -> float:
        if name in floors:  # on the event loop's thread, like the store's commits
            return floors[name].sample()
        return await loop_sample(bare if name == "none" else apps[name])

    plan = ("none", "normal", "floor_normal", "full", "floor_full")
    samples: dict[str, list[float]] = {name: [] for name in plan}
    try:
        for _ in range(2):  # warm-up
            for name in plan:
                await sample(name)
        gc.collect()
        for _ in range(repeat):
            for name in plan:
                samples[name].append(await sample(name))
    finally:
        for store in stores.values():
            await store.aclose()
        for floor in floors.values():
            floor.close()
    return samples


# -- bytes per step -------------------------------------------------------------------------


def used_bytes(path: Path) -> tuple[int, int]:
    """Return (bytes in used pages, file size) after folding the WAL into the database."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        expect("wal_checkpoint busy", busy, 0)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * page_size, path.stat().st_size


async def measure_bytes(directory: Path) -> dict[str, Any]:
    path = directory / "bytes.db"
    store = SQLiteStore(path, durability="normal")
    store.schema_version()  # creates the file and its schema
    await store.aclose()
    used_before, size_before = used_bytes(path)
    store = SQLiteStore(path, durability="normal")
    app = build_loop(BlobState, store)
    try:
        run_id = secrets.token_hex(8)
        outcome = await app.run({"blob": "x" * BLOB_BYTES}, run_id=run_id)
        check_loop(outcome)
        expect("blob unchanged", outcome.state.blob, "x" * BLOB_BYTES)
        rows = await check_stored(store, run_id)
    finally:
        await store.aclose()
    used_after, size_after = used_bytes(path)
    return {
        "bytes_per_step": (used_after - used_before) / LOOP_STEPS,
        "used_bytes_growth": used_after - used_before,
        "file_size_growth": size_after - size_before,
        "checkpoints": len(rows),
        "snapshots": sum(1 for r in rows if r.snapshot is not None),
        "state_bytes": len(outcome.state.model_dump_json()),
    }


# -- resume in a new process, import time ---------------------------------------------------

RESUME_CHILD = textwrap.dedent(
    """
    import json, sys, time
    t_start = time.perf_counter()
    import orchestra
    from orchestra.store import SQLiteStore
    t_import = time.perf_counter()
    from pydantic import BaseModel

    class CounterState(BaseModel):
        counter: int = 0

    first = []

    async def increment(state, ctx):
        first.append(time.perf_counter())
        return {"counter": state.counter + 1}

    async def do_nothing(state, ctx):
        first.append(time.perf_counter())

    def loop_again(state):
        return "a" if state.counter < %(turns)d else orchestra.END

    graph = orchestra.Graph(CounterState, name="loop")
    graph.add_node("a", increment)
    graph.add_node("b", do_nothing)
    graph.add_edge(orchestra.START, "a")
    graph.add_edge("a", "b")
    graph.add_route("b", loop_again, targets=["a", orchestra.END])
    store = SQLiteStore(sys.argv[1], durability="normal")
    # one more step than the run has: resume runs exactly one step, then stops
    app = graph.compile(store=store, budget=orchestra.Budget(steps=%(steps)d + 1))
    t_compile = time.perf_counter()
    store.schema_version()  # opens the file: WAL, pragmas, schema check
    t_open = time.perf_counter()
    # the application's logging set-up; orchestra imports structlog on its first run anyway
    import logging, structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    t_logging = time.perf_counter()
    import anyio

    async def main():
        try:
            return await app.resume(sys.argv[2])
        finally:
            await store.aclose()

    outcome = anyio.run(main, backend=sys.argv[3])
    print(json.dumps({
        "start": t_start, "import": t_import, "compile": t_compile, "open": t_open,
        "logging": t_logging, "first_node": first[0] if first else None,
        "status": str(outcome.status), "steps": outcome.steps,
    }))
    """
)


async def make_resumable(path: Path) -> str:
    """Store a run stopped by its step budget after LOOP_STEPS checkpoints; return its id."""
    store = SQLiteStore(path, durability="normal")
    # a loop twice as long as the budget, so the run stops unfinished at LOOP_STEPS
    graph = build_loop(CounterState, store, turns=LOOP_STEPS, steps=LOOP_STEPS)
    run_id = "resumable"
    try:
        outcome = await graph.run({}, run_id=run_id)
        expect("stopped status", outcome.status, RunStatus.BUDGET_EXCEEDED)
        expect("stopped steps", outcome.steps, LOOP_STEPS)
        expect("checkpoints", len(await store.checkpoints(run_id)), LOOP_STEPS + 1)
    finally:
        await store.aclose()
    return run_id


def resume_sample(template: Path, directory: Path, run_id: str, backend: str) -> dict[str, float]:
    path = directory / "resume.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(template, path)
    code = RESUME_CHILD % {"turns": LOOP_STEPS, "steps": LOOP_STEPS}
    spawned = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", code, str(path), run_id, backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if child.returncode != 0:
        raise BenchmarkError(f"resume child failed:\n{child.stderr}")
    t = json.loads(child.stdout.strip().splitlines()[-1])
    expect("resumed status", t["status"], "budget_exceeded")
    expect("resumed steps", t["steps"], LOOP_STEPS + 1)
    if t["first_node"] is None:
        raise BenchmarkError("the resumed run ran no node")
    ms = 1e3
    return {
        "startup": (t["start"] - spawned) * ms,
        "import": (t["import"] - t["start"]) * ms,
        "compile": (t["compile"] - t["import"]) * ms,
        "open": (t["open"] - t["compile"]) * ms,
        "logging": (t["logging"] - t["open"]) * ms,
        "first_node": (t["first_node"] - t["logging"]) * ms,
        "total": (t["first_node"] - spawned) * ms,
    }


IMPORT_CHILD = (
    "import time; t = time.perf_counter(); import orchestra; print(time.perf_counter() - t)"
)


def import_sample() -> float:
    child = subprocess.run(
        [sys.executable, "-c", IMPORT_CHILD], capture_output=True, text=True, check=True
    )
    return float(child.stdout) * 1e3


# -- reporting ------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p90": p90(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def environment(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
        "versions": versions("orchestra", "anyio", "trio", "pydantic", "sqlite-utils", "structlog"),
        "orchestra_revision": revision(),
        "backend": args.backend,
        "repeat": args.repeat,
        "directory": str(directory),
        # set, Python writes no .pyc files: orchestra's modules compile from source on
        # every import (installed wheels ship or write .pyc)
        "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "logging": "structlog configured to WARNING by this script",
    }


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    steps = results["steps"]
    rows = [
        {
            "name": "loop_none",
            "description": f"2-node loop, {LOOP_STEPS} steps, no store",
            "unit": "µs/step",
            **steps["none"],
            "target": None,
            "floor": None,
        }
    ]
    for durability in ("normal", "full"):
        floor = steps[f"floor_{durability}"]
        rows.append(
            {
                "name": f"loop_{durability}",
                "description": f'same, SQLiteStore(durability="{durability}")',
                "unit": "µs/step",
                **steps[durability],
                "target": TARGETS[durability],
                "floor": {
                    "description": f"one WAL commit, synchronous={durability.upper()}",
                    "unit": "µs/commit",
                    **floor,
                },
                "over_no_store": steps[durability]["median"] - steps["none"]["median"],
            }
        )
    size = results["bytes"]
    rows.append(
        {
            "name": "bytes_per_step",
            "description": f"bytes/step, unchanged {BLOB_BYTES // 1024} KB field",
            "unit": "B/step",
            "median": size["bytes_per_step"],
            "p90": None,
            "target": TARGETS["bytes"],
            "floor": None,
            **{k: v for k, v in size.items() if k != "bytes_per_step"},
        }
    )
    resume = results["resume"]
    for phase, label in (
        ("startup", "resume in new process: python start-up"),
        ("import", "  import orchestra (+ orchestra.store)"),
        ("compile", "  define + compile the graph"),
        ("open", "  open the store"),
        ("logging", "  configure structlog (its import)"),
        ("first_node", "  resume until the first node runs"),
        ("total", f"  total, spawn to first node ({LOOP_STEPS} checkpoints)"),
    ):
        rows.append(
            {
                "name": f"resume_{phase}",
                "description": label,
                "unit": "ms",
                **resume[phase],
                "target": None,
                "floor": None,
            }
        )
    rows.append(
        {
            "name": "import",
            "description": "import orchestra (fresh interpreter)",
            "unit": "ms",
            **results["import"],
            "target": TARGETS["import"],
            "floor": None,
        }
    )
    for row in rows:
        row["passed"] = None if row["target"] is None else row["median"] <= row["target"]
    return rows


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def render_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    header = ("measurement", "median", "p90", "target", "floor (median)", "x floor", "result")
    lines = []
    for row in rows:
        floor = row["floor"]
        lines.append(
            [
                row["description"],
                f"{number(row['median'])} {row['unit']}",
                number(row["p90"]),
                "-" if row["target"] is None else f"<= {number(row['target'])}",
                "-" if floor is None else f"{number(floor['median'])} {floor['unit']}",
                "-" if floor is None else f"{row['median'] / floor['median']:.2f}",
                {None: "-", True: "PASS", False: "MISS"}[row["passed"]],
            ]
        )
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    versions = env["versions"]
    by_name = {row["name"]: row for row in rows}
    size = by_name["bytes_per_step"]
    out = [
        f"orchestra {versions['orchestra']} ({env['orchestra_revision']}) durable benchmark, "
        f"{env['date']}: Python {env['python']}, SQLite {env['sqlite']}, "
        f"sqlite-utils {versions['sqlite-utils']}, {env['backend']}, {env['cpus']} CPUs",
        f"{env['repeat']} interleaved repetitions (no store, normal, floor, full, floor) after "
        f"a warm-up; {env['logging']}",
        "",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(line) for line in lines),
        "",
        "floor: one autocommit INSERT on a fresh WAL database in the same directory, "
        f"{FLOOR_COMMITS} per sample, the file reused across samples like the stores'.",
        "store cost over no store: "
        f"normal +{by_name['loop_normal']['over_no_store']:.1f} µs/step, "
        f"full +{by_name['loop_full']['over_no_store']:.1f} µs/step.",
        f"bytes/step: {size['used_bytes_growth']} B of pages in use for {LOOP_STEPS} steps "
        f"({size['checkpoints']} checkpoints, {size['snapshots']} of them full snapshots of the "
        f"{size['state_bytes']} B state); file grew {size['file_size_growth']} B.",
        f"resume: medians of {RESUME_SAMPLES} child processes per phase (phases need not add "
        f"up to the total's median); import: {IMPORT_SAMPLES} fresh interpreters.",
    ]
    if env["pythondontwritebytecode"]:
        out.append(
            "PYTHONDONTWRITEBYTECODE is set: orchestra's own modules are compiled from source "
            "at every import (no .pyc), which the import figures include."
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument(
        "--repeat", type=int, default=20, help="timed runs per loop scenario (default 20, min 3)"
    )
    parser.add_argument(
        "--dir", help="directory for the databases (default: the system temp directory)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 3:
        parser.error("--repeat must be at least 3")
    return args


async def measure_in_process(
    args: argparse.Namespace, directory: Path, template: Path
) -> tuple[dict[str, list[float]], dict[str, Any], str]:
    steps = await measure_steps(directory, args.repeat)
    size = await measure_bytes(directory)
    run_id = await make_resumable(template)
    return steps, size, run_id


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    template = directory / "resumable.db"
    steps, size, run_id = anyio.run(
        measure_in_process, args, directory, template, backend=args.backend
    )
    resumes: list[dict[str, float]] = []
    imports: list[float] = []
    # interleaved, so a noisy moment of a shared machine hits both alike
    for i in range(max(RESUME_SAMPLES, IMPORT_SAMPLES)):
        if i < RESUME_SAMPLES:
            resumes.append(resume_sample(template, directory, run_id, args.backend))
        if i < IMPORT_SAMPLES:
            imports.append(import_sample())
    return {
        "steps": {name: stats(values) for name, values in steps.items()},
        "bytes": size,
        "resume": {phase: stats([r[phase] for r in resumes]) for phase in resumes[0]},
        "import": stats(imports),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="orchestra-durable-", dir=args.dir) as tmp:
        directory = Path(tmp)
        try:
            results = measure(args, directory)
        except BenchmarkError as exc:
            print(f"benchmark aborted: {exc}", file=sys.stderr)
            return 2
        env = environment(args, directory)
    rows = build_rows(results)
    if args.json:
        print(json.dumps({"environment": env, "results": rows}, indent=2, ensure_ascii=False))
    else:
        print(render_table(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
