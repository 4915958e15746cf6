"""The records every store shares: run and owner ids, the at-rest and budget checks, the
merge of a run's own events with its checkpoints' step events, reading stored enum values
back, and the defaults of the row dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from orchestra.errors import LeaseHeldError, RunStatusError, StoreError
from orchestra.outcome import RunStatus
from orchestra.store.records import (
    CheckpointRow,
    EventRow,
    LedgerEntry,
    LedgerKind,
    LedgerStatus,
    PendingWrite,
    RequestKind,
    RequestRow,
    RequestStatus,
    RunRecord,
    StepCommit,
    budget_event,
    merge_events,
    new_owner_id,
    new_run_id,
    owner_gone,
    refuse_unless_at_rest,
    stored_member,
)

NOW = 1_000.0


def record(
    status: RunStatus = RunStatus.RUNNING,
    *,
    owner: str | None = "host:1:abc",
    lease_expires_at: float | None = NOW + 30,
    budget: dict[str, Any] | None = None,
) -> RunRecord:
    return RunRecord(
        run_id="run-1",
        graph="ticker",
        structure_hash="abc123",
        app_ref=None,
        status=status,
        step=4,
        owner=owner,
        epoch=2,
        lease_expires_at=lease_expires_at,
        created_at=NOW - 60,
        updated_at=NOW - 1,
        budget=budget,
    )


def at_rest(status: RunStatus) -> RunRecord:
    return record(status, owner=None, lease_expires_at=None)


def step_events(*items: dict[str, Any]) -> str:
    return json.dumps(list(items))


def data(row: EventRow) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(row.data)
    return loaded


# -- ids ------------------------------------------------------------------------------------


def test_new_run_id_is_sixteen_hex_digits() -> None:
    """A run id is 16 lowercase hex digits."""
    assert re.fullmatch(r"[0-9a-f]{16}", new_run_id())


def test_new_run_id_is_new_each_time() -> None:
    """Run ids do not repeat."""
    assert len({new_run_id() for _ in range(1000)}) == 1000


def test_new_owner_id_names_host_pid_start_place_and_a_tag() -> None:
    """An owner id is ``host:pid:start:place:tag``: the process's start time (clock ticks
    since boot, from /proc), this boot and PID namespace as 8 hex digits, and a tag."""
    host, pid, start, place, tag = new_owner_id().split(":")
    assert host == socket.gethostname()
    assert pid == str(os.getpid())
    if os.path.exists("/proc/self/stat"):
        assert start.isdigit()
        assert re.fullmatch(r"[0-9a-f]{8}", place)
    assert re.fullmatch(r"[0-9a-f]{6}", tag)


def _ended_process() -> tuple[int, str]:
    """The pid and start time of a process of this host that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    start = Path(f"/proc/{child.pid}/stat").read_bytes().rpartition(b")")[2].split()[19]
    child.kill()
    child.wait()
    return child.pid, start.decode()


def _here(pid: int, start: str) -> str:
    """An owner id of process ``pid`` in this boot and PID namespace."""
    place = new_owner_id().split(":")[3]
    return f"{socket.gethostname()}:{pid}:{start}:{place}:abcdef"


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


@needs_proc
def test_owner_gone_for_an_ended_local_process() -> None:
    """An owner whose process (this host, boot and PID namespace) has ended is gone."""
    assert owner_gone(_here(*_ended_process()))


