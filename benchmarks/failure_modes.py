"""Benchmark the safeguards against multi-agent failure modes, one *storm* each.

    .venv/bin/python benchmarks/failure_modes.py [--storm loop|budget|conflict|approval|all]
        [--runs N] [--backend asyncio|trio|both] [--agents N] [--accounts 4] [--turns 5]
        [--dir DIR] [--seed 1] [--json]

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

**Budget storm.** One run fans out ``--agents`` copies of one research agent (``Send``) on a
``ScriptedModel``; they share the run's token budget and cost budget (a price registered for
the scripted model). Each agent reads sources with a READ tool for 3 to 8 turns; each model
call sleeps 1-6 ms, so the calls of a step are in flight together. Usage is realistic and
grows with the conversation: a 300-token system prompt, 20-150 tokens of reasoning and a tool
call per turn, 100-600-token tool results, a 100-400-token final answer, ``max_tokens=512``.
Each run draws its limits (30k-150k tokens, $0.10-$0.60) from its seed, so some runs stop on
tokens and some on cost. Every seed runs twice, interleaved:

- ``reserved``: orchestra as shipped (a call reserves its worst case before it is sent);
- ``check-then-call``: the baseline of peers, made here without editing orchestra: the same
  check of the worst case against what is *used*, blind to what calls in flight hold.

Every run's result is checked (status, the meter against the model's own count, reservations
granted against calls made, the stop reason); a wrong result aborts with status 2. The
invariants (no overshoot with reservations, the calls overlapped) are reported and also exit
with status 2 when broken.

**Conflict storm.** ``--agents`` (12) teller agents, all ready in every step, move money
between ``--accounts`` (4) accounts with a WRITE tool ``transfer`` whose resources are both
accounts and which has a real lost-update window (it reads both balances, yields to the
scheduler, then writes what it read plus the change). Each teller, on a seeded
``ScriptedModel``, proposes ``--turns`` (5) batches of 2-4 random transfers, one a turn
(several calls a turn), proposes a transfer that lost once more at its next turn, then
answers. Every seed (``--runs``, 20) runs once per policy, interleaved: no arbitration (the
baseline), ``serialize``, ``first_wins``, ``priority_wins``, ``reject_all``, a custom
arbiter (each agent's first call of a conflict runs) and ``escalate``, answered by a script
through ``app.resume`` with ``Choose`` of the conflict's first call. No approvals, no loop
guard, no store (escalate: a ``MemoryStore``, to resume). Every run is checked (completed,
every teller answered, ok results = transfers the tool ran = tool calls metered); the books
are checked against the transfers that ran: the total (money conserved), every account, and
the writes that overwrote a newer write (lost updates, counted by the tool). Targets, status
2 when missed: no broken books under any arbitration, and broken books without it (else the
storm did not race).

**Approval storm.** ``--runs`` (1,000; 200 with ``--storm all``) runs per mode, each a node
calling an irreversible tool that the default approval policy holds, are started on one
SQLite file (``compile(store=path)``, its default durability ``full``) and stop
``interrupted``; the first 10 are resumed without an answer (they must stop again). Then
another process, ``benchmarks/_approval_worker.py`` (which defines the app), lists the open
requests and answers the runs one after another, alternating ``app.resume(run,
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
import functools
import itertools
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.lowlevel
from _common import BenchmarkError, configure_logging, expect, p90, revision, versions
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Arbitration,
    Budget,
    Choose,
    CompiledGraph,
    Conflict,
    Effect,
    Graph,
    NodeContext,
    RunOutcome,
    RunStatus,
    Send,
    Tool,
    ToolContext,
    append,
    register_price,
    tool,
)
from orchestra.events import LoopDetected, RunFinished, StepCommitted
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.safeguards.budgets import BudgetStop, Price, Spend
from orchestra.safeguards.loops import LoopGuard
from orchestra.store import MemoryStore, SQLiteStore

MODES = ("reserved", "check-then-call")

# -- the budget storm ------------------------------------------------------------------------

MODEL = "storm-model"
PRICE = Price(3.00, 15.00)  # dollars per million input/output tokens, a mid-tier model's
MAX_TOKENS = 512
PROSE = (
    "The committee reviewed the quarterly figures, compared them with the forecast and "
    "noted where the two diverged; each divergence was traced to its source before any "
    "conclusion was drawn. "
) * 40
INSTRUCTIONS = PROSE[: 4 * 300]  # about 300 tokens


def prose(tokens: int) -> str:
    """Text of about ``tokens`` tokens (four characters each, as the estimate counts)."""
    return PROSE[: 4 * tokens]


class Desk(BaseModel):
    findings: Annotated[list[str], append] = []


@tool(effect=Effect.READ)
async def read_source(source: str) -> str:
    """Read one source document."""
    return prose(random.Random(source).randint(100, 600))


class StormModel(ScriptedModel):
    """A scripted research agent: its answers, their sizes and delays come from the seed, the
    task and the turn (not from call order, which differs between backends); counts the
    calls in flight and the usage it reports."""

    def __init__(self, seed: int) -> None:
        super().__init__(self.answer, name=MODEL)
        self.seed = seed
        self.in_flight = 0
        self.peak = 0
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0

    async def complete(self, request: ModelRequest) -> ModelResponse:
        response = await super().complete(request)
        self.calls += 1
        self.input_tokens += response.usage.input_tokens
        self.output_tokens += response.usage.output_tokens
        return response

    async def answer(self, request: ModelRequest) -> ModelResponse | str:
        task = next(json.loads(m.content)["task"] for m in request.messages if m.role == "user")
        turn = request.turn
        rng = random.Random(f"{self.seed}/{task}/{turn}")
        turns = random.Random(f"{self.seed}/{task}").randint(3, 8)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await anyio.sleep(rng.uniform(0.001, 0.006))
        finally:
            self.in_flight -= 1
        if turn + 1 < turns:
            source = f"{self.seed}/{task}/{turn}/{rng.randrange(1000)}"
            call = ToolCall(name="read_source", arguments={"source": source})
            return ModelResponse(text=prose(rng.randint(20, 150)), tool_calls=(call,))
        return prose(rng.randint(100, 400))


def build_storm(model: StormModel, agents: int, budget: Budget) -> CompiledGraph[Desk]:
    async def fan(state: Desk, ctx: NodeContext) -> list[Send]:
        return [Send("researcher", {"task": i, "topic": f"topic {i}"}) for i in range(agents)]

    graph: Graph[Desk] = Graph(Desk, name="budget_storm")
    graph.add_node("fan", fan, targets=["researcher"])
    graph.add_node(
        Agent(
            "researcher",
            model=model,
            tools=[read_source],
            instructions=INSTRUCTIONS,
            output="findings",
            max_tokens=MAX_TOKENS,
        )
    )
    graph.add_edge(START, "fan")
    graph.add_edge("researcher", END)
    return graph.compile(budget=budget)


@dataclass
class Book:
    """What the reservation book did in one run, seen from the patched ``reserve_model``."""

    granted: int = 0
    refused: int = 0
    reserved_tokens: int = 0
    # what the run's budgets had free (limit - used - held by calls in flight) when the
    # first call was refused
    free_tokens: float | None = None
    free_usd: float | None = None


@contextmanager
def watched_reservations(book: Book, *, blind: bool) -> Iterator[None]:
    """Count model-call reservations into ``book`` for the duration of one run; with
    ``blind``, make the check see only what is used (check-then-call), not what calls in
    flight hold. orchestra itself is not edited: ``Spend.reserve_model`` is swapped and put
    back."""
    original = Spend.reserve_model

    def check_then_call(
        spend: Spend, node: str, prompt_tokens: int, max_output_tokens: int, price: Price | None
    ) -> Any:
        held = spend.reserved
        spend.reserved = {}  # the same arithmetic, with nothing held by calls in flight
        try:
            reservation = original(spend, node, prompt_tokens, max_output_tokens, price)
        finally:
            added, spend.reserved = spend.reserved, held
        for key, amounts in added.items():  # still held, so that release() balances
            into = held.setdefault(key, dict.fromkeys(amounts, 0.0))
            for name, amount in amounts.items():
                into[name] += amount
        return reservation

    reserve = check_then_call if blind else original

    def reserve_model(
        spend: Spend, node: str, prompt_tokens: int, max_output_tokens: int, price: Price | None
    ) -> Any:
        try:
            reservation = reserve(spend, node, prompt_tokens, max_output_tokens, price)
        except BudgetStop:
            if not book.refused:
                meter, held, run = spend.meter, spend.reserved.get(None, {}), spend.run
                if run.tokens is not None:
                    used = meter.input_tokens + meter.output_tokens
                    book.free_tokens = run.tokens - used - held.get("tokens", 0.0)
                if run.cost_usd is not None:
                    book.free_usd = run.cost_usd - meter.cost_usd - held.get("cost_usd", 0.0)
            book.refused += 1
            raise
        book.granted += 1
        book.reserved_tokens += prompt_tokens + max_output_tokens
        return reservation

    Spend.reserve_model = reserve_model  # type: ignore[method-assign]
    try:
        yield
    finally:
        Spend.reserve_model = original  # type: ignore[method-assign]


@dataclass
class StormRun:
    """One run of the budget storm, checked."""

    seed: int
    mode: str
    status: str
    tripped: str | None  # "tokens" or "cost": the budget named in the stop reason
    refusal: bool  # stopped by a refused call, not by the check at a step's start
    token_limit: int
    cost_limit: float
    tokens: int
    cost_usd: float
    over_tokens: int
    over_usd: float
    used_of_tripped: float | None  # used / limit of the tripped budget at stop
    free_at_refusal: float | None  # free / limit of the tripped budget at the first refusal
    returned: float  # share of reserved tokens not used when the calls settled
    steps: int
    model_calls: int
    tool_calls: int
    refused: int
    peak_in_flight: int
    wall_ms: float


def limits(seed: int) -> tuple[int, float]:
    rng = random.Random(seed)
    # drawn independently, so either may trip first; a whole run (no limits) uses
    # 160k-230k tokens and $0.62-$0.85
    return rng.randint(30_000, 150_000), round(rng.uniform(0.10, 0.60), 4)


async def storm_run(seed: int, mode: str, agents: int) -> StormRun:
    token_limit, cost_limit = limits(seed)
    model = StormModel(seed)
    app = build_storm(model, agents, Budget(tokens=token_limit, cost_usd=cost_limit))
    book = Book()
    with watched_reservations(book, blind=mode == "check-then-call"):
        began = time.perf_counter()
        outcome = await app.run(Desk())
        wall = time.perf_counter() - began
    return check_storm_run(outcome, seed, mode, agents, model, book, wall)


def check_storm_run(
    outcome: RunOutcome[Desk],
    seed: int,
    mode: str,
    agents: int,
    model: StormModel,
    book: Book,
    wall: float,
) -> StormRun:
    """Check one run's result against what the model and the reservation book saw."""
    token_limit, cost_limit = limits(seed)
    usage, reason = outcome.usage, outcome.stop_reason or ""
    where = f"seed {seed}, {mode}"
    expect(f"{where}: error", outcome.error, None)
    expect(f"{where}: model calls (meter vs model)", usage.model_calls, model.calls)
    expect(f"{where}: input tokens (meter vs model)", usage.input_tokens, model.input_tokens)
    expect(f"{where}: output tokens (meter vs model)", usage.output_tokens, model.output_tokens)
    cost = PRICE.cost(model.input_tokens, model.output_tokens)
    if abs(usage.cost_usd - cost) > 1e-9:
        raise BenchmarkError(f"{where}: cost {usage.cost_usd!r}, priced {cost!r}")
    expect(f"{where}: reservations granted vs calls made", book.granted, model.calls)
    tripped, refusal = None, False
    if outcome.status is RunStatus.BUDGET_EXCEEDED:
        # either a call's reservation did not fit (the call was not made), or the usage had
        # already reached a limit when the next step was about to start
        refusal = "the call was not made" in reason
        if refusal != (book.refused > 0):
            raise BenchmarkError(f"{where}: {book.refused} refused calls, stop: {reason!r}")
        if "run token budget" in reason or reason.startswith("token budget exhausted"):
            tripped = "tokens"
        elif "run cost budget" in reason or reason.startswith("cost budget exhausted"):
            tripped = "cost"
        else:
            raise BenchmarkError(f"{where}: stopped by another budget: {reason!r}")
        if len(outcome.state.findings) >= agents:
            raise BenchmarkError(f"{where}: every agent finished, yet the run was stopped")
    elif outcome.status is RunStatus.COMPLETED:
        expect(f"{where}: refused calls of a completed run", book.refused, 0)
        expect(f"{where}: findings", len(outcome.state.findings), agents)
    else:
        raise BenchmarkError(f"{where}: status {outcome.status}: {reason}")
    used_of_tripped = free_at_refusal = None
    if tripped == "tokens":
        used_of_tripped = usage.tokens / token_limit
        if book.free_tokens is not None and refusal:
            free_at_refusal = book.free_tokens / token_limit
    elif tripped == "cost":
        used_of_tripped = usage.cost_usd / cost_limit
        if book.free_usd is not None and refusal:
            free_at_refusal = book.free_usd / cost_limit
    return StormRun(
        seed=seed,
        mode=mode,
        status=str(outcome.status),
        tripped=tripped,
        refusal=refusal,
        token_limit=token_limit,
        cost_limit=cost_limit,
        tokens=usage.tokens,
        cost_usd=usage.cost_usd,
        over_tokens=max(usage.tokens - token_limit, 0),
        over_usd=max(usage.cost_usd - cost_limit, 0.0),
        used_of_tripped=used_of_tripped,
        free_at_refusal=free_at_refusal,
        returned=1 - usage.tokens / book.reserved_tokens if book.reserved_tokens else 0.0,
        steps=outcome.steps,
        model_calls=usage.model_calls,
        tool_calls=usage.tool_calls,
        refused=book.refused,
        peak_in_flight=model.peak,
        wall_ms=wall * 1e3,
    )


