"""The Store contract: every store implementation keeps runs, leases and checkpoints alike."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import LEASE, POLL
from typing_extensions import get_protocol_members

from orchestra.errors import (
    LeaseHeldError,
    LeaseLostError,
    RunNotFoundError,
    RunStatusError,
    StopAllActiveError,
    StoreError,
)
from orchestra.runs.fork import fork_run
from orchestra.runtime.checkpoint import replay_json
from orchestra.store import MemoryStore, OperatorStore, RunStore, SQLiteStore, Store
from orchestra.store.base import (
    CheckpointRow,
    EventRow,
    PendingWrite,
    RunRecord,
    StepCommit,
)

pytestmark = pytest.mark.anyio

TASKS = '[{"node":"tick","index":0,"label":"tick"}]'


@pytest.fixture(params=["sqlite", "memory"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Store]:
    """Return a function that makes each store implementation with the given options."""

    def make(**options: float) -> Store:
        if request.param == "sqlite":
            return SQLiteStore(tmp_path / "runs.db", **options)
        return MemoryStore(**options)

    return make


def run_record(
    run_id: str = "run-1",
    *,
    status: str = "running",
    owner: str | None = "owner-a",
    epoch: int = 1,
    expires_in: float | None = 30.0,
    created_at: float | None = None,
    updated_at: float | None = None,
) -> RunRecord:
    """Build a run row; a run at rest has no owner and no lease."""
    now = time.time()
    created = now if created_at is None else created_at
    if status != "running":
        owner, expires_in = None, None
    return RunRecord(
        run_id=run_id,
        graph="ticker",
        structure_hash="abc123",
        app_ref="pkg.module:app",
        status=status,
        step=0,
        owner=owner,
        epoch=epoch,
        lease_expires_at=None if expires_in is None else now + expires_in,
        created_at=created,
        updated_at=created if updated_at is None else updated_at,
        usage={"steps": 0},
    )


def snapshot(step: int, state: dict[str, Any], *, events: str | None = None) -> CheckpointRow:
    """Build a checkpoint holding the whole state."""
    return CheckpointRow(
        step=step,
        snapshot=json.dumps(state),
        delta=None,
        tasks=TASKS,
        created_at=time.time(),
        events=events,
    )


def delta(step: int, changes: dict[str, Any], *, events: str | None = None) -> CheckpointRow:
    """Build a checkpoint holding only the fields a step set."""
    return CheckpointRow(
        step=step,
        snapshot=None,
        delta=json.dumps({"set": changes}),
        tasks=TASKS,
        created_at=time.time(),
        events=events,
    )


def commit(row: CheckpointRow, *, had_pending: bool = False) -> StepCommit:
    return StepCommit(step=row.step, checkpoint=row, had_pending=had_pending)


def pending(step: int, task: str) -> PendingWrite:
    return PendingWrite(step=step, task=task, result=json.dumps({"update": {task: 1}, "goto": []}))


async def create(
    store: Store, record: RunRecord | None = None, events: Sequence[EventRow] = ()
) -> RunRecord:
    """Create a run with checkpoint 0 (count 0)."""
    record = record or run_record()
    await store.create_run(record, snapshot(0, {"count": 0}), events)
    return record


def protocol_members(protocol: type[Any]) -> set[str]:
    """The names a protocol declares (with those of the protocols it extends)."""
    return set(get_protocol_members(protocol))


async def steps_of(store: Store, run_id: str) -> list[int]:
    return [row.step for row in await store.checkpoints(run_id)]


# -- options and lifetime ----------------------------------------------------------------


def test_store_refuses_a_poll_longer_than_a_third_of_the_lease(
    make_store: Callable[..., Store],
) -> None:
    """A lease renewed on a poll must not lapse between two polls: poll <= lease / 3."""
    with pytest.raises(ValueError, match="poll_seconds"):
        make_store(lease_seconds=3.0, poll_seconds=1.01)
    assert make_store(lease_seconds=3.0, poll_seconds=1.0).poll_seconds == 1.0


async def test_store_is_an_async_context_manager(make_store: Callable[..., Store]) -> None:
    """`async with` gives the store itself, ready to use, and closes it on exit."""
    made = make_store(lease_seconds=LEASE, poll_seconds=POLL)
    async with made as store:
        assert store is made
        record = await create(store)
        assert await store.get_run("run-1") == record


@pytest.mark.parametrize("contract", [RunStore, OperatorStore, Store])
def test_store_implements_the_contract(
    make_store: Callable[..., Store], contract: type[Any]
) -> None:
    """Each store is an instance of both contracts (and of their union), and has every
    method of each with the protocol's parameters, in order, kinds and defaults."""
    made = make_store()
    assert isinstance(made, contract)
    for name in protocol_members(contract):
        wanted = getattr(contract, name, None)
        if not callable(wanted):  # an attribute: present, set by the constructor
            assert hasattr(made, name), name
            continue
        got = inspect.signature(getattr(type(made), name))
        expected = inspect.signature(wanted)
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in expected.parameters.values()
        ], name
        assert inspect.iscoroutinefunction(getattr(type(made), name)) == (
            inspect.iscoroutinefunction(wanted)
        ), name


