"""Budgets: every dimension stops the run before a call that would pass it, concurrent
agents cannot overshoot together (reservations), agents have their own budgets, soft
thresholds warn once, and a cost budget needs prices."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel

from orchestra import (
    END,
    START,
    Agent,
    Budget,
    Effect,
    Graph,
    GraphValidationError,
    NodeContext,
    RunStatus,
    Send,
    append,
    register_price,
    tool,
)
from orchestra.events import BudgetWarned, Event
from orchestra.models import ModelRequest, ModelResponse, ScriptedModel, ToolCall
from orchestra.safeguards.budgets import DEFAULT_MAX_OUTPUT_TOKENS, PRICES, Price
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    answers: list[str] = []
    note: str = ""


@tool(effect=Effect.READ)
async def look(q: str) -> str:
    """Look something up."""
    return q


class Busy:
    """A model that proposes ``turns - 1`` tool calls, then answers; each call takes a
    moment so that concurrent agents' calls overlap; counts calls in flight."""

    def __init__(self, turns: int = 5, name: str = "scripted") -> None:
        self.turns = turns
        self.in_flight = 0
        self.most_in_flight = 0
        self.model = ScriptedModel(self.answer, name=name)

    async def answer(self, request: ModelRequest) -> ModelResponse | str:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await anyio.sleep(0.001)
        self.in_flight -= 1
        if request.turn + 1 < self.turns:
            return ModelResponse(
                tool_calls=(ToolCall(name="look", arguments={"q": str(request.turn)}),)
            )
        return "done"


def fan_out(model: Any, run_budget: Budget, agents: int = 20, **agent: Any) -> Any:
    """``agents`` copies of one agent started by Send, in one run, sharing ``run_budget``."""

    async def fan(state: S, ctx: NodeContext) -> list[Send]:
        return [Send("worker", i) for i in range(agents)]

    graph: Graph[S] = Graph(S)
    graph.add_node("fan", fan, targets=["worker"])
    graph.add_node(Agent("worker", model=model, tools=[look], max_tokens=50, **agent))
    graph.add_edge(START, "fan")
    graph.add_edge("worker", END)
    return graph.compile(budget=run_budget)


@pytest.fixture(autouse=True)
def price() -> Any:
    """A price for the scripted models of these tests (removed afterwards)."""
    register_price("scripted", input_per_million=10.0, output_per_million=20.0)
    yield
    PRICES.pop("scripted", None)


def test_budget_rejects_invalid_limits() -> None:
    """Negative or non-numeric limits and a soft threshold outside (0, 1] are refused."""
    for bad in ({"tokens": -1}, {"cost_usd": "1"}, {"tool_calls": True}, {"soft": 0}):
        with pytest.raises(ValueError, match="Budget"):
            Budget(**bad)


def test_budget_raised_adds_to_set_limits_only() -> None:
    """raised() adds to limits that are set; unlimited ones stay unlimited."""
    budget = Budget(tokens=100, cost_usd=0.5).raised(tokens=50, cost_usd=0.25, tool_calls=3)
    assert (budget.tokens, budget.cost_usd, budget.tool_calls) == (150, 0.75, None)


async def test_budget_concurrent_agents_never_overshoot_the_token_budget() -> None:
    """20 agents calling at once stop at the token budget without passing it."""
    busy = Busy()
    outcome = await fan_out(busy.model, Budget(tokens=9_000)).run(S())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert busy.most_in_flight > 1  # the calls really overlapped
    assert 0 < outcome.usage.tokens <= 9_000
    assert "run token budget" in (outcome.stop_reason or "")
    assert "the call was not made" in (outcome.stop_reason or "")


async def test_budget_concurrent_agents_never_overshoot_the_cost_budget() -> None:
    """The same with a dollar budget, priced from the price table."""
    busy = Busy()
    outcome = await fan_out(busy.model, Budget(cost_usd=0.05)).run(S())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert 0 < outcome.usage.cost_usd <= 0.05
    assert "run cost budget" in (outcome.stop_reason or "")


