"""The run's hold on its store: polling for an abort request and renewing the lease.

The owner of a run checks at every step boundary and, during long steps, from a watcher
task in the run's own task group (see :mod:`orchestra.runtime.drivers`): a cheap indexed
read every ``poll_seconds``, and a renewal every third of the lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import LeaseLostError, RunError, RunStoreError

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ("LeaseWatch",)


class LeaseWatch:
    """When to poll the store and renew the lease, and what the poll found.

    :meth:`poll` returns None (go on), the reason of an abort an operator asked for, or the
    error that fences this process off (:class:`LeaseLostError`, :class:`RunStoreError`).
    """

    __slots__ = ("polled_at", "recorder", "renewed_at")

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        # the clocks belong to the run, not to a watcher task: a stream starts one watcher
        # per step, and short steps must still be checked and renewed on time
        self.polled_at = self.renewed_at = time.monotonic()

    def due(self) -> bool:
        """Whether a poll is due (one per ``poll_seconds``)."""
        return time.monotonic() - self.polled_at >= self.recorder.store.poll_seconds

    def wait(self) -> float:
        """Seconds until the next poll is due (0 or less: now)."""
        return self.polled_at + self.recorder.store.poll_seconds - time.monotonic()

    async def poll(
        self, step: int, usage: Callable[[], dict[str, Any]], *, stopped: bool = False
    ) -> str | RunError | None:
        """Check for an abort and renew the lease when a renewal is due (a run that has
        ``stopped`` already only counts as polled: its own outcome stands)."""
        recorder = self.recorder
        self.polled_at = time.monotonic()
        if stopped:
            return None
        try:
            reason = await recorder.abort_requested()
            if reason is not None:
                return reason
            if time.monotonic() - self.renewed_at >= recorder.store.lease_seconds / 3:
                if not await recorder.renew(step, usage()):
                    return LeaseLostError(run_id=recorder.run_id, step=step, epoch=recorder.epoch)
                self.renewed_at = time.monotonic()
        except RunStoreError as exc:
            return exc
        return None
