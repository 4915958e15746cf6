"""Arbitration: deciding between tool calls of one step that touch the same resources.

Two calls *conflict* when their tools' resource keys overlap and at least one of them
writes (``Effect.WRITE`` or ``Effect.IRREVERSIBLE``). The arbiter sees every call proposed in
a step's act phase at once, so it decides with full information, and deterministically:
calls are ordered by priority (highest first), then caller name, then position.

Calls linked by conflicts form a *conflict*; calls in no conflict run concurrently, as
always. A conflict's policy (:class:`Arbitration` on compile, overridable per resource
pattern and per tool; when a conflict's calls name different policies, the strictest
applies: ``reject_all``, ``escalate``, a custom arbiter, ``priority_wins``, ``first_wins``,
``serialize``):

- ``serialize`` (default): every call runs, one at a time where they conflict, in priority
  order (calls that do not conflict with each other still run together);
- ``first_wins``: going through the calls in proposal order (caller name, then position),
  a call runs unless it conflicts with one already chosen; the others lose;
- ``priority_wins``: the same, in priority order;
- ``reject_all``: none of the conflict's calls runs;
- ``escalate``: an operator chooses (a ``conflict`` request, answered with ``Choose``);
- a custom :data:`Arbiter`: a function of the :class:`Conflict` returning the keys of the
  calls that run, in the order they run.

A call that loses gets a ``conflict`` result naming the call it lost to and the policy; its
agent sees it next turn and can re-plan. Each decision is recorded (an event, and the ledger
of the step, so a re-run of the step decides identically).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = (
    "POLICIES",
    "Arbiter",
    "Arbitration",
    "Conflict",
    "Decision",
    "Plan",
    "ProposedCall",
    "plan_calls",
)

POLICIES = ("serialize", "first_wins", "priority_wins", "reject_all", "escalate")
# the strictest first; a custom arbiter sits between escalate and priority_wins
_STRICTNESS = {"reject_all": 0, "escalate": 1, "priority_wins": 3, "first_wins": 4, "serialize": 5}
_CUSTOM = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposedCall:
    """One call as the arbiter sees it. ``key`` (``"caller#position"``) is unique in the
    act phase; ``call_id`` is the id the model gave it."""

    key: str
    caller: str
    call_id: str
    tool: str
    arguments: Mapping[str, Any]
    resources: frozenset[str]
    writes: bool
    priority: int = 0
    index: int = 0

    def describe(self) -> str:
        return f"{self.tool!r} by {self.caller!r} ({self.key})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "caller": self.caller,
            "tool": self.tool,
            "arguments": dict(self.arguments),
            "resources": sorted(self.resources),
            "writes": self.writes,
            "priority": self.priority,
        }


@dataclass(frozen=True, slots=True)
class Conflict:
    """Calls of one step linked by overlapping resources (at least one writing), in
    priority order; ``resources`` are the contested keys."""

    calls: tuple[ProposedCall, ...]
    resources: frozenset[str]
    policy: str

    def conflicting(self, a: ProposedCall, b: ProposedCall) -> bool:
        """Tell whether two of the conflict's calls conflict with each other directly."""
        return _conflict(a, b)


Arbiter = Callable[[Conflict], Iterable[str]]
"""A custom policy: given a conflict, return the keys of the calls that run, in order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Arbitration:
    """How conflicting calls are settled (see the module doc).

    ``policy``: the default, a policy name or an :data:`Arbiter`. ``per_resource``: policies
    for resource keys matching a pattern (``fnmatch``: ``"account:*"``), the first matching
    pattern winning. A tool's own ``arbitration=`` overrides both for its calls.
    """

    policy: str | Arbiter = "serialize"
    per_resource: Mapping[str, str | Arbiter] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with this configuration (compile reports it)."""
        found = []
        for where, policy in [("policy", self.policy), *self.per_resource.items()]:
            problem = policy_problem(policy)
            if problem is not None:
                label = "arbitration policy" if where == "policy" else f"per_resource[{where!r}]"
                found.append(f"{label}: {problem}")
        return found

    def policy_for(self, resources: Iterable[str]) -> str | Arbiter:
        """The policy the first pattern matching one of ``resources`` names (the default
        without one); :func:`plan_calls` asks it one resource at a time."""
        if self.per_resource:
            for resource in sorted(resources):
                for pattern, policy in self.per_resource.items():
                    if fnmatch.fnmatchcase(resource, pattern):
                        return policy
        return self.policy