def test_store_contracts_split_the_store_between_them() -> None:
    """Every member of Store is in exactly one of the two contracts, or in what they share
    (where the store lives and its lifecycle)."""
    run, operator = protocol_members(RunStore), protocol_members(OperatorStore)
    shared = {"path", "aclose", "__aenter__", "__aexit__"}
    assert run & operator == shared
    assert run | operator == protocol_members(Store)


# == the run contract (RunStore) ============================================================


# -- create_run --------------------------------------------------------------------------


async def test_create_run_stores_the_run_row(store: Store) -> None:
    """A created run reads back exactly as written."""
    record = await create(store)
    assert await store.get_run("run-1") == record


async def test_create_run_stores_checkpoint_0(store: Store) -> None:
    """A created run has its input as checkpoint 0."""
    await create(store)
    rows = await store.checkpoints("run-1")
    assert [(r.step, r.snapshot) for r in rows] == [(0, '{"count": 0}')]


async def test_create_run_refuses_a_duplicate_run_id(store: Store) -> None:
    """A second run with the same id is refused and the first is kept."""
    first = await create(store)
    with pytest.raises(StoreError, match="run-1"):
        await store.create_run(run_record(owner="owner-b"), snapshot(0, {"count": 9}), [])
    assert await store.get_run("run-1") == first
    assert await steps_of(store, "run-1") == [0]


async def test_create_run_is_refused_under_stop_all(store: Store) -> None:
    """No run starts while stop-all is in force."""
    await store.stop_all("maintenance")
    with pytest.raises(StopAllActiveError, match="maintenance"):
        await create(store)
    with pytest.raises(RunNotFoundError):
        await store.get_run("run-1")


# -- commit_step -------------------------------------------------------------------------


async def test_commit_step_adds_a_checkpoint_and_advances_the_step(store: Store) -> None:
    """A committed step is a new checkpoint and the run's step."""
    await create(store)
    await store.commit_step("run-1", 1, commit(delta(1, {"count": 1})))
    await store.commit_step("run-1", 1, commit(delta(2, {"count": 2})))
    assert await steps_of(store, "run-1") == [0, 1, 2]
    assert (await store.get_run("run-1")).step == 2