async def budget_storm_runs(runs: int, agents: int, seed: int) -> list[StormRun]:
    """Run every seed in both modes, interleaved (A B A B ...), after a short warm-up."""
    register_price(
        MODEL,
        input_per_million=PRICE.input_per_million,
        output_per_million=PRICE.output_per_million,
    )
    for mode in MODES:  # warm-up: imports, compile caches, first-call costs
        await storm_run(seed - 1, mode, agents)
    done: list[StormRun] = []
    for n in range(runs):
        for mode in MODES:
            done.append(await storm_run(seed + n, mode, agents))
    return done


def summarize_storm(runs: list[StormRun]) -> dict[str, Any]:
    stopped = [r for r in runs if r.tripped is not None]
    used = [r.used_of_tripped for r in stopped if r.used_of_tripped is not None]
    free = [r.free_at_refusal for r in runs if r.free_at_refusal is not None]
    walls = [r.wall_ms for r in runs]
    return {
        "runs": len(runs),
        "stopped_by_tokens": sum(r.tripped == "tokens" for r in runs),
        "stopped_by_cost": sum(r.tripped == "cost" for r in runs),
        "completed": sum(r.status == "completed" for r in runs),
        "stopped_by_a_refused_call": sum(r.refusal for r in runs),
        "runs_over_a_limit": sum(r.over_tokens > 0 or r.over_usd > 1e-9 for r in runs),
        "max_tokens_over": max(r.over_tokens for r in runs),
        "total_tokens_over": sum(r.over_tokens for r in runs),
        "max_usd_over": max(r.over_usd for r in runs),
        "total_usd_over": sum(r.over_usd for r in runs),
        "refused_calls": sum(r.refused for r in runs),
        "median_refused_per_run": statistics.median(r.refused for r in runs),
        "model_calls": sum(r.model_calls for r in runs),
        "median_model_calls_per_run": statistics.median(r.model_calls for r in runs),
        "median_steps_per_run": statistics.median(r.steps for r in runs),
        "tool_calls": sum(r.tool_calls for r in runs),
        "median_unused": 1 - statistics.median(used) if used else None,
        "min_unused": 1 - max(used) if used else None,
        "max_unused": 1 - min(used) if used else None,
        "median_free_at_refusal": statistics.median(free) if free else None,
        "median_returned": statistics.median(r.returned for r in runs),
        "peak_in_flight": max(r.peak_in_flight for r in runs),
        "median_peak_in_flight": statistics.median(r.peak_in_flight for r in runs),
        "median_wall_ms": statistics.median(walls),
        "p90_wall_ms": p90(walls),
    }


