"""Questions a node asks a person (ctx.interrupt): the request, the validated answer, refused
answers, the schemas it takes, several questions in a node or a step, and expiry."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import past
from pydantic import BaseModel

from orchestra import END, START, Graph, NodeContext, NodeError, RunStatus, tool
from orchestra.errors import AnswerError, RequestExpiredError
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    answer: Any = None
    other: Any = None


class Refund(BaseModel):
    """The answer a question about a refund expects (module level: findable by name)."""

    order_id: str
    amount: float


def asking(fn: Any, *, tools: Any = (), **options: Any) -> Any:
    """Compile START -> ask -> END where ``ask`` is ``fn``."""
    graph: Graph[S] = Graph(S)
    graph.add_node("ask", fn, tools=tools)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    return graph.compile(**options)


def asker(prompt: str, schema: Any = None, **kwargs: Any) -> Any:
    """A node that asks ``prompt`` and puts the answer in ``answer``."""

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"answer": await ctx.interrupt(prompt, schema=schema, **kwargs)}

    return ask


async def test_questions_first_run_stops_with_a_question(store: Store) -> None:
    """The first ctx.interrupt stops the run interrupted with a question request carrying
    the prompt and the answer's JSON schema; the node does not go past it."""
    reached: list[str] = []

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        value = await ctx.interrupt("Refund which order?", schema=Refund)
        reached.append("after")
        return {"answer": value}

    app = asking(ask, store=store)
    with anyio.fail_after(5):
        outcome = await app.run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    (request,) = outcome.pending
    assert (request.kind, request.node, request.step) == ("question", "ask", 1)
    assert request.payload["prompt"] == "Refund which order?"
    assert request.schema is not None
    assert sorted(request.schema["properties"]) == ["amount", "order_id"]
    assert "Refund which order?" in request.describe()
    assert [r.request_id for r in await store.requests("r1")] == [request.id]
    assert reached == []


