"""A step's units of work and their results: what a Task holds and what a TaskResult says
when a task returned nothing."""

from __future__ import annotations

from orchestra.runtime.tasks import Task, TaskResult
from orchestra.specs import NO_PAYLOAD


def test_task_holds_its_node_index_payload_and_label() -> None:
    """A task is its node, its index among the node's tasks, its input and its label."""
    task = Task("review", 1, {"doc": 3}, "review[1]")
    assert (task.node, task.index, task.payload, task.label) == (
        "review",
        1,
        {"doc": 3},
        "review[1]",
    )


def test_task_equals_a_task_with_the_same_fields() -> None:
    """Tasks compare by value (a resumed step's tasks equal the ones it stored)."""
    assert Task("review", 0, NO_PAYLOAD, "review") == Task("review", 0, NO_PAYLOAD, "review")
    assert Task("review", 0, NO_PAYLOAD, "review") != Task("review", 1, NO_PAYLOAD, "review[1]")


def test_task_result_defaults_to_a_task_that_returned_nothing() -> None:
    """An empty result has no update, no goto, no error, no agent turn and no duration."""
    result = TaskResult()
    assert (result.update, result.goto, result.error, result.duration) == (None, (), None, 0.0)


def test_task_result_defaults_to_no_agent_turn() -> None:
    """An empty result carries no messages, no proposed calls and does not run again."""
    result = TaskResult()
    assert (result.messages, result.calls, result.again) == (None, (), False)


def test_tasks_no_payload_is_the_one_sentinel() -> None:
    """The runtime's NO_PAYLOAD is the definition's: a task started by an edge is one."""
    from orchestra import specs
    from orchestra.runtime import tasks

    assert tasks.NO_PAYLOAD is specs.NO_PAYLOAD