@pytest.mark.parametrize("had_pending", [False, True])
async def test_commit_step_with_a_stale_epoch_raises_lease_lost_and_writes_nothing(
    store: Store, had_pending: bool
) -> None:
    """A commit under an epoch that is not current is refused whole."""
    await create(store)
    await store.put_pending_write("run-1", 1, pending(1, "a"))
    with pytest.raises(LeaseLostError) as info:
        await store.commit_step("run-1", 2, commit(delta(1, {"count": 1}), had_pending=had_pending))
    assert (info.value.run_id, info.value.epoch) == ("run-1", 2)
    assert await steps_of(store, "run-1") == [0]
    assert (await store.get_run("run-1")).step == 0
    assert await store.pending_writes("run-1", 1) == [pending(1, "a")]


async def test_commit_step_by_an_owner_fenced_off_by_a_takeover_raises_lease_lost(
    store: Store,
) -> None:
    """Once a new owner took the expired lease, the old owner's commits are refused."""
    await create(store, run_record(expires_in=-1.0))
    taken = await store.acquire("run-1", "owner-b")
    with pytest.raises(LeaseLostError):
        await store.commit_step("run-1", 1, commit(delta(1, {"count": 1})))
    await store.commit_step("run-1", taken.epoch, commit(delta(1, {"count": 10})))
    rows = await store.checkpoints("run-1")
    assert [(r.step, r.delta) for r in rows[1:]] == [(1, '{"set": {"count": 10}}')]


# -- pending writes ----------------------------------------------------------------------


async def test_put_pending_write_keeps_finished_tasks_of_the_step(store: Store) -> None:
    """Pending writes are kept per step, ordered by task."""
    await create(store)
    await store.put_pending_write("run-1", 1, pending(1, "b"))
    await store.put_pending_write("run-1", 1, pending(1, "a"))
    assert await store.pending_writes("run-1", 1) == [pending(1, "a"), pending(1, "b")]
    assert await store.pending_writes("run-1", 2) == []


async def test_put_pending_write_with_a_stale_epoch_raises_lease_lost(store: Store) -> None:
    """A pending write is fenced like a commit."""
    await create(store)
    with pytest.raises(LeaseLostError):
        await store.put_pending_write("run-1", 2, pending(1, "a"))
    assert await store.pending_writes("run-1", 1) == []


async def test_put_pending_write_of_an_unknown_run_raises_lease_lost(store: Store) -> None:
    """A pending write for a run that does not exist is refused."""
    with pytest.raises(LeaseLostError):
        await store.put_pending_write("nope", 1, pending(1, "a"))


async def test_commit_step_with_pending_writes_clears_them(store: Store) -> None:
    """Committing a step that had pending writes drops them."""
    await create(store)
    await store.put_pending_write("run-1", 1, pending(1, "a"))
    await store.put_pending_write("run-1", 1, pending(1, "b"))
    await store.commit_step("run-1", 1, commit(delta(1, {"count": 1}), had_pending=True))
    assert await store.pending_writes("run-1", 1) == []


# -- finish_run --------------------------------------------------------------------------


async def test_finish_run_records_the_status_and_releases_the_lease(store: Store) -> None:
    """A finished run is at rest: status, reason, error and usage kept, no owner."""
    await create(store)
    await store.finish_run(
        "run-1",
        1,
        status="failed",
        reason="why",
        error="boom",
        usage={"steps": 3, "tasks": 4},
        events=[],
    )
    record = await store.get_run("run-1")
    assert (record.status, record.reason, record.error) == ("failed", "why", "boom")
    assert record.usage == {"steps": 3, "tasks": 4}
    assert (record.owner, record.lease_expires_at) == (None, None)


async def test_finish_run_lets_another_owner_acquire_at_once(store: Store) -> None:
    """After finish_run, the run can be taken without waiting for the lease."""
    await create(store)
    await store.finish_run(
        "run-1", 1, status="interrupted", reason=None, error=None, usage={}, events=[]
    )
    record = await store.acquire("run-1", "owner-b")
    assert (record.owner, record.epoch) == ("owner-b", 2)