@pytest.mark.parametrize(
    ("limit", "words"),
    [
        ({"input_tokens": 3_000}, "input-token"),
        ({"output_tokens": 1_500}, "output-token"),
        ({"tool_calls": 7}, "tool-call"),
    ],
)
async def test_budget_each_dimension_stops_before_it_is_passed(
    limit: dict[str, int], words: str
) -> None:
    """Input tokens, output tokens and tool calls each stop the run at their limit."""
    outcome = await fan_out(Busy().model, Budget(**limit)).run(S())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    (name, value), usage = next(iter(limit.items())), outcome.usage
    assert getattr(usage, name) <= value
    assert f"run {words} budget" in (outcome.stop_reason or "")


async def test_budget_within_limits_the_run_completes() -> None:
    """A budget large enough changes nothing: every agent finishes."""
    outcome = await fan_out(Busy().model, Budget(tokens=1_000_000, cost_usd=10.0)).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.usage.model_calls == 20 * 5


async def test_budget_of_an_agent_stops_the_run_naming_the_agent() -> None:
    """An agent's own budget stops the run when that agent's calls would pass it."""
    app = fan_out(Busy().model, Budget(), agents=3, budget=Budget(tokens=1_200))
    outcome = await app.run(S())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert "agent 'worker' token budget" in (outcome.stop_reason or "")
    assert (
        outcome.usage.by_node["worker"]["input_tokens"]
        + outcome.usage.by_node["worker"]["output_tokens"]
        <= 1_200
    )


async def test_budget_steps_of_an_agent_are_its_turns() -> None:
    """An agent's step budget bounds its model calls."""
    app = fan_out(Busy().model, Budget(), agents=1, budget=Budget(steps=3))
    outcome = await app.run(S())
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    assert outcome.usage.model_calls == 3
    assert "agent 'worker' turn budget" in (outcome.stop_reason or "")


async def test_budget_soft_threshold_warns_once() -> None:
    """Crossing the soft threshold emits one budget_warned event per limit."""
    app = fan_out(Busy().model, Budget(tokens=100_000, soft=0.005), agents=2)
    events: list[Event] = [event async for event in app.stream(S())]
    warned = [e for e in events if isinstance(e, BudgetWarned) and e.limit == "tokens"]
    assert [(w.scope, w.limit) for w in warned] == [("run", "tokens")]
    assert warned[0].used >= 500


async def test_budget_spending_limit_holds_models_to_a_max_output() -> None:
    """Under a token budget an agent without max_tokens asks for the default cap."""
    model = ScriptedModel(lambda request: "x" * 40_000)
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=model, output="note"))
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    outcome = await graph.compile(budget=Budget(tokens=50_000)).run(S())
    assert model.requests[0].max_tokens == DEFAULT_MAX_OUTPUT_TOKENS
    assert outcome.usage.output_tokens == DEFAULT_MAX_OUTPUT_TOKENS  # cut, like a real model


def test_budget_cost_without_a_price_is_a_compile_error() -> None:
    """A cost budget over a model with no price is refused at compile, naming the model."""
    graph: Graph[S] = Graph(S)
    graph.add_node(Agent("a", model=ScriptedModel(["x"], name="unpriced-model")))
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    with pytest.raises(GraphValidationError, match="price for model 'unpriced-model'"):
        graph.compile(budget=Budget(cost_usd=1.0))


def test_budget_price_table_prices_per_million_tokens() -> None:
    """A price is dollars per million input and output tokens."""
    assert Price(2.0, 8.0).cost(1_000_000, 500_000) == pytest.approx(6.0)


