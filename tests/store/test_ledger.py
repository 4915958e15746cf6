"""The Store contract for agents: the ledger of calls, requests for a human, and the
agents' conversations kept with the checkpoints (``memory``), on every store."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from orchestra.errors import LeaseLostError, StoreError
from orchestra.store import Store
from orchestra.store.base import CheckpointRow, LedgerEntry, RequestRow, RunRecord, StepCommit

pytestmark = pytest.mark.anyio

TASKS = '[{"node":"billing","index":0,"label":"billing"}]'
MEMORY = json.dumps({"all": {"billing": [{"role": "user", "name": "input", "content": "hi"}]}})


def run_record(run_id: str = "run-1") -> RunRecord:
    """Build a running run row owned by ``owner-a``."""
    now = time.time()
    return RunRecord(
        run_id=run_id,
        graph="agents",
        structure_hash="abc123",
        app_ref=None,
        status="running",
        step=0,
        owner="owner-a",
        epoch=1,
        lease_expires_at=now + 30.0,
        created_at=now,
        updated_at=now,
        usage={},
    )


def checkpoint(step: int, *, memory: str | None = None, snapshot: bool = True) -> CheckpointRow:
    return CheckpointRow(
        step=step,
        snapshot=json.dumps({"count": step}) if snapshot else None,
        delta=None if snapshot else json.dumps({"set": {"count": step}}),
        tasks=TASKS,
        created_at=time.time(),
        memory=memory,
    )


async def create(store: Store, run_id: str = "run-1") -> RunRecord:
    """Create a running run (epoch 1) with checkpoint 0."""
    record = run_record(run_id)
    await store.create_run(record, checkpoint(0), [])
    return record


def entry(
    step: int = 1,
    task: str = "billing",
    seq: int = 0,
    *,
    kind: str = "model",
    name: str = "scripted",
    status: str = "done",
) -> LedgerEntry:
    now = time.time()
    return LedgerEntry(
        step=step,
        task=task,
        seq=seq,
        kind=kind,
        name=name,
        request_hash=f"h-{step}-{task}-{seq}",
        status=status,
        result=json.dumps({"text": "ok"}) if status == "done" else None,
        created_at=now,
        finished_at=now if status == "done" else None,
    )


def request(
    run_id: str = "run-1", request_id: str = "req_1", *, created_at: float | None = None
) -> RequestRow:
    return RequestRow(
        run_id=run_id,
        request_id=request_id,
        step=2,
        task="billing",
        kind="in_doubt",
        payload=json.dumps({"tool": "refund", "arguments": {"order_id": "42"}, "seq": 1}),
        schema=None,
        status="open",
        created_at=time.time() if created_at is None else created_at,
    )


async def finish(
    store: Store, run_id: str = "run-1", epoch: int = 1, *requests: RequestRow
) -> None:
    """Stop a run ``interrupted`` with ``requests``."""
    await store.finish_run(
        run_id,
        epoch,
        status="interrupted",
        reason="waits for an answer",
        error=None,
        usage={},
        events=[],
        requests=requests,
    )


async def interrupted(store: Store, *requests: RequestRow) -> int:
    """Create run-1, stop it with ``requests`` (default: one), take it again; return the
    new owner's epoch."""
    await create(store)
    await finish(store, "run-1", 1, *(requests or (request(),)))
    return (await store.acquire("run-1", "owner-b")).epoch


# -- put_ledger, ledger ------------------------------------------------------------------


async def test_put_ledger_records_an_entry_read_back_by_ledger(store: Store) -> None:
    """An entry put in the ledger is returned as it was written."""
    await create(store)
    written = entry()
    await store.put_ledger("run-1", 1, written)
    assert await store.ledger("run-1") == [written]


async def test_put_ledger_with_a_stale_epoch_raises_lease_lost_and_writes_nothing(
    store: Store,
) -> None:
    """A fenced-off owner cannot record a call: LeaseLostError, nothing written."""
    await create(store)
    await store.put_ledger("run-1", 1, entry(seq=0))
    with pytest.raises(LeaseLostError):
        await store.put_ledger("run-1", 2, entry(seq=1))
    assert [e.seq for e in await store.ledger("run-1")] == [0]


async def test_put_ledger_by_an_owner_fenced_off_by_a_takeover_raises_lease_lost(
    store: Store,
) -> None:
    """After another process took the run over, the old owner's epoch is refused."""
    await create(store)
    await finish(store)
    await store.acquire("run-1", "owner-b")
    with pytest.raises(LeaseLostError):
        await store.put_ledger("run-1", 1, entry())
    assert await store.ledger("run-1") == []


