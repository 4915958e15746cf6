"""Crash tests for approvals: an approved call across real processes (DESIGN §3, §6).

Every process runs ``tests/apps/approval_crash_app.py`` (the default ``Approvals()``): the agent
``billing`` or the plain node ``clerk`` proposes an irreversible ``refund``, which waits for
approval; ``clerk`` first files a ``note`` (a WRITE tool) with ``ctx.call_tool``. Every tool
execution is logged, with its arguments, to a side-effect file. A process is ended by a named
fault point (``ORCHESTRA_FAULTS``) or by a SIGKILL while the refund runs; another process
resumes the run.

What must hold: an approval is used once. An approved (or edited) call recorded as started
whose process died is *in doubt*: the next resume asks an ``in_doubt`` request about it (the
arguments it ran with, edited or not), never the approval again and never a silent re-run;
Retry runs it once, Done never. No tool runs twice across a crash, and the work a step did
before its held call is not redone.
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
from apps import approval_crash_app
from apps.approval_crash_app import ARGUMENTS, DONE_RESULT, EDITED, EXIT_CODE, GRAPHS, NOTE, STEPS
from helpers import APPS, child_environ

from orchestra.errors import RunNotFoundError
from orchestra.store import SQLiteStore
from orchestra.store.base import LedgerEntry, RequestRow, RunRecord

APP = APPS / "approval_crash_app.py"
BACKENDS = ("asyncio", "trio")
LEASE = 0.3  # seconds: a dead owner's run can be taken over this long after its last renewal
TIMEOUT = 30.0  # seconds any one process may take before the test gives up on it
WORKERS = 4  # processes at a time: each waits mostly on interpreter start-up
STARTED = "after_call_started"  # the approved refund recorded as started, then the process dies
TOOL_SLEEP = 10.0  # the refund sleeps this long when killed: the kill always lands inside it

CASES = [(backend, graph) for backend in BACKENDS for graph in GRAPHS]
cases = pytest.mark.parametrize(("backend", "graph"), CASES)
backends = pytest.mark.parametrize("backend", BACKENDS)


# -- driving the app ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proc:
    """One finished process of the app."""

    pid: int
    code: int
    summary: dict[str, Any] | None
    stderr: str

    @property
    def status(self) -> str | None:
        return None if self.summary is None else self.summary["status"]

    @property
    def pending(self) -> list[dict[str, Any]]:
        return [] if self.summary is None else self.summary["pending"]


@dataclass(frozen=True, slots=True)
class Stored:
    """A run as its store shows it."""

    run: RunRecord | None
    ledger: tuple[LedgerEntry, ...] = ()
    requests: tuple[RequestRow, ...] = ()  # every status
    told: tuple[dict[str, Any], ...] = ()  # the tool messages agents were given, as JSON

    def entry(self, name: str) -> LedgerEntry:
        (found,) = (e for e in self.ledger if e.name == name)
        return found

    def kinds(self) -> list[str]:
        return sorted(r.kind for r in self.requests)


def start(chain: Chain, command: str, *flags: str, **env: str) -> subprocess.Popen[str]:
    argv = [sys.executable, str(APP), command, str(chain.db), "r", "--backend", chain.backend]
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ORCHESTRA_FAULTS", "APPROVAL_APP_TOOL_SLEEP")
    }
    environ.update({"APPROVAL_APP_LEASE": str(LEASE), "APPROVAL_APP_POLL": "0.05", **env})
    return subprocess.Popen(
        [*argv, "--graph", chain.graph, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environ(environ),
    )


def finish(proc: subprocess.Popen[str]) -> Proc:
    out, err = proc.communicate(timeout=TIMEOUT)
    lines = [line for line in out.splitlines() if line.strip()]
    return Proc(proc.pid, proc.returncode, json.loads(lines[-1]) if lines else None, err)


def read(db: Path) -> Stored:
    return anyio.run(_read, db)


async def _read(db: Path) -> Stored:
    async with SQLiteStore(db) as store:
        try:
            run = await store.get_run("r")
        except RunNotFoundError:
            return Stored(None)
        ledger = await store.ledger("r")
        requests = await store.requests("r", statuses=())
        told = [
            json.loads(message["content"])
            for row in await store.checkpoints("r")
            for change in json.loads(row.memory or "{}").values()
            for conversation in change.values()
            for message in conversation
            if message["role"] == "tool"
        ]
        return Stored(run, tuple(ledger), tuple(requests), tuple(told))


@dataclass(slots=True)
class Chain:
    """One run, driven process after process; the store as each process left it."""

    db: Path
    backend: str
    graph: str
    procs: list[Proc] = field(default_factory=list)
    stored: list[Stored] = field(default_factory=list)
    seed: int | None = None

    def then(self, command: str = "resume", *flags: str, **env: str) -> Chain:
        """Run one more process to its end (a resume waits out a dead owner's lease)."""
        if command == "resume":
            flags = ("--wait", *flags)
        return self.ended(finish(start(self, command, *flags, **env)))

    def answer(self, answer: str, **env: str) -> Chain:
        return self.then("resume", "--answer", answer, **env)

    def ended(self, proc: Proc) -> Chain:
        self.procs.append(proc)
        self.stored.append(read(self.db))
        return self

    def copy(self, name: str) -> Chain:
        """Copy the database and the side-effect log, to go on from here another way."""
        db = self.db.with_name(f"{self.db.stem}-{name}.db")
        with closing(sqlite3.connect(self.db)) as source, closing(sqlite3.connect(db)) as target:
            source.backup(target)
        log = approval_crash_app.effects_path(self.db)
        if log.exists():
            shutil.copyfile(log, approval_crash_app.effects_path(db))
        return Chain(db, self.backend, self.graph, list(self.procs), list(self.stored), self.seed)

    @property
    def last(self) -> Stored:
        return self.stored[-1]

    def effects(self) -> list[dict[str, Any]]:
        """The tool executions of the run, in the order they started."""
        path = approval_crash_app.effects_path(self.db)
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [line for line in lines if line["kind"] == "tool"]

    def runs(self, proc: int | None = None) -> Counter[str]:
        """How often each tool ran (in the process at index ``proc``, or in all)."""
        pid = None if proc is None else self.procs[proc].pid
        return Counter(e["tool"] for e in self.effects() if pid is None or e["pid"] == pid)

    def refunds(self) -> list[dict[str, Any]]:
        """The arguments of every refund that ran."""
        return [e["arguments"] for e in self.effects() if e["tool"] == "refund"]

    def integrity(self) -> str:
        with closing(sqlite3.connect(self.db)) as conn:
            return "\n".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))


