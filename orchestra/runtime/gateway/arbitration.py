"""Arbitration: which of a step's calls on the same resources run, and in what order.

Every call of the act phase is seen at once; calls whose resources overlap, one of them
writing, conflict, and the policy decides (:mod:`orchestra.safeguards.arbitration`): the
calls that run come back as chains of waves, a call that loses gets a ``conflict`` outcome
it can act on. Each decision is an event and is recorded in the ledger under the
:data:`~orchestra.runtime.ledger.ARBITER` task, so a re-run of the step decides the same; a
conflict escalated to a person becomes a ``conflict`` request whose answer is a decision too.
A node's own calls (``ctx.call_tool``) are not seen together: they take resource locks
instead (:mod:`orchestra.safeguards.locks`, :meth:`ArbitrationStep.lock`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..._json import compact_json, loads_object
from ...errors import ArbitrationError
from ...events import ConflictArbitrated
from ...safeguards.arbitration import Arbitration, Conflict, ProposedCall, plan_calls, strictest
from ...safeguards.interrupts import Request, StepInterrupted
from ...safeguards.locks import Held, ResourceLocks
from ...store.base import LedgerKind, LedgerStatus, RequestKind, RequestStatus
from ...tools import CallStatus
from ..ledger import ARBITER, fingerprint
from .calls import CallOutcome, PlannedCall
from .execute import CallRunner

if TYPE_CHECKING:
    from ...store.base import RequestRow

__all__ = ("ArbitrationStep",)


class ArbitrationStep:
    """Settles one run's conflicts between calls (``policy`` None: calls never conflict).

    ``requests`` are the run's requests a resume found, by id: the gateway's own dict, shared.
    """

    def __init__(
        self,
        *,
        runner: CallRunner,
        policy: Arbitration | None,
        requests: dict[str, RequestRow],
    ) -> None:
        self.runner = runner
        self.run_id = runner.run_id
        self.ledger = runner.ledger
        self.policy = policy
        self.requests = requests
        self.locks = ResourceLocks()

    async def arbitrate(self, calls: Sequence[PlannedCall]) -> list[list[list[PlannedCall]]]:
        """Settle conflicts between the act phase's calls; return chains of waves (chains
        run concurrently, the waves of a chain one after another). Calls that lose get
        their conflict result; a conflict escalated to a person interrupts."""
        if not calls:
            return []
        if self.policy is None or len(calls) == 1 or not any(c.resources for c in calls):
            return [[list(calls)]]
        step = calls[0].caller.step
        proposals = [
            ProposedCall(
                key=item.key,
                caller=item.caller.label,
                call_id=item.call.id,
                tool=item.call.name,
                arguments=item.json_arguments,
                resources=item.resources,
                writes=item.writes,
                priority=item.caller.priority,
                index=index,
            )
            for index, item in enumerate(calls)
        ]
        tools = {item.call.name: item.tool for item in calls}
        settled = self._settled(step)
        try:
            plan = plan_calls(
                proposals,
                self.policy,
                lambda name: getattr(tools.get(name), "arbitration", None),
                settled,
                _conflict_digest,
            )
        except Exception as exc:  # the user's arbiter: the run stops, naming it
            raise ArbitrationError(
                f"arbitration failed: {type(exc).__name__}: {exc}; no call of the step's "
                f"act phase was made",
                run_id=self.run_id,
                step=step,
            ) from exc
        by_key = {item.key: item for item in calls}
        recorded = self._recorded(step)
        for decision in plan.decisions:
            # replayed: reused from an earlier run of the step (an operator's choice applied
            # for the first time is a new decision, recorded now)
            decision.replayed = decision.digest in recorded
            if not decision.replayed:
                await self.ledger.finish(
                    step,
                    ARBITER,
                    _digest_seq(decision.digest),
                    kind=LedgerKind.ARBITRATION,
                    name=decision.policy,
                    request_hash=decision.digest,
                    result=compact_json(decision.to_json()),
                )
            for key, reason in decision.lost.items():
                item = by_key[key]
                item.outcome = CallOutcome(
                    item.call.id, item.call.name, CallStatus.CONFLICT, error=reason
                )
            self.runner.emit(
                ConflictArbitrated(
                    run_id=self.run_id,
                    at=time.time(),
                    step=step,
                    policy=decision.policy,
                    resources=tuple(sorted(decision.resources)),
                    calls=compact_json([c.to_dict() for c in decision.calls]),
                    run=tuple(decision.run),
                    lost=compact_json(decision.lost),
                    replayed=decision.replayed,
                ),
                "info",
            )
        if plan.escalated:
            raise StepInterrupted([self._conflict_request(step, c) for c in plan.escalated])
        return [[[by_key[c.key] for c in wave] for wave in chain] for chain in plan.chains]

    def _recorded(self, step: int) -> dict[str, dict[str, Any]]:
        """The decisions an earlier run of this step recorded, by conflict digest."""
        found = {}
        for entry in self.ledger.entries(step, ARBITER):
            if entry.status == LedgerStatus.DONE and entry.result is not None:
                found[entry.request_hash] = json.loads(entry.result)
        return found

    def _settled(self, step: int) -> dict[str, dict[str, Any]]:
        """Recorded decisions, and operators' choices for escalated conflicts."""
        settled: dict[str, dict[str, Any]] = {}
        for row in self.requests.values():
            if (
                row.kind == RequestKind.CONFLICT
                and row.step == step
                and row.status == RequestStatus.ANSWERED
            ):
                payload = json.loads(row.payload)
                settled[payload["digest"]] = {
                    "run": list(loads_object(row.answer).get("run") or [])
                }
        settled.update(self._recorded(step))
        return settled

    def _conflict_request(self, step: int, conflict: Conflict) -> Request:
        digest = _conflict_digest(conflict)
        keys = [c.key for c in conflict.calls]
        return Request.new(
            run_id=self.run_id,
            kind=RequestKind.CONFLICT,
            step=step,
            task=ARBITER,
            seq=_digest_seq(digest),
            identity="conflict",
            node=", ".join(dict.fromkeys(c.caller for c in conflict.calls)),
            payload={
                "digest": digest,
                "resources": sorted(conflict.resources),
                "calls": [c.to_dict() for c in conflict.calls],
            },
            schema={
                "type": "object",
                "properties": {
                    "run": {
                        "type": "array",
                        "items": {"enum": keys},
                        "uniqueItems": True,
                        "description": "the keys of the calls that run, in order",
                    }
                },
                "required": ["run"],
            },
        )

    # -- a node's own calls: resource locks ------------------------------------------------

    async def lock(self, item: PlannedCall) -> Held | None:
        """Take the call's resource locks; None when it lost (its outcome is set, recorded
        and reported)."""
        assert item.tool is not None
        assert self.policy is not None
        own = item.tool.arbitration
        arbitration = self.policy
        policy = (
            own
            if own is not None
            else strictest(arbitration.policy_for((r,)) for r in item.resources)
        )
        name = policy if isinstance(policy, str) else "serialize"
        got = await self.locks.acquire(
            item.resources,
            write=item.writes,
            holder=item.key,
            policy=name,
            priority=item.caller.priority,
        )
        if isinstance(got, Held):
            return got
        holder, resource = got
        outcome = CallOutcome(
            item.call.id,
            item.call.name,
            CallStatus.CONFLICT,
            error=f"resource {resource} is held by call {holder}; policy {name} let that "
            f"call have it, and this one was not made",
        )
        self.runner.emit(
            ConflictArbitrated(
                run_id=self.run_id,
                at=time.time(),
                step=item.caller.step,
                policy=name,
                resources=(resource,),
                calls=compact_json(
                    [
                        {"key": holder, "holding": True},
                        {
                            "key": item.key,
                            "caller": item.caller.label,
                            "tool": item.call.name,
                            "arguments": item.json_arguments,
                        },
                    ]
                ),
                run=(holder,),
                lost=compact_json({item.key: outcome.error}),
            ),
            "info",
        )
        # recorded: a re-run of the step decides the same
        await self.ledger.finish(
            item.caller.step,
            item.caller.label,
            item.seq,
            kind=LedgerKind.TOOL,
            name=item.call.name,
            request_hash=item.request_hash,
            result=outcome.to_json(),
        )
        item.outcome = outcome
        self.runner.report(item, outcome, 0.0)
        return None

    def unlock(self, held: Held) -> None:
        """Release the resource locks a node's call held."""
        self.locks.release(held)


def _conflict_digest(conflict: Conflict) -> str:
    """A conflict's identity: its policy and its calls (what a re-run must decide alike)."""
    return fingerprint(
        {
            "policy": conflict.policy,
            "calls": [[c.key, c.tool, dict(c.arguments)] for c in conflict.calls],
        }
    )


def _digest_seq(digest: str) -> int:
    """A ledger position for a conflict's decision: from its digest (one per conflict)."""
    return int(digest[:8], 16)