async def test_finish_run_with_a_stale_epoch_raises_lease_lost(store: Store) -> None:
    """A fenced owner cannot record an end for the run."""
    record = await create(store)
    with pytest.raises(LeaseLostError):
        await store.finish_run(
            "run-1", 2, status="completed", reason=None, error=None, usage={}, events=[]
        )
    assert await store.get_run("run-1") == record


async def test_finish_run_stores_its_events(store: Store) -> None:
    """The events given to finish_run are part of the run's events."""
    await create(store)
    done = EventRow(step=0, kind="run_finished", at=time.time(), data="{}")
    await store.finish_run(
        "run-1", 1, status="completed", reason=None, error=None, usage={}, events=[done]
    )
    assert await store.events("run-1") == [done]


# -- acquire -----------------------------------------------------------------------------


async def test_acquire_bumps_the_epoch_and_takes_the_lease(store: Store) -> None:
    """Acquiring a run at rest makes the caller its running owner under a new epoch."""
    await create(store, run_record(status="interrupted"))
    before = time.time()
    record = await store.acquire("run-1", "owner-b")
    assert (record.owner, record.epoch, record.status) == ("owner-b", 2, "running")
    assert record.lease_expires_at is not None
    assert record.lease_expires_at >= before + LEASE
    assert await store.get_run("run-1") == record


async def test_acquire_while_the_lease_is_live_raises_lease_held_naming_the_owner(
    store: Store,
) -> None:
    """A live owner keeps its run; the error names it."""
    await create(store)
    with pytest.raises(LeaseHeldError) as info:
        await store.acquire("run-1", "owner-b")
    assert info.value.owner == "owner-a"
    assert "owner-a" in str(info.value)
    assert (await store.get_run("run-1")).epoch == 1


async def test_acquire_takes_over_after_the_lease_expires(store: Store) -> None:
    """An owner that stopped renewing loses the run once its lease runs out."""
    await create(store, run_record(status="interrupted"))
    await store.acquire("run-1", "owner-a")
    with pytest.raises(LeaseHeldError):
        await store.acquire("run-1", "owner-b")
    await anyio.sleep(LEASE + 0.1)
    record = await store.acquire("run-1", "owner-b")
    assert (record.owner, record.epoch) == ("owner-b", 3)


async def test_acquire_a_completed_run_raises_run_status_error(store: Store) -> None:
    """A completed run cannot be taken again."""
    await create(store, run_record(status="completed"))
    with pytest.raises(RunStatusError) as info:
        await store.acquire("run-1", "owner-b")
    assert info.value.status == "completed"


async def test_acquire_an_unknown_run_raises_run_not_found(store: Store) -> None:
    """Acquiring a run that does not exist names it."""
    with pytest.raises(RunNotFoundError, match="nope"):
        await store.acquire("nope", "owner-b")


async def test_acquire_under_stop_all_raises_stop_all_active(store: Store) -> None:
    """No run resumes while stop-all is in force."""
    await create(store, run_record(status="interrupted"))
    await store.stop_all("maintenance")
    with pytest.raises(StopAllActiveError):
        await store.acquire("run-1", "owner-b")
    assert (await store.get_run("run-1")).status == "interrupted"


# -- renew -------------------------------------------------------------------------------


async def test_renew_extends_the_lease_and_refreshes_step_and_usage(store: Store) -> None:
    """Renewing pushes the lease out and records the owner's progress."""
    record = await create(store, run_record(expires_in=0.1))
    await store.commit_step("run-1", 1, commit(delta(1, {"count": 1})))
    await store.commit_step("run-1", 1, commit(delta(2, {"count": 2})))
    assert await store.renew("run-1", 1, step=2, usage={"steps": 2, "tasks": 2})
    renewed = await store.get_run("run-1")
    assert record.lease_expires_at is not None
    assert renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > record.lease_expires_at
    assert (renewed.step, renewed.usage) == (2, {"steps": 2, "tasks": 2})