def budget_storm(args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """Run the budget storm on each backend; return its summaries and broken invariants."""
    summaries: dict[str, dict[str, Any]] = {}
    every: list[dict[str, Any]] = []
    failures: list[str] = []
    for backend in backends:
        runs = anyio.run(budget_storm_runs, args.runs, args.agents, args.seed, backend=backend)
        every.extend({"backend": backend, **asdict(r)} for r in runs)
        for mode in MODES:
            summary = summarize_storm([r for r in runs if r.mode == mode])
            summaries[f"{backend}/{mode}"] = summary
            if summary["peak_in_flight"] < 2:
                failures.append(f"{backend}, {mode}: the calls never overlapped")
        held = summaries[f"{backend}/reserved"]
        if held["runs_over_a_limit"]:
            failures.append(
                f"{backend}, reserved: {held['runs_over_a_limit']} runs passed a limit (max "
                f"{held['max_tokens_over']:,} tokens, ${held['max_usd_over']:.6f} over)"
            )
    return {"summaries": summaries, "runs": every, "failures": failures}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


STORM_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("runs (stopped on tokens / cost / completed)",
     lambda s: f"{s['runs']} ({s['stopped_by_tokens']}/{s['stopped_by_cost']}/{s['completed']})"),
    ("  stopped by a refused call", lambda s: f"{s['stopped_by_a_refused_call']}"),
    ("runs over a hard limit", lambda s: f"{s['runs_over_a_limit']}"),
    ("tokens over the limit: max / total",
     lambda s: f"{s['max_tokens_over']:,} / {s['total_tokens_over']:,}"),
    ("$ over the limit: max / total",
     lambda s: f"${s['max_usd_over']:.4f} / ${s['total_usd_over']:.4f}"),
    ("calls refused: total (median/run)",
     lambda s: f"{s['refused_calls']} ({s['median_refused_per_run']:g})"),
    ("model calls made: total (median/run)",
     lambda s: f"{s['model_calls']:,} ({s['median_model_calls_per_run']:g})"),
    ("steps per run: median", lambda s: f"{s['median_steps_per_run']:g}"),
    ("tripped limit left unused at stop: median",
     lambda s: pct(s["median_unused"])),
    ("  min..max (negative: over the limit)",
     lambda s: f"{pct(s['min_unused'])}..{pct(s['max_unused'])}"),
    ("  free when the first call was refused: median",
     lambda s: pct(s["median_free_at_refusal"])),
    ("reserved tokens returned at settlement: median",
     lambda s: pct(s["median_returned"])),
    ("calls in flight at once: max (median)",
     lambda s: f"{s['peak_in_flight']} ({s['median_peak_in_flight']:g})"),
    ("wall time per run: median (p90)",
     lambda s: f"{s['median_wall_ms']:.0f} ms ({s['p90_wall_ms']:.0f})"),
)  # fmt: skip


def print_budget_storm(result: dict[str, Any], args: argparse.Namespace) -> None:
    columns = list(result["summaries"])
    print(
        f"budget storm: {args.agents} agents per run sharing one token and one cost budget, "
        f"{args.runs} runs per backend and mode (seeds {args.seed}..{args.seed + args.runs - 1})"
    )
    width = max(len(label) for label, _ in STORM_ROWS)
    cells = [[render(result["summaries"][c]) for _, render in STORM_ROWS] for c in columns]
    sizes = [max(len(c), *(len(x) for x in col)) for c, col in zip(columns, cells, strict=True)]
    print(f"{'':<{width}}  " + "  ".join(f"{c:>{n}}" for c, n in zip(columns, sizes, strict=True)))
    print(f"{'-' * width}  " + "  ".join("-" * n for n in sizes))
    for i, (label, _) in enumerate(STORM_ROWS):
        row = "  ".join(f"{col[i]:>{n}}" for col, n in zip(cells, sizes, strict=True))
        print(f"{label:<{width}}  {row}")
    verdict = "FAIL" if result["failures"] else "PASS"
    print(f"target: 0 tokens and $0 over the hard limits with reservations: {verdict}")