def policy_problem(policy: object) -> str | None:
    """Say what is wrong with a policy, or None."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            return f"unknown policy {policy!r} (known: {', '.join(POLICIES)}, or a function)"
        return None
    if not callable(policy):
        return f"a policy is a name ({', '.join(POLICIES)}) or a function, got {policy!r}"
    return None


def strictest(policies: Iterable[str | Arbiter]) -> str | Arbiter:
    """The strictest of several policies (see the module doc); ties by name."""
    return min(
        policies,
        key=lambda p: (
            _STRICTNESS.get(p, _CUSTOM) if isinstance(p, str) else _CUSTOM,
            policy_name(p),
        ),
    )


def policy_name(policy: str | Arbiter) -> str:
    if isinstance(policy, str):
        return policy
    return getattr(policy, "__qualname__", None) or type(policy).__name__


@dataclass(slots=True)
class Decision:
    """How one conflict was settled: the calls that run (in order) and those that lost."""

    policy: str
    calls: tuple[ProposedCall, ...]
    resources: frozenset[str]
    run: list[str] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)
    digest: str = ""
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "run": self.run, "lost": self.lost}


@dataclass(slots=True)
class Plan:
    """The act phase, arbitrated: ``chains`` run concurrently with each other; each chain is
    waves run one after another, the calls of a wave at once. ``lost`` maps the keys of the
    calls that do not run to the reason; ``escalated`` are conflicts waiting for a person."""

    chains: list[list[list[ProposedCall]]] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    escalated: list[Conflict] = field(default_factory=list)


def _conflict(a: ProposedCall, b: ProposedCall) -> bool:
    return (a.writes or b.writes) and not a.resources.isdisjoint(b.resources)


def priority_order(call: ProposedCall) -> tuple[int, str, int]:
    return (-call.priority, call.caller, call.index)


def proposal_order(call: ProposedCall) -> tuple[str, int]:
    return (call.caller, call.index)


def find_conflicts(
    calls: Sequence[ProposedCall],
) -> tuple[list[ProposedCall], list[tuple[list[ProposedCall], frozenset[str]]]]:
    """Split calls into those in no conflict and groups of calls linked by conflicts (each
    in priority order, with its contested resources)."""
    parent = list(range(len(calls)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_resource: dict[str, list[int]] = {}
    for i, call in enumerate(calls):
        for resource in call.resources:
            by_resource.setdefault(resource, []).append(i)
    contested: dict[int, set[str]] = {}
    linked: set[int] = set()
    for resource, users in by_resource.items():
        writer = next((i for i in users if calls[i].writes), None)
        if len(users) < 2 or writer is None:
            continue
        # with a writer among them, every user of the resource conflicts with someone (a
        # reader with the writer, a writer with anyone): all are linked, in O(users)
        for i in users:
            linked.add(i)
            contested.setdefault(i, set()).add(resource)
            a, b = find(i), find(writer)
            if a != b:
                parent[max(a, b)] = min(a, b)
    free = [calls[i] for i in range(len(calls)) if i not in linked]
    groups: dict[int, list[int]] = {}
    for i in sorted(linked):
        groups.setdefault(find(i), []).append(i)
    conflicts = []
    for members in groups.values():
        resources = frozenset(r for i in members for r in contested.get(i, ()))
        conflicts.append(
            (sorted((calls[i] for i in members), key=priority_order), resources),
        )
    conflicts.sort(key=lambda item: priority_order(item[0][0]))
    return free, conflicts


def _waves(calls: Sequence[ProposedCall]) -> list[list[ProposedCall]]:
    """Greedy layering in the given order: a call goes in the wave after the last one
    holding a call it conflicts with (calls that do not conflict share a wave). Per
    resource, the last wave with any user and the last with a writer are enough: a writer
    follows every user, a reader every writer (O(calls x resources))."""
    waves: list[list[ProposedCall]] = []
    used: dict[str, int] = {}
    written: dict[str, int] = {}
    for call in calls:
        level = 0
        for resource in call.resources:
            before = used.get(resource, -1) if call.writes else written.get(resource, -1)
            level = max(level, before + 1)
        if level == len(waves):
            waves.append([])
        waves[level].append(call)
        for resource in call.resources:
            used[resource] = max(used.get(resource, -1), level)
            if call.writes:
                written[resource] = max(written.get(resource, -1), level)
    return waves


def _winners(
    calls: Sequence[ProposedCall], policy: str
) -> tuple[list[ProposedCall], dict[str, str]]:
    """Greedy: each call runs unless it conflicts with a call already chosen."""
    chosen: list[ProposedCall] = []
    lost: dict[str, str] = {}
    user: dict[str, ProposedCall] = {}  # per resource: the first chosen call using it
    writer: dict[str, ProposedCall] = {}  # ... and the first chosen call writing it
    for call in calls:
        holders = user if call.writes else writer
        rival = next((holders[r] for r in sorted(call.resources) if r in holders), None)
        if rival is None:
            chosen.append(call)
            for resource in call.resources:
                user.setdefault(resource, call)
                if call.writes:
                    writer.setdefault(resource, call)
        else:
            shared = ", ".join(sorted(call.resources & rival.resources))
            lost[call.key] = (
                f"conflicts with {rival.describe()} over {shared}; policy {policy} let "
                f"that call run instead, and this one was not made"
            )
    return chosen, lost


def decide(
    conflict: Conflict, arbiter: Arbiter | None, chosen: Sequence[str] | None = None
) -> Decision:
    """Settle one conflict by its policy (``chosen``: an operator's or a recorded choice)."""
    calls = conflict.calls
    decision = Decision(policy=conflict.policy, calls=calls, resources=conflict.resources)
    names = ", ".join(sorted(conflict.resources))
    if chosen is not None or arbiter is not None:
        if chosen is None:
            assert arbiter is not None
            chosen = list(arbiter(conflict))
        keys = {c.key: c for c in calls}
        unknown = [k for k in chosen if k not in keys]
        if unknown or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"the choice {list(chosen)!r} must name calls of the conflict, each once "
                f"(its calls: {', '.join(keys)})"
            )
        decision.run = list(chosen)
        picked = ", ".join(keys[k].describe() for k in chosen) or "no call"
        who = "an operator" if conflict.policy == "escalate" else f"arbiter {conflict.policy}"
        for call in calls:
            if call.key not in decision.run:
                decision.lost[call.key] = (
                    f"conflicts over {names}; {who} chose {picked}, and this call was not made"
                )
        return decision
    policy = conflict.policy
    if policy == "serialize":
        decision.run = [c.key for c in calls]
    elif policy in ("first_wins", "priority_wins"):
        order = sorted(calls, key=proposal_order) if policy == "first_wins" else list(calls)
        winners, decision.lost = _winners(order, policy)
        decision.run = [c.key for c in winners]
    elif policy == "reject_all":
        for call in calls:
            decision.lost[call.key] = (
                f"conflicts with {len(calls) - 1} other call(s) over {names}; policy "
                f"reject_all refuses them all, and this call was not made"
            )
    else:  # pragma: no cover - escalate is answered by ``chosen``; the rest are checked
        raise ValueError(f"policy {policy!r} cannot decide on its own")
    return decision


