"""Crash tests: real processes die mid-run and new processes resume them (DESIGN §3, §6).

Every process runs ``tests/apps/crash_app.py`` (a counter loop with one fan-out step of Send tasks,
each node execution logged to a side-effect file). A run is ended by a named fault point
(``ORCHESTRA_FAULTS``, ``os._exit(137)``) or a SIGKILL at a random moment, then resumed in a
new process. Whatever the crash, the resumed run must end like an uninterrupted one, keep every
committed checkpoint unchanged, never run again a task whose step committed or whose pending
write was stored, and leave a database that passes ``PRAGMA integrity_check``. Leases: two
resumers of one run cannot both own it, and a frozen owner that wakes after losing its lease
cannot write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from apps import crash_app
from apps.crash_app import EXPECTED_ITEMS, FAN_AT, FAN_OUT, FAN_STEP, LAST, STEPS
from helpers import APPS, child_environ, integrity

from orchestra.errors import RunNotFoundError
from orchestra.store import CheckpointRow, RunRecord, SQLiteStore

APP = APPS / "crash_app.py"
BACKENDS = ("asyncio", "trio")
LEASE = 0.3  # seconds: a dead owner's run can be taken over this long after its last renewal
TIMEOUT = 30.0  # seconds any one process may take before the test gives up on it

Key = tuple[int, str]  # (step, task label): one task of one step


# -- driving crash_app ----------------------------------------------------------------------


class App:
    """One crash_app process; its output is read by threads so a pipe never fills."""

    def __init__(self, action: str, db: Path, run_id: str, backend: str, *flags: str, **env: str):
        environ = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ORCHESTRA_FAULTS", "CRASH_APP_SLEEP", "CRASH_APP_LEASE")
        }
        environ.update({"CRASH_APP_LEASE": str(LEASE), "CRASH_APP_POLL": "0.05", **env})
        argv = [sys.executable, str(APP), action, str(db), run_id, "--backend", backend, *flags]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_environ(environ),
        )
        self.pid = self.proc.pid
        self.ready = threading.Event()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        with stream:
            for line in stream:
                lines.append(line)
                if line.startswith("crash_app: ready"):
                    self.ready.set()
        self.ready.set()  # the process ended: nobody waits for a ready line any more

    def wait_ready(self) -> None:
        assert self.ready.wait(TIMEOUT), "crash_app did not start"
        assert any(line.startswith("crash_app: ready") for line in self.err), self.stderr

    def wait(self) -> int:
        code = self.proc.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return code

    @property
    def summary(self) -> dict[str, Any] | None:
        lines = [line for line in self.out if line.strip()]
        return json.loads(lines[-1]) if lines else None

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def run_app(action: str, db: Path, run_id: str, backend: str, *flags: str, **env: str) -> App:
    """Run crash_app to its end."""
    app = App(action, db, run_id, backend, *flags, **env)
    app.wait()
    return app


# -- reading what is stored -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A run as its store shows it, read through the Store contract."""

    run: RunRecord | None
    checkpoints: tuple[CheckpointRow, ...] = ()
    pending: frozenset[str] = frozenset()  # labels of the pending writes of the step in flight
    states: tuple[dict[str, Any], ...] = ()  # load_state at every step

    @property
    def committed(self) -> int:
        return self.checkpoints[-1].step if self.checkpoints else -1


def read(db: Path, run_id: str, *, states: bool = False) -> Stored:
    if not db.exists():
        return Stored(None)
    return anyio.run(_read, db, run_id, states)


async def _read(db: Path, run_id: str, states: bool) -> Stored:
    store = SQLiteStore(db)
    try:
        try:
            run = await store.get_run(run_id)
        except RunNotFoundError:
            return Stored(None)
        rows = tuple(await store.checkpoints(run_id))
        step = rows[-1].step if rows else -1
        pending = frozenset(w.task for w in await store.pending_writes(run_id, step + 1))
        loaded: list[dict[str, Any]] = []
        if states:
            app = crash_app.build(store)
            for row in rows:
                loaded.append((await app.load_state(run_id, row.step)).model_dump(mode="json"))
        return Stored(run, rows, pending, tuple(loaded))
    finally:
        await store.aclose()