async def test_renew_with_a_stale_epoch_returns_false(store: Store) -> None:
    """A fenced owner cannot renew, and changes nothing by trying."""
    record = await create(store)
    assert not await store.renew("run-1", 2, step=5, usage={"steps": 5})
    assert await store.get_run("run-1") == record


@pytest.mark.parametrize("status", ["interrupted", "aborted", "failed"])
async def test_renew_of_a_run_not_running_returns_false(store: Store, status: str) -> None:
    """Only a running run's lease can be renewed, even under its current epoch."""
    record = await create(store, run_record(status=status))
    assert not await store.renew("run-1", 1, step=5, usage={"steps": 5})
    assert await store.get_run("run-1") == record


# -- abort_requested --------------------------------------------------------------------


async def test_abort_requested_is_none_without_a_request(store: Store) -> None:
    """A run nobody asked to abort reads no abort reason."""
    await create(store)
    assert await store.abort_requested("run-1") is None


# == the operator contract (OperatorStore) ===================================================


# -- request_abort -----------------------------------------------------------------------


async def test_request_abort_of_a_run_with_a_live_owner_asks_the_owner(store: Store) -> None:
    """With a live owner, abort is a request: the run stays running until the owner stops."""
    await create(store)
    record = await store.request_abort("run-1", "operator said so")
    assert (record.status, record.abort_requested) == ("running", "operator said so")
    assert await store.abort_requested("run-1") == "operator said so"


async def test_request_abort_of_a_run_at_rest_aborts_it_at_once(store: Store) -> None:
    """A run without an owner is marked aborted immediately, with the reason."""
    await create(store, run_record(status="interrupted"))
    record = await store.request_abort("run-1", "not needed")
    assert (record.status, record.reason) == ("aborted", "not needed")
    assert await store.get_run("run-1") == record
    assert await store.abort_requested("run-1") is None


async def test_request_abort_of_a_run_whose_lease_expired_aborts_it_at_once(
    store: Store,
) -> None:
    """A running run whose owner died is marked aborted immediately."""
    await create(store, run_record(expires_in=-1.0))
    record = await store.request_abort("run-1", "owner is gone")
    assert (record.status, record.reason, record.owner) == ("aborted", "owner is gone", None)


async def test_request_abort_of_a_run_whose_lease_expired_fences_off_its_owner(
    store: Store,
) -> None:
    """The abort moves the epoch on: an owner that still runs can neither write nor renew."""
    await create(store, run_record(expires_in=-1.0))
    await store.request_abort("run-1", "owner is gone")
    aborted = await store.get_run("run-1")
    assert aborted.epoch == 2
    with pytest.raises(LeaseLostError):
        await store.commit_step("run-1", 1, commit(delta(1, {"count": 1})))
    with pytest.raises(LeaseLostError):
        await store.put_pending_write("run-1", 1, pending(1, "a"))
    with pytest.raises(LeaseLostError):
        await store.finish_run(
            "run-1", 1, status="completed", reason=None, error=None, usage={}, events=[]
        )
    assert not await store.renew("run-1", 1, step=1, usage={"steps": 1})
    assert await store.get_run("run-1") == aborted
    assert await steps_of(store, "run-1") == [0]
    assert await store.pending_writes("run-1", 1) == []


async def test_request_abort_of_a_completed_run_raises_run_status_error(store: Store) -> None:
    """A completed run cannot be aborted."""
    await create(store, run_record(status="completed"))
    with pytest.raises(RunStatusError):
        await store.request_abort("run-1", "too late")
    assert (await store.get_run("run-1")).status == "completed"


async def test_request_abort_of_an_unknown_run_raises_run_not_found(store: Store) -> None:
    """Aborting a run that does not exist names it."""
    with pytest.raises(RunNotFoundError, match="nope"):
        await store.request_abort("nope", "why")


async def test_request_abort_is_recorded_as_an_event(store: Store) -> None:
    """An abort request leaves an event with its reason."""
    await create(store)
    await store.request_abort("run-1", "operator said so")
    [event] = [e for e in await store.events("run-1") if e.kind == "abort_requested"]
    assert json.loads(event.data) == {"reason": "operator said so"}