@needs_proc
def test_owner_gone_for_a_zombie() -> None:
    """An owner killed but not yet reaped by its parent (a zombie) is gone."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    start = Path(f"/proc/{child.pid}/stat").read_bytes().rpartition(b")")[2].split()[19]
    owner = _here(child.pid, start.decode())
    assert not owner_gone(owner)
    os.kill(child.pid, signal.SIGKILL)
    for _ in range(200):  # until the kernel has made it a zombie (not reaped: no wait yet)
        if Path(f"/proc/{child.pid}/stat").read_bytes().rpartition(b")")[2].split()[0] == b"Z":
            break
        time.sleep(0.01)
    try:
        assert owner_gone(owner)
    finally:
        child.wait()


@needs_proc
def test_owner_gone_for_a_reused_pid() -> None:
    """A live pid that started at another time than the owner id says is a reused pid."""
    assert owner_gone(_here(os.getpid(), "1"))


@needs_proc
def test_owner_gone_not_in_another_pid_namespace_or_boot() -> None:
    """An ended pid with another place (another container's PID namespace, another boot or
    machine of the same host name) is not known to be gone: its lease is waited out."""
    pid, start = _ended_process()
    assert not owner_gone(f"{socket.gethostname()}:{pid}:{start}:00000000:abcdef")


def test_owner_gone_not_for_a_live_owner_another_host_or_an_older_id() -> None:
    """This process's own id, an owner on another host, an id of the older ``host:pid:tag``
    form (no start time, no place), or no owner: not gone."""
    assert not owner_gone(new_owner_id())
    assert not owner_gone(f"elsewhere.example:{os.getpid()}:1:00000000:abcdef")
    assert not owner_gone(f"{socket.gethostname()}:999999999:abcdef")
    assert not owner_gone(None)
    assert not owner_gone("not an owner id")


def test_new_owner_id_differs_between_calls_in_one_process() -> None:
    """Two owners in one process get different ids (the tag tells them apart)."""
    assert len({new_owner_id() for _ in range(50)}) > 1


# -- RunRecord.lease_live -------------------------------------------------------------------------


def test_run_record_lease_live_while_an_owner_holds_an_unexpired_lease() -> None:
    """An owner with a lease expiring later holds the run."""
    assert record().lease_live(NOW)


def test_run_record_lease_not_live_at_its_expiry() -> None:
    """A lease is over at the moment it expires."""
    assert not record(lease_expires_at=NOW).lease_live(NOW)


def test_run_record_lease_not_live_without_an_owner() -> None:
    """An expiry time without an owner is no lease."""
    assert not record(owner=None).lease_live(NOW)


# -- refuse_unless_at_rest ------------------------------------------------------------------------


def test_refuse_unless_at_rest_refuses_a_completed_run() -> None:
    """A completed run is refused with a RunStatusError saying what was attempted."""
    with pytest.raises(RunStatusError, match="run run-1 is completed; cannot resume it") as info:
        refuse_unless_at_rest(at_rest(RunStatus.COMPLETED), NOW, "resume it")
    assert info.value.run_id == "run-1"


def test_refuse_unless_at_rest_refuses_a_run_a_live_process_owns() -> None:
    """A run with a live lease is refused with a LeaseHeldError naming the owner."""
    with pytest.raises(LeaseHeldError) as info:
        refuse_unless_at_rest(record(lease_expires_at=NOW + 12), NOW, "answer its requests")
    assert info.value.owner == "host:1:abc"
    assert info.value.expires_in == pytest.approx(12)


def test_refuse_unless_at_rest_accepts_a_running_run_whose_lease_lapsed() -> None:
    """A run whose owner's lease expired is at rest: its process is gone."""
    refuse_unless_at_rest(record(lease_expires_at=NOW - 1), NOW, "resume it")


@pytest.mark.parametrize(
    "status",
    [s for s in RunStatus if s not in (RunStatus.COMPLETED, RunStatus.RUNNING)],
)
def test_refuse_unless_at_rest_accepts_every_resumable_status(status: RunStatus) -> None:
    """Every status but completed, without an owner, may be resumed or answered."""
    refuse_unless_at_rest(at_rest(status), NOW, "resume it")


# -- budget_event ---------------------------------------------------------------------------------


def test_budget_event_records_before_after_and_reason() -> None:
    """The event names the old budget, the new one and why it changed."""
    old = {"run": {"max_cost_usd": 1.0}}
    new = {"run": {"max_cost_usd": 5.0}}
    stopped = dataclasses.replace(at_rest(RunStatus.BUDGET_EXCEEDED), budget=old)
    event = budget_event(stopped, new, "more", NOW)
    assert (event.kind, event.step, event.at) == ("budget_raised", 4, NOW)
    assert data(event) == {"before": old, "after": new, "reason": "more"}


def test_budget_event_of_a_run_stored_without_a_budget_has_none_before() -> None:
    """A run stored before budgets were has ``before`` None."""
    event = budget_event(at_rest(RunStatus.INTERRUPTED), {"run": {}}, None, NOW)
    assert data(event)["before"] is None
    assert data(event)["reason"] is None


def test_budget_event_refuses_a_completed_run() -> None:
    """A completed run's budget cannot change."""
    with pytest.raises(RunStatusError, match="cannot raise its budget"):
        budget_event(at_rest(RunStatus.COMPLETED), {"run": {}}, None, NOW)