# -- the loop storm --------------------------------------------------------------------------

PREFIX = 40  # a loop run first progresses for 0 to this many steps, drawn from its seed
LOOP_CAP = 100  # then has this many steps to be caught (its step budget): else it is missed
NO_PROGRESS = 8  # the stuck cases' LoopGuard(no_progress=...)
PROGRESS_GUARD = LoopGuard(no_progress=NO_PROGRESS, progress=("done",))
REPETITIONS = 3  # target: a repeated state or call is caught by the time it is seen this often


class Work(BaseModel):
    """The state of every loop-storm graph; ``done`` is the stuck cases' progress field."""

    done: int = 0
    tries: int = 0
    stage: str = ""
    draft: str = ""
    review: str = ""
    attempt: str = ""
    answer: str | None = None


@dataclass
class Script:
    """One run's script, and what its nodes and model did (the run's ground truth)."""

    seed: int
    rng: random.Random
    prefix: int | None  # a loop run loops after this step; None: a legitimate run
    step: int = 0  # the last committed step, kept by the stream's reader
    last_change: int = 0  # the last step that changed the state (stuck: the progress field)
    first_repeat: int | None = None  # the step of the first of the repeated calls
    expect: dict[str, Any] = field(default_factory=dict)  # each field's last written value
    model_calls: int = 0
    tool_calls: int = 0  # calls with valid arguments (the ones that run)
    clock_ok: bool = True

    @property
    def now(self) -> int:
        """The step running now: the graphs run one task a step, and the stream's reader
        resumes the run only after it has read the last step's events."""
        return self.step + 1

    def looping(self) -> bool:
        return self.prefix is not None and self.now > self.prefix

    def wrote(self, name: str, old: Any, new: Any, *, marks: bool = True) -> None:
        """Note a write; one that changes the field and ``marks`` moves ``last_change``."""
        self.expect[name] = new
        if marks and new != old:
            self.last_change = self.now


@tool(effect=Effect.READ)
async def lookup(query: str) -> str:
    """Look a term up."""
    return f"notes on {query}"


@tool(effect=Effect.READ)
async def search(query: str, page: int = 1) -> str:
    """Search the web."""
    return f"results {page} for {query}"


@tool(effect=Effect.READ)
async def read_page(url: str, page: int) -> str:
    """Read one page of a document."""
    return f"page {page} of {url}"


WORKSPACES: dict[str, dict[str, str]] = {}  # run id -> path -> content


@tool(effect=Effect.WRITE)
async def write_file(path: str, content: str, ctx: ToolContext) -> str:
    """Write a file of the workspace."""
    WORKSPACES.setdefault(ctx.run_id, {})[path] = content
    return f"wrote {len(content)} characters to {path}"


@tool(effect=Effect.READ)
async def run_tests(ctx: ToolContext) -> str:
    """Run the test suite."""
    edits = len(WORKSPACES.get(ctx.run_id, {}))
    return f"{max(40 - 7 * edits, 0)} of 40 tests failing"


def visit_of(request: ModelRequest) -> tuple[int, int, dict[str, Any]]:
    """An agent's visit (from 1), its turn within the visit (from 0), and the visit's input
    (the state, as the agent was given it)."""
    visit, turn, given = 0, 0, "{}"
    for message in request.messages:
        if message.role == "user" and message.name == "input":
            visit, turn, given = visit + 1, 0, message.content
        elif message.role == "assistant":
            turn += 1
    return visit, turn, json.loads(given)


def build_cycle(script: Script) -> Graph[Work]:
    """Plain nodes a -> b (-> c -> d) -> a; each sets ``stage``, a also counts ``done``. A
    loop run's nodes change nothing after its prefix; a legitimate run ends after 15-40
    rounds."""
    size = script.rng.randint(2, 4)
    rounds = script.rng.randint(15, 40)
    names = ["a", "b", "c", "d"][:size]

    def node(name: str) -> Callable[[Work, NodeContext], Awaitable[dict[str, Any] | None]]:
        async def visit(state: Work, ctx: NodeContext) -> dict[str, Any] | None:
            script.clock_ok = script.clock_ok and ctx.step == script.now
            if script.looping():
                return None
            update: dict[str, Any] = {"stage": name}
            script.wrote("stage", state.stage, name)
            if name == "a":
                update["done"] = state.done + 1
                script.wrote("done", state.done, state.done + 1)
            return update

        return visit

    def again(state: Work) -> str:
        return "a" if script.prefix is not None or state.done < rounds else END

    graph: Graph[Work] = Graph(Work, name="cycle")
    for name in names:
        graph.add_node(name, node(name))
    graph.add_edge(START, "a")
    for one, two in itertools.pairwise(names):
        graph.add_edge(one, two)
    graph.add_route(names[-1], again, targets=["a", END])
    return graph


def build_ping_pong(script: Script, lookups: tuple[int, int]) -> Graph[Work]:
    """A writer and a reviewer agent hand the work back and forth, each first making
    ``lookups`` (a range) distinct lookups a visit. The writer writes a new draft each
    visit, the reviewer "needs work"; a loop run's agents write back what is there after its
    prefix; a legitimate run's reviewer approves at its 15th-30th visit."""
    rounds = script.rng.randint(15, 30)

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        agent = request.agent or ""
        visit, turn, given = visit_of(request)
        if turn < random.Random(f"{script.seed}/{agent}/{visit}").randint(*lookups):
            script.tool_calls += 1
            call = ToolCall(name="lookup", arguments={"query": f"{agent} {visit}.{turn}"})
            return ModelResponse(tool_calls=(call,))
        name = "draft" if agent == "writer" else "review"
        old = given[name]
        if script.looping():
            new = old
        elif agent == "writer":
            new = f"draft {visit}"
        else:
            new = "approved" if script.prefix is None and visit >= rounds else "needs work"
        script.wrote(name, old, new)
        return new

    model = ScriptedModel(answer)
    graph: Graph[Work] = Graph(Work, name="ping_pong")
    graph.add_node(Agent("writer", model=model, tools=[lookup], output="draft"))
    graph.add_node(Agent("reviewer", model=model, tools=[lookup], output="review"))
    graph.add_edge(START, "writer")
    graph.add_edge("writer", "reviewer")
    graph.add_route(
        "reviewer",
        lambda state: END if state.review == "approved" else "writer",
        targets=["writer", END],
    )
    return graph


def one_agent(name: str, model: ScriptedModel, tools: list[Tool]) -> Graph[Work]:
    graph: Graph[Work] = Graph(Work, name=name)
    graph.add_node(Agent("agent", model=model, tools=tools, output="answer", max_turns=1000))
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    return graph