# -- stop_all ----------------------------------------------------------------------------


async def test_stop_all_aborts_every_running_run_and_returns_their_ids(store: Store) -> None:
    """stop-all asks live owners to abort, aborts ownerless running runs, skips the rest."""
    await create(store, run_record("live"))
    await create(store, run_record("stale", expires_in=-1.0))
    await create(store, run_record("resting", status="interrupted"))
    await create(store, run_record("done", status="completed"))
    affected = await store.stop_all("maintenance")
    assert sorted(affected) == ["live", "stale"]
    assert await store.abort_requested("live") == "maintenance"
    assert (await store.get_run("stale")).status == "aborted"
    assert (await store.get_run("resting")).status == "interrupted"
    assert (await store.get_run("done")).status == "completed"


async def test_stop_all_reason_says_why_it_is_in_force(store: Store) -> None:
    """stop_all_reason is None until stop-all, then its reason."""
    assert await store.stop_all_reason() is None
    await store.stop_all("maintenance")
    assert await store.stop_all_reason() == "maintenance"


async def test_release_stop_all_lets_runs_start_again(store: Store) -> None:
    """After release, runs can be created; releasing twice reports it was not in force."""
    await store.stop_all("maintenance")
    assert await store.release_stop_all()
    assert await store.stop_all_reason() is None
    await create(store)
    assert (await store.get_run("run-1")).status == "running"
    assert not await store.release_stop_all()


# -- list_runs, get_run ------------------------------------------------------------------


async def test_list_runs_returns_newest_first(store: Store) -> None:
    """Runs are listed by creation time, newest first."""
    now = time.time()
    for i, run_id in enumerate(["old", "new", "middle"]):
        await create(store, run_record(run_id, created_at=now + [0, 2, 1][i]))
    assert [r.run_id for r in await store.list_runs()] == ["new", "middle", "old"]


async def test_list_runs_filters_by_status(store: Store) -> None:
    """Only runs with one of the given statuses are listed."""
    await create(store, run_record("a", status="completed"))
    await create(store, run_record("b", status="failed"))
    await create(store, run_record("c"))
    runs = await store.list_runs(statuses=["completed", "failed"])
    assert sorted(r.run_id for r in runs) == ["a", "b"]


async def test_list_runs_stops_at_the_limit(store: Store) -> None:
    """limit keeps the newest runs."""
    now = time.time()
    for i in range(4):
        await create(store, run_record(f"r{i}", created_at=now + i))
    assert [r.run_id for r in await store.list_runs(limit=2)] == ["r3", "r2"]


async def test_get_run_of_an_unknown_run_raises_run_not_found(store: Store) -> None:
    """Reading a run that does not exist names it."""
    with pytest.raises(RunNotFoundError, match="nope") as info:
        await store.get_run("nope")
    assert info.value.run_id == "nope"


# -- checkpoints -------------------------------------------------------------------------


async def make_history(store: Store) -> None:
    """Run-1 with a snapshot at 0, deltas at 1-2, a snapshot at 3, deltas at 4-5."""
    await create(store)
    rows = [
        delta(1, {"count": 1}),
        delta(2, {"count": 2, "note": "two"}),
        snapshot(3, {"count": 3, "note": "three"}),
        delta(4, {"count": 4}),
        delta(5, {"count": 5}),
    ]
    for row in rows:
        await store.commit_step("run-1", 1, commit(row))


async def test_checkpoints_returns_every_checkpoint_oldest_first(store: Store) -> None:
    """Every step's checkpoint is kept, in step order, with its size."""
    await make_history(store)
    rows = await store.checkpoints("run-1")
    assert [r.step for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r.size for r in rows] == [len(r.snapshot or r.delta or "") for r in rows]
    assert all(r.size > 0 for r in rows)


