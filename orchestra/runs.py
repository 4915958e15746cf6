"""Operations on stored runs that need more than one store call: resume and fork."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .checkpoint import load_result, load_state, load_tasks, replay_json
from .errors import GraphChangedError, OrchestraError, RunStatusError, StoreError
from .store.base import CheckpointRow, EventRow, RunRecord, Store, new_owner_id

if TYPE_CHECKING:
    from .compile import CompiledGraph
    from .executor import Execution

__all__ = ("fork_run", "prepare_resume")


async def prepare_resume(
    app: CompiledGraph[Any], run_id: str, *, allow_graph_change: bool
) -> Execution:
    """Check, take the lease of, and load a run; return the Execution that continues it."""
    from .executor import Execution
    from .recorder import Recorder

    store = app._require_store()
    record = await store.get_run(run_id)
    if record.status == "completed":
        raise RunStatusError(run_id, record.status, "resume it")
    if record.structure_hash != app.structure_hash and not allow_graph_change:
        raise GraphChangedError(run_id, record.structure_hash, app.structure_hash)
    owner = new_owner_id()
    record = await store.acquire(run_id, owner)
    try:
        chain = await store.checkpoint_chain(run_id)
        state = load_state(app.schema, chain)
        tasks = load_tasks(chain[-1].tasks)
        missing = sorted({t.node for t in tasks} - set(app.nodes))
        if missing:
            raise StoreError(
                f"run {run_id} is due to run {', '.join(map(repr, missing))} next, which this "
                f"graph does not have"
            )
        step = chain[-1].step
        pending = await store.pending_writes(run_id, step + 1)
        usage = json.loads(chain[-1].usage) if chain[-1].usage else {}
        # a step discarded by the deadline, or a crash, leaves the run row's totals higher
        for key in ("tasks", "wall_seconds"):
            usage[key] = max(usage.get(key, 0), record.usage.get(key, 0))
        done = {write.task: load_result(write.result) for write in pending}
    except Exception as exc:
        message = f"could not load the run to resume it: {type(exc).__name__}: {exc}"
        await store.finish_run(
            run_id,
            record.epoch,
            status="failed",
            reason=None,
            error=message,
            usage=record.usage,
            events=[],
        )
        if isinstance(exc, OrchestraError):
            raise
        raise StoreError(f"run {run_id}: {message}") from exc
    recorder = Recorder(store, app, run_id, owner).resumed(record, chain)
    return Execution(
        app,
        state,
        run_id=run_id,
        recorder=recorder,
        step=step,
        tasks=tasks,
        done=done,
        usage=usage,
        events=False,
    )


async def fork_run(store: Store, run_id: str, step: int, new_run_id: str) -> RunRecord:
    """Start a new run (status ``pending``) from the checkpoint of ``run_id`` at ``step``.

    Works from the stored JSON alone, so an operator can fork without importing the app;
    ``orchestra resume NEW`` then runs it.
    """
    source = await store.get_run(run_id)
    chain = await store.checkpoint_chain(run_id, step)
    now = time.time()
    snapshot = json.dumps(replay_json(chain), separators=(",", ":"))
    record = replace(
        source,
        run_id=new_run_id,
        status="pending",
        step=step,
        owner=None,
        epoch=0,
        lease_expires_at=None,
        created_at=now,
        updated_at=now,
        usage={"steps": step},
        reason=f"forked from {run_id} at step {step}",
        error=None,
        abort_requested=None,
        parent_run_id=run_id,
        parent_step=step,
    )
    checkpoint = CheckpointRow(
        step=step, snapshot=snapshot, delta=None, tasks=chain[-1].tasks, created_at=now
    )
    event = EventRow(
        step=step,
        kind="run_forked",
        at=now,
        data=json.dumps({"from_run": run_id, "from_step": step}),
    )
    await store.fork(record, checkpoint, [event])
    return record
