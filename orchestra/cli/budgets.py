"""A stored run's budget for operators: reading ``+N`` and ``N`` limits, applying them, and
saying what the limits are, how much of each is used, and what a change did."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..safeguards.budgets import Budget
from ..store.base import RunRecord
from .format import format_duration, parse_duration

__all__ = (
    "LIMITS",
    "LimitChange",
    "apply_changes",
    "budget_changes",
    "budget_used",
    "format_budget",
    "format_budget_diff",
    "format_change",
    "parse_limit",
    "scope_budget",
    "stored_with",
)

LIMITS: dict[str, tuple[str, str]] = {
    # Budget field: (its CLI option, its name in words), in the order they are shown
    "tokens": ("--tokens", "tokens"),
    "input_tokens": ("--input-tokens", "input tokens"),
    "output_tokens": ("--output-tokens", "output tokens"),
    "cost_usd": ("--cost", "cost"),
    "tool_calls": ("--tool-calls", "tool calls"),
    "steps": ("--steps", "steps"),
    "wall_seconds": ("--wall", "wall time"),
    "state_bytes": ("--state-bytes", "state size"),
}
_INTEGER = frozenset(
    {"tokens", "input_tokens", "output_tokens", "tool_calls", "steps", "state_bytes"}
)
_WHOLE = re.compile(r"\d+(?:[_,]\d+)*")
_DECIMAL = re.compile(r"(?:\d+(?:[_,]\d+)*)(?:\.\d*)?|\.\d+")


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChange:
    """One limit as an operator asked for it: raised by ``amount`` (``+N``) or set to it."""

    name: str
    amount: float
    relative: bool


def parse_limit(name: str, text: str) -> LimitChange:
    """Read ``+N`` (raise by N) or ``N`` (set to N) for the Budget field ``name``.

    Counts are whole numbers (``20000``, ``20_000``, ``20,000``); cost is dollars
    (``0.5``, ``$0.5``); wall time is seconds or a duration (``90``, ``30m``, ``1h30m``).
    Raises ValueError, saying what is wrong, for anything else (a negative number too).
    """
    option = LIMITS[name][0]
    spec = text.strip()
    relative = spec.startswith("+")
    body = spec[1:].strip() if relative else spec
    if name == "cost_usd" and body.startswith("$"):
        body = body[1:]
    amount: float | None = None
    if name in _INTEGER:
        if _WHOLE.fullmatch(body):
            amount = int(body.replace("_", "").replace(",", ""))
    elif _DECIMAL.fullmatch(body):
        amount = float(body.replace("_", "").replace(",", ""))
    elif name == "wall_seconds":
        try:
            amount = parse_duration(body)
        except ValueError:
            amount = None
    if amount is None:
        what = {
            "cost_usd": "dollars",
            "wall_seconds": "seconds (or a duration like 30m)",
        }.get(name, "a whole number")
        raise ValueError(
            f"{option} {text!r}: expected {what} >= 0, as +N to raise the limit by N or N to "
            f"set it; nothing was changed"
        )
    return LimitChange(name=name, amount=amount, relative=relative)


def scope_budget(record: RunRecord, agent: str | None) -> Budget:
    """Return the stored budget of the run, or of its agent ``agent``; raise ValueError,
    saying why, if there is none."""
    stored = record.budget
    if stored is None:
        raise ValueError(
            f"run {record.run_id} has no stored budget: this run was started before budgets "
            f"were stored; resume it with an app compiled with a larger budget"
        )
    if agent is None:
        data = stored.get("run")
    else:
        agents: Mapping[str, Any] = stored.get("agents") or {}
        data = agents.get(agent)
        if data is None:
            which = ", ".join(map(repr, sorted(agents))) or "none of its agents has one"
            raise ValueError(
                f"run {record.run_id} has no budget for agent {agent!r} (agents with their "
                f"own budget: {which})"
            )
    if not isinstance(data, Mapping):
        raise ValueError(f"run {record.run_id}: the stored budget cannot be read ({stored!r})")
    try:
        return Budget.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run {record.run_id}: the stored budget cannot be read: {exc}") from exc


def apply_changes(budget: Budget, changes: Sequence[LimitChange], *, agent: str | None) -> Budget:
    """Return ``budget`` with ``changes`` applied; raise ValueError, saying why, for a limit
    that is unlimited and asked to rise, for an agent's wall time, or for a value the budget
    refuses (e.g. 0 steps)."""
    scope = "the run's" if agent is None else f"agent {agent!r}'s"
    increments: dict[str, float] = {}
    values: dict[str, Any] = {}
    for change in changes:
        option, words = LIMITS[change.name]
        if agent is not None and change.name == "wall_seconds":
            raise ValueError(
                "an agent's budget has no wall-time limit (the run's has); drop --agent to "
                "change the run's; nothing was changed"
            )
        if not change.relative:
            values[change.name] = change.amount
        elif getattr(budget, change.name) is None:
            raise ValueError(
                f"{scope} {words} budget is unlimited: there is nothing to raise; "
                f"`{option} N` sets a limit; nothing was changed"
            )
        else:
            increments[change.name] = change.amount
    try:
        return replace(budget.raised(**increments), **values)
    except ValueError as exc:
        raise ValueError(f"{exc}; nothing was changed") from exc


def stored_with(record: RunRecord, agent: str | None, budget: Budget) -> dict[str, Any]:
    """Return the run's stored budget with the run's (or ``agent``'s) part replaced."""
    stored = dict(record.budget or {})
    if agent is None:
        stored["run"] = budget.to_dict()
    else:
        stored["agents"] = {**(stored.get("agents") or {}), agent: budget.to_dict()}
    return stored


def budget_used(record: RunRecord, agent: str | None) -> dict[str, float]:
    """Return how much of each limit the run (or ``agent``: its steps are its turns) used."""
    usage: Mapping[str, Any] = record.usage
    if agent is not None:
        usage = (record.usage.get("by_node") or {}).get(agent) or {}
    tokens_in = float(usage.get("input_tokens", 0))
    tokens_out = float(usage.get("output_tokens", 0))
    used = {
        "tokens": tokens_in + tokens_out,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cost_usd": float(usage.get("cost_usd", 0.0)),
        "tool_calls": float(usage.get("tool_calls", 0)),
    }
    if agent is None:
        used["steps"] = float(record.step)
        used["wall_seconds"] = float(usage.get("wall_seconds", 0.0))
    else:
        used["steps"] = float(usage.get("model_calls", 0))
    return used


def _limit(name: str, value: float) -> str:
    if name == "cost_usd":
        text = f"{value:.4f}".rstrip("0")
        whole, _, cents = text.partition(".")
        return f"${whole}.{cents.ljust(2, '0')}"
    if name == "wall_seconds":
        return format_duration(value)
    return f"{int(value):,}"


def _used(name: str, value: float) -> str:
    return f"${value:.4f}" if name == "cost_usd" else _limit(name, value)


def format_budget(limits: Mapping[str, Any], used: Mapping[str, float]) -> str:
    """Say a budget's limits that are set, each with its use: ``tokens 50,000 (used
    12,345), cost $0.50 (used $0.0213), steps 40 (used 7)``; "" when none is set. A limit
    missing from ``used`` does not apply (an agent's wall time) and is left out."""
    parts = []
    for name, (_, words) in LIMITS.items():
        value = limits.get(name)
        if value is None or name not in used:
            continue
        parts.append(f"{words} {_limit(name, value)} (used {_used(name, used[name])})")
    return ", ".join(parts)


def budget_changes(before: Budget, after: Budget) -> list[tuple[str, Any, Any]]:
    """Return the limits that differ, as ``(field, before, after)``, in display order."""
    return [
        (name, getattr(before, name), getattr(after, name))
        for name in LIMITS
        if getattr(before, name) != getattr(after, name)
    ]


def _value(name: str, value: Any) -> str:
    return "unlimited" if value is None else _limit(name, value)


def format_change(name: str, before: Any, after: Any, used: Mapping[str, float]) -> str:
    """Say one changed limit: ``tokens  50,000 -> 70,000 (used 52,000)``, and warn when the
    new limit is already used up (the run stops again as soon as it resumes)."""
    words = LIMITS[name][1]
    line = f"{words:<13} {_value(name, before)} -> {_value(name, after)}"
    if name in used:
        line += f" (used {_used(name, used[name])})"
        if after is not None and used[name] >= after:
            line += ": still used up, the run stops again when resumed"
    return line


def format_budget_diff(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """Say what a stored-budget change did, run then agents: ``tokens 50,000 -> 70,000,
    agent 'writer' cost $0.10 -> $0.20``."""
    old = before or {}
    parts = []
    scopes: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = [
        ("", old.get("run") or {}, after.get("run") or {})
    ]
    old_agents = old.get("agents") or {}
    for agent, limits in (after.get("agents") or {}).items():
        scopes.append((f"agent {agent!r} ", old_agents.get(agent) or {}, limits))
    for prefix, was, now in scopes:
        for name in LIMITS:
            if was.get(name) != now.get(name):
                parts.append(
                    f"{prefix}{LIMITS[name][1]} {_value(name, was.get(name))} -> "
                    f"{_value(name, now.get(name))}"
                )
    return ", ".join(parts) or "no limit changed"