async def test_put_ledger_of_an_unknown_run_raises_lease_lost(store: Store) -> None:
    """A run that does not exist has no owner whose epoch could match."""
    with pytest.raises(LeaseLostError):
        await store.put_ledger("nope", 1, entry())


async def test_put_ledger_replaces_a_started_entry_with_its_result(store: Store) -> None:
    """Putting the same (step, task, seq) again updates it: started becomes done, one entry."""
    await create(store)
    started = entry(seq=1, kind="tool", name="refund", status="started")
    await store.put_ledger("run-1", 1, started)
    done = replace(started, status="done", result='{"status":"ok"}', finished_at=time.time())
    await store.put_ledger("run-1", 1, done)
    assert await store.ledger("run-1") == [done]


async def test_ledger_returns_entries_in_step_task_seq_order(store: Store) -> None:
    """Entries come back ordered by (step, task, seq), whatever the order they were put in."""
    await create(store)
    keys = [(2, "b", 0), (1, "b", 1), (1, "a", 1), (2, "a", 0), (1, "b", 0), (1, "a", 0)]
    for step, task, seq in keys:
        await store.put_ledger("run-1", 1, entry(step, task, seq))
    assert [(e.step, e.task, e.seq) for e in await store.ledger("run-1")] == sorted(keys)


async def test_ledger_of_a_step_returns_only_that_steps_entries(store: Store) -> None:
    """ledger(run_id, step) filters by step."""
    await create(store)
    for step in (1, 2, 3):
        await store.put_ledger("run-1", 1, entry(step, seq=0))
        await store.put_ledger("run-1", 1, entry(step, seq=1))
    assert [(e.step, e.seq) for e in await store.ledger("run-1", 2)] == [(2, 0), (2, 1)]
    assert await store.ledger("run-1", 9) == []


async def test_ledger_keeps_runs_apart(store: Store) -> None:
    """One run's entries are not another's."""
    await create(store, "run-1")
    await create(store, "run-2")
    await store.put_ledger("run-1", 1, entry(1, "a"))
    await store.put_ledger("run-2", 1, entry(1, "b"))
    assert [e.task for e in await store.ledger("run-1")] == ["a"]
    assert [e.task for e in await store.ledger("run-2")] == ["b"]


async def test_ledger_of_a_run_without_entries_is_empty(store: Store) -> None:
    """A run that made no call has an empty ledger."""
    await create(store)
    assert await store.ledger("run-1") == []


# -- delete_ledger -----------------------------------------------------------------------


async def test_delete_ledger_forgets_one_entry(store: Store) -> None:
    """delete_ledger removes the entry at (step, task, seq) and no other."""
    await create(store)
    for seq in (0, 1, 2):
        await store.put_ledger("run-1", 1, entry(seq=seq))
    await store.put_ledger("run-1", 1, entry(2, seq=1))
    await store.delete_ledger("run-1", 1, 1, "billing", 1)
    assert [(e.step, e.seq) for e in await store.ledger("run-1")] == [(1, 0), (1, 2), (2, 1)]


async def test_delete_ledger_with_a_stale_epoch_raises_lease_lost_and_keeps_the_entry(
    store: Store,
) -> None:
    """A fenced-off owner cannot forget a call."""
    await create(store)
    written = entry()
    await store.put_ledger("run-1", 1, written)
    with pytest.raises(LeaseLostError):
        await store.delete_ledger("run-1", 2, 1, "billing", 0)
    assert await store.ledger("run-1") == [written]


# -- finish_run(requests=...), requests --------------------------------------------------


async def test_finish_run_stores_its_requests_open(store: Store) -> None:
    """The requests a stopped run waits for are stored with it, open."""
    await create(store)
    asked = request()
    await finish(store, "run-1", 1, asked)
    assert await store.requests("run-1") == [asked]


async def test_finish_run_with_a_stale_epoch_stores_no_request(store: Store) -> None:
    """A fenced-off owner's requests are refused with its final status."""
    await create(store)
    with pytest.raises(LeaseLostError):
        await finish(store, "run-1", 2, request())
    assert await store.requests("run-1", statuses=()) == []


