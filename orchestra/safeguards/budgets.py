"""Budgets: hard limits a run cannot pass, on the run and per agent.

Steps and wall time are checked at the top of every step (the wall-time limit is also the
deadline of the step's cancel scope, so a node that hangs cannot outlive it). Tokens, cost
and tool calls are checked *before* each call: a model call first reserves its worst case
(the prompt's estimated tokens plus its maximum output tokens, and their price) against
every budget that covers it, and settles to the usage the model reports once it answers; a
call whose reservation does not fit is not sent. Reservations are taken without awaiting in
between, so concurrent agents of one run (on asyncio or trio) cannot overshoot a limit
together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ("PRICES", "Budget", "BudgetStop", "Price", "Spend", "price_of", "register_price")

DEFAULT_STEPS = 1_000
DEFAULT_WALL_SECONDS = 3_600.0
DEFAULT_MAX_OUTPUT_TOKENS = 4_096
"""The output tokens reserved (and asked for, as ``max_tokens``) for an agent without
``max_tokens`` when a token or cost budget covers it: a reservation needs a worst case."""

_SPEND = ("tokens", "input_tokens", "output_tokens", "cost_usd", "tool_calls")


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Hard limits for one run, or for one agent within it (``Agent(..., budget=...)``).

    ``steps``: supersteps the run may execute (default 1,000; for an agent, its turns).
    ``wall_seconds``: wall-clock seconds from the run's start (default one hour; not used
    for an agent). ``tokens``, ``input_tokens``, ``output_tokens``: model tokens;
    ``cost_usd``: dollars from the price table (:func:`register_price`); ``tool_calls``: tool
    calls made. ``state_bytes``: the size of the run's state as JSON (an update that would
    pass it is refused at the barrier, naming the node, the field and the sizes; for the
    run only). ``None`` lifts a limit; a run compiled without a budget gets the step and
    wall-time defaults, so no run is unbounded by accident. ``soft`` is the fraction of a
    limit at which a ``budget_warned`` event is emitted, once per limit (default 0.8).
    """

    steps: int | None = DEFAULT_STEPS
    wall_seconds: float | None = DEFAULT_WALL_SECONDS
    tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    tool_calls: int | None = None
    state_bytes: int | None = None
    soft: float = 0.8

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Budget.steps must be at least 1, got {self.steps}")
        if self.wall_seconds is not None and self.wall_seconds <= 0:
            raise ValueError(f"Budget.wall_seconds must be positive, got {self.wall_seconds}")
        for name in _SPEND:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise ValueError(f"Budget.{name} must be a number >= 0, got {value!r}")
        if self.state_bytes is not None and (
            isinstance(self.state_bytes, bool)
            or not isinstance(self.state_bytes, int)
            or self.state_bytes < 1
        ):
            raise ValueError(f"Budget.state_bytes must be a positive int, got {self.state_bytes!r}")
        if not 0 < self.soft <= 1:
            raise ValueError(f"Budget.soft must be within (0, 1], got {self.soft}")

    @property
    def limits_spend(self) -> bool:
        """Whether tokens or cost are limited (model calls then need a worst case)."""
        return any(
            getattr(self, n) is not None
            for n in ("tokens", "input_tokens", "output_tokens", "cost_usd")
        )

    def exceeded(
        self, *, steps: int, wall_seconds: float, usage: Mapping[str, Any] | None = None
    ) -> str | None:
        """Return which limit stops the next step from starting, in words, or None."""
        if self.steps is not None and steps >= self.steps:
            return f"step budget exhausted: {steps} of {self.steps} steps used"
        if self.wall_seconds is not None and wall_seconds >= self.wall_seconds:
            return f"wall-time budget exhausted: {wall_seconds:.1f}s of {self.wall_seconds:g}s used"
        if usage:
            for name in _SPEND:
                limit = getattr(self, name)
                used = _used(usage, name)
                # past it (the reservations keep it from being passed; at it, the next step
                # may still run if it spends nothing)
                if limit is not None and used > limit:
                    return (
                        f"{_words(name)} budget exhausted: {_amount(name, used)} of "
                        f"{_amount(name, limit)} used"
                    )
        return None

    def raised(self, **increments: float) -> Budget:
        """Return this budget with limits raised by ``increments`` (a limit that is None
        stays unlimited)."""
        changes: dict[str, Any] = {}
        for name, more in increments.items():
            if name not in {f.name for f in fields(self)} or name == "soft":
                raise ValueError(f"Budget has no limit {name!r}")
            current = getattr(self, name)
            if current is not None:
                value = current + more
                whole = name not in ("cost_usd", "wall_seconds") and float(value).is_integer()
                changes[name] = int(value) if whole else float(value)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _used(usage: Mapping[str, Any], name: str) -> float:
    """How much of ``name`` a usage dict (stored usage, or one agent's) has spent."""
    if name == "tokens":
        return float(usage.get("input_tokens", 0)) + float(usage.get("output_tokens", 0))
    return float(usage.get(name, 0))


