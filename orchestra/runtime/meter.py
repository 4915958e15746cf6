"""The run's meter: what its model and tool calls used, in total and per node.

It counts the :data:`~orchestra.outcome.COUNTERS` of :class:`~orchestra.outcome.Usage` and
nothing else, so a run's usage is the meter's counters plus the run's steps, tasks and wall
time (:meth:`Meter.usage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..outcome import COUNTERS, Usage

__all__ = ("Meter",)

_PER_NODE = ("input_tokens", "output_tokens", "model_calls", "tool_calls", "denied_calls")


class Meter:
    """Usage so far: model tokens, cost and calls, tool calls; per node too.

    ``counts`` maps each counter to the run's total; ``by_node`` maps a node to its own
    (``cost_usd`` appears there once the node spent something).
    """

    __slots__ = ("by_node", "counts")

    def __init__(self, usage: Mapping[str, Any] | None = None) -> None:
        usage = usage or {}
        self.counts: dict[str, Any] = {
            name: (float if name == "cost_usd" else int)(usage.get(name, 0)) for name in COUNTERS
        }
        self.by_node: dict[str, dict[str, Any]] = {
            k: dict(v) for k, v in (usage.get("by_node") or {}).items()
        }

    def model(self, node: str, input_tokens: int, output_tokens: int, cost: float = 0.0) -> None:
        """Count one model call."""
        counts = self.counts
        counts["input_tokens"] += input_tokens
        counts["output_tokens"] += output_tokens
        counts["cost_usd"] += cost
        counts["model_calls"] += 1
        mine = self._mine(node)
        mine["input_tokens"] += input_tokens
        mine["output_tokens"] += output_tokens
        mine["model_calls"] += 1
        if cost:
            mine["cost_usd"] = mine.get("cost_usd", 0.0) + cost

    def tool(self, node: str) -> None:
        """Count one tool call that ran (or may have run)."""
        self.counts["tool_calls"] += 1
        self._mine(node)["tool_calls"] += 1

    def denied(self, node: str) -> None:
        """Count one call refused by the allowlist."""
        self.counts["denied_calls"] += 1
        self._mine(node)["denied_calls"] += 1

    @property
    def called(self) -> bool:
        """Whether any model or tool call was counted (or denied)."""
        counts = self.counts
        return bool(counts["model_calls"] or counts["tool_calls"] or counts["denied_calls"])

    def usage(self, *, steps: int, tasks: int, wall_seconds: float) -> Usage:
        """The run's usage: these counters and the run's own figures."""
        return Usage(
            steps=steps,
            tasks=tasks,
            wall_seconds=wall_seconds,
            by_node={k: dict(v) for k, v in self.by_node.items()},
            **self.counts,
        )

    def stored(self) -> dict[str, Any]:
        """The counters as the store keeps them (empty while nothing was called)."""
        if not self.called:
            return {}
        stored = dict(self.counts)
        stored["cost_usd"] = round(stored["cost_usd"], 10)
        stored["by_node"] = {k: dict(v) for k, v in self.by_node.items()}
        return stored

    def _mine(self, node: str) -> dict[str, Any]:
        mine = self.by_node.get(node)
        if mine is None:
            mine = self.by_node[node] = dict.fromkeys(_PER_NODE, 0)
        return mine
