"""What a node sees besides its input: the run, the step, usage so far and a bound logger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._logging import get_logger
from .outcome import Usage

__all__ = ("NodeContext",)


class NodeContext:
    """Passed to every node as its second argument.

    ``state`` is the run's state at the start of the step (for a task started by ``Send``, the
    node's first argument is the payload and ``ctx.state`` the run state). Treat both as
    read-only: a node changes the state only by returning an update.
    """

    __slots__ = ("_log", "_usage", "node", "run_id", "state", "step", "task")

    def __init__(
        self,
        *,
        run_id: str,
        step: int,
        node: str,
        task: int,
        state: Any,
        usage: Callable[[], Usage],
    ) -> None:
        self.run_id = run_id
        self.step = step
        self.node = node
        self.task = task
        self.state = state
        self._usage = usage
        self._log: Any = None

    @property
    def usage(self) -> Usage:
        """What the run has consumed so far (a snapshot)."""
        return self._usage()

    @property
    def log(self) -> Any:
        """A structlog logger bound to ``run_id``, ``step`` and ``node``."""
        if self._log is None:
            self._log = get_logger("orchestra.node").bind(
                run_id=self.run_id, step=self.step, node=self.node
            )
        return self._log

    def __repr__(self) -> str:
        return f"<NodeContext run={self.run_id} step={self.step} node={self.node!r}>"