def dump_tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of every table: what "wrote nothing" is checked against."""
    with closing(sqlite3.connect(db)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"'), key=repr) for t in tables}


def effects(db: Path, run_id: str) -> list[dict[str, Any]]:
    """Return the node executions of a run, in the order they started."""
    path = crash_app.effects_path(db)
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["run"] == run_id]


def key(effect: dict[str, Any]) -> Key:
    return effect["step"], crash_app.task_label(effect["node"], effect["task"])


@dataclass(frozen=True, slots=True)
class Death:
    """A process that stopped owning a run, and what the store kept of its work."""

    pid: int
    committed: int
    pending: frozenset[str]


def check_nothing_kept_is_redone(
    run_effects: list[dict[str, Any]], deaths: list[Death], expected: frozenset[Key]
) -> None:
    """Every task ran until one execution was kept (its step committed, or its pending
    write was stored, or the process finished the run), and never after that."""
    dead = {death.pid: death for death in deaths}
    kept: dict[Key, int] = {}
    problems = []
    for effect in run_effects:
        task = key(effect)
        if task in kept:
            problems.append(f"{task} ran again in pid {effect['pid']} after pid {kept[task]}")
        death = dead.get(effect["pid"])
        if (
            death is None
            or task[0] <= death.committed
            or (task[0] == death.committed + 1 and task[1] in death.pending)
        ):
            kept.setdefault(task, effect["pid"])
    assert not problems, "\n".join(problems)
    assert set(kept) == expected, f"kept {sorted(kept)}, expected {sorted(expected)}"


def wait_for_lease_expiry(db: Path, run_id: str) -> None:
    run = read(db, run_id).run
    assert run is not None
    if run.lease_expires_at is not None:
        time.sleep(max(0.0, run.lease_expires_at - time.time()) + 0.02)


# -- the uninterrupted run ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    state: dict[str, Any]
    states: tuple[dict[str, Any], ...]
    tasks: frozenset[Key]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The same graph run once without a crash."""
    db = tmp_path_factory.mktemp("reference") / "runs.db"
    app = run_app("run", db, "ref", "asyncio")
    assert app.proc.returncode == 0, app.stderr
    summary = app.summary
    assert summary is not None
    assert summary["state"] == {"counter": LAST, "items": EXPECTED_ITEMS}
    stored = read(db, "ref", states=True)
    run_effects = effects(db, "ref")
    assert Counter(key(e) for e in run_effects).most_common(1)[0][1] == 1
    return Reference(summary["state"], stored.states, frozenset(key(e) for e in run_effects))


# -- deterministic crash windows ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    point: str
    step: int | None
    committed: int  # the last step committed when the process dies there

    @property
    def faults(self) -> str:
        return self.point if self.step is None else f"{self.point}@{self.step}"


WINDOWS = (
    Window("after_run_created", None, 0),  # before the first step
    Window("before_commit", 1, 0),
    Window("after_commit", 1, 1),
    Window("before_commit", FAN_AT, FAN_AT - 1),  # the step whose route fans out
    Window("after_commit", FAN_AT, FAN_AT),  # the next tasks carry Send payloads
    Window("after_pending_write", FAN_STEP, FAN_AT),  # one worker done, the others not
    Window("before_commit", FAN_STEP, FAN_AT),  # every worker has a pending write
    Window("after_commit", FAN_STEP, FAN_STEP),
    Window("before_commit", STEPS, STEPS - 1),  # the last step
    Window("after_commit", STEPS, STEPS),  # committed, but the run not yet marked completed
)


@dataclass(frozen=True, slots=True)
class Recovery:
    crash: App
    crashed: Stored
    resume: App
    final: Stored
    effects: list[dict[str, Any]]
    integrity: str


def crash_and_resume(root: Path, backend: str, window: Window) -> Recovery:
    db = root / f"{backend}-{window.faults.replace('@', '-')}.db"
    crash = run_app("run", db, "r", backend, ORCHESTRA_FAULTS=window.faults)
    crashed = read(db, "r")
    resume = run_app("resume", db, "r", backend, "--wait")
    final = read(db, "r", states=True)
    return Recovery(crash, crashed, resume, final, effects(db, "r"), integrity(db))


@pytest.fixture(scope="module")
def recoveries(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, Window], Recovery]:
    """Crash and resume every window on both backends, several at a time (they are
    independent, and each waits mostly on interpreter start-up)."""
    root = tmp_path_factory.mktemp("windows")
    cases = [(backend, window) for backend in BACKENDS for window in WINDOWS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(crash_and_resume, root, *case) for case in cases}
        return {case: future.result() for case, future in futures.items()}


