"""Turn states, deltas and tasks into the JSON a store keeps, and back.

A checkpoint is either a snapshot (the whole state) or a delta: for each field a step changed,
its new value, or for append/extend fields only the items added. Loading a checkpoint is the
nearest snapshot plus every later delta, applied in JSON form, then validated once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from .._json import compact_json
from ..models.base import Message, ToolCall
from ..specs import NO_PAYLOAD, Send
from ..state import FieldDelta, StateSchema
from ..store.base import CheckpointRow
from .tasks import Task, TaskResult

__all__ = (
    "dump_delta",
    "dump_result",
    "dump_state",
    "dump_tasks",
    "load_result",
    "load_state",
    "load_tasks",
    "replay_json",
)


_PLAIN = (int, str, bool, type(None))

_TASKS_CACHE: dict[tuple[tuple[str, int, str], ...], str] = {}


def dump_state(state: BaseModel) -> str:
    """Serialize the whole state (a snapshot)."""
    return state.model_dump_json()


def dump_delta(schema: StateSchema, state: BaseModel, deltas: Mapping[str, FieldDelta]) -> str:
    """Serialize what one step changed: set fields' values, appended items.

    Values are serialized the way the state model serializes them; ints, strings, booleans
    and None (whose JSON form cannot differ) skip the model's serializer.
    """
    sets: dict[str, Any] = {}
    slow: set[str] = set()
    appended: dict[str, Any] = {}
    plain = _PLAIN if schema.plain_serialization else ()
    for name, delta in deltas.items():
        if delta.kind == "append":
            adapter = schema.fields[name].items_adapter
            assert adapter is not None
            appended[name] = adapter.dump_python(delta.value, mode="json")
        elif type(delta.value) in plain:
            sets[name] = delta.value
        else:
            slow.add(name)
    if slow:
        sets.update(state.model_dump(mode="json", include=slow))
    out: dict[str, Any] = {}
    if sets:
        out["set"] = sets
    if appended:
        out["append"] = appended
    return compact_json(out)


def load_state(schema: StateSchema, chain: Sequence[CheckpointRow]) -> BaseModel:
    """Rebuild the state from a snapshot and the deltas after it (oldest first)."""
    return schema.model.model_validate(replay_json(chain), by_name=True)


def replay_json(chain: Sequence[CheckpointRow]) -> dict[str, Any]:
    """Apply a chain's deltas to its snapshot in JSON form (no validation)."""
    if not chain or chain[0].snapshot is None:
        raise ValueError("a checkpoint chain starts with a snapshot")
    data: dict[str, Any] = json.loads(chain[0].snapshot)
    for row in chain[1:]:
        if row.snapshot is not None:
            data = json.loads(row.snapshot)
            continue
        if not row.delta:
            continue
        delta = json.loads(row.delta)
        data.update(delta.get("set", {}))
        for name, items in delta.get("append", {}).items():
            data[name] = [*(data.get(name) or ()), *items]
    return data


def dump_tasks(tasks: Sequence[Task]) -> str:
    """Serialize the tasks a step leaves ready (edge-started task lists are cached)."""
    if all(task.payload is NO_PAYLOAD for task in tasks):
        key = tuple((task.node, task.index, task.label) for task in tasks)
        text = _TASKS_CACHE.get(key)
        if text is None:
            if len(_TASKS_CACHE) > 4096:
                _TASKS_CACHE.clear()
            text = _TASKS_CACHE[key] = compact_json(
                [{"node": n, "index": i, "label": label} for n, i, label in key]
            )
        return text
    out = []
    for task in tasks:
        item: dict[str, Any] = {"node": task.node, "index": task.index, "label": task.label}
        if task.payload is not NO_PAYLOAD:
            item["payload"] = to_jsonable_python(task.payload)
        out.append(item)
    return compact_json(out)


def load_tasks(text: str) -> list[Task]:
    return [
        Task(item["node"], item["index"], item.get("payload", NO_PAYLOAD), item["label"])
        for item in json.loads(text)
    ]