async def test_checkpoints_of_an_unknown_run_raises_run_not_found(store: Store) -> None:
    """Listing the checkpoints of a run that does not exist names it."""
    with pytest.raises(RunNotFoundError):
        await store.checkpoints("nope")


@pytest.mark.parametrize(
    ("step", "chain"),
    [
        (None, [3, 4, 5]),
        (5, [3, 4, 5]),
        (4, [3, 4]),
        (3, [3]),
        (2, [0, 1, 2]),
        (0, [0]),
    ],
)
async def test_checkpoint_chain_is_the_nearest_snapshot_and_later_deltas(
    store: Store, step: int | None, chain: list[int]
) -> None:
    """The chain for a step starts at the nearest snapshot at or before it."""
    await make_history(store)
    rows = await store.checkpoint_chain("run-1", step)
    assert [r.step for r in rows] == chain
    assert rows[0].snapshot is not None
    assert all(r.snapshot is None for r in rows[1:])


async def test_checkpoint_chain_rebuilds_the_state_at_a_step(store: Store) -> None:
    """Replaying a chain gives the state as of that step."""
    await make_history(store)
    assert replay_json(await store.checkpoint_chain("run-1", 2)) == {"count": 2, "note": "two"}
    assert replay_json(await store.checkpoint_chain("run-1")) == {"count": 5, "note": "three"}


async def test_checkpoint_chain_at_a_step_without_checkpoint_raises(store: Store) -> None:
    """Asking for a step the run never committed is an error, not a shorter chain."""
    await make_history(store)
    with pytest.raises(StoreError, match="step 9"):
        await store.checkpoint_chain("run-1", 9)


async def test_checkpoint_chain_of_an_unknown_run_raises_run_not_found(store: Store) -> None:
    """Loading a run that does not exist names it."""
    with pytest.raises(RunNotFoundError):
        await store.checkpoint_chain("nope")


# -- events ------------------------------------------------------------------------------


async def test_events_merges_run_events_and_step_events_by_time(store: Store) -> None:
    """Run-level events and the events kept in checkpoint rows come back in time order."""
    t = time.time()
    own = [
        EventRow(step=0, kind="run_started", at=t + 1, data='{"graph": "ticker"}'),
        EventRow(step=2, kind="run_finished", at=t + 5, data='{"status": "completed"}'),
    ]
    await create(store, events=own)
    first = json.dumps([{"event": "step_committed", "at": t + 2, "step": 1}])
    second = json.dumps(
        [
            {"event": "node_finished", "at": t + 3, "node": "tick"},
            {"event": "step_committed", "at": t + 4, "step": 2},
        ]
    )
    await store.commit_step("run-1", 1, commit(delta(1, {"count": 1}, events=first)))
    await store.commit_step("run-1", 1, commit(delta(2, {"count": 2}, events=second)))
    events = await store.events("run-1")
    assert [(e.kind, e.step, e.at) for e in events] == [
        ("run_started", 0, t + 1),
        ("step_committed", 1, t + 2),
        ("node_finished", 2, t + 3),
        ("step_committed", 2, t + 4),
        ("run_finished", 2, t + 5),
    ]
    # a step event gets back its row's step and the defaults the recorder left out
    assert json.loads(events[2].data) == {
        "step": 2,
        "node": "tick",
        "task": 0,
        "attempts": 1,
        "error": None,
    }
    assert json.loads(events[4].data) == {"status": "completed"}


# -- fork --------------------------------------------------------------------------------


async def test_fork_creates_a_pending_run_at_rest(store: Store) -> None:
    """A fork is a new run with no owner, status pending, its parent recorded."""
    await make_history(store)
    record = await fork_run(store, "run-1", 2, "fork-1")
    assert await store.get_run("fork-1") == record
    assert (record.status, record.owner, record.lease_expires_at) == ("pending", None, None)
    assert (record.parent_run_id, record.parent_step, record.step) == ("run-1", 2, 2)