def build_tool_repeat(script: Script, invalid: bool = False) -> Graph[Work]:
    """One agent researching with 1-2 calls a turn (search, read_page, lookup), all with new
    arguments; a legitimate run re-reads a page now and then (never a third time) and
    answers at its 40th-80th turn. After its prefix a loop run's agent calls
    ``read_page(url=.../status, page=1)`` every turn, alone or beside a new call, its
    arguments in either order; ``invalid``: with ``page="first"``, which fails validation."""
    turns = script.rng.randint(40, 80)
    fresh = itertools.count()
    once: list[ToolCall] = []  # calls made once: a legitimate agent may make one again

    def new_call(rng: random.Random) -> ToolCall:
        n = next(fresh)
        name = rng.choice(("search", "read_page", "lookup"))
        if name == "search":
            arguments: dict[str, Any] = {"query": f"topic {n}", "page": 1 + n % 3}
        elif name == "read_page":
            arguments = {"url": f"https://example.org/{n}", "page": 1}
        else:
            arguments = {"query": f"term {n}"}
        call = ToolCall(name=name, arguments=arguments)
        once.append(call)
        return call

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        turn = request.turn
        rng = random.Random(f"{script.seed}/{turn}")
        if script.prefix is None and turn >= turns:
            script.wrote("answer", None, "the research is done")
            return "the research is done"
        if script.looping():
            page: Any = "first" if invalid else 1
            stuck = {"url": "https://example.org/status", "page": page}
            if rng.random() < 0.5:
                stuck = dict(reversed(stuck.items()))
            calls = [ToolCall(name="read_page", arguments=stuck)]
            if rng.random() < 0.5:
                calls.insert(rng.randint(0, 1), new_call(rng))
            if script.first_repeat is None:
                script.first_repeat = script.now
            script.tool_calls += len(calls) - 1 if invalid else len(calls)
        else:
            calls = []
            if script.prefix is None and once and rng.random() < 0.15:
                calls.append(once.pop(rng.randrange(len(once))))  # a second look, no third
            calls.extend(new_call(rng) for _ in range(rng.randint(1, 2)))
            script.tool_calls += len(calls)
        return ModelResponse(tool_calls=tuple(calls))

    return one_agent("tool_repeat", ScriptedModel(answer), [search, read_page, lookup])


def build_edit_test(script: Script) -> Graph[Work]:
    """A coding agent alternates ``write_file`` (a new revision each time) and
    ``run_tests()``, whose result changes with every edit, for 10-25 rounds, then answers."""
    rounds = script.rng.randint(10, 25)

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        turn = request.turn
        if turn >= 2 * rounds:
            script.wrote("answer", None, "all tests pass")
            return "all tests pass"
        script.tool_calls += 1
        if turn % 2:
            return ModelResponse(tool_calls=(ToolCall(name="run_tests", arguments={}),))
        path, content = f"src/module_{turn // 2 % 6}.py", f"# revision {turn // 2}\n"
        call = ToolCall(name="write_file", arguments={"path": path, "content": content})
        return ModelResponse(tool_calls=(call,))

    return one_agent("edit_test", ScriptedModel(answer), [write_file, run_tests])


def build_stuck(script: Script) -> Graph[Work]:
    """A worker agent writes an attempt (after 0-1 lookups), a plain ``check`` node counts
    ``tries`` and, for a good attempt, ``done`` (the progress field). Attempts fail 0-3
    times in a row, never for more than NO_PROGRESS steps; a legitimate run ends at its
    10th-20th good attempt. After its prefix a loop run's attempts all fail (each one
    different, so the state keeps changing)."""
    goal = script.rng.randint(10, 20)
    plan: list[tuple[int, bool]] = []  # per worker visit: lookups, whether the attempt passes
    while len(plan) < 2 * (PREFIX + LOOP_CAP):
        looks = [script.rng.randint(0, 1) for _ in range(script.rng.randint(1, 4))]
        if sum(2 + n for n in looks) <= NO_PROGRESS:  # steps from one progress to the next
            plan.extend((n, i == len(looks) - 1) for i, n in enumerate(looks))

    def answer(request: ModelRequest) -> ModelResponse | str:
        script.model_calls += 1
        visit, turn, given = visit_of(request)
        looks, good = plan[visit - 1]
        if turn < looks:
            script.tool_calls += 1
            call = ToolCall(name="lookup", arguments={"query": f"hint {visit}"})
            return ModelResponse(tool_calls=(call,))
        good = good and not script.looping()
        text = f"attempt {visit} ({'good' if good else 'bad'})"
        script.wrote("attempt", given["attempt"], text, marks=False)
        return text

    async def check(state: Work, ctx: NodeContext) -> dict[str, int]:
        script.clock_ok = script.clock_ok and ctx.step == script.now
        script.wrote("tries", state.tries, state.tries + 1, marks=False)
        if not state.attempt.endswith("(good)"):
            return {"tries": state.tries + 1}
        script.wrote("done", state.done, state.done + 1)
        return {"tries": state.tries + 1, "done": state.done + 1}

    graph: Graph[Work] = Graph(Work, name="stuck")
    graph.add_node(Agent("worker", model=ScriptedModel(answer), tools=[lookup], output="attempt"))
    graph.add_node("check", check)
    graph.add_edge(START, "worker")
    graph.add_edge("worker", "check")
    graph.add_route(
        "check",
        lambda state: END if script.prefix is None and state.done >= goal else "worker",
        targets=["worker", END],
    )
    return graph


@dataclass(frozen=True)
class Case:
    """One kind of run of the loop storm: a loop to catch, or a legitimate run to leave be."""

    kind: str
    name: str
    loop: bool
    build: Callable[[Script], Graph[Work]]
    detector: str | None = None  # the detector meant to catch the loop
    guard: LoopGuard | None = None  # None: compile's default


CASES = (
    Case("cycle", "loop: 2-4 nodes, nothing changes", True, build_cycle, "repeats"),
    Case("cycle", "legit: revisits change the state", False, build_cycle),
    Case(
        "ping-pong",
        "loop: 2 agents, 0-2 lookups a visit",
        True,
        functools.partial(build_ping_pong, lookups=(0, 2)),
        "repeats",
    ),
    Case(
        "ping-pong",
        "loop: 2 agents, 4-5 lookups a visit",
        True,
        functools.partial(build_ping_pong, lookups=(4, 5)),
        "repeats",
    ),
    Case(
        "ping-pong",
        "legit: new draft each round",
        False,
        functools.partial(build_ping_pong, lookups=(0, 2)),
    ),
    Case("tool repeat", "loop: the same call again", True, build_tool_repeat, "same_call"),
    Case(
        "tool repeat",
        "loop: the same invalid call again",
        True,
        functools.partial(build_tool_repeat, invalid=True),
        "same_call",
    ),
    Case("tool repeat", "legit: new calls, a few re-reads", False, build_tool_repeat),
    Case("tool repeat", "legit: edit, run the tests, again", False, build_edit_test),
    Case(
        "stuck",
        "loop: attempts change, done never",
        True,
        build_stuck,
        "no_progress",
        PROGRESS_GUARD,
    ),
    Case(
        "stuck",
        f"legit: done at most every {NO_PROGRESS} steps",
        False,
        build_stuck,
        guard=PROGRESS_GUARD,
    ),
)


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
    for backend in dict.fromkeys(key.split("/")[0] for key in result["summaries"]):
        rows = [
            [render(s) for _, render in LOOP_COLUMNS]
            for key, s in result["summaries"].items()
            if key.split("/")[0] == backend
        ]
        heads = [head for head, _ in LOOP_COLUMNS]
        sizes = [max(len(head), *(len(row[i]) for row in rows)) for i, head in enumerate(heads)]
        print(f"\n{backend}")
        for cells in (heads, ["-" * n for n in sizes], *rows):
            left = [f"{cell:<{n}}" for cell, n in zip(cells[:2], sizes, strict=False)]
            right = [f"{cell:>{n}}" for cell, n in zip(cells[2:], sizes[2:], strict=True)]
            print("  ".join(left + right))
    verdict = "FAIL" if result["failures"] else "PASS"
    print(
        f"targets: every loop caught, within {REPETITIONS} repetitions (stuck: "
        f"{NO_PROGRESS} steps), no legitimate run flagged: {verdict}"
    )