def pool_run(jobs: dict[Any, Any]) -> dict[Any, Any]:
    """Run ``{key: (function, *args)}`` several at a time; return ``{key: result}``."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {key: pool.submit(*job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def expected_resolution(graph: str, refund: str) -> str:
    return "Refunded order 42." if graph == "agent" else refund


def wrote(graph: str) -> Counter[str]:
    """The tools other than the refund a run of ``graph`` makes, each once."""
    return Counter({"note": 1}) if graph == "node" else Counter()


# -- approved, then in doubt: the process dies between the started record and the call ------


def approve_and_crash(root: Path, backend: str, graph: str) -> dict[str, Chain]:
    """Hold the refund for approval; answer Approve or Edit in a process that dies right
    after recording the call as started; resume without an answer; then answer the in-doubt
    request (Retry, or for the edited call also Done) in a copy each."""
    held = Chain(root / f"{backend}-{graph}.db", backend, graph).then("run")
    approved = held.copy("approve").answer("approve", ORCHESTRA_FAULTS=STARTED).then()
    edited = held.copy("edit").answer("edit", ORCHESTRA_FAULTS=STARTED).then()
    return {
        "approve-retry": approved.answer("retry"),
        "edit-retry": edited.copy("retry").answer("retry"),
        "edit-done": edited.copy("done").answer("done"),
    }


@pytest.fixture(scope="module")
def doubts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], Chain]:
    """Every approve-and-crash chain on both backends and both graphs."""
    root = tmp_path_factory.mktemp("approved")
    found = pool_run({case: (approve_and_crash, root, *case) for case in CASES})
    return {
        (backend, graph, name): chain
        for (backend, graph), chains in found.items()
        for name, chain in chains.items()
    }


@cases
def test_approval_request_holds_the_refund_before_it_runs(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str
) -> None:
    """The first process stops ``interrupted`` with one approval request for the refund,
    as proposed, and runs no refund."""
    chain = doubts[backend, graph, "approve-retry"]
    held = chain.procs[0]
    assert held.status == "interrupted", held.stderr
    assert [(r["kind"], r["payload"]["tool"]) for r in held.pending] == [("approval", "refund")]
    assert held.pending[0]["payload"]["arguments"] == ARGUMENTS
    assert chain.runs(0) == wrote(graph)


@cases
@pytest.mark.parametrize("answer", ["approve", "edit"])
def test_approved_call_crash_after_started_record_leaves_it_unrun(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str, answer: str
) -> None:
    """The process answering the approval dies right after recording the refund as started:
    the ledger holds a started entry and the refund did not run."""
    chain = doubts[backend, graph, f"{answer}-retry"]
    died, stored = chain.procs[1], chain.stored[1]
    assert died.code == EXIT_CODE, died.stderr
    entry = stored.entry("refund")
    assert (entry.step, entry.status, entry.result) == (1, "started", None)
    assert stored.run is not None
    assert stored.run.status == "running"
    assert chain.runs(1) == Counter()


@cases
def test_approved_call_in_doubt_resume_asks_in_doubt_not_approval(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str
) -> None:
    """The next resume stops ``interrupted`` with one ``in_doubt`` request for the refund as
    approved: no new approval request, and the refund is not run."""
    chain = doubts[backend, graph, "approve-retry"]
    asked, stored = chain.procs[2], chain.stored[2]
    assert asked.status == "interrupted", asked.stderr
    (request,) = asked.pending
    assert request["kind"] == "in_doubt"
    assert (request["payload"]["tool"], request["payload"]["arguments"]) == ("refund", ARGUMENTS)
    assert "edited" not in request["payload"]
    assert stored.kinds() == ["approval", "in_doubt"]
    assert [r.status for r in stored.requests if r.kind == "in_doubt"] == ["open"]
    assert stored.entry("refund").status == "started"
    assert chain.runs(2) == Counter()


@cases
def test_approved_call_in_doubt_retry_runs_it_once_without_asking_approval_again(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str
) -> None:
    """Answered Retry(), the refund runs exactly once in all (with the approved arguments),
    the run completes, and the approval was asked only the first time."""
    chain = doubts[backend, graph, "approve-retry"]
    retry, stored = chain.procs[-1], chain.last
    assert retry.code == 0, retry.stderr
    assert retry.summary is not None
    assert retry.summary["state"]["resolution"] == expected_resolution(
        graph, "refunded 30 on order 42"
    )
    assert chain.runs() == Counter({"refund": 1}) + wrote(graph)
    assert chain.runs(-1) == Counter({"refund": 1})
    assert chain.refunds() == [ARGUMENTS]
    assert stored.kinds() == ["approval", "in_doubt"]
    assert {r.kind: r.status for r in stored.requests}["in_doubt"] == "used"
    assert stored.entry("refund").status == "done"


@cases
def test_edited_call_in_doubt_request_names_the_edited_arguments(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str
) -> None:
    """An edited call in doubt is asked about with the arguments it ran with, marked edited,
    and not as a new approval."""
    chain = doubts[backend, graph, "edit-retry"]
    asked, stored = chain.procs[2], chain.stored[2]
    assert asked.status == "interrupted", asked.stderr
    (request,) = asked.pending
    assert request["kind"] == "in_doubt"
    assert request["payload"]["arguments"] == EDITED
    assert request["payload"]["edited"] is True
    assert stored.kinds() == ["approval", "in_doubt"]
    assert chain.runs(2) == Counter()


@cases
def test_edited_call_in_doubt_retry_runs_the_edited_call_once(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str
) -> None:
    """Answered Retry(), the edited refund runs exactly once, with the edited arguments, and
    its recorded result says so."""
    chain = doubts[backend, graph, "edit-retry"]
    retry, stored = chain.procs[-1], chain.last
    assert retry.code == 0, retry.stderr
    assert retry.summary is not None
    assert retry.summary["state"]["resolution"] == expected_resolution(
        graph, "refunded 12.5 on order 42"
    )
    assert chain.refunds() == [EDITED]
    assert chain.runs() == Counter({"refund": 1}) + wrote(graph)
    result = json.loads(stored.entry("refund").result or "null")
    assert result["edited_arguments"] == EDITED
    assert stored.kinds() == ["approval", "in_doubt"]


@backends
def test_edited_call_in_doubt_retry_tells_the_agent_the_arguments_changed(
    doubts: dict[tuple[str, str, str], Chain], backend: str
) -> None:
    """Retried, the edited call's tool message tells the agent the arguments it ran with."""
    (told,) = doubts[backend, "agent", "edit-retry"].last.told
    assert told["arguments_used"] == EDITED
    assert told["result"] == "refunded 12.5 on order 42"