window_cases = pytest.mark.parametrize(
    ("backend", "window"),
    [(b, w) for b in BACKENDS for w in WINDOWS],
    ids=[f"{b}-{w.faults}" for b in BACKENDS for w in WINDOWS],
)


@window_cases
def test_crash_window_leaves_resumable_run(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """The process dies at the named point, leaving a running run with exactly the steps
    committed before that point (the run row and checkpoint 0 exist before the first step)."""
    recovery = recoveries[backend, window]
    assert recovery.crash.proc.returncode == 137, recovery.crash.stderr
    crashed = recovery.crashed
    assert crashed.run is not None, "no run row after the crash"
    assert crashed.run.status == "running"
    assert [row.step for row in crashed.checkpoints] == list(range(window.committed + 1))


@window_cases
def test_crash_window_resume_ends_like_uninterrupted_run(
    recoveries: dict[tuple[str, Window], Recovery],
    reference: Reference,
    backend: str,
    window: Window,
) -> None:
    """A new process resumes the run to completion with the uninterrupted run's state."""
    recovery = recoveries[backend, window]
    summary = recovery.resume.summary
    assert recovery.resume.proc.returncode == 0, recovery.resume.stderr
    assert summary is not None
    assert (summary["status"], summary["steps"]) == ("completed", STEPS)
    assert summary["state"] == reference.state
    assert recovery.final.run is not None
    assert recovery.final.run.status == "completed"


@window_cases
def test_crash_window_keeps_committed_checkpoints(
    recoveries: dict[tuple[str, Window], Recovery],
    reference: Reference,
    backend: str,
    window: Window,
) -> None:
    """Checkpoints committed before the crash are unchanged after resume; every step's
    state equals the uninterrupted run's."""
    recovery = recoveries[backend, window]
    before, after = recovery.crashed.checkpoints, recovery.final.checkpoints
    assert after[: len(before)] == before
    assert [row.step for row in after] == list(range(STEPS + 1))
    assert recovery.final.states == reference.states


@window_cases
def test_crash_window_redoes_only_unfinished_tasks(
    recoveries: dict[tuple[str, Window], Recovery],
    reference: Reference,
    backend: str,
    window: Window,
) -> None:
    """No task of a committed step runs again, nor a fan-out task with a pending write;
    the unfinished tasks of the step in flight run again once."""
    recovery = recoveries[backend, window]
    crashed = recovery.crashed
    death = Death(recovery.crash.pid, crashed.committed, crashed.pending)
    check_nothing_kept_is_redone(recovery.effects, [death], reference.tasks)
    workers = {crash_app.task_label("worker", i) for i in range(FAN_OUT)}
    if window.point == "after_pending_write":
        assert crashed.pending, "no pending write stored before the crash"
        assert crashed.pending < workers
    elif window == Window("before_commit", FAN_STEP, FAN_AT):
        assert crashed.pending == workers
        resumed = [e for e in recovery.effects if e["pid"] == recovery.resume.pid]
        assert [key(e) for e in resumed if e["step"] == FAN_STEP] == []


@window_cases
def test_crash_window_database_passes_integrity_check(
    recoveries: dict[tuple[str, Window], Recovery], backend: str, window: Window
) -> None:
    """PRAGMA integrity_check is ok after the crash and the resume."""
    assert recoveries[backend, window].integrity == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_again_in_same_step_keeps_both_pending_writes(
    tmp_path: Path, reference: Reference, backend: str
) -> None:
    """A resumer that dies in the fan-out step too adds its pending write to the first
    process's; the third process runs only the tasks neither of them finished."""
    db, fault = tmp_path / "runs.db", f"after_pending_write@{FAN_STEP}"
    first = run_app("run", db, "r", backend, ORCHESTRA_FAULTS=fault)
    after_first = read(db, "r")
    second = run_app("resume", db, "r", backend, "--wait", ORCHESTRA_FAULTS=fault)
    after_second = read(db, "r")
    assert (first.proc.returncode, second.proc.returncode) == (137, 137), second.stderr
    assert after_second.committed == after_first.committed == FAN_AT
    assert after_first.pending < after_second.pending
    third = run_app("resume", db, "r", backend, "--wait")
    assert third.proc.returncode == 0, third.stderr
    final = read(db, "r", states=True)
    assert final.states == reference.states
    deaths = [
        Death(first.pid, FAN_AT, after_first.pending),
        Death(second.pid, FAN_AT, after_second.pending),
    ]
    check_nothing_kept_is_redone(effects(db, "r"), deaths, reference.tasks)
    assert integrity(db) == "ok"


# -- random SIGKILLs ------------------------------------------------------------------------

NODE_SLEEP = 0.005  # spreads a run over ~90 ms (~8 ms a step) so a random kill lands anywhere
KILLED_RUNS = 2
KILLS_PER_RUN = 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_random_sigkill_resumes_to_same_state(
    tmp_path: Path, reference: Reference, backend: str
) -> None:
    """Runs SIGKILLed at random moments (their resumers too) end like uninterrupted runs,
    with committed checkpoints kept, nothing kept redone and an intact database."""
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    db = tmp_path / "runs.db"
    kills = 0
    for n in range(KILLED_RUNS):
        run_id = f"random-{n}"
        deaths: list[Death] = []
        snapshots: list[Stored] = []
        stored = Stored(None)
        for _ in range(KILLS_PER_RUN):
            action = "run" if stored.run is None else "resume"
            app = App(action, db, run_id, backend, "--wait", CRASH_APP_SLEEP=str(NODE_SLEEP))
            app.wait_ready()
            lease_left = 0.0
            if stored.run is not None and stored.run.lease_expires_at is not None:
                lease_left = max(0.0, stored.run.lease_expires_at - time.time())
            remaining = STEPS - stored.committed
            time.sleep(lease_left + rng.uniform(0, 0.006 * remaining))
            os.kill(app.pid, signal.SIGKILL)
            code = app.wait()
            stored = read(db, run_id)
            if code == 0:
                break  # it finished before the kill
            assert code == -signal.SIGKILL, app.stderr
            kills += 1
            deaths.append(Death(app.pid, stored.committed, stored.pending))
            snapshots.append(stored)
            if stored.run is not None and stored.run.status == "completed":
                break  # killed after finishing the run, before exiting
        if stored.run is None or stored.run.status != "completed":
            action = "run" if stored.run is None else "resume"
            app = run_app(action, db, run_id, backend, "--wait")
            assert app.proc.returncode == 0, f"seed {seed}: {app.stderr}"
        final = read(db, run_id, states=True)
        assert final.run is not None
        assert final.run.status == "completed", f"seed {seed}"
        assert final.states[-1] == reference.state, f"seed {seed}"
        assert final.states == reference.states, f"seed {seed}"
        for snapshot in snapshots:
            kept = snapshot.checkpoints
            assert final.checkpoints[: len(kept)] == kept, f"seed {seed}"
        check_nothing_kept_is_redone(effects(db, run_id), deaths, reference.tasks)
    assert integrity(db) == "ok"
    assert kills >= 1, f"seed {seed}: every process finished before its kill"


# -- leases: concurrent resumers, fencing ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_concurrent_resumers_exactly_one_wins(
    tmp_path: Path, reference: Reference, backend: str
) -> None:
    """Three processes resume one crashed run at the same moment: one completes it, the
    others are refused with LeaseHeldError and run nothing."""
    db, go = tmp_path / "runs.db", tmp_path / "go"
    crash = run_app("run", db, "contested", backend, ORCHESTRA_FAULTS="after_commit@3")
    assert crash.proc.returncode == 137, crash.stderr
    # the winner's run lasts ~0.8 s and its lease 1 s, so neither a slow start of a loser nor
    # a slow renewal of the winner on a busy machine can let a second process in
    slow = {"CRASH_APP_SLEEP": "0.1", "CRASH_APP_LEASE": "1.0"}
    resumers = [App("resume", db, "contested", backend, "--go", str(go), **slow) for _ in range(3)]
    for app in resumers:
        app.wait_ready()
    wait_for_lease_expiry(db, "contested")
    go.touch()
    codes = [app.wait() for app in resumers]
    assert sorted(codes) == [0, 3, 3], [app.stderr for app in resumers]
    (winner,) = (app for app in resumers if app.proc.returncode == 0)
    assert winner.summary is not None
    assert winner.summary["state"] == reference.state
    for loser in (app for app in resumers if app is not winner):
        assert loser.summary is not None
        assert loser.summary["error_type"] == "LeaseHeldError"
        assert "crash_app: LeaseHeldError: run contested is owned by" in loser.stderr
    ran = {e["pid"] for e in effects(db, "contested") if e["pid"] != crash.pid}
    assert ran == {winner.pid}
    death = Death(crash.pid, 3, frozenset())
    check_nothing_kept_is_redone(effects(db, "contested"), [death], reference.tasks)
    assert integrity(db) == "ok"