# -- the conflict storm ----------------------------------------------------------------------

OPENING = 1_000  # every account's opening balance


@dataclass
class Bank:
    """One run's accounts, kept outside the state like a real database, and what the
    ``transfer`` tool saw happen to them."""

    balances: list[int]
    versions: list[int]  # bumped by every write: a write over a newer version lost an update
    lost_updates: int = 0  # writes that overwrote a write made after their read
    applied: list[tuple[int, int, int]] = field(default_factory=list)  # transfers that ran


BANKS: dict[str, Bank] = {}  # run id -> its bank


def accounts(args: dict[str, Any]) -> set[str]:
    return {f"acct:{args['src']}", f"acct:{args['dst']}"}


@tool(effect=Effect.WRITE, resources=accounts)
async def transfer(src: int, dst: int, amount: int, ctx: ToolContext) -> dict[str, int]:
    """Move ``amount`` from account ``src`` to account ``dst``; return both new balances."""
    bank = BANKS[ctx.run_id]
    if src == dst or not (0 <= src < len(bank.balances) and 0 <= dst < len(bank.balances)):
        raise ValueError(f"no transfer from account {src} to account {dst}")
    # read, then write what was read plus the change: a read-modify-write with a window
    # between the two (one pass of the scheduler; a database round trip is longer), the
    # way a tool over a store without transactions is written
    have = bank.balances[src], bank.balances[dst]
    seen = bank.versions[src], bank.versions[dst]
    await anyio.lowlevel.checkpoint()
    bank.lost_updates += (bank.versions[src] != seen[0]) + (bank.versions[dst] != seen[1])
    bank.balances[src], bank.balances[dst] = have[0] - amount, have[1] + amount
    bank.versions[src] += 1
    bank.versions[dst] += 1
    bank.applied.append((src, dst, amount))
    return {"src": have[0] - amount, "dst": have[1] + amount}


@dataclass
class Tally:
    """What one teller agent's conversation says happened to its transfers."""

    planned: int = 0
    made: int = 0  # transfers with an ok result
    ok: int = 0  # ok results (a transfer has at most one)
    conflicts: int = 0  # conflict results (a transfer retried may lose twice)
    other: int = 0  # any other status (none expected)
    turns: int = 0


class TellerModel(ScriptedModel):
    """Teller agents on a script: each plans ``turns`` batches of 2-4 random transfers
    between distinct accounts (amounts 1-100, all from the seed and its name) and proposes
    one batch a turn. It re-plans once: a transfer of its last batch that lost (a
    ``conflict`` result) is proposed again at its next turn, beside the next batch, and
    dropped if it loses again. It answers when nothing is left to propose: after ``turns``
    turns, or ``turns + 1`` when its last batch lost a transfer."""

    def __init__(self, seed: int, agents: list[str], accounts: int, turns: int) -> None:
        super().__init__(self.answer, name="teller-model")
        self.turns = turns
        self.plans: dict[str, list[list[dict[str, int]]]] = {}
        for agent in agents:
            rng = random.Random(f"{seed}/{agent}")
            self.plans[agent] = [
                [
                    dict(zip(("src", "dst"), rng.sample(range(accounts), 2), strict=True))
                    | {"amount": rng.randint(1, 100)}
                    for _ in range(rng.randint(2, 4))
                ]
                for _ in range(turns)
            ]
        self.tallies: dict[str, Tally] = {}

    def answer(self, request: ModelRequest) -> ModelResponse | str:
        agent, turn = request.agent or "", request.turn
        plan = self.plans[agent]
        flat = [t for batch in plan for t in batch]
        starts = list(itertools.accumulate(map(len, plan), initial=0))  # batch -> first index
        tally = Tally(planned=len(flat), turns=turn + 1)
        made: set[int] = set()
        retry = []
        for message in request.messages:
            if message.role != "tool":
                continue
            _, index, asked = (message.tool_call_id or "").split(":")
            status = json.loads(message.content).get("status", "ok")
            if status == "ok":
                tally.ok += 1
                made.add(int(index))
            elif status == "conflict":
                tally.conflicts += 1
                # lost at its first proposal (its batch's turn), in the last turn: retried
                if int(asked) == turn - 1 and starts[turn - 1] <= int(index) < starts[turn]:
                    retry.append(int(index))
            else:
                tally.other += 1
        tally.made = len(made)
        new = list(range(starts[turn], starts[turn + 1])) if turn < self.turns else []
        if not (retry or new):
            self.tallies[agent] = tally
            return f"made {tally.made} of {tally.planned} transfers"
        calls = tuple(
            ToolCall(name="transfer", arguments=flat[n], id=f"{agent}:{n}:{turn}")
            for n in retry + new
        )
        return ModelResponse(tool_calls=calls)


def one_per_agent(conflict: Conflict) -> list[str]:
    """A custom arbiter: each agent's first call in the conflict runs (the agents in
    priority order, one at a time where they conflict); its other calls wait for its next
    turn. No agent can crowd the others out."""
    seen: set[str] = set()
    chosen = []
    for call in conflict.calls:
        if call.caller not in seen:
            seen.add(call.caller)
            chosen.append(call.key)
    return chosen


# policy name -> the arbitration compiled (None: the baseline, no arbitration)
ARBITRATIONS: dict[str, Arbitration | None] = {
    "none": None,
    "serialize": Arbitration(),
    "first_wins": Arbitration(policy="first_wins"),
    "priority_wins": Arbitration(policy="priority_wins"),
    "reject_all": Arbitration(policy="reject_all"),
    "custom": Arbitration(policy=one_per_agent),
    "escalate": Arbitration(policy="escalate"),
}