@backends
def test_edited_call_in_doubt_done_tells_the_agent_the_arguments_changed(
    doubts: dict[tuple[str, str, str], Chain], backend: str
) -> None:
    """Settled with Done, the edited call's tool message still tells the agent the arguments
    it ran with."""
    (told,) = doubts[backend, "agent", "edit-done"].last.told
    assert told["result"] == DONE_RESULT
    assert told["arguments_used"] == EDITED


@cases
def test_edited_call_in_doubt_done_completes_without_running_it(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str
) -> None:
    """Answered Done(result), the run completes with that result recorded for the edited
    call, and the refund never ran."""
    chain = doubts[backend, graph, "edit-done"]
    done, stored = chain.procs[-1], chain.last
    assert done.code == 0, done.stderr
    assert done.summary is not None
    assert done.summary["state"]["resolution"] == expected_resolution(graph, DONE_RESULT)
    assert chain.refunds() == []
    assert chain.runs() == wrote(graph)
    entry = stored.entry("refund")
    assert entry.status == "done"
    assert json.loads(entry.result or "null")["result"] == DONE_RESULT
    assert stored.kinds() == ["approval", "in_doubt"]


@cases
@pytest.mark.parametrize("name", ["approve-retry", "edit-retry", "edit-done"])
def test_approved_call_crash_database_passes_integrity_check(
    doubts: dict[tuple[str, str, str], Chain], backend: str, graph: str, name: str
) -> None:
    """PRAGMA integrity_check is ok after the crash and every resume."""
    assert doubts[backend, graph, name].integrity() == "ok"