def plan_calls(
    calls: Sequence[ProposedCall],
    arbitration: Arbitration,
    tool_policy: Callable[[str], str | Arbiter | None] = lambda name: None,
    settled: Mapping[str, Mapping[str, Any]] | None = None,
    digest: Callable[[Conflict], str] = lambda conflict: "",
) -> Plan:
    """Arbitrate one act phase.

    ``settled`` maps a conflict's digest to a decision already taken (``{"run": [keys],
    "lost": {key: reason}}``: recorded by an earlier run of the step, or an operator's
    choice without ``lost``); such a conflict is not decided again.
    """
    free, groups = find_conflicts(calls)
    plan = Plan()
    if free:
        plan.chains.append([list(free)])
    for members, resources in groups:
        policies: list[str | Arbiter] = []
        for call in members:
            own = tool_policy(call.tool)
            if own is not None:
                policies.append(own)
            else:  # each contested resource it touches names its own
                policies.extend(arbitration.policy_for((r,)) for r in call.resources & resources)
        policy = strictest(policies)
        conflict = Conflict(tuple(members), resources, policy_name(policy))
        key = digest(conflict)
        recorded = (settled or {}).get(key)
        if recorded is None and policy == "escalate":
            plan.escalated.append(conflict)
            continue
        arbiter = None if isinstance(policy, str) else policy
        decision = decide(conflict, arbiter, None if recorded is None else recorded["run"])
        if recorded is not None and recorded.get("lost") is not None:
            decision.lost = dict(recorded["lost"])
        decision.digest = key
        decision.replayed = recorded is not None
        plan.decisions.append(decision)
        plan.lost.update(decision.lost)
        by_key = {c.key: c for c in members}
        plan.chains.append(_waves([by_key[k] for k in decision.run]))
    return plan
