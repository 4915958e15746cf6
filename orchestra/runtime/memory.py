"""Agent memory: where each task's conversation is kept, how a step changes the
conversations (and join progress), and how a conversation is held to its cap.

Conversations are run state the framework keeps (checkpointed with every step, like the
state); :class:`~orchestra.runtime.checkpoint.MemoryChange` is what a step changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidUpdateError
from ..models.base import Message
from ..safeguards.caps import Cap
from ..specs import NO_PAYLOAD, NodeKind
from .checkpoint import Joins, MemoryChange
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan

__all__ = ("conversation_key", "hold_conversation", "mid_visit", "remember")

_AGENT = NodeKind.AGENT  # (a module global: cheaper per task than the enum's attribute)


def conversation_key(node: str, label: str, payload: Any) -> str:
    """Where a task's conversation is kept: one per agent for visits started by edges or
    routes; one per task for agents started by ``Send`` (dropped when it finishes)."""
    return node if payload is NO_PAYLOAD else f"send:{label}"


def hold_conversation(messages: list[Message], cap: Cap, run_id: str, label: str) -> list[Message]:
    """Hold a conversation to its cap: keep the instructions, forget whole oldest turns (a
    tool result never outlives its call), or let a hook compact it; refuse if asked to."""
    if cap.policy == "refuse":
        raise InvalidUpdateError(
            f"agent {label!r}: its conversation would hold {len(messages)} messages, over its "
            f"cap of {cap.max_items} (Cap policy 'refuse')",
            run_id=run_id,
            node=label,
        )
    if callable(cap.policy):
        kept = list(cap.policy(list(messages)))
    else:
        # keep the instructions and this visit's input, then the newest whole turns (an
        # answer with its tool results) that fit: earlier visits and turns are forgotten
        head = [m for m in messages[:1] if m.role == "system"]
        start = next(
            (
                i
                for i in range(len(messages) - 1, -1, -1)
                if messages[i].role == "user" and messages[i].name == "input"
            ),
            None,
        )
        if start is not None:
            head.append(messages[start])
        turns: list[list[Message]] = []
        for message in messages[(start + 1) if start is not None else len(head) :]:
            if message.role == "assistant" or not turns:
                turns.append([message])
            else:
                turns[-1].append(message)
        room = cap.max_items - len(head)
        tail: list[Message] = []
        for turn in reversed(turns):
            if len(turn) > room:
                break
            tail[:0] = turn
            room -= len(turn)
        kept = [*head, *tail]
    if len(kept) > cap.max_items or not all(isinstance(m, Message) for m in kept):
        raise InvalidUpdateError(
            f"agent {label!r}: the memory Cap hook must return at most {cap.max_items} "
            f"Message objects, got {len(kept)}",
            run_id=run_id,
            node=label,
        )
    return kept


def mid_visit(plan: Plan[Any], memory: Mapping[str, list[Message]], task: Task) -> bool:
    """Tell whether an agent's task is between turns (its tool results wait for it)."""
    if plan.nodes[task.node].kind is not _AGENT:
        return False
    history = memory.get(conversation_key(task.node, task.label, task.payload))
    if not history:
        return False
    last = history[-1]
    return not (last.role == "assistant" and not last.tool_calls)


def remember(
    plan: Plan[Any],
    run_id: str,
    memory: dict[str, list[Message]],
    joins: Joins,
    previous_joins: Joins,
    tasks: Sequence[Task],
    results: Sequence[TaskResult],
) -> MemoryChange:
    """The conversations after a step: the messages its agents added (held to their caps);
    a finished Send-started agent's conversation is dropped. And the join progress after it."""
    added: dict[str, list[Message]] = {}
    dropped: list[str] = []
    for task, result in zip(tasks, results, strict=True):
        if result.messages is None and plan.nodes[task.node].kind is not _AGENT:
            continue
        key = conversation_key(task.node, task.label, task.payload)
        if result.messages:
            added[key] = result.messages
        if not result.again and task.payload is not NO_PAYLOAD:
            dropped.append(key)
    change = MemoryChange(memory, added, dropped, joins, joins_changed=joins != previous_joins)
    if not added and not dropped:
        return change
    memory = change.conversations = dict(memory)
    for key, messages in added.items():
        memory[key] = [*memory.get(key, ()), *messages]
    for task in tasks:
        agent = plan.nodes[task.node].fn
        cap = getattr(agent, "memory", None)
        key = conversation_key(task.node, task.label, task.payload)
        if cap is None or key not in added or len(memory[key]) <= cap.max_items:
            continue
        kept = hold_conversation(memory[key], cap, run_id, task.label)
        memory[key] = kept
        change.replaced = {**(change.replaced or {}), key: kept}
        added.pop(key)
    for key in dropped:
        memory.pop(key, None)
    return change
