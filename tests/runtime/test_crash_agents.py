"""Crash tests for agents: the ledger and in-doubt calls across real processes (DESIGN §3, §6).

Every process runs ``tests/apps/agent_crash_app.py``: one agent (``single``) or two agents in the
same steps (``pair``), each calling a READ tool, then an IRREVERSIBLE tool, then answering;
every real model call and every tool execution is logged to a side-effect file. A run is ended
by a named fault point (``ORCHESTRA_FAULTS``), by the app's own exit right after a tool's
result is recorded, or by a SIGKILL while an irreversible tool runs; a new process resumes it.

What must hold: a resumed run ends like an uncrashed one; no tool runs twice; a model call
recorded before the crash is replayed, not made (nor billed) again; an irreversible call
started but never finished is *in doubt* and waits for an operator (Done, Retry, Abort) instead
of running again; the database passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from apps import agent_crash_app
from apps.agent_crash_app import (
    AGENTS,
    DONE_RESULT,
    EXIT_CODE,
    EXPECTED_STATE,
    IRREVERSIBLE,
    STEPS,
    TOOLS,
)
from helpers import APPS, child_environ, integrity

from orchestra.errors import RunNotFoundError
from orchestra.store import SQLiteStore
from orchestra.store.base import LedgerEntry, RequestRow, RunRecord

APP = APPS / "agent_crash_app.py"
BACKENDS = ("asyncio", "trio")
LEASE = 0.3  # seconds: a dead owner's run can be taken over this long after its last renewal
TIMEOUT = 30.0  # seconds any one process may take before the test gives up on it
WORKERS = 4  # processes at a time: each waits mostly on interpreter start-up

backends = pytest.mark.parametrize("backend", BACKENDS)

ModelKey = tuple[str, int]  # (agent, turn): one model call


# -- driving the app ------------------------------------------------------------------------


def _environ(env: dict[str, str]) -> dict[str, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ORCHESTRA_FAULTS", "AGENT_APP_TOOL_SLEEP", "AGENT_APP_EXIT_AFTER_TOOL")
    }
    environ.update({"AGENT_APP_LEASE": str(LEASE), "AGENT_APP_POLL": "0.05", **env})
    return environ


def start(
    action: str, db: Path, run_id: str, backend: str, graph: str, *flags: str, **env: str
) -> subprocess.Popen[str]:
    argv = [sys.executable, str(APP), action, str(db), run_id, "--backend", backend]
    argv += ["--graph", graph, *flags]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environ(_environ(env)),
    )


@dataclass(frozen=True, slots=True)
class Proc:
    """One finished process of the app."""

    pid: int
    code: int
    summary: dict[str, Any] | None
    stderr: str


def finish(proc: subprocess.Popen[str]) -> Proc:
    out, err = proc.communicate(timeout=TIMEOUT)
    lines = [line for line in out.splitlines() if line.strip()]
    summary = json.loads(lines[-1]) if lines else None
    return Proc(proc.pid, proc.returncode, summary, err)


def run_app(
    action: str, db: Path, run_id: str, backend: str, graph: str, *flags: str, **env: str
) -> Proc:
    """Run the app to its end."""
    return finish(start(action, db, run_id, backend, graph, *flags, **env))


def resume(db: Path, backend: str, graph: str, *flags: str, **env: str) -> Proc:
    return run_app("resume", db, "r", backend, graph, "--wait", *flags, **env)


# -- reading what is stored and what ran ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A run as its store shows it."""

    run: RunRecord | None
    steps: tuple[int, ...] = ()
    ledger: tuple[LedgerEntry, ...] = ()
    requests: tuple[RequestRow, ...] = ()  # every status
    open_requests: tuple[RequestRow, ...] = ()

    def model_keys(self) -> set[ModelKey]:
        """The model calls with a recorded result (an agent's turn is its step - 1)."""
        return {(e.task, e.step - 1) for e in self.ledger if e.kind == "model" and e.result}

    def entry(self, name: str) -> LedgerEntry:
        (found,) = (e for e in self.ledger if e.name == name)
        return found


