"""Resource locks for the calls nodes make themselves (``ctx.call_tool``).

Agents' calls are arbitrated as a whole act phase; a node's call is made the moment the node
asks, so it takes read/write locks on its resource keys instead: readers share a key, a
writer has it alone. Keys are always taken in one global (sorted) order, so two calls can
never wait for each other (no deadlock). What a call does when a key it needs is held by
another task's call depends on the policy:

- ``serialize`` (and ``escalate`` or a custom arbiter, which need a whole act phase): wait;
- ``first_wins`` and ``reject_all``: do not wait; the call loses to the holder;
- ``priority_wins``: wait if the holder's priority is lower, lose otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

__all__ = ("Held", "ResourceLocks")


@dataclass(slots=True)
class _Lock:
    writer: str | None = None
    writer_priority: int = 0
    readers: dict[str, int] = field(default_factory=dict)  # holder -> count
    reader_priority: int = 0
    released: anyio.Event | None = None

    def blocker(self, write: bool, holder: str) -> tuple[str, int] | None:
        """Who keeps a call of ``holder`` from taking this key (None: nobody)."""
        if self.writer is not None and self.writer != holder:
            return self.writer, self.writer_priority
        if write:
            for reader in self.readers:
                if reader != holder:
                    return reader, self.reader_priority
        return None

    def idle(self) -> bool:
        return self.writer is None and not self.readers


@dataclass(slots=True)
class Held:
    """The keys one call holds (release them with :meth:`ResourceLocks.release`)."""

    holder: str
    write: bool
    keys: list[str] = field(default_factory=list)


class ResourceLocks:
    """One run's resource locks."""

    def __init__(self) -> None:
        self._locks: dict[str, _Lock] = {}

    async def acquire(
        self,
        keys: Iterable[str],
        *,
        write: bool,
        holder: str,
        policy: str,
        priority: int = 0,
    ) -> Held | tuple[str, str]:
        """Take every key, in sorted order; return what is held, or ``(holder, key)`` of the
        call this one loses to (then nothing is held)."""
        held = Held(holder, write)
        try:
            for key in sorted(set(keys)):
                while True:
                    # looked up again after each wait: an idle lock is dropped
                    lock = self._locks.get(key)
                    if lock is None:
                        lock = self._locks[key] = _Lock()
                    blocker = lock.blocker(write, holder)
                    if blocker is None:
                        break
                    other, other_priority = blocker
                    if policy in ("first_wins", "reject_all") or (
                        policy == "priority_wins" and other_priority >= priority
                    ):
                        self.release(held)
                        return other, key
                    if lock.released is None:
                        lock.released = anyio.Event()
                    await lock.released.wait()
                if write:
                    lock.writer, lock.writer_priority = holder, priority
                else:
                    lock.readers[holder] = lock.readers.get(holder, 0) + 1
                    lock.reader_priority = max(lock.reader_priority, priority)
                held.keys.append(key)
        except BaseException:  # cancelled while waiting: nothing stays held
            self.release(held)
            raise
        return held

    def release(self, held: Held) -> None:
        """Give back every key ``held`` has (in reverse order) and wake whoever waits."""
        for key in reversed(held.keys):
            lock = self._locks[key]
            if held.write:
                lock.writer = None
            else:
                count = lock.readers.get(held.holder, 0) - 1
                if count > 0:
                    lock.readers[held.holder] = count
                else:
                    lock.readers.pop(held.holder, None)
                    if not lock.readers:
                        lock.reader_priority = 0
            if lock.released is not None:
                lock.released.set()
                lock.released = None
            if lock.idle():
                del self._locks[key]
        held.keys.clear()

    def busy(self) -> bool:
        """Tell whether any key is held."""
        return bool(self._locks)
