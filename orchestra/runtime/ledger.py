"""The ledger: every model and tool call of a step, keyed by (step, task, seq).

A call's result is recorded the moment it completes, durably when the run has a store (like
a pending write, not only at the step's commit), so a step re-run after a crash or an
interrupt replays it instead of calling again: never re-executed, never re-billed. An
irreversible tool call is recorded as *started* before it runs; a started entry with no
result is *in doubt*.

``seq`` numbers the calls of one task in the order it makes them (an agent's model call is
0, its proposed tool calls 1, 2, ...; a node's ``ctx.call_tool`` calls 0, 1, ...), so the
same deterministic code finds the same entries again. A re-run that asks for something else
at the same position is refused (:class:`~orchestra.errors.LedgerMismatchError`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .. import _faults
from .._json import compact_json, loads_object
from .._logging import get_logger
from ..errors import LedgerMismatchError
from ..specs import Effect
from ..store.base import LedgerEntry, LedgerKind, LedgerStatus
from ..tools import CallStatus

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ("ARBITER", "Ledger", "fingerprint")

ARBITER = "@arbiter"
"""The task the act phase's arbitration decisions are recorded under."""


def fingerprint(value: Any) -> str:
    """Hash a request's canonical JSON (what a replay must ask for again)."""
    return hashlib.sha256(compact_json(value).encode()).hexdigest()[:16]


class Ledger:
    """One run's ledger: entries of the step in flight, in memory, and in the store."""

    def __init__(self, run_id: str, recorder: Recorder | None = None) -> None:
        self.run_id = run_id
        self.recorder = recorder
        self._entries: dict[tuple[int, str, int], LedgerEntry] = {}
        self.log = get_logger("orchestra.ledger").bind(run_id=run_id)
        # which tools are read-only (their recorded calls may be made again): the run's
        # graph sets it; unknown tools are assumed to have an effect
        self.read_only: Callable[[str], bool] = lambda name: False

    def _harmless(self, entry: LedgerEntry) -> bool:
        return entry.kind == LedgerKind.MODEL or (
            entry.kind == LedgerKind.TOOL and self.read_only(entry.name)
        )

    def entries(self, step: int, task: str) -> list[LedgerEntry]:
        """The entries of one task of a step, in position order."""
        found = [e for (s, t, _), e in self._entries.items() if s == step and t == task]
        return sorted(found, key=lambda e: e.seq)

    def preload(self, entries: Iterable[LedgerEntry]) -> None:
        """Take the stored entries of the step a resume re-runs."""
        for entry in entries:
            self._entries[(entry.step, entry.task, entry.seq)] = entry

    def find(
        self,
        step: int,
        task: str,
        seq: int,
        *,
        kind: LedgerKind,
        name: str,
        request_hash: str,
        harmless: bool = False,
    ) -> LedgerEntry | None:
        """Return the entry recorded for this position, checking it is the same call.

        A different call at the position is refused, unless both the new call is
        ``harmless`` (a model call or a read-only tool) and so is everything recorded for
        the task from this position on: then the old entry is ignored, the call is made
        and its result replaces it. A call with an effect is never replaced.
        """
        entry = self._entries.get((step, task, seq))
        if entry is None:
            return None
        if entry.kind != kind or entry.name != name or entry.request_hash != request_hash:
            later = [
                e for (s, t, q), e in self._entries.items() if s == step and t == task and q >= seq
            ]
            if harmless and all(self._harmless(e) for e in later):
                self.log.warning(
                    "ledger_entry_replaced",
                    step=step,
                    node=task,
                    seq=seq,
                    recorded=entry.name,
                    asked=name,
                )
                return None
            raise LedgerMismatchError(
                f"call #{seq} of this task was recorded as {entry.kind} {entry.name!r} "
                f"(request {entry.request_hash}) but the re-run asks for {kind} {name!r} "
                f"(request {request_hash}); the node must make the same calls in the same "
                f"order when re-run",
                run_id=self.run_id,
                step=step,
                node=task,
            )
        return entry

    async def start(
        self, step: int, task: str, seq: int, *, kind: LedgerKind, name: str, request_hash: str
    ) -> LedgerEntry:
        """Record, durably, that an irreversible call is about to run."""
        entry = _new(
            step, task, seq, kind, name, request_hash, LedgerStatus.STARTED, None, finished=False
        )
        await self._put(entry)
        if _faults.ACTIVE:
            _faults.reach("after_call_started", step)
        return entry

    async def finish(
        self,
        step: int,
        task: str,
        seq: int,
        *,
        kind: LedgerKind,
        name: str,
        request_hash: str,
        result: str,
        started: LedgerEntry | None = None,
    ) -> LedgerEntry:
        """Record a completed call's result (JSON), durably."""
        if started is not None:
            entry = replace(
                started, status=LedgerStatus.DONE, result=result, finished_at=time.time()
            )
        else:
            entry = _new(
                step, task, seq, kind, name, request_hash, LedgerStatus.DONE, result, finished=True
            )
        await self._put(entry)
        if _faults.ACTIVE:
            _faults.reach("after_call_recorded", step)
        return entry

    async def release_failed(
        self, step: int, effect: Callable[[str], str | None], kept: Iterable[str] = ()
    ) -> None:
        """Forget the calls of a step that failed, so that a resume makes them again (a bad
        model answer is asked again, not replayed), except in tasks that will not run again
        (``kept``: their pending writes are kept, and their calls count in the usage) and
        tasks that called a tool with an effect: those keep every entry (the call happened,
        and what led to it must replay the same), and an irreversible call that raised
        becomes in doubt, for an operator to settle. ``effect(tool name)`` is the tool's
        effect (None: unknown)."""
        entries = [e for k, e in self._entries.items() if k[0] == step]
        keep = {
            e.task for e in entries if e.kind == LedgerKind.TOOL and effect(e.name) != Effect.READ
        }
        if keep:  # calls with effects ran as arbitration decided: a re-run decides the same
            keep.add(ARBITER)
        keep.update(kept)
        for entry in entries:
            key = (entry.step, entry.task, entry.seq)
            if entry.task not in keep:
                if self.recorder is not None:
                    await self.recorder.delete_ledger(entry)
                del self._entries[key]
            elif (
                entry.kind == LedgerKind.TOOL
                and effect(entry.name) in (Effect.IRREVERSIBLE, None)
                and entry.status == LedgerStatus.DONE
                and loads_object(entry.result).get("status") == CallStatus.ERROR
            ):
                await self._put(
                    replace(entry, status=LedgerStatus.STARTED, result=None, finished_at=None)
                )

    def forget(self, step: int) -> None:
        """Drop the in-memory entries of a committed step (the store keeps them)."""
        if self._entries:
            for key in [k for k in self._entries if k[0] <= step]:
                del self._entries[key]

    async def _put(self, entry: LedgerEntry) -> None:
        if self.recorder is not None:
            await self.recorder.put_ledger(entry)
        self._entries[(entry.step, entry.task, entry.seq)] = entry


def _new(
    step: int,
    task: str,
    seq: int,
    kind: LedgerKind,
    name: str,
    request_hash: str,
    status: LedgerStatus,
    result: str | None,
    *,
    finished: bool,
) -> LedgerEntry:
    now = time.time()
    return LedgerEntry(
        step=step,
        task=task,
        seq=seq,
        kind=kind,
        name=name,
        request_hash=request_hash,
        status=status,
        result=result,
        created_at=now,
        finished_at=now if finished else None,
    )