def test_budget_event_refuses_a_running_run_a_live_process_owns() -> None:
    """A run owned by a live process keeps its budget until it stops."""
    with pytest.raises(LeaseHeldError):
        budget_event(record(), {"run": {}}, None, NOW)


def test_budget_event_accepts_a_running_run_whose_lease_lapsed() -> None:
    """A running run whose owner's lease expired may have its budget raised."""
    event = budget_event(record(lease_expires_at=NOW - 1), {"run": {}}, None, NOW)
    assert event.kind == "budget_raised"


# -- merge_events ---------------------------------------------------------------------------------


def test_merge_events_orders_by_step_then_time() -> None:
    """Events come out by step, and by time within a step, whatever the clocks said."""
    own = [EventRow(step=2, kind="abort_requested", at=5.0, data="{}")]
    steps = [
        (1, step_events({"event": "step_committed", "at": 9.0, "next": []}), "[]"),
        (2, step_events({"event": "step_committed", "at": 1.0, "next": []}), "[]"),
    ]
    merged = merge_events(own, steps)
    assert [(e.step, e.at, e.kind) for e in merged] == [
        (1, 9.0, "step_committed"),
        (2, 1.0, "step_committed"),
        (2, 5.0, "abort_requested"),
    ]


def test_merge_events_puts_events_without_a_step_first() -> None:
    """A run's own event with no step (before step 0) comes before every step's events."""
    own = [EventRow(step=None, kind="run_created", at=50.0, data="{}")]
    steps = [(0, step_events({"event": "step_committed", "at": 1.0, "next": []}), "[]")]
    assert [e.kind for e in merge_events(own, steps)] == ["run_created", "step_committed"]


def test_merge_events_keeps_the_run_own_rows_as_they_are() -> None:
    """A run's own events pass through unchanged."""
    own = [EventRow(step=3, kind="budget_raised", at=2.0, data='{"reason": "x"}')]
    assert merge_events(own, []) == own


def test_merge_events_moves_kind_and_time_out_of_the_data() -> None:
    """A step event's ``event`` and ``at`` become the row's kind and time, and its step is
    added to the data."""
    steps = [(7, step_events({"event": "node_started", "at": 3.5, "node": "a"}), "[]")]
    (row,) = merge_events([], steps)
    assert (row.step, row.kind, row.at) == (7, "node_started", 3.5)
    assert data(row) == {"step": 7, "node": "a"}


def test_merge_events_fills_in_the_defaults_the_recorder_left_out() -> None:
    """A node_finished event stored without its default fields gets them back."""
    steps = [(1, step_events({"event": "node_finished", "at": 1.0, "node": "a"}), "[]")]
    (row,) = merge_events([], steps)
    assert data(row) == {"step": 1, "task": 0, "attempts": 1, "error": None, "node": "a"}


def test_merge_events_keeps_stored_values_over_the_defaults() -> None:
    """A field the recorder did store wins over its default."""
    item = {"event": "node_finished", "at": 1.0, "node": "a", "attempts": 3, "error": "boom"}
    (row,) = merge_events([], [(1, step_events(item), "[]")])
    assert (data(row)["attempts"], data(row)["error"]) == (3, "boom")


def test_merge_events_gives_step_committed_its_next_tasks_from_the_checkpoint() -> None:
    """A step_committed event stored without ``next`` takes the labels of the row's tasks."""
    tasks = json.dumps([{"label": "b"}, {"label": "c#1"}])
    (row,) = merge_events([], [(2, step_events({"event": "step_committed", "at": 1.0}), tasks)])
    assert data(row)["next"] == ["b", "c#1"]


def test_merge_events_keeps_a_stored_next() -> None:
    """A step_committed event that stored ``next`` keeps it."""
    tasks = json.dumps([{"label": "b"}])
    item = {"event": "step_committed", "at": 1.0, "next": ["kept"]}
    (row,) = merge_events([], [(2, step_events(item), tasks)])
    assert data(row)["next"] == ["kept"]


# -- stored_member --------------------------------------------------------------------------------


def test_stored_member_reads_a_stored_value_back_as_its_member() -> None:
    """A stored string gives back the enum member."""
    found = stored_member(RequestStatus, "answered", run_id="r", table="requests", column="status")
    assert found is RequestStatus.ANSWERED


def test_stored_member_passes_a_member_through() -> None:
    """A value that already is a member is returned as is."""
    found = stored_member(LedgerKind, LedgerKind.TOOL, run_id="r", table="ledger", column="kind")
    assert found is LedgerKind.TOOL