def _words(name: str) -> str:
    return {
        "tokens": "token",
        "input_tokens": "input-token",
        "output_tokens": "output-token",
        "cost_usd": "cost",
        "tool_calls": "tool-call",
        "model_calls": "turn",
    }[name]


def _amount(name: str, value: float) -> str:
    if name == "cost_usd":
        return f"${value:.4f}"
    return f"{int(value):,}"


# -- prices ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Price:
    """Dollars per million input and output tokens."""

    input_per_million: float
    output_per_million: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_per_million + output_tokens * self.output_per_million
        ) / 1e6


PRICES: dict[str, Price] = {
    # list prices per million tokens as published by the providers (USD); extend or
    # override with register_price, which is also how local models get a price (0 is fine)
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "o3": Price(2.00, 8.00),
    "o4-mini": Price(1.10, 4.40),
}


def register_price(model: str, *, input_per_million: float, output_per_million: float) -> None:
    """Set the price of ``model`` (its ``name``) in dollars per million tokens."""
    if input_per_million < 0 or output_per_million < 0:
        raise ValueError("prices must be >= 0")
    PRICES[model] = Price(float(input_per_million), float(output_per_million))


def price_of(model: str) -> Price | None:
    return PRICES.get(model)


# -- the reservation book ------------------------------------------------------------------


class BudgetStop(BaseException):
    """Stops the step in flight: a call did not fit a budget (never an ``Exception``: user
    code cannot swallow it). ``reason`` says which budget, in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Reservation:
    """What one call holds against the budgets until it settles."""

    node: str
    amounts: dict[str, float]
    open: bool = True


class Spend:
    """The reservations of one run against its budget and its agents' budgets.

    What is *used* is read from the run's usage meter (settled calls, replays included);
    what is *reserved* is held here by calls in flight. ``warn(scope, limit, used, value)``
    is called once per limit when its soft threshold is crossed.
    """

    def __init__(
        self,
        meter: Any,
        run: Budget,
        agents: Mapping[str, Budget],
        warn: Callable[[str, str, float, float], None] | None = None,
    ) -> None:
        self.meter = meter
        self.run = run
        self.agents = dict(agents)
        self.warn = warn
        self.reserved: dict[str | None, dict[str, float]] = {}
        self.warned: set[tuple[str | None, str]] = set()
        self.refused = 0

    def reserve_model(
        self, node: str, prompt_tokens: int, max_output_tokens: int, price: Price | None
    ) -> Reservation:
        """Reserve a model call's worst case against every budget that covers ``node``;
        raise :class:`BudgetStop` (reserving nothing) if it does not fit one."""
        amounts = {
            "tokens": float(prompt_tokens + max_output_tokens),
            "input_tokens": float(prompt_tokens),
            "output_tokens": float(max_output_tokens),
            "cost_usd": price.cost(prompt_tokens, max_output_tokens) if price else 0.0,
            "model_calls": 1.0,
        }
        return self._reserve(node, amounts, "a model call")

    def caps(self, node: str) -> bool:
        """Whether a token or cost limit covers ``node``'s model calls."""
        agent = self.agents.get(node)
        return self.run.limits_spend or (agent is not None and agent.limits_spend)

    def reserve_tool(self, node: str) -> Reservation:
        """Reserve one tool call (``tool_calls`` limits)."""
        return self._reserve(node, {"tool_calls": 1.0}, "a tool call")

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation: its call settled (the meter now counts it) or was not made."""
        if not reservation.open:
            return
        reservation.open = False
        for key in self._keys(reservation.node):
            held = self.reserved[key]
            for name, amount in reservation.amounts.items():
                held[name] -= amount

    def check_soft(self, node: str) -> None:
        """Warn once per limit whose soft threshold the usage has reached."""
        if self.warn is None:
            return
        for key in self._keys(node):
            budget = self._budget(key)
            for name in _SPEND:
                limit = getattr(budget, name)
                if not limit or (key, name) in self.warned:
                    continue
                used = self._used(key, name)
                if used >= limit * budget.soft:
                    self.warned.add((key, name))
                    self.warn(_scope_name(key), name, used, float(limit))

    # -- inside --------------------------------------------------------------------------

    def _keys(self, node: str) -> list[str | None]:
        return [None, node] if node in self.agents else [None]

    def _budget(self, key: str | None) -> Budget:
        return self.run if key is None else self.agents[key]

    def _used(self, key: str | None, name: str) -> float:
        meter = self.meter
        source: Mapping[str, Any] = meter.counts if key is None else meter.by_node.get(key, {})
        return _used(source, name)

    def _reserve(self, node: str, amounts: dict[str, float], what: str) -> Reservation:
        keys = self._keys(node)
        for key in keys:
            budget = self._budget(key)
            held = self.reserved.setdefault(key, dict.fromkeys((*_SPEND, "model_calls"), 0.0))
            for name, amount in amounts.items():
                if name == "model_calls":  # an agent's steps are its turns
                    limit: float | None = budget.steps if key is not None else None
                else:
                    limit = getattr(budget, name)
                if limit is None or amount == 0:
                    continue
                used = self._used(key, name)
                if used + held[name] + amount > limit + 1e-12:
                    self.refused += 1
                    left = max(limit - used - held[name], 0)
                    raise BudgetStop(
                        f"{_scope_name(key)} {_words(name)} budget: {what} by {node!r} needs "
                        f"up to {_amount(name, amount)} but {_amount(name, left)} of "
                        f"{_amount(name, limit)} is left ({_amount(name, used)} used, "
                        f"{_amount(name, held[name])} held by calls in flight); the call was "
                        f"not made"
                    )
        # no await between the checks above and this: concurrent callers cannot both fit
        for key in keys:
            held = self.reserved[key]
            for name, amount in amounts.items():
                held[name] += amount
        return Reservation(node, amounts)


def _scope_name(key: str | None) -> str:
    return "run" if key is None else f"agent {key!r}"


def worst_output(max_tokens: int | None) -> int:
    """The output tokens a model call may use: its ``max_tokens``, or the default."""
    return max_tokens if max_tokens is not None else DEFAULT_MAX_OUTPUT_TOKENS


def stored_budget(run: Budget, agents: Mapping[str, Budget]) -> dict[str, Any]:
    """The run's limits as the store keeps them (``orchestra budget`` raises them)."""
    return {"run": run.to_dict(), "agents": {name: b.to_dict() for name, b in agents.items()}}