def read(db: Path, run_id: str = "r") -> Stored:
    return anyio.run(_read, db, run_id)


async def _read(db: Path, run_id: str) -> Stored:
    async with SQLiteStore(db) as store:
        try:
            run = await store.get_run(run_id)
        except RunNotFoundError:
            return Stored(None)
        steps = tuple(row.step for row in await store.checkpoints(run_id))
        return Stored(
            run,
            steps,
            tuple(await store.ledger(run_id)),
            tuple(await store.requests(run_id, statuses=())),
            tuple(await store.requests(run_id)),
        )


def effects(db: Path, run_id: str = "r") -> list[dict[str, Any]]:
    """Return the model calls and tool executions of a run, in the order they started."""
    path = agent_crash_app.effects_path(db)
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["run"] == run_id]


def tool_runs(lines: list[dict[str, Any]], pid: int | None = None) -> Counter[str]:
    """How often each tool ran (in one process, or in all)."""
    return Counter(
        e["tool"] for e in lines if e["kind"] == "tool" and (pid is None or e["pid"] == pid)
    )


def model_calls(lines: list[dict[str, Any]], pid: int | None = None) -> Counter[ModelKey]:
    """How often each (agent, turn) model call was made (in one process, or in all)."""
    return Counter(
        (e["agent"], e["turn"])
        for e in lines
        if e["kind"] == "model" and (pid is None or e["pid"] == pid)
    )


def every_tool(graph: str) -> Counter[str]:
    return Counter(name for agent in AGENTS[graph] for name in TOOLS[agent])


def every_model_call(graph: str) -> Counter[ModelKey]:
    return Counter((agent, turn) for agent in AGENTS[graph] for turn in range(STEPS))


# -- uncrashed runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The summary of an uncrashed run of each graph."""
    root = tmp_path_factory.mktemp("reference")
    summaries = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = {
            graph: pool.submit(run_app, "run", root / f"{graph}.db", "r", "asyncio", graph)
            for graph in AGENTS
        }
        for graph, future in procs.items():
            proc = future.result()
            assert proc.code == 0, proc.stderr
            assert proc.summary is not None
            assert proc.summary["state"] == EXPECTED_STATE[graph]
            lines = effects(root / f"{graph}.db")
            assert tool_runs(lines) == every_tool(graph)
            assert model_calls(lines) == every_model_call(graph)
            summaries[graph] = proc.summary
    return summaries


# -- deterministic crash windows ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    graph: str
    fault: str  # an orchestra fault point ("point@step"), or "tool:NAME" (the app's own exit)
    committed: int  # the last step committed when the process dies there

    @property
    def env(self) -> dict[str, str]:
        if self.fault.startswith("tool:"):
            return {"AGENT_APP_EXIT_AFTER_TOOL": self.fault.removeprefix("tool:")}
        return {"ORCHESTRA_FAULTS": self.fault}

    @property
    def dies_with_pending_writes(self) -> bool:
        """Whether a finished agent turn of the step in flight is kept when the process dies
        (a step of two tasks, past the first pending write, before the commit)."""
        point = self.fault.partition("@")[0]
        return self.graph == "pair" and point not in ("after_call_recorded", "after_commit")

    @property
    def in_doubt(self) -> bool:
        return self.fault.startswith("after_call_started")

    @property
    def id(self) -> str:
        return f"{self.graph}-{self.fault}"