async def test_budget_raised_in_the_store_lets_the_run_resume_without_rebilling(
    store: Store,
) -> None:
    """A run stopped by its token budget, raised as `orchestra budget` does, resumes to
    completion; calls made before the stop are replayed, never made (or billed) again."""
    busy = Busy()
    app = fan_out(busy.model, Budget(tokens=1_200), agents=4)
    app = app.with_store(store)
    first = await app.run(S(), run_id="r1")
    assert first.status is RunStatus.BUDGET_EXCEEDED
    record = await store.get_run("r1")
    assert record.budget is not None
    assert record.budget["run"]["tokens"] == 1_200
    raised = Budget.from_dict(record.budget["run"]).raised(tokens=100_000)
    await store.set_budget("r1", {**record.budget, "run": raised.to_dict()}, reason="test")
    second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert second.usage.model_calls == 4 * 5
    assert len(busy.model.requests) == 4 * 5  # every call made exactly once
    assert second.usage.tokens <= 101_200


async def test_budget_resumed_run_keeps_its_own_limits_until_changed(store: Store) -> None:
    """A resumed run keeps its stored limits against an app with lower or no limits (a
    limit an operator set on a run whose app has none holds); set_budget (as `orchestra
    budget`) changes them; a cost limit over an unpriced model is refused."""
    busy = Busy()
    first = (
        await fan_out(busy.model, Budget(tokens=1_200), agents=4)
        .with_store(store)
        .run(S(), run_id="r1")
    )
    assert first.status is RunStatus.BUDGET_EXCEEDED
    for app_budget in (Budget(tokens=500), Budget()):
        app = fan_out(busy.model, app_budget, agents=4).with_store(store)
        again = await app.resume("r1")
        assert again.status is RunStatus.BUDGET_EXCEEDED  # still the run's 1,200 tokens
        assert again.usage.tokens <= 1_200
    PRICES.pop("scripted")
    with pytest.raises(ValueError, match="price for model 'scripted'"):
        await app.set_budget("r1", Budget(tokens=50_000, cost_usd=1.0))
    await app.set_budget("r1", Budget(tokens=50_000), reason="more")
    last = await app.resume("r1")
    assert last.status is RunStatus.COMPLETED


async def test_budget_app_with_higher_limits_raises_a_resumed_runs(store: Store) -> None:
    """An app resuming a run with higher limits than the run's raises them."""
    busy = Busy()
    first = (
        await fan_out(busy.model, Budget(tokens=1_200), agents=4)
        .with_store(store)
        .run(S(), run_id="r1")
    )
    assert first.status is RunStatus.BUDGET_EXCEEDED
    higher = fan_out(busy.model, Budget(tokens=1_000_000), agents=4).with_store(store)
    assert (await higher.resume("r1")).status is RunStatus.COMPLETED


class Notes(BaseModel):
    notes: Annotated[list[str], append] = []
    title: str = ""


def growing(store: Store | None = None, state_bytes: int = 300) -> Any:
    """A node appending a 40-character note every step, for 20 steps."""

    async def write(state: Notes, ctx: NodeContext) -> dict[str, str]:
        return {"notes": "n" * 40}

    graph: Graph[Notes] = Graph(Notes)
    graph.add_node("writer", write)
    graph.add_edge(START, "writer")
    graph.add_route(
        "writer", lambda s: "writer" if len(s.notes) < 20 else END, targets=["writer", END]
    )
    return graph.compile(store=store, budget=Budget(state_bytes=state_bytes))


async def test_budget_state_bytes_refuses_the_update_that_would_pass_it(store: Store) -> None:
    """The state stops growing at its size limit: the update that would pass it is refused,
    naming the node, the field and the sizes; the last committed state fits."""
    outcome = await growing(store).run(Notes(), run_id="r1")
    assert outcome.status is RunStatus.BUDGET_EXCEEDED
    reason = outcome.stop_reason or ""
    assert "state-size budget" in reason
    assert "field 'notes' by 'writer'" in reason
    assert len(outcome.state.model_dump_json()) <= 300
    assert len(outcome.state.notes) == outcome.steps


async def test_budget_state_bytes_raised_lets_the_run_finish(store: Store) -> None:
    """Raised with set_budget, the run resumes and completes."""
    app = growing(store)
    await app.run(Notes(), run_id="r1")
    await app.set_budget("r1", Budget(state_bytes=10_000))
    outcome = await app.resume("r1")
    assert outcome.status is RunStatus.COMPLETED
    assert len(outcome.state.notes) == 20