def dump_result(result: TaskResult) -> str:
    """Serialize a finished task's result (a pending write)."""
    goto = [
        {"send": g.node, "payload": to_jsonable_python(g.payload)} if isinstance(g, Send) else g
        for g in result.goto
    ]
    update = None if result.update is None else to_jsonable_python(dict(result.update))
    data: dict[str, Any] = {"update": update, "goto": goto}
    if result.messages:
        data["messages"] = dump_messages(result.messages)
    if result.calls:
        data["calls"] = [c.model_dump(mode="json") for c in result.calls]
    if result.again:
        data["again"] = True
    return compact_json(data)


def load_result(text: str) -> TaskResult:
    data = json.loads(text)
    goto = tuple(
        Send(g["send"], g.get("payload")) if isinstance(g, dict) else g for g in data["goto"]
    )
    return TaskResult(
        update=data["update"],
        goto=goto,
        messages=load_messages(data["messages"]) if "messages" in data else None,
        calls=tuple(ToolCall.model_validate(c) for c in data.get("calls", ())),
        again=bool(data.get("again", False)),
    )


# -- agents' conversations ---------------------------------------------------------------


def dump_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [m.model_dump(mode="json", exclude_defaults=True) for m in messages]


def load_messages(items: Sequence[Any]) -> list[Message]:
    return [Message.model_validate(item) for item in items]


Joins = dict[int, frozenset[str]]
"""Join progress: for a join (by its index) whose sources finish in different steps (agents
running several turns), the sources that have finished so far."""


@dataclass(slots=True)
class MemoryChange:
    """What a step changed in the framework's own run state: the conversations after it,
    the messages it added, the conversations it dropped, and the join progress after it
    (``joins_changed`` says whether that differs from before)."""

    conversations: dict[str, list[Message]]
    added: dict[str, list[Message]]
    dropped: list[str]
    joins: Joins
    joins_changed: bool = False
    replaced: dict[str, list[Message]] | None = None

    @property
    def empty(self) -> bool:
        return not self.added and not self.dropped and not self.joins_changed and not self.replaced


def dump_memory(change: MemoryChange, *, full: bool) -> str | None:
    """Serialize the framework's run state for a checkpoint: all of it with a snapshot,
    else only what the step changed."""
    data: dict[str, Any] = {}
    if full:
        if change.conversations:
            data["all"] = {k: dump_messages(v) for k, v in change.conversations.items()}
        if change.joins:
            data["joins"] = _dump_joins(change.joins)
        return compact_json(data) if data else None
    if change.added:
        data["add"] = {k: dump_messages(v) for k, v in change.added.items()}
    if change.replaced:
        data["set"] = {k: dump_messages(v) for k, v in change.replaced.items()}
    if change.dropped:
        data["drop"] = list(change.dropped)
    if change.joins_changed:
        data["joins"] = _dump_joins(change.joins)
    return compact_json(data) if data else None


def _dump_joins(joins: Joins) -> dict[str, list[str]]:
    return {str(index): sorted(sources) for index, sources in sorted(joins.items())}


def load_joins(chain: Sequence[CheckpointRow]) -> Joins:
    """Rebuild the join progress from a chain (the last value written wins)."""
    joins: Joins = {}
    for row in chain:
        if row.snapshot is not None:
            joins = {}
        if row.memory and '"joins"' in row.memory:
            data = json.loads(row.memory).get("joins")
            if data is not None:
                joins = {int(k): frozenset(v) for k, v in data.items()}
    return joins


def replay_memory(chain: Sequence[CheckpointRow]) -> dict[str, list[Any]]:
    """Rebuild the conversations (JSON form) from a chain, like the state."""
    memory: dict[str, list[Any]] = {}
    for row in chain:
        if row.snapshot is not None:
            memory = {}
        if not row.memory:
            continue
        data = json.loads(row.memory)
        if "all" in data:
            memory = {k: list(v) for k, v in data["all"].items()}
        for key, items in data.get("add", {}).items():
            memory.setdefault(key, []).extend(items)
        for key, items in data.get("set", {}).items():  # a conversation held to its cap
            memory[key] = list(items)
        for key in data.get("drop", ()):
            memory.pop(key, None)
    return memory


def load_memory(chain: Sequence[CheckpointRow]) -> dict[str, list[Message]]:
    return {k: load_messages(v) for k, v in replay_memory(chain).items()}