def freeze(app: App, db: Path) -> None:
    """SIGSTOP ``app`` at a moment it holds no write lock (it commits in microseconds)."""
    for _ in range(100):
        os.kill(app.pid, signal.SIGSTOP)
        with closing(sqlite3.connect(db, timeout=0, isolation_level=None)) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                os.kill(app.pid, signal.SIGCONT)
                time.sleep(0.005)
                continue
            conn.execute("ROLLBACK")
            return
    pytest.fail("could not freeze the owner outside a write transaction")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [3, FAN_STEP], ids=["single-task-step", "fan-out-step"])
def test_crash_frozen_owner_is_fenced_off(
    tmp_path: Path, reference: Reference, backend: str, step: int
) -> None:
    """An owner frozen past its lease is taken over; woken up, it fails with LeaseLostError
    and writes nothing: the run's checkpoints and state are the new owner's."""
    db = tmp_path / "runs.db"
    lease = {"CRASH_APP_LEASE": "0.5"}
    owner = App("run", db, "fenced", backend, CRASH_APP_SLEEP="0.2", **lease)
    owner.wait_ready()
    deadline = time.monotonic() + TIMEOUT
    while not any(e["step"] == step for e in effects(db, "fenced")):
        assert time.monotonic() < deadline, owner.stderr
        assert owner.proc.poll() is None, owner.stderr
        time.sleep(0.005)
    time.sleep(0.02)  # inside the step's nodes (they sleep 0.2 s), well before its commit
    freeze(owner, db)
    try:
        taken = read(db, "fenced")
        assert taken.committed == step - 1
        successor = run_app("resume", db, "fenced", backend, "--wait", **lease)
        assert successor.proc.returncode == 0, successor.stderr
        assert successor.summary is not None
        assert successor.summary["state"] == reference.state
        tables = dump_tables(db)
        executions = effects(db, "fenced")
    finally:
        os.kill(owner.pid, signal.SIGCONT)
    code = owner.wait()
    assert dump_tables(db) == tables, "the fenced owner wrote to the database"
    assert effects(db, "fenced") == executions, "the fenced owner ran more nodes"
    assert integrity(db) == "ok"
    final = read(db, "fenced", states=True)
    assert final.states == reference.states
    assert final.checkpoints[: len(taken.checkpoints)] == taken.checkpoints
    death = Death(owner.pid, taken.committed, taken.pending)
    check_nothing_kept_is_redone(executions, [death], reference.tasks)
    # the owner itself ends with a failed outcome naming the lost lease, not a traceback
    assert owner.summary is not None, f"the fenced owner crashed:\n{owner.stderr[-3000:]}"
    assert code == 1, owner.stderr
    assert (owner.summary["status"], owner.summary["error_type"]) == ("failed", "LeaseLostError")