def loaded_budget(
    data: Mapping[str, Any], run: Budget, agents: Mapping[str, Budget]
) -> tuple[Budget, dict[str, Budget]]:
    """The limits a resumed run runs under, limit by limit: its own (as stored, and as an
    operator changed them with ``orchestra budget`` or ``app.set_budget``), raised to the
    resuming app's where the app's is higher. A limit only one of them sets applies; an
    agent new to the graph gets the app's."""
    stored = data.get("agents") or {}
    return _merged(Budget.from_dict(data["run"]), run), {
        name: _merged(Budget.from_dict(stored[name]), budget) if name in stored else budget
        for name, budget in agents.items()
    }


def _merged(own: Budget, app: Budget) -> Budget:
    changes: dict[str, Any] = {}
    for item in fields(Budget):
        if item.name == "soft":
            continue
        mine, theirs = getattr(own, item.name), getattr(app, item.name)
        if mine is None:
            changes[item.name] = theirs
        elif theirs is not None:
            changes[item.name] = max(mine, theirs)
    return replace(own, **changes)


class StateSize:
    """The size of a run's state as JSON, kept up to date from the fields each step changes
    (O(changed fields), not O(state)): field by field, ``"name":value`` plus separators."""

    def __init__(self, state: Any) -> None:
        from pydantic_core import to_json

        self._to_json = to_json
        self.fields = {
            name: self._measure(name, getattr(state, name)) for name in type(state).model_fields
        }
        self.total = 2 + sum(self.fields.values()) + max(len(self.fields) - 1, 0)

    def _measure(self, name: str, value: Any) -> int:
        return len(name) + 3 + len(self._to_json(value, fallback=str))

    def after(
        self, state: Any, changed: Mapping[str, Any] | Iterable[str]
    ) -> tuple[int, dict[str, tuple[int, int]]]:
        """The size the state would have after a step, and each changed field's (before,
        after) size; nothing is kept until :meth:`keep`. With ``changed`` mapping fields to
        their FieldDelta, an append measures only the new items."""
        sizes = {}
        deltas: Mapping[str, Any] = (
            changed if isinstance(changed, Mapping) else dict.fromkeys(changed)
        )
        for name, delta in deltas.items():
            before = self.fields[name]
            items = (
                getattr(delta, "value", None) if getattr(delta, "kind", None) == "append" else None
            )
            if items:
                added = len(self._to_json(items, fallback=str)) - 2  # without [ ]
                empty = before == len(name) + 5  # "name":[]
                sizes[name] = (before, before + added + (0 if empty else 1))
            else:
                sizes[name] = (before, self._measure(name, getattr(state, name)))
        total = self.total + sum(after - before for before, after in sizes.values())
        return total, sizes

    def keep(self, total: int, sizes: Mapping[str, tuple[int, int]]) -> None:
        self.total = total
        for name, (_, after) in sizes.items():
            self.fields[name] = after