WINDOWS = (
    # single: step 1 = model + lookup_order, step 2 = model + refund, step 3 = model (answer)
    Window("single", "after_call_recorded@1", 0),  # the model call recorded, the tool not run
    Window("single", "before_commit@1", 0),  # the READ tool's result recorded too
    Window("single", "after_call_recorded@2", 1),  # the irreversible call not started yet
    Window("single", "before_commit@2", 1),  # the irreversible call's result recorded
    Window("single", "after_commit@2", 2),  # the conversation comes from the checkpoint
    Window("single", "before_commit@3", 2),  # the final answer recorded
    # pair: both agents in every step (think: two tasks with pending writes; one act phase)
    Window("pair", "after_call_recorded@1", 0),  # one agent's model call recorded
    Window("pair", "after_pending_write@1", 0),  # one agent's turn kept, no tool run
    Window("pair", "tool:lookup_order", 0),  # billing's READ call recorded, maybe not the other
    Window("pair", "before_commit@1", 0),
    Window("pair", "after_commit@1", 1),
    Window("pair", "after_pending_write@2", 1),
    Window("pair", "after_call_started@2", 1),  # in doubt: resumed, interrupted, retried
    Window("pair", "tool:refund", 1),  # refund recorded, send_parcel maybe not started
    Window("pair", "before_commit@2", 1),
    Window("pair", "before_commit@3", 2),
)


@dataclass(frozen=True, slots=True)
class Recovery:
    crash: Proc
    crashed: Stored
    resumes: list[Proc]  # the last one completes the run
    final: Stored
    effects: list[dict[str, Any]]
    integrity: str

    @property
    def resumers(self) -> list[int]:
        return [proc.pid for proc in self.resumes]

    def after_crash(self) -> list[dict[str, Any]]:
        return [e for e in self.effects if e["pid"] != self.crash.pid]


def crash_and_resume(root: Path, backend: str, window: Window) -> Recovery:
    db = root / f"{backend}-{window.id.replace('@', '-').replace(':', '-')}.db"
    crash = run_app("run", db, "r", backend, window.graph, **window.env)
    crashed = read(db)
    resumes = [resume(db, backend, window.graph)]
    if window.in_doubt:
        resumes.append(resume(db, backend, window.graph, "--answer", "retry"))
    return Recovery(crash, crashed, resumes, read(db), effects(db), integrity(db))


@pytest.fixture(scope="module")
def recoveries(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, Window], Recovery]:
    """Crash and resume every window on both backends, several at a time."""
    root = tmp_path_factory.mktemp("windows")
    cases = [(backend, window) for backend in BACKENDS for window in WINDOWS]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {case: pool.submit(crash_and_resume, root, *case) for case in cases}
        return {case: future.result() for case, future in futures.items()}


def window_cases(*xfail: tuple[Window, str]) -> pytest.MarkDecorator:
    """Parametrize over every (backend, window); the given windows are known bugs."""
    bugs = dict(xfail)
    params = []
    for backend in BACKENDS:
        for window in WINDOWS:
            marks = []
            if window in bugs:
                marks.append(pytest.mark.xfail(strict=True, reason=f"bug: {bugs[window]}"))
            params.append(pytest.param(backend, window, id=f"{backend}-{window.id}", marks=marks))
    return pytest.mark.parametrize(("backend", "window"), params)


