"""CompiledGraph: the facade users call to run, stream, resume and operate a graph.

It adds the run and operator methods to the frozen :class:`~orchestra.compile.Plan` and
delegates them: running to :mod:`orchestra.runtime`, resuming and answering to
:mod:`orchestra.runs`, the rest to the store.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from .compile import Plan, price_problems
from .events import Event
from .outcome import RunOutcome
from .safeguards.budgets import Budget

if TYPE_CHECKING:
    from .runtime.executor import Execution
    from .safeguards.interrupts import Request
    from .store.base import RunRecord

__all__ = ("CompiledGraph",)

StateT = TypeVar("StateT", bound=BaseModel)


class CompiledGraph(Plan[StateT]):
    """A validated, frozen graph, ready to run (``graph.compile(...)`` makes one)."""

    __slots__ = ()

    async def run(
        self, input: StateT | Mapping[str, Any], *, run_id: str | None = None
    ) -> RunOutcome[StateT]:
        """Run the graph from ``input`` until it completes or stops; return the outcome.

        A node failure does not raise: the outcome has status ``failed`` and the error
        (``outcome.raise_for_status()`` raises it). Invalid input raises
        :class:`InputValidationError` before anything runs.
        """
        from .runtime.drivers import run_to_end

        return await run_to_end(self._execution(input, run_id, events=False))

    async def stream(
        self, input: StateT | Mapping[str, Any], *, run_id: str | None = None
    ) -> AsyncGenerator[Event, None]:
        """Run the graph and yield its events as each step passes its barrier.

        The last event is :class:`~orchestra.events.RunFinished` carrying the outcome. Invalid
        input raises on the first iteration, before any node runs. To stop early, close the
        stream (``contextlib.aclosing``): no further node runs.
        """
        from .runtime.drivers import stream_events

        execution = self._execution(input, run_id, events=True)
        async with aclosing(stream_events(execution)) as events:
            async for event in events:
                yield event

    def _execution(
        self, input: StateT | Mapping[str, Any], run_id: str | None, *, events: bool
    ) -> Execution:
        from .runtime.executor import Execution
        from .runtime.recorder import Recorder
        from .store.base import new_owner_id, new_run_id

        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        state = self.validate_input(input)
        run_id = run_id or new_run_id()
        recorder = None
        if self.store is not None:
            recorder = Recorder(self.store, self, run_id, new_owner_id())
        return Execution(self, state, run_id=run_id, recorder=recorder, events=events)

    async def resume(
        self,
        run_id: str,
        *,
        answers: Mapping[str, Any] | None = None,
        allow_graph_change: bool = False,
    ) -> RunOutcome[StateT]:
        """Continue an unfinished run from its last checkpoint; return the new outcome.

        Works for crashed, interrupted, aborted, failed and budget-stopped runs. Tasks that
        finished in the step that was in flight are not run again, and the model and tool
        calls of that step that completed are replayed from the ledger, not made again.
        ``answers`` maps the ids of an interrupted run's requests (``outcome.pending``) to
        their answers; every answer is checked before anything changes
        (:class:`~orchestra.errors.AnswerError`). Refused with a clear error for an unknown
        or completed run, a run another live process owns, or a graph whose structure
        changed (unless ``allow_graph_change``).
        """
        from .runs.resume import prepare_resume
        from .runtime.drivers import run_to_end

        execution = await prepare_resume(
            self, run_id, allow_graph_change=allow_graph_change, answers=answers
        )
        return await run_to_end(execution)

    async def answer(self, run_id: str, answers: Mapping[str, Any]) -> tuple[Request, ...]:
        """Record answers to a stopped run's requests without resuming it; return the
        requests still open. Every answer is checked first (against its request's schema,
        the tool's for an ``Edit``); a refused one raises
        :class:`~orchestra.errors.AnswerError` and nothing is recorded. A later
        ``resume`` uses them."""
        from .runs.answers import answer_requests
        from .safeguards.interrupts import Request

        rows = await answer_requests(self, self.require_store(), run_id, answers)
        return tuple(Request.from_row(row) for row in rows)

    async def pending(self, run_id: str | None = None) -> tuple[Request, ...]:
        """Return the open requests of one run, or of every run in the store, oldest
        first. Raises :class:`~orchestra.errors.RunNotFoundError` for an unknown run."""
        from .safeguards.interrupts import Request

        store = self.require_store()
        if run_id is not None:
            await store.get_run(run_id)  # an unknown run is said so (RunNotFoundError)
        rows = await store.requests(run_id)
        return tuple(Request.from_row(row) for row in rows)

    async def abort(self, run_id: str, reason: str = "aborted by operator") -> RunRecord:
        """Ask a run to stop: its owner cancels it within one poll interval and records
        ``aborted``; a run with no live owner is marked ``aborted`` at once."""
        return await self.require_store().request_abort(run_id, reason)

    async def set_budget(
        self,
        run_id: str,
        budget: Budget,
        *,
        agents: Mapping[str, Budget] | None = None,
        reason: str | None = None,
    ) -> RunRecord:
        """Change the limits stored with a stopped run (what ``orchestra budget`` does); a
        resume runs under them, raised to its app's where the app's are higher. ``agents``
        replaces the named agents' budgets. Refused for a completed run or one a live
        process owns; a cost limit over a model without a price is refused too."""
        from .safeguards.budgets import stored_budget

        if not isinstance(budget, Budget):
            raise TypeError(f"set_budget takes a Budget, got {type(budget).__name__}")
        bad = [name for name, b in (agents or {}).items() if not isinstance(b, Budget)]
        if bad:
            raise TypeError(f"set_budget: the budgets of agents {bad} are not Budget objects")
        unknown = sorted(set(agents or {}) - set(self.nodes))
        if unknown:
            raise ValueError(f"set_budget: this graph has no agents {unknown}")
        store = self.require_store()
        record = await store.get_run(run_id)
        current = dict(self.agent_budgets)
        if record.budget is not None:
            current.update(
                {k: Budget.from_dict(v) for k, v in (record.budget.get("agents") or {}).items()}
            )
        current.update(agents or {})
        problems = price_problems(self.nodes, budget, current)
        if problems:
            raise ValueError("; ".join(problems))
        return await store.set_budget(run_id, stored_budget(budget, current), reason=reason)

    async def get_run(self, run_id: str) -> RunRecord:
        """Return the stored record of a run."""
        return await self.require_store().get_run(run_id)

    async def load_state(self, run_id: str, step: int | None = None) -> StateT:
        """Return the state of a run at ``step`` (default: its last checkpoint)."""
        from .runtime.checkpoint import load_state

        chain = await self.require_store().checkpoint_chain(run_id, step)
        return load_state(self.schema, chain)  # type: ignore[return-value]
