"""Benchmark the budget safeguard: agents of one run share its token and cost budgets.

    .venv/bin/python benchmarks/storms/budget.py [--runs 50] [--backend asyncio|trio|both]
        [--agents 20] [--seed 1] [--json]

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
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from _shared import BenchmarkError, Desk, Storm, expect, main, p90, print_rows

from orchestra import (
    END,
    START,
    Agent,
    Budget,
    CompiledGraph,
    Effect,
    Graph,
    NodeContext,
    RunOutcome,
    RunStatus,
    Send,
    register_price,
    tool,
)
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.safeguards.budgets import BudgetStop, Price, Spend

MODES = ("reserved", "check-then-call")

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
                    used = meter.counts["input_tokens"] + meter.counts["output_tokens"]
                    book.free_tokens = run.tokens - used - held.get("tokens", 0.0)
                if run.cost_usd is not None:
                    book.free_usd = (
                        run.cost_usd - meter.counts["cost_usd"] - held.get("cost_usd", 0.0)
                    )
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
    print(
        f"budget storm: {args.agents} agents per run sharing one token and one cost budget, "
        f"{args.runs} runs per backend and mode (seeds {args.seed}..{args.seed + args.runs - 1})"
    )
    print_rows(result["summaries"], STORM_ROWS)
    verdict = "FAIL" if result["failures"] else "PASS"
    print(f"target: 0 tokens and $0 over the hard limits with reservations: {verdict}")


STORM = Storm("budget", budget_storm, print_budget_storm, runs=50, agents=20)

if __name__ == "__main__":
    sys.exit(main({STORM.name: STORM}, __doc__.split("\n\n")[0]))