@window_cases()
def test_agent_crash_window_leaves_resumable_run(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """The process dies at the named point, leaving a running run with exactly the steps
    committed before that point."""
    recovery = recoveries[backend, window]
    assert recovery.crash.code == EXIT_CODE, recovery.crash.stderr
    assert recovery.crashed.run is not None
    assert recovery.crashed.run.status == "running"
    assert recovery.crashed.steps == tuple(range(window.committed + 1))


@window_cases()
def test_agent_crash_window_resume_ends_like_uncrashed_run(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """A new process resumes the run to completion with the uncrashed run's final state."""
    recovery = recoveries[backend, window]
    last = recovery.resumes[-1]
    assert last.code == 0, last.stderr
    assert last.summary is not None
    assert (last.summary["status"], last.summary["steps"]) == ("completed", STEPS)
    assert last.summary["state"] == EXPECTED_STATE[window.graph]
    assert recovery.final.run is not None
    assert recovery.final.run.status == "completed"
    assert recovery.final.steps == tuple(range(STEPS + 1))


@window_cases()
def test_agent_crash_window_runs_every_tool_exactly_once(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """Across the crashed and the resuming processes, every tool ran exactly once."""
    recovery = recoveries[backend, window]
    assert tool_runs(recovery.effects) == every_tool(window.graph)


@window_cases()
def test_agent_crash_window_does_not_call_recorded_models_again(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """The resumers make exactly the model calls that had no recorded result at the crash,
    each once: a recorded call is replayed, not made (nor billed) again."""
    recovery = recoveries[backend, window]
    recorded = recovery.crashed.model_keys()
    expected = every_model_call(window.graph)
    assert recorded <= set(expected)
    assert model_calls(recovery.after_crash()) == expected - Counter(recorded)


@window_cases()
def test_agent_crash_window_makes_every_model_call_once(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """Over the crashed and the resuming processes every model call is made exactly once
    (at each fault point every call made so far has been recorded)."""
    recovery = recoveries[backend, window]
    assert model_calls(recovery.effects) == every_model_call(window.graph)


@window_cases()
def test_agent_crash_window_keeps_recorded_calls_unchanged(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """Every call recorded with a result before the crash keeps its ledger entry as it was:
    replayed, never recorded again."""
    recovery = recoveries[backend, window]
    done = [e for e in recovery.crashed.ledger if e.status == "done"]
    assert done, "nothing was recorded before the crash"
    assert set(done) <= set(recovery.final.ledger)


@window_cases()
def test_agent_crash_window_usage_equals_uncrashed_run(
    recoveries: dict[tuple[str, Window], Recovery],
    reference: dict[str, dict[str, Any]],
    backend: str,
    window: Window,
) -> None:
    """The resumed run's usage (tokens, model and tool calls, per agent) is the uncrashed
    run's: nothing billed twice, nothing lost."""
    last = recoveries[backend, window].resumes[-1]
    assert last.summary is not None
    assert last.summary["usage"] == reference[window.graph]["usage"]


@window_cases()
def test_agent_crash_window_database_passes_integrity_check(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """PRAGMA integrity_check is ok after the crash and the resume."""
    assert recoveries[backend, window].integrity == "ok"


@backends
def test_agent_crash_in_doubt_pair_resume_asks_before_any_new_call(
    recoveries: dict[tuple[str, Window], Recovery], backend: str
) -> None:
    """Two agents' irreversible calls in one act phase, one started when the process died:
    the resume asks about that one alone and runs neither call until it is answered."""
    recovery = recoveries[backend, Window("pair", "after_call_started@2", 1)]
    first = recovery.resumes[0]
    assert first.summary is not None
    assert first.summary["status"] == "interrupted", first.stderr
    started = [e.name for e in recovery.crashed.ledger if e.status == "started"]
    assert len(started) == 1
    assert started[0] in IRREVERSIBLE
    (request_id,) = first.summary["pending"]
    (request,) = recovery.final.requests
    assert request.request_id == request_id
    assert json.loads(request.payload)["tool"] == started[0]
    assert tool_runs(recovery.effects, first.pid) == Counter()


# -- in doubt: killed right after an irreversible call's started record ---------------------

IN_DOUBT = "after_call_started@2"  # single: refund recorded as started, then the process dies


@dataclass(slots=True)
class Doubt:
    """A run killed with its irreversible call in doubt, then resumed step by step."""

    db: Path
    crash: Proc
    crashed: Stored
    procs: list[Proc] = field(default_factory=list)  # the resumes, in order
    stored: list[Stored] = field(default_factory=list)  # the store after each

    @property
    def effects(self) -> list[dict[str, Any]]:
        return effects(self.db)

    def tools_until(self, resume: int) -> Counter[str]:
        """How often each tool ran in the crash and the resumes up to ``resume`` (index)."""
        pids = {self.crash.pid, *(proc.pid for proc in self.procs[: resume + 1])}
        return tool_runs([e for e in self.effects if e["pid"] in pids])


def copy_run(doubt: Doubt, db: Path) -> Doubt:
    """Copy the database and the side-effect log of ``doubt`` to ``db``, to go on from
    there another way."""
    with closing(sqlite3.connect(doubt.db)) as source, closing(sqlite3.connect(db)) as target:
        source.backup(target)
    shutil.copyfile(agent_crash_app.effects_path(doubt.db), agent_crash_app.effects_path(db))
    return Doubt(db, doubt.crash, doubt.crashed, list(doubt.procs), list(doubt.stored))


@dataclass(frozen=True, slots=True)
class Then:
    """One resume of an in-doubt chain: its answer (None: none) and its fault points."""

    answer: str | None = None
    faults: str = ""


def go_on(doubt: Doubt, backend: str, *steps: Then) -> Doubt:
    """Resume once per step."""
    for then in steps:
        flags = () if then.answer is None else ("--answer", then.answer)
        env = {"ORCHESTRA_FAULTS": then.faults} if then.faults else {}
        doubt.procs.append(resume(doubt.db, backend, "single", *flags, **env))
        doubt.stored.append(read(doubt.db))
    return doubt


CHAINS = {
    "retry": (Then(), Then("retry")),  # asked a second time without an answer, then retried
    "done": (Then("done"),),
    "abort": (Then("abort"),),
    # retried, and the process dies in doubt again: asked anew, then answered Done
    "retry_again": (Then("retry", IN_DOUBT), Then(), Then("done")),
    # aborted, then resumed after all: asked again, then answered Done
    "abort_resumed": (Then("abort"), Then(), Then("done")),
}


def in_doubt_chains(root: Path, backend: str, pool: ThreadPoolExecutor) -> dict[str, Doubt]:
    """Crash in doubt and resume without an answer; then go on in a copy per chain."""
    db = root / f"{backend}.db"
    crash = run_app("run", db, "r", backend, "single", ORCHESTRA_FAULTS=IN_DOUBT)
    asked = go_on(Doubt(db, crash, read(db)), backend, Then())
    futures = {
        chain: pool.submit(go_on, copy_run(asked, root / f"{backend}-{chain}.db"), backend, *then)
        for chain, then in CHAINS.items()
    }
    return {chain: future.result() for chain, future in futures.items()}


@pytest.fixture(scope="module")
def doubts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Doubt]:
    """Run every in-doubt chain on both backends, several at a time."""
    root = tmp_path_factory.mktemp("doubt")
    with ThreadPoolExecutor(max_workers=WORKERS) as pool, ThreadPoolExecutor(2) as outer:
        futures = {b: outer.submit(in_doubt_chains, root, b, pool) for b in BACKENDS}
        return {
            (backend, chain): doubt
            for backend, future in futures.items()
            for chain, doubt in future.result().items()
        }


@backends
def test_in_doubt_crash_after_started_record_runs_the_tool_zero_times(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """The process dies after recording the irreversible call as started and before running
    it: the ledger holds a started entry and the tool did not run."""
    doubt = doubts[backend, "retry"]
    assert doubt.crash.code == EXIT_CODE, doubt.crash.stderr
    entry = doubt.crashed.entry("refund")
    assert (entry.step, entry.task, entry.seq, entry.status) == (2, "billing", 1, "started")
    assert entry.result is None
    assert tool_runs(doubt.effects, doubt.crash.pid)["refund"] == 0


@backends
def test_in_doubt_resume_interrupts_with_one_open_request(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """The resumed run stops ``interrupted`` with one pending in-doubt request, stored as
    open, and does not run the tool."""
    doubt = doubts[backend, "retry"]
    proc, stored = doubt.procs[0], doubt.stored[0]
    assert proc.code == 1, proc.stderr
    assert proc.summary is not None
    assert proc.summary["status"] == "interrupted"
    (request_id,) = proc.summary["pending"]
    (request,) = stored.open_requests
    assert (request.request_id, request.kind, request.step, request.task) == (
        request_id,
        "in_doubt",
        2,
        "billing",
    )
    payload = json.loads(request.payload)
    assert (payload["tool"], payload["arguments"]) == ("refund", {"order_id": "42", "amount": 30})
    assert stored.run is not None
    assert stored.run.status == "interrupted"
    assert doubt.tools_until(0)["refund"] == 0


@backends
def test_in_doubt_resume_without_answer_stays_interrupted_with_same_request(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """A second resume without an answer asks the same request again (same id, still one
    request stored) and still does not run the tool."""
    doubt = doubts[backend, "retry"]
    first, second = doubt.procs[0].summary, doubt.procs[1].summary
    assert first is not None
    assert second is not None
    assert second["status"] == "interrupted"
    assert second["pending"] == first["pending"]
    assert [r.request_id for r in doubt.stored[1].requests] == first["pending"]
    assert [r.status for r in doubt.stored[1].requests] == ["open"]
    assert doubt.stored[1].entry("refund").status == "started"
    assert doubt.tools_until(1)["refund"] == 0


@backends
def test_in_doubt_retry_runs_the_tool_once_and_completes(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """Answered Retry() from another process, the call runs exactly once (in that process)
    and the run completes like an uncrashed one."""
    doubt = doubts[backend, "retry"]
    retry, stored = doubt.procs[-1], doubt.stored[-1]
    assert retry.code == 0, retry.stderr
    assert retry.summary is not None
    asked = doubt.procs[0].summary
    assert asked is not None
    assert retry.summary["answered"] == asked["pending"]
    assert retry.summary["state"] == EXPECTED_STATE["single"]
    assert tool_runs(doubt.effects) == every_tool("single")
    assert tool_runs(doubt.effects, retry.pid) == Counter({"refund": 1})
    assert stored.entry("refund").status == "done"
    assert [r.status for r in stored.requests] == ["used"]
    assert stored.open_requests == ()


@backends
def test_in_doubt_retry_usage_equals_uncrashed_run(
    doubts: dict[tuple[str, str], Doubt], reference: dict[str, dict[str, Any]], backend: str
) -> None:
    """The interrupted resumes replay the step's model call: the completed run's usage is
    the uncrashed run's, and no model call was made twice."""
    doubt = doubts[backend, "retry"]
    assert doubt.procs[-1].summary is not None
    assert doubt.procs[-1].summary["usage"] == reference["single"]["usage"]
    assert model_calls(doubt.effects) == every_model_call("single")


@backends
def test_in_doubt_done_completes_without_running_the_tool(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """Answered Done(result), the run completes with that result recorded for the call and
    the tool never run."""
    doubt = doubts[backend, "done"]
    done, stored = doubt.procs[-1], doubt.stored[-1]
    assert done.code == 0, done.stderr
    assert done.summary is not None
    assert done.summary["state"] == EXPECTED_STATE["single"]
    assert tool_runs(doubt.effects)["refund"] == 0
    entry = stored.entry("refund")
    assert entry.status == "done"
    assert json.loads(entry.result or "null") == {"status": "ok", "result": DONE_RESULT}
    (request,) = stored.requests
    assert request.status == "used"
    assert json.loads(request.answer or "null") == {"answer": "done", "result": DONE_RESULT}


@backends
def test_in_doubt_abort_ends_the_run_aborted(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """Answered Abort(), the run ends ``aborted``, the tool never run, the request answered."""
    doubt = doubts[backend, "abort"]
    proc, stored = doubt.procs[-1], doubt.stored[-1]
    assert proc.code == 1, proc.stderr
    assert proc.summary is not None
    assert proc.summary["status"] == "aborted"
    assert stored.run is not None
    assert stored.run.status == "aborted"
    assert tool_runs(doubt.effects)["refund"] == 0
    assert [(r.status, json.loads(r.answer or "{}")["answer"]) for r in stored.requests] == [
        ("used", "abort")
    ]
    assert stored.open_requests == ()


@backends
def test_in_doubt_retried_call_in_doubt_again_is_asked_anew(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """A retried call whose process dies in doubt again becomes a new open request (a new
    id, the answered one kept), which can be answered: Done completes the run with the tool
    never run."""
    doubt = doubts[backend, "retry_again"]
    first, died, asked, done = doubt.procs
    assert died.code == EXIT_CODE, died.stderr
    assert asked.summary is not None
    assert asked.summary["status"] == "interrupted", asked.stderr
    assert first.summary is not None
    assert asked.summary["pending"] != first.summary["pending"]
    (old,), (new,) = first.summary["pending"], asked.summary["pending"]
    assert {r.request_id: r.status for r in doubt.stored[2].requests} == {
        old: "used",
        new: "open",
    }
    assert done.code == 0, done.stderr
    assert done.summary is not None
    assert done.summary["answered"] == asked.summary["pending"]
    assert done.summary["state"] == EXPECTED_STATE["single"]
    assert tool_runs(doubt.effects)["refund"] == 0


@backends
def test_in_doubt_aborted_run_resumed_asks_an_answerable_request(
    doubts: dict[tuple[str, str], Doubt], backend: str
) -> None:
    """A run aborted while its call was in doubt, resumed later, stops interrupted with an
    open request for the call, which an answer then resolves."""
    doubt = doubts[backend, "abort_resumed"]
    _, aborted, asked, done = doubt.procs
    assert aborted.summary is not None
    assert aborted.summary["status"] == "aborted"
    assert asked.summary is not None
    assert asked.summary["status"] == "interrupted", asked.stderr
    assert [r.request_id for r in doubt.stored[2].open_requests] == asked.summary["pending"]
    assert done.code == 0, done.stderr
    assert tool_runs(doubt.effects)["refund"] == 0


@backends
@pytest.mark.parametrize("chain", list(CHAINS))
def test_in_doubt_database_passes_integrity_check(
    doubts: dict[tuple[str, str], Doubt], backend: str, chain: str
) -> None:
    """PRAGMA integrity_check is ok after the crash and every resume."""
    assert integrity(doubts[backend, chain].db) == "ok"


# -- a real SIGKILL while the irreversible tool runs ----------------------------------------

TOOL_SLEEP = 10.0  # the irreversible tool sleeps this long: the kill always lands inside it


@backends
def test_in_doubt_sigkill_while_irreversible_tool_runs_is_never_rerun(
    tmp_path: Path, backend: str
) -> None:
    """SIGKILLed at a random moment while the irreversible tool runs, the run resumes as
    interrupted with the call in doubt; the tool ran once and never runs again, even when
    the operator answers Done."""
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    db = tmp_path / "runs.db"
    proc = start("run", db, "r", backend, "single", AGENT_APP_TOOL_SLEEP=str(TOOL_SLEEP))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not tool_runs(effects(db))["refund"]:
            assert time.monotonic() < deadline, "the irreversible tool never started"
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    killed = finish(proc)
    assert killed.code == -signal.SIGKILL, f"seed {seed}: {killed.stderr}"
    assert read(db).entry("refund").status == "started", f"seed {seed}"
    resumed = resume(db, backend, "single")
    assert resumed.summary is not None, resumed.stderr
    assert resumed.summary["status"] == "interrupted", f"seed {seed}: {resumed.stderr}"
    assert len(read(db).open_requests) == 1
    answered = resume(db, backend, "single", "--answer", "done")
    assert answered.code == 0, f"seed {seed}: {answered.stderr}"
    assert tool_runs(effects(db)) == every_tool("single"), f"seed {seed}"
    assert tool_runs(effects(db), killed.pid) == every_tool("single")
    assert integrity(db) == "ok"