# -- a dead owner is taken over at once ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_sigkilled_owner_is_taken_over_before_its_lease_expires(
    tmp_path: Path, reference: Reference, backend: str
) -> None:
    """A run whose owner was SIGKILLed on this host is resumed at once by app.resume, long
    before the dead owner's 30 s lease would lapse; the epoch moves on (the dead owner is
    fenced off) and the run ends like an uninterrupted one."""
    db = tmp_path / "runs.db"
    app = App("run", db, "r", backend, CRASH_APP_LEASE="30", CRASH_APP_SLEEP="0.05")
    app.wait_ready()
    while read(db, "r").committed < 3:  # killed mid-run, with steps committed
        time.sleep(0.005)
    os.kill(app.pid, signal.SIGKILL)
    assert app.wait() == -signal.SIGKILL, app.stderr
    dead = read(db, "r").run
    assert dead is not None
    assert dead.lease_expires_at is not None
    resumed = run_app("resume", db, "r", backend, CRASH_APP_LEASE="30")
    assert resumed.proc.returncode == 0, resumed.stderr
    assert time.time() + 20 < dead.lease_expires_at  # resumed to the end, lease not waited
    stored = read(db, "r", states=True)
    assert stored.run is not None
    assert stored.run.status == "completed"
    assert stored.run.epoch > dead.epoch
    assert stored.states[-1] == reference.states[-1]