# -- a real SIGKILL while the approved refund runs ------------------------------------------


def approve_and_kill(root: Path, backend: str, graph: str) -> Chain:
    """Hold the refund; approve it in a process SIGKILLed at a random moment while the
    refund runs; resume without an answer; then answer Done."""
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    chain = Chain(root / f"{backend}-{graph}.db", backend, graph, seed=seed).then("run")
    sleep = str(TOOL_SLEEP)
    proc = start(chain, "resume", "--wait", "--answer", "approve", APPROVAL_APP_TOOL_SLEEP=sleep)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not chain.runs()["refund"]:  # the refund logs its start, then sleeps
            if time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
    finally:
        proc.send_signal(signal.SIGKILL)  # (nothing if it ended already: the tests say so)
    return chain.ended(finish(proc)).then().answer("done")


@pytest.fixture(scope="module")
def kills(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Chain]:
    """A SIGKILL while the agent's approved refund runs, on both backends (the node's call
    is left in doubt the same way: see the fault point above)."""
    root = tmp_path_factory.mktemp("killed")
    return pool_run({backend: (approve_and_kill, root, backend, "agent") for backend in BACKENDS})


@backends
def test_approved_call_sigkill_while_it_runs_leaves_it_in_doubt(
    kills: dict[str, Chain], backend: str
) -> None:
    """SIGKILLed at a random moment while the approved refund runs, the process leaves the
    refund started (once) and without a result."""
    chain = kills[backend]
    killed = chain.procs[1]
    assert killed.code == -signal.SIGKILL, f"seed {chain.seed}: {killed.stderr}"
    assert chain.runs(1)["refund"] == 1, f"seed {chain.seed}: the refund never started"
    assert chain.stored[1].entry("refund").status == "started", f"seed {chain.seed}"


@backends
def test_approved_call_sigkill_resume_asks_in_doubt_and_runs_nothing(
    kills: dict[str, Chain], backend: str
) -> None:
    """The resume after the kill asks one ``in_doubt`` request (not the approval again) and
    runs no tool."""
    chain = kills[backend]
    asked = chain.procs[2]
    assert asked.status == "interrupted", f"seed {chain.seed}: {asked.stderr}"
    assert [r["kind"] for r in asked.pending] == ["in_doubt"], f"seed {chain.seed}"
    assert chain.stored[2].kinds() == ["approval", "in_doubt"], f"seed {chain.seed}"
    assert chain.runs(2) == Counter(), f"seed {chain.seed}"


