"""Benchmark arbitration: agents whose tool calls conflict over shared accounts.

    .venv/bin/python benchmarks/storms/conflict.py [--runs 20] [--backend asyncio|trio|both]
        [--agents 12] [--accounts 4] [--turns 5] [--seed 1] [--json]

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
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from _shared import BenchmarkError, Desk, Storm, expect, main, p90, print_backend_tables

from orchestra import (
    END,
    START,
    Agent,
    Arbitration,
    Choose,
    CompiledGraph,
    Conflict,
    Effect,
    Graph,
    RunOutcome,
    RunStatus,
    ToolContext,
    tool,
)
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.store import MemoryStore

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
    print_backend_tables(result["summaries"], CONFLICT_COLUMNS, left=1, key="policy")
    verdict = "FAIL" if result["failures"] else "PASS"
    print(f"targets: 0 broken runs with arbitration, and some without (the storm races): {verdict}")


STORM = Storm("conflict", conflict_storm, print_conflict_storm, runs=20, agents=12)

if __name__ == "__main__":
    sys.exit(main({STORM.name: STORM}, __doc__.split("\n\n")[0]))