async def test_finish_run_asking_an_open_request_again_does_not_duplicate_it(
    store: Store,
) -> None:
    """The same request asked again by a later owner stays one row, as first stored."""
    await create(store)
    first = request(created_at=100.0)
    await finish(store, "run-1", 1, first)
    epoch = (await store.acquire("run-1", "owner-b")).epoch
    await finish(store, "run-1", epoch, replace(first, created_at=200.0))
    assert await store.requests("run-1", statuses=()) == [first]


async def test_finish_run_asking_an_answered_request_again_opens_it_again(
    store: Store,
) -> None:
    """A request asked again after its answer was used (an abort, then a resume) is one
    row, open again and answerable (the answer given before stays in the run's events)."""
    epoch = await interrupted(store)
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"abort"}')
    await finish(store, "run-1", epoch, request(created_at=300.0))
    (kept,) = await store.requests("run-1", statuses=())
    assert (kept.status, kept.answer, kept.answered_at) == ("open", None, None)
    assert kept.created_at == 300.0
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"retry"}')
    (answered,) = await store.requests("run-1", statuses=())
    assert (answered.status, answered.answer) == ("answered", '{"answer":"retry"}')


async def test_finish_run_adds_new_requests_next_to_kept_ones(store: Store) -> None:
    """A later stop with a new request adds it; the earlier ones stay."""
    epoch = await interrupted(store, request(request_id="req_1", created_at=100.0))
    await finish(store, "run-1", epoch, request(request_id="req_2", created_at=200.0))
    assert [r.request_id for r in await store.requests("run-1")] == ["req_1", "req_2"]


async def test_requests_of_every_run_oldest_first(store: Store) -> None:
    """requests() without a run id returns the requests of every run, oldest first."""
    await create(store, "run-1")
    await create(store, "run-2")
    await finish(store, "run-2", 1, request("run-2", "req_b", created_at=100.0))
    await finish(store, "run-1", 1, request("run-1", "req_a", created_at=200.0))
    rows = await store.requests()
    assert [(r.run_id, r.request_id) for r in rows] == [("run-2", "req_b"), ("run-1", "req_a")]


async def test_requests_of_one_run_leaves_out_other_runs(store: Store) -> None:
    """requests(run_id) returns only that run's requests."""
    await create(store, "run-1")
    await create(store, "run-2")
    await finish(store, "run-1", 1, request("run-1", "req_a"))
    await finish(store, "run-2", 1, request("run-2", "req_b"))
    assert [r.request_id for r in await store.requests("run-2")] == ["req_b"]


async def test_requests_returns_only_open_ones_by_default(store: Store) -> None:
    """The default statuses filter is ("open",): an answered request is left out."""
    epoch = await interrupted(
        store, request(request_id="req_1", created_at=1.0), request(request_id="req_2")
    )
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"retry"}')
    assert [r.request_id for r in await store.requests("run-1")] == ["req_2"]


async def test_requests_filters_by_the_given_statuses(store: Store) -> None:
    """statuses picks the requests to return; an empty filter returns every status."""
    epoch = await interrupted(
        store, request(request_id="req_1", created_at=1.0), request(request_id="req_2")
    )
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"retry"}')
    assert [r.request_id for r in await store.requests("run-1", statuses=["answered"])] == ["req_1"]
    assert [r.request_id for r in await store.requests("run-1", statuses=())] == [
        "req_1",
        "req_2",
    ]


async def test_requests_of_a_run_without_requests_is_empty(store: Store) -> None:
    """A run that never asked anything has no requests."""
    await create(store)
    assert await store.requests("run-1", statuses=()) == []


# -- answer_request ----------------------------------------------------------------------


async def test_answer_request_records_the_answer(store: Store) -> None:
    """An answered request has its status, answer and time set."""
    epoch = await interrupted(store)
    before = time.time()
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"done"}')
    (row,) = await store.requests("run-1", statuses=())
    assert (row.status, row.answer) == ("answered", '{"answer":"done"}')
    assert row.answered_at is not None
    assert row.answered_at >= before


async def test_answer_request_takes_the_status_to_record(store: Store) -> None:
    """The status of an answered request can be given (e.g. expired)."""
    epoch = await interrupted(store)
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"no"}', status="expired")
    assert [r.status for r in await store.requests("run-1", statuses=())] == ["expired"]


async def test_answer_request_refuses_a_status_that_is_not_a_request_status(store: Store) -> None:
    """A status that is not a RequestStatus is refused (StoreError naming it), not stored."""
    epoch = await interrupted(store)
    with pytest.raises(StoreError, match="'rejected'"):
        await store.answer_request("run-1", epoch, "req_1", '{"answer":"no"}', status="rejected")
    assert [r.status for r in await store.requests("run-1", statuses=())] == ["open"]