def test_stored_member_refuses_an_unknown_value_naming_where_it_was() -> None:
    """An unknown value is a StoreError naming the run, table, column, value and the
    members that would be valid."""
    with pytest.raises(StoreError) as info:
        stored_member(LedgerStatus, "halfway", run_id="run-9", table="ledger", column="status")
    assert str(info.value) == (
        "run run-9: table ledger holds status 'halfway', which is not a LedgerStatus "
        "(started, done)"
    )


def test_stored_member_refuses_a_value_that_is_not_a_string() -> None:
    """A non-string value (a number edited in by hand) is a StoreError too."""
    with pytest.raises(StoreError, match="holds kind 3, which is not a RequestKind"):
        stored_member(RequestKind, 3, run_id="r", table="requests", column="kind")


def test_stored_member_refuses_a_member_of_another_enum() -> None:
    """A member of a different enum is not taken as one of this enum."""
    with pytest.raises(StoreError, match="which is not a LedgerKind"):
        stored_member(LedgerKind, RequestKind.APPROVAL, run_id="r", table="ledger", column="kind")


# -- row defaults ---------------------------------------------------------------------------------


def test_run_record_defaults_to_no_usage_reason_error_parent_or_budget() -> None:
    """A run record made with the required fields only has empty usage and no extras."""
    made = record()
    assert made.usage == {}
    assert (made.reason, made.error, made.abort_requested) == (None, None, None)
    assert (made.parent_run_id, made.parent_step, made.budget) == (None, None, None)


def test_run_records_do_not_share_their_usage() -> None:
    """Each run record's default usage is its own dict."""
    first, second = record(), record()
    first.usage["steps"] = 3
    assert second.usage == {}


def test_run_record_is_frozen() -> None:
    """A run record cannot be changed in place."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        record().step = 5  # type: ignore[misc]


def test_run_record_is_keyword_only() -> None:
    """Run records are built by keyword only."""
    with pytest.raises(TypeError):
        RunRecord("run-1")  # type: ignore[call-arg]


def test_checkpoint_row_defaults_to_no_events_usage_or_memory_and_size_zero() -> None:
    """A checkpoint made with its required fields has no events, usage or memory."""
    row = CheckpointRow(step=0, snapshot="{}", delta=None, tasks="[]", created_at=NOW)
    assert (row.events, row.usage, row.memory, row.size) == (None, None, None, 0)


def test_step_commit_defaults_to_no_pending_writes() -> None:
    """A step commit assumes no pending writes to clear unless told."""
    row = CheckpointRow(step=1, snapshot=None, delta="{}", tasks="[]", created_at=NOW)
    assert StepCommit(step=1, checkpoint=row).had_pending is False


def test_ledger_entry_defaults_to_unfinished() -> None:
    """A ledger entry has no finish time unless given one."""
    entry = LedgerEntry(
        step=1,
        task="a",
        seq=0,
        kind=LedgerKind.TOOL,
        name="pay",
        request_hash="h",
        status=LedgerStatus.STARTED,
        result=None,
        created_at=NOW,
    )
    assert entry.finished_at is None


def test_request_row_defaults_to_no_expiry_and_no_answer() -> None:
    """A request has no expiry, answer or answer time unless given them."""
    row = RequestRow(
        run_id="r",
        request_id="q1",
        step=1,
        task="a",
        kind=RequestKind.QUESTION,
        payload="{}",
        schema=None,
        status=RequestStatus.OPEN,
        created_at=NOW,
    )
    assert (row.expires_at, row.answer, row.answered_at) == (None, None, None)


def test_pending_write_is_frozen() -> None:
    """A pending write cannot be changed in place."""
    write = PendingWrite(step=1, task="a", result="{}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        write.result = "[]"  # type: ignore[misc]


@pytest.mark.parametrize(
    "pid", ["99999999999999999999999", "9999999999", "²", "0", "-1", "12a", ""]
)
def test_owner_gone_not_for_a_pid_that_is_no_pid(pid: str) -> None:
    """An owner id read back from a database with a pid that is not one (too large for
    os.kill, not ASCII digits, zero) is not gone, and raises nothing."""
    place = new_owner_id().split(":")[3]
    assert not owner_gone(f"{socket.gethostname()}:{pid}:1:{place}:abcdef")