async def test_questions_answer_is_returned_validated(store: Store) -> None:
    """On resume the node gets the answer validated against its schema: a model instance."""
    got: list[Any] = []

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        value = await ctx.interrupt("Refund which order?", schema=Refund)
        got.append(value)
        return {"answer": value.order_id}

    app = asking(ask, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        answer = {"order_id": "7", "amount": "12.5"}
        second = await app.resume("r1", answers={request.id: answer})
    assert second.status is RunStatus.COMPLETED
    assert second.state.answer == "7"
    (value,) = got
    assert isinstance(value, Refund)
    assert value == Refund(order_id="7", amount=12.5)


async def test_questions_answer_not_fitting_the_schema_is_refused(store: Store) -> None:
    """An answer that does not fit is refused naming the field; the request stays open, the
    run interrupted, and a fitting answer later still works."""
    app = asking(asker("Refund which order?", Refund), store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        with pytest.raises(AnswerError, match="amount") as caught:
            await app.resume("r1", answers={request.id: {"order_id": "7"}})
        assert caught.value.request_id == request.id
        assert [r.request_id for r in await store.requests("r1")] == [request.id]
        assert (await store.get_run("r1")).status == "interrupted"
        answer = {"order_id": "7", "amount": 3}
        second = await app.resume("r1", answers={request.id: answer})
    assert second.status is RunStatus.COMPLETED
    assert second.state.answer == Refund(order_id="7", amount=3)


@pytest.mark.parametrize(
    ("schema", "answer", "expected"),
    [
        pytest.param(int, 3, 3, id="int"),
        pytest.param(str, "yes", "yes", id="str"),
        pytest.param(None, {"any": [1, "json"]}, {"any": [1, "json"]}, id="none"),
        pytest.param(bool, True, True, id="bool"),
        pytest.param(list, [1, 2], [1, 2], id="list"),
    ],
)
async def test_questions_builtin_schemas_return_the_answer(
    store: Store, schema: Any, answer: Any, expected: Any
) -> None:
    """schema=int, str, bool, list or None: the node gets the answer back."""
    app = asking(asker("How many?", schema), store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: answer})
    assert second.status is RunStatus.COMPLETED
    assert second.state.answer == expected


@pytest.mark.parametrize(
    ("schema", "answer"),
    [
        pytest.param(int, "many", id="int"),
        pytest.param(str, 5, id="str"),
    ],
)
async def test_questions_builtin_schema_refuses_a_wrong_value(
    store: Store, schema: Any, answer: Any
) -> None:
    """An answer of the wrong type for a builtin schema is refused."""
    app = asking(asker("How many?", schema), store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        with pytest.raises(AnswerError):
            await app.resume("r1", answers={request.id: answer})
    assert [r.request_id for r in await store.requests("r1")] == [request.id]


async def test_questions_int_schema_is_stated_in_the_request() -> None:
    """The request of an int question carries the JSON schema of an integer."""
    with anyio.fail_after(5):
        outcome = await asking(asker("How many?", int)).run(S())
    (request,) = outcome.pending
    assert request.schema == {"type": "integer"}


async def test_questions_interrupt_cannot_be_swallowed() -> None:
    """A node catching Exception around ctx.interrupt does not catch the interrupt."""

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            return {"answer": await ctx.interrupt("Which?")}
        except Exception:
            return {"answer": "swallowed"}

    with anyio.fail_after(5):
        outcome = await asking(ask).run(S())
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.state.answer is None


async def test_questions_local_class_schema_fails_the_node() -> None:
    """A class defined inside a function cannot be found again by another process: the
    node fails with a TypeError saying what schemas are taken."""

    class Local(BaseModel):
        value: int

    with anyio.fail_after(5):
        outcome = await asking(asker("Which?", Local)).run(S())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, NodeError)
    cause = outcome.error.__cause__
    assert isinstance(cause, TypeError)
    assert "module level" in str(cause)
    assert "Local" in str(cause)


async def test_questions_empty_prompt_fails_the_node() -> None:
    """A question needs a prompt."""
    with anyio.fail_after(5):
        outcome = await asking(asker("  ")).run(S())
    assert outcome.status is RunStatus.FAILED
    assert isinstance(outcome.error, NodeError)
    assert "non-empty prompt" in str(outcome.error)


# -- several questions ----------------------------------------------------------------------


async def test_questions_two_in_a_node_are_asked_one_after_the_other(store: Store) -> None:
    """The second question of a node is asked once the first is answered, and each answer
    goes to its own question."""

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        name = await ctx.interrupt("Whose order?", schema=str)
        count = await ctx.interrupt("How many items?", schema=int)
        return {"answer": name, "other": count}

    app = asking(ask, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (name_q,) = first.pending
        assert name_q.payload["prompt"] == "Whose order?"
        second = await app.resume("r1", answers={name_q.id: "Ada"})
        assert second.status is RunStatus.INTERRUPTED
        (count_q,) = second.pending
        assert count_q.payload["prompt"] == "How many items?"
        assert count_q.id != name_q.id
        third = await app.resume("r1", answers={count_q.id: 4})
    assert third.status is RunStatus.COMPLETED
    assert (third.state.answer, third.state.other) == ("Ada", 4)


async def test_questions_same_prompt_twice_gets_two_answers(store: Store) -> None:
    """A node asking the same prompt twice asks two questions, each with its own answer."""

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"answer": [await ctx.interrupt("Next?"), await ctx.interrupt("Next?")]}

    app = asking(ask, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (one,) = first.pending
        second = await app.resume("r1", answers={one.id: "a"})
        (two,) = second.pending
        assert two.id != one.id
        third = await app.resume("r1", answers={two.id: "b"})
    assert third.state.answer == ["a", "b"]


async def test_questions_parallel_nodes_ask_at_once(store: Store) -> None:
    """Two nodes of one step asking each: both questions are pending at once, and each
    answer reaches its own node."""

    async def left(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"answer": await ctx.interrupt("Left?", schema=str)}

    async def right(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"other": await ctx.interrupt("Right?", schema=int)}

    graph: Graph[S] = Graph(S)
    graph.add_node("left", left)
    graph.add_node("right", right)
    for name in ("left", "right"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        assert first.status is RunStatus.INTERRUPTED
        by_node = {r.node: r for r in first.pending}
        assert sorted(by_node) == ["left", "right"]
        assert sorted(r.request_id for r in await store.requests("r1")) == sorted(
            r.id for r in first.pending
        )
        answers = {by_node["left"].id: "west", by_node["right"].id: 2}
        second = await app.resume("r1", answers=answers)
    assert second.status is RunStatus.COMPLETED
    assert (second.state.answer, second.state.other) == ("west", 2)


async def test_questions_parallel_node_that_finished_is_not_run_again(store: Store) -> None:
    """A node that finished beside a question in the same step does not run again when the
    question's answer resumes the step."""
    runs: list[str] = []

    async def busy(state: S, ctx: NodeContext) -> dict[str, Any]:
        runs.append("busy")
        return {"other": "busy done"}

    graph: Graph[S] = Graph(S)
    graph.add_node("ask", asker("Which?", str))
    graph.add_node("busy", busy)
    for name in ("ask", "busy"):
        graph.add_edge(START, name)
        graph.add_edge(name, END)
    app = graph.compile(store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: "this one"})
    assert second.status is RunStatus.COMPLETED
    assert (second.state.answer, second.state.other) == ("this one", "busy done")
    assert runs == ["busy"]


async def test_questions_work_before_a_question_is_not_redone(store: Store) -> None:
    """A tool call the node made before asking is replayed on resume, not made again."""
    noted: list[str] = []

    @tool
    async def note(text: str) -> str:
        noted.append(text)
        return f"noted {text}"

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        result = await ctx.call_tool("note", text="asking")
        value = await ctx.interrupt("Go on?", schema=bool)
        return {"answer": value, "other": result}

    app = asking(ask, tools=[note], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: True})
    assert second.status is RunStatus.COMPLETED
    assert (second.state.answer, second.state.other) == (True, "noted asking")
    assert noted == ["asking"]


async def test_questions_resume_without_an_answer_asks_again(store: Store) -> None:
    """Resumed without an answer, the run is interrupted on the same request, not a copy."""
    app = asking(asker("Which?", str), store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        second = await app.resume("r1")
    assert second.status is RunStatus.INTERRUPTED
    assert [r.id for r in second.pending] == [r.id for r in first.pending]
    assert len(await store.requests("r1", statuses=())) == 1


# -- expiry ---------------------------------------------------------------------------------


async def test_questions_expired_question_raises_inside_the_node(store: Store) -> None:
    """Resumed after expires_in passed, the node's ctx.interrupt raises RequestExpiredError;
    a node that catches it goes on with a default."""
    caught: list[RequestExpiredError] = []

    async def ask(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            value = await ctx.interrupt("Approve the plan?", schema=bool, expires_in=0.05)
        except RequestExpiredError as exc:
            caught.append(exc)
            value = False
        return {"answer": value}

    app = asking(ask, store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        assert request.expires_at is not None
        await past(request)
        second = await app.resume("r1")
    assert second.status is RunStatus.COMPLETED
    assert second.state.answer is False
    (error,) = caught
    assert (error.run_id, error.request_id) == ("r1", request.id)
    (row,) = await store.requests("r1", statuses=())
    assert row.status == "expired"


async def test_questions_expired_question_cannot_be_answered(store: Store) -> None:
    """An answer given after the question expired is refused."""
    app = asking(asker("Approve?", bool, expires_in=0.05), store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        await past(request)
        with pytest.raises(AnswerError, match="expired"):
            await app.resume("r1", answers={request.id: True})
    assert (await store.get_run("r1")).status == "interrupted"


async def test_questions_uncaught_expiry_fails_the_node(store: Store) -> None:
    """A node that does not catch the expiry fails, naming it."""
    app = asking(asker("Approve?", bool, expires_in=0.05), store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        await past(first.pending[0])
        second = await app.resume("r1")
    assert second.status is RunStatus.FAILED
    assert isinstance(second.error, NodeError)
    assert isinstance(second.error.__cause__, RequestExpiredError)