async def test_answer_request_refuses_a_request_already_answered(store: Store) -> None:
    """An answer is used once: answering again raises StoreError and keeps the first."""
    epoch = await interrupted(store)
    await store.answer_request("run-1", epoch, "req_1", '{"answer":"retry"}')
    with pytest.raises(StoreError, match="req_1"):
        await store.answer_request("run-1", epoch, "req_1", '{"answer":"abort"}')
    assert [r.answer for r in await store.requests("run-1", statuses=())] == ['{"answer":"retry"}']


async def test_answer_request_refuses_an_unknown_request(store: Store) -> None:
    """A request id the run never asked raises StoreError."""
    epoch = await interrupted(store)
    with pytest.raises(StoreError, match="req_9"):
        await store.answer_request("run-1", epoch, "req_9", '{"answer":"retry"}')


async def test_answer_request_with_a_stale_epoch_raises_lease_lost_and_keeps_it_open(
    store: Store,
) -> None:
    """Only the run's current owner may answer: an old epoch is refused."""
    epoch = await interrupted(store)
    with pytest.raises(LeaseLostError):
        await store.answer_request("run-1", epoch - 1, "req_1", '{"answer":"retry"}')
    assert [r.status for r in await store.requests("run-1", statuses=())] == ["open"]


# -- prune -------------------------------------------------------------------------------


async def test_prune_deletes_the_ledger_and_requests_of_pruned_runs(store: Store) -> None:
    """A pruned run's ledger entries and requests go with it; other runs keep theirs."""
    for run_id in ("gone", "kept"):
        await create(store, run_id)
        await store.put_ledger(run_id, 1, entry())
        await finish(store, run_id, 1, request(run_id, f"req_{run_id}"))
    await store.acquire("kept", "owner-b")  # running again: not matched by the prune
    assert await store.prune(older_than=time.time() + 60, statuses=["interrupted"]) == 1
    assert await store.ledger("gone") == []
    assert await store.requests("gone", statuses=()) == []
    assert len(await store.ledger("kept")) == 1
    assert [r.request_id for r in await store.requests(statuses=())] == ["req_kept"]


# -- checkpoints keep the agents' conversations ------------------------------------------


async def test_create_run_keeps_the_memory_of_checkpoint_0(store: Store) -> None:
    """Checkpoint 0's memory column is stored and read back."""
    await store.create_run(run_record(), checkpoint(0, memory=MEMORY), [])
    assert [row.memory for row in await store.checkpoints("run-1")] == [MEMORY]


async def test_commit_step_keeps_the_memory_column(store: Store) -> None:
    """A committed step's memory is returned by checkpoints(), as written."""
    await create(store)
    for step in (1, 2):
        memory = MEMORY if step == 1 else None
        row = checkpoint(step, memory=memory, snapshot=False)
        await store.commit_step("run-1", 1, StepCommit(step=step, checkpoint=row))
    assert [row.memory for row in await store.checkpoints("run-1")] == [None, MEMORY, None]


async def test_checkpoint_chain_keeps_the_memory_column(store: Store) -> None:
    """The rows of a checkpoint chain carry their memory (a snapshot's and the deltas')."""
    await create(store)
    for step, memory, snapshot in ((1, MEMORY, True), (2, None, False), (3, MEMORY, False)):
        row = checkpoint(step, memory=memory, snapshot=snapshot)
        await store.commit_step("run-1", 1, StepCommit(step=step, checkpoint=row))
    chain = await store.checkpoint_chain("run-1")
    assert [(row.step, row.memory) for row in chain] == [(1, MEMORY), (2, None), (3, MEMORY)]


# -- unknown runs ------------------------------------------------------------------------


async def test_delete_ledger_of_an_unknown_run_raises_lease_lost(store: Store) -> None:
    """A run that does not exist has no owner whose epoch could match."""
    with pytest.raises(LeaseLostError):
        await store.delete_ledger("nope", 1, 1, "billing", 0)


async def test_answer_request_of_an_unknown_run_raises_lease_lost(store: Store) -> None:
    """A run that does not exist has no owner whose epoch could match."""
    with pytest.raises(LeaseLostError):
        await store.answer_request("nope", 1, "req_1", '{"answer":"retry"}')
