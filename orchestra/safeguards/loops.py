"""Loop detection that does not rely on the model.

``LoopGuard`` (on ``compile``; on by default) watches a run at every barrier and every act
phase with detectors that look at what the run *does*, never at what a model says about it:

- ``repeats``: the same state (its fingerprint) with the same ready nodes, seen that many
  times within ``window`` steps: the run is going round in a circle (an exact cycle, or
  agents handing work back and forth without changing anything);
- ``same_call``: one agent calling the same tool with the same arguments that many times
  within ``window`` steps (its result cannot change what it does next);
- ``no_progress``: none of the ``progress`` fields changed for that many steps;
- ``similar_output``: one agent's final answers near-identical (``similarity``, 0.9 by
  default, of normalized text, and the same numbers and ids; answers of 20 characters or
  more) that many times in a row.

The state fingerprint is a XOR of per-field hashes (plain values directly, others through
their JSON form with dict keys sorted), updated from the fields a step changed: O(changed
fields) per step, not O(state). Fields listed in
``volatile`` (timestamps, counters of attempts) are left out.

Each detector's policy is ``stop`` (the run stops, after its step is checkpointed, with status
``loop_detected`` and the evidence: the repeating window and its steps), ``interrupt`` (it
stops ``interrupted`` with a ``loop`` request: an operator answers ``Continue()`` or
``Abort()``) or ``nudge`` (for ``same_call``: the agent is told, once, what it is repeating;
the next repetition stops the run).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

__all__ = ("Detection", "LoopGuard", "LoopWatch")

POLICIES = ("stop", "interrupt", "nudge")
DETECTORS = ("repeats", "same_call", "no_progress", "similar_output")
MIN_OUTPUT = 20  # characters: short answers ("billing", "yes") repeat legitimately


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopGuard:
    """Loop detectors and their policies (see the module doc); ``None`` turns one off."""

    repeats: int | None = 3
    same_call: int | None = 3
    no_progress: int | None = None
    similar_output: int | None = 3
    similarity: float = 0.9
    window: int = 20
    progress: tuple[str, ...] = ()
    volatile: tuple[str, ...] = ()
    policy: str | Mapping[str, str] = "stop"

    def __post_init__(self) -> None:
        if not 0 < self.similarity <= 1:
            raise ValueError(f"LoopGuard.similarity must be within (0, 1], got {self.similarity}")
        for name in ("repeats", "same_call", "no_progress", "similar_output"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ValueError(f"LoopGuard.{name} must be an integer >= 2 or None")
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError("LoopGuard.window must be an integer >= 2")
        for name in ("repeats", "same_call"):
            value = getattr(self, name)
            if value is not None and value > self.window:
                raise ValueError(
                    f"LoopGuard.{name}={value} can never be seen within window={self.window}"
                )
        for name in ("progress", "volatile"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"LoopGuard.{name} takes a tuple of field names, not a str")
        if not isinstance(self.policy, str):
            unknown = sorted(set(self.policy) - set(DETECTORS))
            if unknown:
                raise ValueError(
                    f"LoopGuard policy names unknown detectors {unknown}; known: {DETECTORS}"
                )
        if self.no_progress is not None and not self.progress:
            raise ValueError("LoopGuard.no_progress needs progress=(field names)")
        object.__setattr__(self, "progress", tuple(self.progress))
        object.__setattr__(self, "volatile", tuple(self.volatile))
        for detector in DETECTORS:
            policy = self.policy_for(detector)
            if policy not in POLICIES:
                raise ValueError(f"LoopGuard policy must be one of {POLICIES}, got {policy!r}")
        if any(self.policy_for(d) == "nudge" for d in DETECTORS if d != "same_call"):
            raise ValueError("the nudge policy applies to same_call only (it tells an agent)")

    def policy_for(self, detector: str) -> str:
        if isinstance(self.policy, str):
            return self.policy
        return self.policy.get(detector, "stop")

    def problems(self, fields: Iterable[str]) -> list[str]:
        """Fields named here must be state fields."""
        known = set(fields)
        return [
            f"loop guard: {what} field {name!r} is not a state field"
            for what, names in (("progress", self.progress), ("volatile", self.volatile))
            for name in names
            if name not in known
        ]


@dataclass(frozen=True, slots=True)
class Detection:
    """A loop found: which detector, in words, and the evidence (steps, what repeats)."""

    detector: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


_PLAIN = (int, str, bool, float, type(None))


def _field_hash(name: str, value: Any) -> int:
    """A field's hash, the same in every process (a resumed run goes on with the watch of
    the run it continues): plain values through their repr, others through their JSON form
    (dict keys sorted)."""
    if type(value) in _PLAIN and value == value:  # (NaN is not equal to itself)
        text = f"{name}\x00{type(value).__name__}\x00{value!r}"
    else:
        text = f"{name}\x00\x00{_value_text(value)}"
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


def _append_hash(name: str, old: int, value: Any) -> int:
    text = f"{name}\x00{old}\x00{_value_text(value)}"
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


def _value_text(value: Any) -> str:
    """Canonical JSON of a value: dict keys sorted at every level, anything pydantic cannot
    serialize as its str."""
    return json.dumps(
        to_jsonable_python(value, fallback=str), sort_keys=True, separators=(",", ":"), default=str
    )


class LoopWatch:
    """One run's detectors."""

    def __init__(self, guard: LoopGuard, state: BaseModel, step: int) -> None:
        self.guard = guard
        self._skip = frozenset(guard.volatile)
        self._hashes = {
            k: _field_hash(k, getattr(state, k))
            for k in type(state).model_fields
            if k not in self._skip
        }
        self._print = 0
        for value in self._hashes.values():
            self._print ^= value
        # the window: (step, key) in order, and each key's steps within it
        self._window: deque[tuple[int, tuple[int, tuple[str, ...]]]] = deque()
        self._recent: dict[tuple[int, tuple[str, ...]], deque[int]] = {}
        self._clock = 0  # steps checked by the state detector
        self._calls: dict[tuple[str, str, str], deque[int]] = {}
        self._nudged: dict[tuple[str, str, str], int] = {}  # told once: at which step
        self._outputs: dict[str, list[tuple[int, str]]] = {}
        self._progressed = step

    def fingerprint(self) -> int:
        return self._print

    def _full_print(self, state: BaseModel) -> int:
        """The fingerprint of ``state`` computed from scratch (what a new watch starts
        from; the running one folds appends in, so it differs once a list grew)."""
        found = 0
        for name in type(state).model_fields:
            if name not in self._skip:
                found ^= _field_hash(name, getattr(state, name))
        return found

    def snapshot(self, step: int, state: BaseModel) -> dict[str, Any]:
        """What the detectors remember of the committed steps up to ``step``, as JSON data
        (kept with a stopped run, so its resume goes on watching instead of starting
        afresh). Calls of a step that did not commit are left out (its re-run makes them
        again), and so is what has left the window."""
        horizon = step - self.guard.window
        calls = []
        for key, steps in self._calls.items():
            kept = [s for s in steps if horizon < s <= step]
            if kept:
                calls.append([*key, kept])
        return {
            "step": step,
            "state": self._full_print(state),
            "fingerprint": self._print,
            "hashes": dict(self._hashes),
            "window": [[clock, fp, list(ready)] for clock, (fp, ready) in self._window],
            "recent": [
                [fp, list(ready), list(steps)] for (fp, ready), steps in self._recent.items()
            ],
            "clock": self._clock,
            "calls": calls,
            "nudged": [[*key, at] for key, at in self._nudged.items() if at <= step],
            "outputs": {
                label: [list(item) for item in run if item[0] <= step]
                for label, run in self._outputs.items()
            },
            "progressed": min(self._progressed, step),
        }

    def restore(self, data: Mapping[str, Any]) -> bool:
        """Take back what :meth:`snapshot` kept, if it was kept with this very state;
        return whether it did."""
        if data.get("state") != self._print:
            return False  # another state (an edited run, another graph): start afresh
        try:
            hashes = {str(k): int(v) for k, v in data["hashes"].items()}
            fingerprint = int(data["fingerprint"])
            window = deque(
                (int(clock), (int(fp), tuple(ready))) for clock, fp, ready in data["window"]
            )
            recent = {
                (int(fp), tuple(ready)): deque(int(s) for s in steps)
                for fp, ready, steps in data["recent"]
            }
            calls = {
                (str(node), str(tool), str(text)): deque(int(s) for s in steps)
                for node, tool, text, steps in data["calls"]
            }
            nudged = {(str(a), str(b), str(c)): int(at) for a, b, c, at in data["nudged"]}
            outputs = {
                str(label): [(int(s), str(t)) for s, t in run]
                for label, run in data["outputs"].items()
            }
            clock, progressed = int(data["clock"]), int(data["progressed"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return False  # written by another version: start afresh
        # the running fingerprint (appends folded in), so the window's keys still match
        self._hashes, self._print = hashes, fingerprint
        self._window, self._recent, self._calls = window, recent, calls
        self._nudged, self._outputs = nudged, outputs
        self._clock, self._progressed = clock, progressed
        return True

    def after_step(
        self,
        step: int,
        state: BaseModel,
        changed: Mapping[str, Any],
        ready: tuple[str, ...],
        busy: bool,
    ) -> Detection | None:
        """Update the fingerprint from the fields the step changed (``changed``: field ->
        FieldDelta; an append folds in only the new items); check the state and progress
        detectors. ``busy``: agents are between turns (not a repetition)."""
        skip, hashes = self._skip, self._hashes
        guard = self.guard
        for name, delta in changed.items():
            if name in skip:
                continue
            old = hashes.get(name, 0)
            if getattr(delta, "kind", None) == "append":
                new = _append_hash(name, old, delta.value)
            else:
                new = _field_hash(name, getattr(state, name))
            if new == old:
                continue  # written, but to the same value: not a change, not progress
            self._print ^= old ^ new
            hashes[name] = new
            if name in guard.progress:
                self._progressed = step
        if guard.no_progress is not None and step - self._progressed >= guard.no_progress:
            return Detection(
                "no_progress",
                f"no change to {', '.join(map(repr, guard.progress))} for "
                f"{step - self._progressed} steps (steps {self._progressed + 1}-{step})",
                {"fields": list(guard.progress), "since_step": self._progressed, "step": step},
            )
        if guard.repeats is None or busy or not ready:
            return None
        # the window counts the steps checked here: steps where agents are between turns
        # (using tools) do not use it up, so long rounds of agents are compared too
        self._clock += 1
        clock = self._clock
        window, recent = self._window, self._recent
        horizon = clock - guard.window
        while window and window[0][0] <= horizon:
            _, old_key = window.popleft()
            expired = recent[old_key]
            expired.popleft()
            if not expired:
                del recent[old_key]
        key = (self._print, ready)
        window.append((clock, key))
        seen = recent.get(key)
        if seen is None:
            recent[key] = deque((step,))
            return None
        seen.append(step)
        steps = seen
        if len(steps) >= guard.repeats:
            return Detection(
                "repeats",
                f"the same state with the same next nodes ({', '.join(ready)}) came back "
                f"{len(steps)} times, at steps {', '.join(map(str, steps))}",
                {"steps": list(steps), "next": list(ready), "fingerprint": f"{self._print:016x}"},
            )
        return None

    def on_output(self, step: int, label: str, text: str) -> Detection | None:
        """Record an agent's final answer; detect the same answer again and again."""
        guard = self.guard
        if guard.similar_output is None:
            return None
        normal = " ".join(text.lower().split())
        if len(normal) < MIN_OUTPUT:
            self._outputs.pop(label, None)
            return None
        run = self._outputs.get(label)
        if run is not None and _similar(run[-1][1], normal) >= guard.similarity:
            run.append((step, normal))
        else:
            run = self._outputs[label] = [(step, normal)]
        if len(run) < guard.similar_output:
            return None
        steps = [s for s, _ in run]
        return Detection(
            "similar_output",
            f"{label!r} gave near-identical answers {len(run)} times in a row (steps "
            f"{', '.join(map(str, steps))}): {text[:80]!r}",
            {"node": label, "steps": steps, "answer": text[:500]},
        )

    def changed_world(self, node: str, tool: str, arguments: Any) -> None:
        """A call with an effect (a write) by ``node``: its other calls are not repetitions
        of what came before it (tests re-run after an edit)."""
        args = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
        mine = f"{args}\x00"  # (the key's third part starts with the arguments)
        for key in [k for k in self._calls if k[0] == node]:
            if not (key[1] == tool and key[2].startswith(mine)):
                del self._calls[key]

    def on_call(
        self, step: int, node: str, tool: str, arguments: Any, result: str = ""
    ) -> tuple[Detection | None, bool]:
        """Record an agent's tool call and what came of it (a call whose result changed,
        say tests re-run after an edit, is not a repetition); return a detection and
        whether it is a first repetition to nudge about (under the nudge policy)."""
        guard = self.guard
        if guard.same_call is None:
            return None, False
        args = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
        # with the state as it is: the same lookup once per round of a progressing run is
        # not a repetition
        # (the result by its digest: a large result need not be kept to be compared)
        digest = blake2b(result.encode(), digest_size=8).hexdigest()
        key = (node, tool, f"{args}\x00{digest}\x00{self._print}")
        steps = self._calls.setdefault(key, deque())
        steps.append(step)
        while steps and steps[0] <= step - guard.window:
            steps.popleft()
        if len(steps) < guard.same_call:
            return None, False
        detection = Detection(
            "same_call",
            f"{node!r} called {tool}({args}) {len(steps)} times within {guard.window} steps "
            f"with the same result (steps {', '.join(map(str, steps))})",
            {"node": node, "tool": tool, "arguments": arguments, "steps": list(steps)},
        )
        if guard.policy_for("same_call") == "nudge" and key not in self._nudged:
            self._nudged[key] = step  # told once; the next repetition stops the run
            return detection, True
        return detection, False


def _similar(a: str, b: str) -> float:
    """How alike two texts are, from 0 to 1 (difflib's ratio; equal texts cost nothing).

    Texts that mention different numbers or ids (``order 41``, ``order 42``) are not alike:
    a templated answer about each new item is progress, not a loop."""
    if a == b:
        return 1.0
    import re

    if re.findall(r"\w*\d\w*", a) != re.findall(r"\w*\d\w*", b):
        return 0.0
    from difflib import SequenceMatcher

    return SequenceMatcher(None, a, b, autojunk=False).ratio()
