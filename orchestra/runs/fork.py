"""Fork a stored run: a new run starting from one of its checkpoints."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from .._json import compact_json
from ..outcome import RunStatus
from ..runtime.checkpoint import (
    load_joins,
    replay_json,
    replay_memory,
)
from ..store.base import (
    CheckpointRow,
    EventRow,
    OperatorStore,
    RunRecord,
)

__all__ = ("fork_run",)


async def fork_run(store: OperatorStore, run_id: str, step: int, new_run_id: str) -> RunRecord:
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
        status=RunStatus.PENDING,
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
    conversations = replay_memory(chain)
    joins = load_joins(chain)
    memory: dict[str, Any] = {"all": conversations} if conversations else {}
    if joins:
        memory["joins"] = {str(k): sorted(v) for k, v in joins.items()}
    checkpoint = CheckpointRow(
        step=step,
        snapshot=snapshot,
        delta=None,
        tasks=chain[-1].tasks,
        created_at=now,
        memory=compact_json(memory) if memory else None,
    )
    event = EventRow(
        step=step,
        kind="run_forked",
        at=now,
        data=json.dumps({"from_run": run_id, "from_step": step}),
    )
    await store.fork(record, checkpoint, [event])
    return record