def test_budget_state_size_follows_the_json_size() -> None:
    """The tracked size is the state's JSON size, updated from the changed fields."""
    from orchestra.safeguards.budgets import StateSize

    state = Notes(notes=["a", "bb"], title="t")
    size = StateSize(state)
    assert size.total == len(state.model_dump_json())
    grown = state.model_copy(update={"notes": [*state.notes, "ccc"]})
    total, _ = size.after(grown, ["notes"])
    assert total == len(grown.model_dump_json())


async def test_budget_step_limit_warns_at_its_soft_threshold() -> None:
    """The step budget warns once when the run reaches its soft threshold."""

    async def count(state: Notes, ctx: NodeContext) -> dict[str, str]:
        return {"title": str(ctx.step)}

    graph: Graph[Notes] = Graph(Notes)
    graph.add_node("count", count)
    graph.add_edge(START, "count")
    graph.add_route("count", lambda s: "count" if s.title != "9" else END, targets=["count", END])
    app = graph.compile(budget=Budget(steps=10, soft=0.5))
    events = [event async for event in app.stream(Notes())]
    warned = [e for e in events if isinstance(e, BudgetWarned)]
    assert [(w.limit, w.used, w.value) for w in warned] == [("steps", 5.0, 10.0)]


async def test_budget_state_over_its_limit_may_still_shrink() -> None:
    """A state already over its limit (an input too large, or a lowered limit) may be
    compacted: an update that makes it smaller is not refused."""

    async def compact(state: Notes, ctx: NodeContext) -> Notes:
        return state.model_copy(update={"title": ""})

    graph: Graph[Notes] = Graph(Notes)
    graph.add_node("compact", compact)
    graph.add_edge(START, "compact")
    graph.add_edge("compact", END)
    app = graph.compile(budget=Budget(state_bytes=50))
    outcome = await app.run(Notes(title="x" * 200))
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.title == ""


async def test_budget_state_bytes_warns_at_its_soft_threshold() -> None:
    """Nearing the state-size limit emits budget_warned once."""
    events = [event async for event in growing(state_bytes=1_000).stream(Notes())]
    warned = [e for e in events if isinstance(e, BudgetWarned) and e.limit == "state_bytes"]
    assert len(warned) == 1
    assert warned[0].used >= 800


async def test_budget_limits_raised_by_the_resuming_app_are_stored(store: Store) -> None:
    """The limits a resume runs under become the run's stored limits (so an operator's +N
    adds to them), with a budget_raised event."""
    busy = Busy()
    first = (
        await fan_out(busy.model, Budget(tokens=1_200), agents=4)
        .with_store(store)
        .run(S(), run_id="r1")
    )
    assert first.status is RunStatus.BUDGET_EXCEEDED
    higher = fan_out(busy.model, Budget(tokens=1_500), agents=4).with_store(store)
    await higher.resume("r1")
    record = await store.get_run("r1")
    assert record.budget is not None
    assert record.budget["run"]["tokens"] == 1_500
    assert any(e.kind == "budget_raised" for e in await store.events("r1"))


async def test_budget_set_budget_refuses_bad_input_and_changes_nothing(store: Store) -> None:
    """set_budget refuses a non-Budget, non-Budget agent limits and unknown agents; the
    stored limits stay as they were."""
    app = fan_out(Busy().model, Budget(tokens=1_200), agents=2).with_store(store)
    await app.run(S(), run_id="r1")
    before = (await store.get_run("r1")).budget
    with pytest.raises(TypeError, match="takes a Budget"):
        await app.set_budget("r1", {"tokens": 5})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not Budget objects"):
        await app.set_budget("r1", Budget(), agents={"worker": 5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="no agents \\['ghost'\\]"):
        await app.set_budget("r1", Budget(), agents={"ghost": Budget()})
    assert (await store.get_run("r1")).budget == before