async def test_fork_starts_from_the_state_at_the_forked_step(store: Store) -> None:
    """The fork's one checkpoint is a snapshot of the parent's state at that step."""
    await make_history(store)
    await fork_run(store, "run-1", 2, "fork-1")
    [row] = await store.checkpoints("fork-1")
    assert row.step == 2
    assert row.tasks == TASKS
    assert replay_json([row]) == replay_json(await store.checkpoint_chain("run-1", 2))


async def test_fork_leaves_the_parent_untouched(store: Store) -> None:
    """Forking does not change the run it forks."""
    await make_history(store)
    before = (await store.get_run("run-1"), await store.checkpoints("run-1"))
    await fork_run(store, "run-1", 2, "fork-1")
    assert (await store.get_run("run-1"), await store.checkpoints("run-1")) == before


async def test_fork_can_be_acquired(store: Store) -> None:
    """A fork is at rest, so an owner can take it at once."""
    await make_history(store)
    await fork_run(store, "run-1", 2, "fork-1")
    record = await store.acquire("fork-1", "owner-b")
    assert (record.status, record.owner) == ("running", "owner-b")


async def test_fork_refuses_an_existing_run_id(store: Store) -> None:
    """A fork cannot overwrite a run."""
    await make_history(store)
    await create(store, run_record("taken", status="completed"))
    with pytest.raises(StoreError, match="taken"):
        await fork_run(store, "run-1", 2, "taken")
    assert (await store.get_run("taken")).status == "completed"


async def test_fork_at_a_step_without_checkpoint_raises(store: Store) -> None:
    """A fork needs a checkpoint at the step it starts from."""
    await make_history(store)
    with pytest.raises(StoreError):
        await fork_run(store, "run-1", 9, "fork-1")
    with pytest.raises(RunNotFoundError):
        await store.get_run("fork-1")


# -- prune -------------------------------------------------------------------------------


async def make_prunable(store: Store) -> float:
    """Create old and recent runs in several statuses; return the cut-off time."""
    now = time.time()
    old = now - 3600
    await create(store, run_record("old-done", status="completed", created_at=old))
    await create(store, run_record("old-failed", status="failed", created_at=old))
    await create(store, run_record("old-running", created_at=old))
    await create(store, run_record("new-done", status="completed"))
    return now - 60


async def test_prune_deletes_old_runs_with_the_given_statuses(store: Store) -> None:
    """prune removes the runs it matched, with their checkpoints, and counts them."""
    cutoff = await make_prunable(store)
    assert await store.prune(older_than=cutoff, statuses=["completed"]) == 1
    with pytest.raises(RunNotFoundError):
        await store.get_run("old-done")
    with pytest.raises(RunNotFoundError):
        await store.checkpoints("old-done")


async def test_prune_leaves_other_runs_untouched(store: Store) -> None:
    """Runs that are too recent or in another status keep their rows and checkpoints."""
    cutoff = await make_prunable(store)
    await store.prune(older_than=cutoff, statuses=["completed"])
    runs = sorted(r.run_id for r in await store.list_runs())
    assert runs == ["new-done", "old-failed", "old-running"]
    for run_id in runs:
        assert await steps_of(store, run_id) == [0]


async def test_prune_matches_several_statuses(store: Store) -> None:
    """prune takes a list of statuses."""
    cutoff = await make_prunable(store)
    assert await store.prune(older_than=cutoff, statuses=["completed", "failed"]) == 2
    assert sorted(r.run_id for r in await store.list_runs()) == ["new-done", "old-running"]


async def test_prune_without_statuses_deletes_nothing(store: Store) -> None:
    """An empty status list matches no run."""
    cutoff = await make_prunable(store)
    assert await store.prune(older_than=cutoff, statuses=[]) == 0
    assert len(await store.list_runs()) == 4
