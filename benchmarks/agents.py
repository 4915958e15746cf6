"""Benchmark the cost the framework adds to an agent turn: the model call through the ledger,
one tool call through the gateway, the conversation kept and checkpointed.

    .venv/bin/python benchmarks/agents.py [--turns 10] [--repeat 30] [--backend asyncio|trio]

Every scenario runs one agent on a ``ScriptedModel`` (answers computed from the request,
no sleeping, so what is timed is orchestra) for ``--turns`` turns: each turn but the last
proposes one call of a no-op READ tool, the last gives the final answer. A turn is one
superstep: the model call, the act phase, the merge, the commit. Figures are µs per turn,
median over ``--repeat`` runs, interleaved with the baselines:

- ``floor``: the same model and tool called directly in a loop (what the agent's work costs
  without orchestra);
- ``plain step``: a plain two-node loop of the same number of steps, no store (what a step
  costs without an agent).

With a store, each turn also writes two ledger entries (the model answer and the tool
result, each its own transaction, fsynced at ``full``) and the step's checkpoint with the new
messages.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _common import (
    BenchmarkError,
    CounterState,
    build_loop,
    configure_logging,
    expect,
    p90,
    revision,
    versions,
)
from pydantic import BaseModel

from orchestra import END, START, Agent, Budget, CompiledGraph, Effect, Graph, tool
from orchestra.models import Message, ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.store import SQLiteStore


class Desk(BaseModel):
    request: str = "look up order 42"
    answer: str | None = None


@tool(effect=Effect.READ)
async def lookup(order_id: str) -> dict[str, Any]:
    """Look an order up (a no-op)."""
    return {"order_id": order_id, "status": "shipped"}


def script(turns: int) -> Any:
    def answer(request: ModelRequest) -> ModelResponse | str:
        if request.turn + 1 < turns:
            call = ToolCall(name="lookup", arguments={"order_id": str(request.turn)})
            return ModelResponse(tool_calls=(call,))
        return f"done after {turns} turns"

    return answer


def build_agent(turns: int, store: SQLiteStore | None) -> CompiledGraph[Any]:
    agent = Agent(
        "desk",
        model=ScriptedModel(script(turns)),
        tools=[lookup],
        instructions="Answer the request.",
        output="answer",
        max_turns=turns + 1,
    )
    graph = Graph(Desk, name="agent")
    graph.add_node(agent)
    graph.add_edge(START, "desk")
    graph.add_edge("desk", END)
    return graph.compile(store=store, budget=Budget(steps=turns + 5))


async def agent_sample(app: CompiledGraph[Any], turns: int) -> float:
    began = time.perf_counter()
    outcome = await app.run(Desk())
    elapsed = time.perf_counter() - began
    expect("status", str(outcome.status), "completed")
    expect("steps", outcome.steps, turns)
    expect("answer", outcome.state.answer, f"done after {turns} turns")
    expect("tool calls", outcome.usage.tool_calls, turns - 1)
    expect("model calls", outcome.usage.model_calls, turns)
    if app.store is not None:
        entries = await app.store.ledger(outcome.run_id)
        expect("ledger entries", len(entries), 2 * turns - 1)
    return elapsed / turns * 1e6


async def floor_sample(turns: int) -> float:
    """The model and the tool called directly, the way the agent would, without orchestra."""
    model = ScriptedModel(script(turns))
    messages: list[Message] = [Message(role="user", content="look up order 42")]
    began = time.perf_counter()
    for _ in range(turns):
        response = await model.complete(ModelRequest(messages=tuple(messages)))
        messages.append(Message(role="assistant", content=response.text or ""))
        for call in response.tool_calls:
            result = await lookup.fn(**call.arguments)
            messages.append(Message(role="tool", content=json.dumps(result)))
    elapsed = time.perf_counter() - began
    return elapsed / turns * 1e6


async def plain_sample(app: CompiledGraph[Any], steps: int) -> float:
    began = time.perf_counter()
    outcome = await app.run({})
    elapsed = time.perf_counter() - began
    expect("plain steps", outcome.steps, steps)
    return elapsed / steps * 1e6


async def measure(turns: int, repeat: int, directory: Path) -> dict[str, list[float]]:
    stores = {d: SQLiteStore(directory / f"agent-{d}.db", durability=d) for d in ("normal", "full")}
    apps = {"none": build_agent(turns, None)}
    apps.update({d: build_agent(turns, s) for d, s in stores.items()})
    # the plain loop runs a and b alternately: turns steps = turns // 2 loop rounds
    plain = build_loop(CounterState, None, turns=turns // 2, steps=turns + 5)
    plain_steps = 2 * (turns // 2)

    async def sample(name: str) -> float:
        if name == "floor":
            return await floor_sample(turns)
        if name == "plain":
            return await plain_sample(plain, plain_steps)
        return await agent_sample(apps[name], turns)

    plan = ("none", "floor", "plain", "normal", "full")
    samples: dict[str, list[float]] = {name: [] for name in plan}
    try:
        for _ in range(3):
            for name in plan:
                await sample(name)
        gc.collect()
        for _ in range(repeat):
            for name in plan:
                samples[name].append(await sample(name))
    finally:
        for store in stores.values():
            await store.aclose()
    return samples


LABELS = {
    "none": "agent turn, no store",
    "normal": "agent turn, SQLite normal",
    "full": "agent turn, SQLite full",
    "floor": "floor: model + tool called directly",
    "plain": "plain step, no store",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.turns < 2 or args.repeat < 3:
        parser.error("--turns must be at least 2 and --repeat at least 3")
    configure_logging()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            samples = anyio.run(measure, args.turns, args.repeat, Path(tmp), backend=args.backend)
        except BenchmarkError as exc:
            print(f"benchmark aborted: {exc}", file=sys.stderr)
            return 2
    rows = {
        name: {
            "median_us": statistics.median(values),
            "p90_us": p90(values),
            "min_us": min(values),
            "max_us": max(values),
        }
        for name, values in samples.items()
    }
    env = {
        "revision": revision(),
        "python": sys.version.split()[0],
        **versions("anyio", "pydantic", "trio"),
        "backend": args.backend,
        "turns": args.turns,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({"environment": env, "rows": rows}, indent=2))
        return 0
    print(
        f"orchestra ({env['revision']}) agent benchmark: {args.turns} turns per run, "
        f"{args.repeat} interleaved repetitions, {args.backend}"
    )
    print(f"{'scenario (per turn or step)':<38} {'median':>10} {'p90':>7} {'min..max':>16}")
    for name in ("none", "normal", "full", "floor", "plain"):
        row = rows[name]
        print(
            f"{LABELS[name]:<38} {row['median_us']:>7.1f} µs {row['p90_us']:>7.1f}"
            f" {row['min_us']:>7.1f}..{row['max_us']:<7.1f}"
        )
    overhead = rows["none"]["median_us"] - rows["floor"]["median_us"]
    print(f"orchestra per agent turn, no store: {overhead:.1f} µs over the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
