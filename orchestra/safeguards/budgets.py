"""Budgets: hard limits a run cannot pass.

Checked at the top of every step (before any node of the step runs). The wall-time limit is
also a deadline on the step's cancel scope, so a node that hangs cannot outlive it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("Budget",)

DEFAULT_STEPS = 1_000
DEFAULT_WALL_SECONDS = 3_600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Hard limits for one run.

    ``steps``: supersteps the run may execute (default 1,000). ``wall_seconds``: wall-clock
    seconds from the run's start (default one hour). ``None`` lifts a limit; a run compiled
    without a budget gets the defaults, so no run is unbounded by accident.
    """

    steps: int | None = DEFAULT_STEPS
    wall_seconds: float | None = DEFAULT_WALL_SECONDS

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Budget.steps must be at least 1, got {self.steps}")
        if self.wall_seconds is not None and self.wall_seconds <= 0:
            raise ValueError(f"Budget.wall_seconds must be positive, got {self.wall_seconds}")

    def exceeded(self, *, steps: int, wall_seconds: float) -> str | None:
        """Return which limit stops the next step from starting, in words, or None."""
        if self.steps is not None and steps >= self.steps:
            return f"step budget exhausted: {steps} of {self.steps} steps used"
        if self.wall_seconds is not None and wall_seconds >= self.wall_seconds:
            return f"wall-time budget exhausted: {wall_seconds:.1f}s of {self.wall_seconds:g}s used"
        return None
