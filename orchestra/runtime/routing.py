"""What comes out of a node, and what runs next.

``normalize`` splits a node's return value into an update and its goto targets, refusing
anything else; ``next_tasks`` finds the next step's tasks from static edges, routes (evaluated
on the merged state), goto and joins, ordered by node name so a replay schedules identically.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..errors import InvalidUpdateError, RouteError
from ..specs import END, NO_PAYLOAD, START, Command, NodeSpec, RouteSpec, Send
from .tasks import Task, TaskResult

if TYPE_CHECKING:
    from ..compile import Plan

__all__ = ("initial_tasks", "make_tasks", "next_tasks", "normalize")


def normalize(
    graph: Plan[Any],
    run_id: str,
    out: Any,
    node: NodeSpec,
    step: int,
    state: BaseModel,
) -> tuple[Mapping[str, Any] | None, tuple[str | Send, ...]]:
    """Split what a node returned into (update, goto), refusing anything else.

    ``state`` is the state the node saw: a returned state-model instance updates the
    fields whose values differ from it.
    """
    if out is None:
        return None, ()
    if isinstance(out, Mapping):
        return out or None, ()
    if isinstance(out, Command):
        update = (
            None if out.update is None else _as_update(graph, run_id, out.update, node, step, state)
        )
        goto = out.goto
        items = (goto,) if isinstance(goto, str | Send) else tuple(goto)
        return update, _check_goto(run_id, items, node, step)
    if isinstance(out, Send):
        return None, _check_goto(run_id, (out,), node, step)
    if isinstance(out, list | tuple) and out and all(isinstance(x, Send) for x in out):
        return None, _check_goto(run_id, tuple(out), node, step)
    return _as_update(graph, run_id, out, node, step, state), ()


def _as_update(
    graph: Plan[Any],
    run_id: str,
    value: Any,
    node: NodeSpec,
    step: int,
    state: BaseModel,
) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value or None
    if isinstance(value, graph.state_model):
        return _changed_fields(graph, run_id, value, node, step, state)
    raise InvalidUpdateError(
        f"node returned {type(value).__name__} {value!r:.80}; return a dict of field "
        f"updates, a {graph.state_model.__name__}, a Command, Send objects or None",
        run_id=run_id,
        step=step,
        node=node.name,
    )


def _changed_fields(
    graph: Plan[Any],
    run_id: str,
    value: BaseModel,
    node: NodeSpec,
    step: int,
    state: BaseModel,
) -> Mapping[str, Any] | None:
    """The fields of a returned state instance that it sets and that differ from the state
    the node saw (a ``model_copy`` of the state sets every field, but changes only some)."""
    changed: dict[str, Any] = {}
    fields = graph.schema.fields
    for name in value.model_fields_set:
        spec = fields[name]
        new, old = getattr(value, name), getattr(state, name, None)
        if new is old or new == old:
            continue
        if spec.reducer is not None:
            raise InvalidUpdateError(
                f"returned a {type(value).__name__} whose field {name!r} changed, but "
                f"{name!r} has the {spec.reducer.name} reducer, so the new value would be "
                f"added to the old one; return a dict such as {{{name!r}: ...}} with only "
                f"what to add",
                run_id=run_id,
                step=step,
                node=node.name,
            )
        changed[name] = new
    return changed or None


def _check_goto(
    run_id: str, items: Sequence[Any], node: NodeSpec, step: int
) -> tuple[str | Send, ...]:
    for item in items:
        target = item.node if isinstance(item, Send) else item
        if not isinstance(target, str):
            raise InvalidUpdateError(
                f"goto holds {item!r}; use node names, END or Send objects",
                run_id=run_id,
                step=step,
                node=node.name,
            )
        if target not in node.targets:
            declared = ", ".join(repr(t) for t in node.targets) or "none"
            raise InvalidUpdateError(
                f"goto {target!r} is not a declared target (declared: {declared}); "
                f"add it with add_node(..., targets=[...])",
                run_id=run_id,
                step=step,
                node=node.name,
            )
    return tuple(items)


# -- routing ----------------------------------------------------------------------------


async def initial_tasks(graph: Plan[Any], run_id: str, state: BaseModel) -> list[Task]:
    """Find the first step's tasks: START's edges and routes, on the input state."""
    triggered = set(graph.successors.get(START, ()))
    sends: list[Send] = []
    for route in graph.routes.get(START, ()):
        await _follow(run_id, route, state, 0, triggered, sends)
    return make_tasks(triggered, sends)


async def next_tasks(
    graph: Plan[Any],
    run_id: str,
    state: BaseModel,
    tasks: Sequence[Task],
    results: Sequence[TaskResult],
    step: int,
    joins: dict[int, frozenset[str]] | None = None,
) -> list[Task]:
    """Find the next step's tasks: static edges, routes, goto, then joins.

    A task whose agent runs again (its tool calls' results are waiting) is carried into the
    next step as it is. A node's edges and routes are followed once none of its tasks is
    carried: after a fan-out of agents with ``Send``, the next node runs once, when the last
    of them has finished. Likewise a join whose sources finish in different steps because
    some are agents still running: ``joins`` (updated in place) keeps which sources have
    finished while others were still running, and the join fires once the last finishes.
    ``joins`` is None for a graph without agents.
    """
    if joins is None:  # no agents in the graph: nothing is ever carried
        carried: list[Task] = []
    elif len(results) == 1:
        carried = list(tasks) if results[0].again else []
    else:
        carried = [t for t, r in zip(tasks, results, strict=True) if r.again]
    if carried:
        busy = {t.node for t in carried}
        ran = sorted({t.node for t in tasks} - busy)
    else:
        ran = sorted({t.node for t in tasks}) if len(tasks) > 1 else [tasks[0].node]
    triggered: set[str] = set()
    sends: list[Send] = []
    for name in ran:
        triggered.update(graph.successors.get(name, ()))
        for route in graph.routes.get(name, ()):
            await _follow(run_id, route, state, step, triggered, sends)
    for result in results:
        for item in result.goto:
            if isinstance(item, Send):
                sends.append(item)
            else:
                triggered.add(item)
    if graph.joins:
        done = set(ran)
        busy = {t.node for t in carried}
        for index, join in enumerate(graph.joins):
            sources = set(join.sources)
            have = done & sources
            if joins is not None:
                have |= joins.get(index, frozenset())
            if have >= sources and not busy & sources:
                triggered.add(join.target)
                if joins is not None:
                    joins.pop(index, None)
            elif joins is not None:
                if have and busy & sources:  # the others are agents still at work
                    joins[index] = frozenset(have)
                else:
                    joins.pop(index, None)
    return make_tasks(triggered, sends, carried)


async def _follow(
    run_id: str,
    route: RouteSpec,
    state: BaseModel,
    step: int,
    triggered: set[str],
    sends: list[Send],
) -> None:
    """Evaluate one route on the merged state and collect what it chose."""
    try:
        out = route.fn(state)
        if inspect.isawaitable(out):
            out = await out
    except Exception as exc:
        raise RouteError(run_id=run_id, step=step, node=route.source, error=exc) from exc
    items = out if isinstance(out, list | tuple) else (out,)
    for item in items:
        if isinstance(item, Send):
            target = item.node
        elif isinstance(item, str):
            target = item
        else:
            raise InvalidUpdateError(
                f"route returned {item!r}; return a declared target, END, Send objects "
                f"or a list of them",
                run_id=run_id,
                step=step,
                node=route.source,
            )
        if target not in route.targets:
            declared = ", ".join(repr(t) for t in route.targets)
            raise InvalidUpdateError(
                f"route returned {target!r}, which is not among its declared targets ({declared})",
                run_id=run_id,
                step=step,
                node=route.source,
            )
        if isinstance(item, Send):
            sends.append(item)
        else:
            triggered.add(item)


def make_tasks(triggered: set[str], sends: list[Send], carried: Sequence[Task] = ()) -> list[Task]:
    """Order the next step's tasks by node name; a node's Send tasks follow its edge task.

    ``carried`` tasks (agents running again) keep their labels; an edge trigger of a node
    whose edge task is carried is absorbed by it, and new Send tasks of that node are
    numbered after the carried ones.
    """
    triggered.discard(END)
    if carried:
        return _with_carried(triggered, sends, carried)
    if not sends:
        if len(triggered) == 1:
            (name,) = triggered
            return [Task(name, 0, NO_PAYLOAD, name)]
        return [Task(name, 0, NO_PAYLOAD, name) for name in sorted(triggered)]
    payloads: dict[str, list[Any]] = defaultdict(list)
    for send in sends:
        if send.node != END:
            payloads[send.node].append(send.payload)
    tasks: list[Task] = []
    for name in sorted(triggered | payloads.keys()):
        inputs = ([NO_PAYLOAD] if name in triggered else []) + payloads.get(name, [])
        many = len(inputs) > 1
        for index, payload in enumerate(inputs):
            tasks.append(Task(name, index, payload, f"{name}[{index}]" if many else name))
    return tasks


def _with_carried(triggered: set[str], sends: list[Send], carried: Sequence[Task]) -> list[Task]:
    fresh = make_tasks(set(triggered), sends)
    taken: dict[str, int] = defaultdict(int)
    edge = set()
    for task in carried:
        taken[task.node] = max(taken[task.node], task.index + 1)
        if task.payload is NO_PAYLOAD:
            edge.add(task.node)
    tasks = list(carried)
    for task in fresh:
        if task.node not in taken:
            tasks.append(task)
        elif task.payload is NO_PAYLOAD and task.node in edge:
            continue  # the carried task will see the new state anyway
        else:
            index = taken[task.node]
            taken[task.node] += 1
            tasks.append(Task(task.node, index, task.payload, f"{task.node}[{index}]"))
    tasks.sort(key=lambda t: (t.node, t.index))
    return tasks
