"""The approval policy: which tool calls wait for a person before they run.

By default every ``Effect.IRREVERSIBLE`` call needs approval. A held call becomes an
``approval`` request bound to the exact tool name and arguments; the run stops
``interrupted`` before any call of that act phase runs, and resumes with
``Approve()``, ``Reject(reason=...)`` or ``Edit(arguments={...})`` for it. An approval is
used once: the approved call is recorded as started before it runs (so a crash leaves it in
doubt, never silently run twice), and a later call, even with the same arguments, asks
again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..specs import Effect

__all__ = ("Approvals",)

LEVELS = ("irreversible", "writes", "all", "none")


if TYPE_CHECKING:  # (typing only: a protocol costs a millisecond at import)

    class Gated(Protocol):
        """What the policy reads of a tool: its name and its effect."""

        @property
        def name(self) -> str: ...

        @property
        def effect(self) -> Effect: ...


Rule = bool | Callable[[dict[str, Any]], bool]
"""Per tool: always (True), never (False), or a function of the call's arguments (JSON)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Approvals:
    """Which calls need a person's approval.

    ``require``: the default by effect: ``"irreversible"`` (the default), ``"writes"``
    (writes and irreversible calls), ``"all"`` or ``"none"``. ``tools``: per tool name,
    ``True``, ``False`` or a function of the arguments (``lambda a: a["amount"] > 100``).
    ``agents``: per agent (or node) name, a whole policy of its own replacing this one for
    its calls. ``expires_after``: seconds after which an unanswered request can no longer be
    approved; a resume then treats it as rejected.
    """

    require: str = "irreversible"
    tools: Mapping[str, Rule] = field(default_factory=dict)
    agents: Mapping[str, Approvals] = field(default_factory=dict)
    expires_after: float | None = None

    def for_caller(self, node: str) -> Approvals:
        return self.agents.get(node, self)

    def needs(self, node: str, tool: Gated, arguments: Mapping[str, Any]) -> bool:
        """Tell whether a call by ``node`` to ``tool`` with ``arguments`` needs approval."""
        policy = self.agents.get(node, self)
        rule = policy.tools.get(tool.name)
        if rule is not None:
            return bool(rule(dict(arguments))) if callable(rule) else bool(rule)
        effect = tool.effect
        if policy.require == "all":
            return True
        if policy.require == "writes":
            return effect is not Effect.READ
        if policy.require == "irreversible":
            return effect is Effect.IRREVERSIBLE
        return False

    def problems(self, nodes: Iterable[str], tools: Iterable[str], where: str = "") -> list[str]:
        """What is wrong with this policy for a graph with these nodes and tools."""
        nodes, tools = set(nodes), set(tools)
        label = f"approvals{where}"
        found = []
        if self.require not in LEVELS:
            found.append(
                f"{label}: require must be one of {', '.join(LEVELS)}, got {self.require!r}"
            )
        for name, rule in self.tools.items():
            if name not in tools:
                known = ", ".join(sorted(tools)) or "none"
                found.append(f"{label}: no tool {name!r} in this graph (its tools: {known})")
            if not isinstance(rule, bool) and not callable(rule):
                found.append(
                    f"{label}: the rule for tool {name!r} must be True, False or a function "
                    f"of the arguments, got {rule!r}"
                )
        expires = self.expires_after
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0
        ):
            found.append(f"{label}: expires_after must be a positive number of seconds")
        for name, policy in self.agents.items():
            if name not in nodes:
                found.append(f"{label}: no agent or node {name!r} in this graph")
            if not isinstance(policy, Approvals):
                found.append(f"{label}: agents[{name!r}] must be an Approvals, got {policy!r}")
            elif policy.agents:
                found.append(f"{label}: agents[{name!r}] cannot have agents of its own")
            else:
                found.extend(policy.problems(nodes, tools, f".agents[{name!r}]"))
        return found