def build_tellers(
    model: TellerModel, agents: list[str], policy: str, turns: int
) -> CompiledGraph[Desk]:
    """The tellers as agents all started at once (``START -> tellerNN -> END``), with
    priorities 0-2 (``tellerNN``: NN % 3), so every step's calls meet in one act phase."""
    graph: Graph[Desk] = Graph(Desk, name="conflict_storm")
    for i, name in enumerate(agents):
        graph.add_node(
            Agent(
                name,
                model=model,
                tools=[transfer],
                output="findings",
                priority=i % 3,
                max_turns=turns + 2,
            )
        )
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    # escalate needs a store to resume from; every other policy runs without one. The
    # default loop guard watches (a teller proposing a lost transfer once more is not a
    # repetition: a conflict's result depends on the other calls)
    store = MemoryStore() if policy == "escalate" else None
    return graph.compile(store=store, approvals=None, arbitration=ARBITRATIONS[policy])


@dataclass
class ConflictRun:
    """One run of the conflict storm, checked."""

    seed: int
    policy: str
    steps: int
    interrupts: int  # escalate: conflict requests answered
    planned: int
    made: int  # transfers made (distinct)
    calls: int  # tool calls proposed (retries included)
    ran: int  # calls that ran
    lost: int  # calls that lost (conflict results)
    lost_updates: int  # writes that overwrote another's write made after their read
    drift: int  # total balance minus the total opening balance
    wrong_accounts: int  # accounts whose balance is not what the transfers that ran make it
    wall_ms: float

    @property
    def violated(self) -> bool:
        return bool(self.drift or self.lost_updates or self.wrong_accounts)


async def conflict_run(
    seed: int, policy: str, agents: int, accounts: int, turns: int
) -> ConflictRun:
    names = [f"teller{i:02d}" for i in range(agents)]
    model = TellerModel(seed, names, accounts, turns)
    app = build_tellers(model, names, policy, turns)
    run_id = f"conflict-storm-{seed}-{policy}"
    bank = BANKS[run_id] = Bank([OPENING] * accounts, [0] * accounts)
    interrupts = resumes = 0
    began = time.perf_counter()
    try:
        outcome = await app.run(Desk(), run_id=run_id)
        while outcome.status is RunStatus.INTERRUPTED and resumes <= turns + 2:
            # escalate: a person who always lets the first call (highest priority) run
            answers = {}
            for request in outcome.pending:
                if request.kind != "conflict":
                    raise BenchmarkError(f"seed {seed}, {policy}: a {request.kind} request")
                answers[request.id] = Choose(request.payload["calls"][0]["key"])
            interrupts += len(answers)
            resumes += 1
            outcome = await app.resume(run_id, answers=answers)
        wall = time.perf_counter() - began
    finally:
        BANKS.pop(run_id, None)
    return check_conflict_run(outcome, seed, policy, names, model, bank, interrupts, wall)


def check_conflict_run(
    outcome: RunOutcome[Desk],
    seed: int,
    policy: str,
    names: list[str],
    model: TellerModel,
    bank: Bank,
    interrupts: int,
    wall: float,
) -> ConflictRun:
    """Check one run's result against what its tellers and its bank saw."""
    where = f"seed {seed}, {policy}"
    expect(f"{where}: error", outcome.error, None)
    expect(f"{where}: status", outcome.status, RunStatus.COMPLETED)
    expect(f"{where}: tellers that answered", sorted(model.tallies), names)
    expect(f"{where}: answers in the state", len(outcome.state.findings), len(names))
    tallies = list(model.tallies.values())
    ok = sum(t.ok for t in tallies)
    lost = sum(t.conflicts for t in tallies)
    expect(f"{where}: results neither ok nor conflict", sum(t.other for t in tallies), 0)
    expect(f"{where}: ok results vs transfers the tool ran", ok, len(bank.applied))
    expect(f"{where}: tool calls metered vs run", outcome.usage.tool_calls, ok)
    if policy in ("none", "serialize"):
        expect(f"{where}: calls that lost", lost, 0)
        expect(f"{where}: transfers unmade", sum(t.planned - t.made for t in tallies), 0)
    expect(f"{where}: interrupts", interrupts > 0, policy == "escalate")
    expected = [OPENING] * len(bank.balances)
    for src, dst, amount in bank.applied:
        expected[src] -= amount
        expected[dst] += amount
    return ConflictRun(
        seed=seed,
        policy=policy,
        steps=outcome.steps,
        interrupts=interrupts,
        planned=sum(t.planned for t in tallies),
        made=sum(t.made for t in tallies),
        calls=ok + lost,
        ran=ok,
        lost=lost,
        lost_updates=bank.lost_updates,
        drift=sum(bank.balances) - OPENING * len(bank.balances),
        wrong_accounts=sum(a != b for a, b in zip(bank.balances, expected, strict=True)),
        wall_ms=wall * 1e3,
    )


async def conflict_storm_runs(
    runs: int, seed: int, agents: int, accounts: int, turns: int
) -> list[ConflictRun]:
    """Run every policy on every seed, interleaved (policy 1, policy 2, ... then the next
    seed), after a warm-up run of each."""
    for policy in ARBITRATIONS:
        await conflict_run(seed - 1, policy, agents, accounts, turns)
    return [
        await conflict_run(seed + n, policy, agents, accounts, turns)
        for n in range(runs)
        for policy in ARBITRATIONS
    ]


def summarize_conflicts(runs: list[ConflictRun]) -> dict[str, Any]:
    med = statistics.median
    return {
        "runs": len(runs),
        "median_calls_per_second": med(r.ran / (r.wall_ms / 1e3) for r in runs),
        "median_decided_per_second": med(r.calls / (r.wall_ms / 1e3) for r in runs),
        "median_calls": med(r.calls for r in runs),
        "median_ran": med(r.ran for r in runs),
        "median_lost": med(r.lost for r in runs),
        "median_planned": med(r.planned for r in runs),
        "median_made": med(r.made for r in runs),
        "runs_violated": sum(r.violated for r in runs),
        "runs_not_conserved": sum(r.drift != 0 for r in runs),
        "max_abs_drift": max(abs(r.drift) for r in runs),
        "lost_updates": sum(r.lost_updates for r in runs),
        "median_lost_updates": med(r.lost_updates for r in runs),
        "wrong_accounts": sum(r.wrong_accounts for r in runs),
        "median_steps": med(r.steps for r in runs),
        "max_steps": max(r.steps for r in runs),
        "median_interrupts": med(r.interrupts for r in runs),
        "median_wall_ms": med(r.wall_ms for r in runs),
        "p90_wall_ms": p90([r.wall_ms for r in runs]),
    }