@backends
def test_approved_call_sigkill_never_runs_the_tool_twice(
    kills: dict[str, Chain], backend: str
) -> None:
    """Answered Done, the run completes; across the kill and the recovery the refund ran
    exactly once, in the killed process."""
    chain = kills[backend]
    done = chain.procs[-1]
    assert done.code == 0, f"seed {chain.seed}: {done.stderr}"
    assert chain.runs() == Counter({"refund": 1}), f"seed {chain.seed}"
    assert chain.runs(2) + chain.runs(3) == Counter(), f"seed {chain.seed}"
    assert chain.integrity() == "ok"


# -- a write before the held call: once across a crash -------------------------------------


def before_the_interrupt(root: Path, backend: str, way: str) -> Chain:
    """The node files its note, then its refund is held. ``interrupted``: run, approve.
    ``killed_before_interrupt``: the run dies right after the note's result is recorded;
    resume; approve. ``killed_after_refund``: run; the approving process dies right after
    the refund's result is recorded; resume."""
    chain = Chain(root / f"{backend}-{way}.db", backend, "node")
    if way == "interrupted":
        return chain.then("run").answer("approve")
    if way == "killed_before_interrupt":
        return chain.then("run", ORCHESTRA_FAULTS="after_call_recorded@1").then().answer("approve")
    return chain.then("run").answer("approve", ORCHESTRA_FAULTS="after_call_recorded@1").then()


WAYS = ("interrupted", "killed_before_interrupt", "killed_after_refund")


@pytest.fixture(scope="module")
def writes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Chain]:
    """Each way through the node's note and held refund, on both backends."""
    root = tmp_path_factory.mktemp("writes")
    return pool_run(
        {(b, way): (before_the_interrupt, root, b, way) for b in BACKENDS for way in WAYS}
    )


@backends
@pytest.mark.parametrize("way", WAYS)
def test_write_before_held_call_runs_once_across_crash_and_approval(
    writes: dict[tuple[str, str], Chain], backend: str, way: str
) -> None:
    """The note filed before the held refund ran exactly once, in the first process, and
    the refund once; the run completes."""
    chain = writes[backend, way]
    last = chain.procs[-1]
    assert last.code == 0, last.stderr
    assert last.summary is not None
    assert last.summary["state"]["resolution"] == "refunded 30 on order 42"
    assert last.summary["steps"] == STEPS["node"]
    assert chain.runs() == Counter({"note": 1, "refund": 1})
    assert chain.runs(0)["note"] == 1
    assert [e["arguments"] for e in chain.effects() if e["tool"] == "note"] == [{"text": NOTE}]


@backends
def test_write_before_held_call_crash_leaves_it_recorded_and_nothing_asked(
    writes: dict[tuple[str, str], Chain], backend: str
) -> None:
    """Killed right after the note's result is recorded, the run is left running with the
    note done in the ledger and no request yet."""
    chain = writes[backend, "killed_before_interrupt"]
    died, stored = chain.procs[0], chain.stored[0]
    assert died.code == EXIT_CODE, died.stderr
    assert stored.run is not None
    assert stored.run.status == "running"
    assert stored.entry("note").status == "done"
    assert stored.requests == ()


@backends
def test_write_before_held_call_resume_replays_it_and_asks_approval(
    writes: dict[tuple[str, str], Chain], backend: str
) -> None:
    """The resume after that crash replays the note (not run again) and stops at the
    refund's approval request."""
    chain = writes[backend, "killed_before_interrupt"]
    asked = chain.procs[1]
    assert asked.status == "interrupted", asked.stderr
    assert [(r["kind"], r["payload"]["tool"]) for r in asked.pending] == [("approval", "refund")]
    assert chain.runs(1) == Counter()


@backends
def test_write_before_held_call_approved_refund_recorded_is_not_asked_again(
    writes: dict[tuple[str, str], Chain], backend: str
) -> None:
    """The approving process killed right after the refund's result is recorded, a resume
    without an answer completes the run: the approval is not asked again and nothing runs."""
    chain = writes[backend, "killed_after_refund"]
    died, resumed = chain.procs[1], chain.procs[2]
    assert died.code == EXIT_CODE, died.stderr
    assert chain.stored[1].entry("refund").status == "done"
    assert resumed.status == "completed", resumed.stderr
    assert chain.runs(2) == Counter()
    assert chain.last.kinds() == ["approval"]