def conflict_storm(args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """Run the conflict storm on each backend; return its summaries and broken invariants:
    a violation under any arbitration, or none at all without (the storm did not race)."""
    summaries: dict[str, dict[str, Any]] = {}
    every: list[dict[str, Any]] = []
    failures: list[str] = []
    for backend in backends:
        runs = anyio.run(
            conflict_storm_runs,
            args.runs,
            args.seed,
            args.agents,
            args.accounts,
            args.turns,
            backend=backend,
        )
        every.extend({"backend": backend, **asdict(r)} for r in runs)
        for policy in ARBITRATIONS:
            summary = summarize_conflicts([r for r in runs if r.policy == policy])
            summaries[f"{backend}/{policy}"] = summary
            if policy == "none" and not summary["runs_violated"]:
                failures.append(f"{backend}, no arbitration: no run lost money (no race)")
            elif policy != "none" and summary["runs_violated"]:
                failures.append(
                    f"{backend}, {policy}: {summary['runs_violated']} of {summary['runs']} "
                    f"runs broke the books ({summary['lost_updates']} lost updates, max "
                    f"drift {summary['max_abs_drift']})"
                )
    return {"summaries": summaries, "runs": every, "failures": failures}


CONFLICT_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("ran/s", lambda s: f"{s['median_calls_per_second']:,.0f}"),
    ("calls/s", lambda s: f"{s['median_decided_per_second']:,.0f}"),
    ("calls", lambda s: f"{s['median_calls']:g}"),
    ("ran", lambda s: f"{s['median_ran']:g}"),
    ("lost", lambda s: f"{s['median_lost']:g}"),
    ("made/planned", lambda s: f"{s['median_made']:g}/{s['median_planned']:g}"),
    ("steps", lambda s: f"{s['median_steps']:g}"),
    ("interrupts", lambda s: f"{s['median_interrupts']:g}"),
    ("broken runs", lambda s: f"{s['runs_violated']}/{s['runs']}"),
    ("lost updates", lambda s: f"{s['lost_updates']} ({s['median_lost_updates']:g})"),
    ("max drift", lambda s: f"{s['max_abs_drift']}"),
    ("wrong accts", lambda s: f"{s['wrong_accounts']}"),
    ("wall ms", lambda s: f"{s['median_wall_ms']:.0f}"),
)


def print_conflict_storm(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"conflict storm: {args.agents} teller agents, {args.accounts} accounts, "
        f"{args.turns} batches of 2-4 transfers each, one a turn (a lost transfer is "
        f"proposed once more); {args.runs} runs per backend and policy (seeds "
        f"{args.seed}..{args.seed + args.runs - 1}); escalate: every conflict answered "
        f"Choose(its first call) through app.resume"
    )
    print(
        "median per run, except: broken runs (lost money, lost an update or a wrong account) "
        "and wrong accts: total; lost updates: total (median); max drift: max |total - opening|"
        "; ran/s, calls/s: calls that ran, calls proposed (ran or lost), per second of wall time"
    )
    for backend in dict.fromkeys(key.split("/")[0] for key in result["summaries"]):
        rows = [
            [key.split("/")[1]] + [render(s) for _, render in CONFLICT_COLUMNS]
            for key, s in result["summaries"].items()
            if key.split("/")[0] == backend
        ]
        heads = ["policy"] + [head for head, _ in CONFLICT_COLUMNS]
        sizes = [max(len(head), *(len(row[i]) for row in rows)) for i, head in enumerate(heads)]
        print(f"\n{backend}")
        for cells in (heads, ["-" * n for n in sizes], *rows):
            print(
                "  ".join(
                    f"{cell:<{n}}" if i == 0 else f"{cell:>{n}}"
                    for i, (cell, n) in enumerate(zip(cells, sizes, strict=True))
                )
            )
    verdict = "FAIL" if result["failures"] else "PASS"
    print(f"targets: 0 broken runs with arbitration, and some without (the storm races): {verdict}")


# -- the approval storm ----------------------------------------------------------------------

WORKER = Path(__file__).resolve().parent / "_approval_worker.py"
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


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[-1]


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
            f"(--storm all runs {ALL_APPROVAL_RUNS} a mode; --storm approval runs "
            f"{DEFAULT_RUNS['approval']:,})"
        )
    for mode, call in APPROVAL_MODES.items():
        print(f"  {mode}: {call}")
    columns = list(result["summaries"])
    width = max(len(label) for label, _ in APPROVAL_ROWS)
    cells = [[render(result["summaries"][c]) for _, render in APPROVAL_ROWS] for c in columns]
    sizes = [max(len(c), *(len(x) for x in col)) for c, col in zip(columns, cells, strict=True)]
    print(f"{'':<{width}}  " + "  ".join(f"{c:>{n}}" for c, n in zip(columns, sizes, strict=True)))
    print(f"{'-' * width}  " + "  ".join("-" * n for n in sizes))
    for i, (label, _) in enumerate(APPROVAL_ROWS):
        row = "  ".join(f"{col[i]:>{n}}" for col, n in zip(cells, sizes, strict=True))
        print(f"{label:<{width}}  {row}")
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


STORMS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., None]]] = {
    "loop": (loop_storm, print_loop_storm),
    "budget": (budget_storm, print_budget_storm),
    "conflict": (conflict_storm, print_conflict_storm),
    "approval": (approval_storm, print_approval_storm),
}
DEFAULT_RUNS = {"loop": 40, "budget": 50, "conflict": 20, "approval": 1_000}
DEFAULT_AGENTS = {"budget": 20, "conflict": 12}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storm", choices=(*STORMS, "all"), default="all")
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
    args = parser.parse_args(argv)
    if (args.runs is not None and args.runs < 1) or (args.agents is not None and args.agents < 2):
        parser.error("--runs must be at least 1 and --agents at least 2")
    if args.accounts < 2 or args.turns < 1:
        parser.error("--accounts must be at least 2 and --turns at least 1")
    # errors only: every run of a storm crosses its soft thresholds (budget_warned warnings)
    configure_logging(logging.ERROR)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    storms = list(STORMS) if args.storm == "all" else [args.storm]

    def runs_of(name: str) -> int:
        if args.runs is not None:
            return args.runs
        if name == "approval" and args.storm == "all":
            return ALL_APPROVAL_RUNS  # a shorter approval storm when every storm runs
        return DEFAULT_RUNS[name]

    # each storm's own default number of runs and agents, unless --runs / --agents say
    options = {
        name: argparse.Namespace(
            **{
                **vars(args),
                "runs": runs_of(name),
                "agents": args.agents or DEFAULT_AGENTS.get(name),
            }
        )
        for name in storms
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in storms:
            results[name] = STORMS[name][0](options[name], backends)
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
            "runs": {name: options[name].runs for name in storms},
            "agents": {name: options[name].agents for name in storms if options[name].agents},
            "seed": args.seed,
        }
        print(json.dumps({"environment": env, "storms": results, "failures": failures}, indent=2))
    else:
        print(f"orchestra ({revision()}) failure-mode benchmark, {', '.join(backends)}")
        for name, result in results.items():
            print()
            STORMS[name][1](result, options[name])
        for failure in failures:
            print(f"invariant broken: {failure}", file=sys.stderr)
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
