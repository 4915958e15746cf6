"""@tool: argument schemas from signatures, the injected ToolContext, execution (async and in
a worker thread), result validation, the size cap and the timeout."""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

import anyio
import pytest
from helpers import Order
from pydantic import AfterValidator, BaseModel, Field, ValidationError

from orchestra import (
    END,
    START,
    Agent,
    Done,
    Effect,
    Graph,
    NodeContext,
    Retry,
    RunStatus,
    Send,
    Tool,
    ToolContext,
    tool,
)
from orchestra.errors import ToolCallError
from orchestra.models import ModelResponse, ScriptedModel, ToolCall
from orchestra.store import Store

pytestmark = pytest.mark.anyio


class S(BaseModel):
    request: str = ""
    resolution: str | None = None


def one_node(fn: Any, tools: list[Any], **options: Any) -> Any:
    """Compile START -> n -> END where ``n`` may call ``tools``."""
    graph: Graph[S] = Graph(S)
    graph.add_node("n", fn, tools=tools)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    return graph.compile(approvals=None, **options)


async def call_once(target: Tool, **arguments: Any) -> tuple[str, Any]:
    """Call ``target`` once from a node; return ("ok", result) or (status, error detail)."""
    seen: dict[str, Any] = {}

    async def node(state: S, ctx: NodeContext) -> None:
        try:
            seen["value"] = await ctx.call_tool(target, **arguments)
            seen["status"] = "ok"
        except ToolCallError as exc:
            seen["status"], seen["value"] = exc.status, exc.detail

    outcome = await one_node(node, [target]).run(S())
    assert outcome.status is RunStatus.COMPLETED, outcome.error
    return seen["status"], seen["value"]


def single_agent(agent: Agent, **options: Any) -> Any:
    """Compile START -> agent -> END."""
    graph: Graph[S] = Graph(S)
    graph.add_node(agent)
    graph.add_edge(START, agent.name)
    graph.add_edge(agent.name, END)
    return graph.compile(approvals=None, **options)


# -- schemas ----------------------------------------------------------------------------


def test_tool_schema_marks_parameters_without_defaults_required() -> None:
    """Parameters without a default are required; defaults appear in the schema."""

    @tool
    async def search(query: str, limit: int = 10, exact: bool = False) -> list[str]:
        return []

    schema = search.spec().parameters
    assert schema["required"] == ["query"]
    assert schema["properties"]["query"]["type"] == "string"
    assert schema["properties"]["limit"] == {"default": 10, "title": "Limit", "type": "integer"}
    assert schema["properties"]["exact"]["default"] is False


def test_tool_schema_refuses_additional_properties() -> None:
    """The schema tells the model that no other arguments are accepted."""

    @tool
    async def ping(host: str) -> str:
        return host

    assert ping.spec().parameters["additionalProperties"] is False


def test_tool_schema_takes_field_descriptions_from_annotated() -> None:
    """An ``Annotated[..., Field(description=...)]`` parameter is described in the schema."""

    @tool
    async def refund(
        order_id: Annotated[str, Field(description="The order to refund")],
        amount: Annotated[float, Field(gt=0, description="In euros")],
    ) -> str:
        return "ok"

    properties = refund.spec().parameters["properties"]
    assert properties["order_id"]["description"] == "The order to refund"
    assert properties["amount"]["description"] == "In euros"
    assert properties["amount"]["exclusiveMinimum"] == 0


def test_tool_description_is_the_docstring_first_paragraph() -> None:
    """The description is the docstring's first paragraph, on one line."""

    @tool
    async def lookup(order_id: str) -> str:
        """Look up an order
        by its id.

        Internal notes the model must not see.
        """
        return order_id

    spec = lookup.spec()
    assert spec.name == "lookup"
    assert spec.description == "Look up an order by its id."


def test_tool_name_and_description_can_be_given() -> None:
    """``@tool(name=..., description=...)`` override the function's name and docstring."""

    @tool(name="find_order", description="Find it.")
    async def lookup(order_id: str) -> str:
        """Ignored."""
        return order_id

    assert (lookup.name, lookup.spec().name, lookup.description) == (
        "find_order",
        "find_order",
        "Find it.",
    )


def test_tool_without_docstring_has_an_empty_description() -> None:
    """A tool with no docstring and no description has an empty description."""

    @tool
    async def bare(x: int) -> int:
        return x

    assert bare.spec().description == ""


def test_tool_effect_defaults_to_write() -> None:
    """A tool not declared otherwise is assumed to change something."""

    @tool
    async def change(x: int) -> int:
        return x

    @tool(effect=Effect.READ)
    async def read(x: int) -> int:
        return x

    assert (change.effect, read.effect) == (Effect.WRITE, Effect.READ)


def test_tool_context_parameter_is_not_in_the_schema() -> None:
    """A ToolContext parameter is filled in by the gateway, not described to the model."""

    @tool
    async def charge(amount: float, ctx: ToolContext) -> str:
        return ctx.idempotency_key

    schema = charge.spec().parameters
    assert list(schema["properties"]) == ["amount"]
    assert schema["required"] == ["amount"]
    assert charge.context_param == "ctx"


def test_tool_refuses_var_positional() -> None:
    """A tool with ``*args`` cannot be described to a model: TypeError."""
    with pytest.raises(TypeError, match=r"\*args and \*\*kwargs"):

        @tool
        async def many(*args: int) -> int:
            return 0


def test_tool_refuses_var_keyword() -> None:
    """A tool with ``**kwargs`` cannot be described to a model: TypeError."""
    with pytest.raises(TypeError, match="'loose'"):

        @tool
        async def loose(x: int, **kwargs: Any) -> int:
            return 0


def test_tool_refuses_positional_only_parameters() -> None:
    """A positional-only parameter cannot be passed by name: TypeError naming it."""
    with pytest.raises(TypeError, match="parameter 'x' is positional-only"):

        @tool
        async def positional(x: int, /) -> int:
            return x


def test_tool_refuses_a_non_positive_timeout() -> None:
    """A timeout of zero or less is refused."""
    with pytest.raises(ValueError, match="timeout must be positive"):
        tool(timeout=0)(lambda x: x)


def test_tool_refuses_a_non_callable() -> None:
    """@tool applied to something that is not a function raises TypeError."""
    with pytest.raises(TypeError, match="needs a function"):
        Tool(42)  # type: ignore[arg-type]


def test_tool_validate_converts_arguments() -> None:
    """Arguments are validated against the schema and converted to the declared types."""

    @tool
    async def refund(order_id: str, amount: float, note: str = "") -> str:
        return "ok"

    assert refund.validate({"order_id": "42", "amount": "30"}) == {
        "order_id": "42",
        "amount": 30.0,
        "note": "",
    }


def test_tool_validate_refuses_extra_arguments() -> None:
    """An argument the tool does not declare is refused, not ignored."""

    @tool
    async def refund(order_id: str) -> str:
        return "ok"

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        refund.validate({"order_id": "42", "admin": True})


def test_tool_validate_refuses_missing_required_arguments() -> None:
    """A required argument that is missing is refused."""

    @tool
    async def refund(order_id: str, amount: float) -> str:
        return "ok"

    with pytest.raises(ValidationError, match="amount"):
        refund.validate({"order_id": "42"})


def test_tool_resource_keys_come_from_the_arguments() -> None:
    """``resources(arguments)`` gives the call's resource keys; one string is one key."""

    @tool(resources=lambda a: {f"order:{a['order_id']}", "ledger"})
    async def refund(order_id: str) -> str:
        return "ok"

    @tool(resources=lambda a: f"user:{a['user']}")
    async def notify(user: str) -> str:
        return "ok"

    assert refund.resource_keys({"order_id": "7"}) == {"order:7", "ledger"}
    assert notify.resource_keys({"user": "ann"}) == {"user:ann"}


async def test_tool_is_still_callable_directly() -> None:
    """A tool called directly runs its function, outside any run."""

    @tool
    async def add(a: int, b: int) -> int:
        return a + b

    @tool
    def mul(a: int, b: int) -> int:
        return a * b

    assert await add(2, 3) == 5
    assert mul(2, 3) == 6
    assert add.__name__ == "add"


# -- execution ----------------------------------------------------------------------------


async def test_tool_context_is_injected_with_the_call() -> None:
    """The ToolContext names the run, step, caller, call id and idempotency key."""
    seen: list[ToolContext] = []

    @tool
    async def charge(amount: float, ctx: ToolContext) -> str:
        seen.append(ctx)
        return "charged"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(charge, amount=5)}

    outcome = await one_node(node, [charge]).run(S(), run_id="r1")
    assert outcome.state.resolution == "charged"
    assert seen == [
        ToolContext(run_id="r1", step=1, caller="n", call_id="n-1-0", idempotency_key="r1/1/n/0")
    ]


async def test_tool_context_keys_differ_between_calls() -> None:
    """Two calls of one node get distinct call ids and idempotency keys."""
    seen: list[ToolContext] = []

    @tool
    async def charge(amount: float, ctx: ToolContext) -> str:
        seen.append(ctx)
        return "charged"

    async def node(state: S, ctx: NodeContext) -> None:
        await ctx.call_tool(charge, amount=1)
        await ctx.call_tool(charge, amount=1)

    await one_node(node, [charge]).run(S(), run_id="r1")
    assert [c.call_id for c in seen] == ["n-1-0", "n-1-1"]
    assert len({c.idempotency_key for c in seen}) == 2


async def test_tool_sync_function_runs_in_a_worker_thread() -> None:
    """A sync tool runs in a worker thread, not on the event loop's thread."""
    threads: list[int] = []

    @tool
    def blocking(x: int) -> int:
        threads.append(threading.get_ident())
        return x * 2

    assert await call_once(blocking, x=21) == ("ok", 42)
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()


async def test_tool_sync_function_gets_its_context() -> None:
    """A sync tool gets its ToolContext too."""

    @tool
    def whoami(ctx: ToolContext) -> str:
        return ctx.caller

    assert await call_once(whoami) == ("ok", "n")


async def test_tool_result_is_validated_against_the_return_annotation() -> None:
    """A result that does not fit the return annotation has status invalid_result."""

    @tool
    async def count() -> int:
        return "many"  # type: ignore[return-value]

    status, detail = await call_once(count)
    assert status == "invalid_result"
    assert "return type" in detail


async def test_tool_result_is_converted_to_the_return_annotation() -> None:
    """A result that fits after conversion comes back as the annotated type."""

    @tool
    async def count() -> int:
        return "12"  # type: ignore[return-value]

    assert await call_once(count) == ("ok", 12)


async def test_tool_result_that_is_not_json_is_invalid() -> None:
    """An unannotated result that cannot become JSON has status invalid_result."""

    @tool
    async def opaque():  # type: ignore[no-untyped-def]
        return object()

    status, detail = await call_once(opaque)
    assert status == "invalid_result"
    assert "not JSON" in detail


async def test_tool_result_over_the_size_cap_is_too_large() -> None:
    """A result whose JSON exceeds ``max_result_bytes`` has status too_large."""

    @tool(max_result_bytes=50)
    async def dump() -> str:
        return "x" * 100

    status, detail = await call_once(dump)
    assert status == "too_large"
    assert "over the tool's cap of 50" in detail


async def test_tool_result_under_the_size_cap_is_returned() -> None:
    """A result within ``max_result_bytes`` is returned."""

    @tool(max_result_bytes=50)
    async def dump() -> str:
        return "x" * 40

    assert await call_once(dump) == ("ok", "x" * 40)


async def test_tool_past_its_timeout_has_status_timeout() -> None:
    """A (reversible) tool that runs past its timeout has status timeout."""

    @tool(timeout=0.05)
    async def slow() -> str:
        await anyio.sleep(5)
        return "late"

    with anyio.fail_after(2):
        status, detail = await call_once(slow)
    assert status == "timeout"
    assert "no result within 0.05s" in detail


async def test_tool_raising_has_status_error() -> None:
    """A tool that raises has status error, with the exception's type and message."""

    @tool
    async def broken() -> str:
        raise LookupError("no such order")

    assert await call_once(broken) == ("error", "LookupError: no such order")


async def test_tool_returning_a_model_comes_back_as_an_instance() -> None:
    """A tool annotated to return a pydantic model gives the caller an instance of it."""

    @tool
    async def fetch(order_id: str) -> Order:
        return Order(order_id=order_id, amount=9.5)

    status, value = await call_once(fetch, order_id="42")
    assert status == "ok"
    assert value == Order(order_id="42", amount=9.5)


async def test_tool_raising_is_shown_to_the_agent_as_a_tool_message() -> None:
    """An agent whose tool raised gets the error as a tool message and the run goes on."""

    @tool
    async def broken(order_id: str) -> str:
        raise LookupError("no such order")

    call = ToolCall(name="broken", arguments={"order_id": "1"}, id="c1")
    model = ScriptedModel({"a": [ModelResponse(tool_calls=(call,)), "gave up"]})
    app = single_agent(Agent("a", model=model, tools=[broken], output="resolution"))
    outcome = await app.run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.resolution == "gave up"
    message = model.requests[1].messages[-1]
    assert (message.role, message.name, message.tool_call_id) == ("tool", "broken", "c1")
    assert "LookupError: no such order" in message.content
    assert '"status":"error"' in message.content


async def test_tool_irreversible_timeout_interrupts_the_run_with_a_request() -> None:
    """An irreversible tool past its timeout is in doubt: the run is interrupted."""

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def pay(amount: float) -> str:
        await anyio.sleep(5)
        return "paid"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(pay, amount=3)}

    with anyio.fail_after(2):
        outcome = await one_node(node, [pay]).run(S(), run_id="r1")
    assert outcome.status is RunStatus.INTERRUPTED
    assert outcome.state.resolution is None
    (request,) = outcome.pending
    assert (request.kind, request.node, request.step) == ("in_doubt", "n", 1)
    assert request.payload["tool"] == "pay"
    assert request.payload["arguments"] == {"amount": 3.0}
    assert request.payload["idempotency_key"] == "r1/1/n/0"


async def test_tool_reversible_timeout_does_not_interrupt_the_run() -> None:
    """A WRITE tool past its timeout is not in doubt: the node gets ToolCallError."""

    @tool(effect=Effect.WRITE, timeout=0.05)
    async def save(x: int) -> str:
        await anyio.sleep(5)
        return "saved"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        try:
            await ctx.call_tool(save, x=1)
        except ToolCallError as exc:
            return {"resolution": exc.status}
        return {"resolution": "no error"}

    with anyio.fail_after(2):
        outcome = await one_node(node, [save]).run(S())
    assert outcome.status is RunStatus.COMPLETED
    assert outcome.state.resolution == "timeout"


async def test_tool_retried_call_gets_the_same_idempotency_key(store: Store) -> None:
    """An in-doubt call run again with Retry() sees the same idempotency key."""
    keys: list[str] = []
    slow = [False, True]  # popped from the end: slow the first time only

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def pay(amount: float, ctx: ToolContext) -> str:
        keys.append(ctx.idempotency_key)
        if slow.pop():
            await anyio.sleep(5)
        return "paid"

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        return {"resolution": await ctx.call_tool(pay, amount=3)}

    app = one_node(node, [pay], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        second = await app.resume("r1", answers={request.id: Retry()})
    assert second.status is RunStatus.COMPLETED
    assert second.state.resolution == "paid"
    assert keys == ["r1/1/n/0", "r1/1/n/0"]
    assert request.payload["idempotency_key"] == "r1/1/n/0"


async def test_tool_call_resolved_by_done_returns_the_given_result(store: Store) -> None:
    """A node whose in-doubt call is answered Done(result) gets that result, as its type."""
    runs: list[str] = []

    @tool(effect=Effect.IRREVERSIBLE, timeout=0.05)
    async def fetch(order_id: str) -> Order:
        runs.append(order_id)
        await anyio.sleep(5)
        return Order(order_id=order_id, amount=1)

    async def node(state: S, ctx: NodeContext) -> dict[str, Any]:
        order = await ctx.call_tool(fetch, order_id="42")
        assert isinstance(order, Order)
        return {"resolution": f"{order.order_id}:{order.amount}"}

    app = one_node(node, [fetch], store=store)
    with anyio.fail_after(5):
        first = await app.run(S(), run_id="r1")
        (request,) = first.pending
        done = Done({"order_id": "42", "amount": 7.5})
        second = await app.resume("r1", answers={request.id: done})
    assert second.status is RunStatus.COMPLETED
    assert second.state.resolution == "42:7.5"
    assert runs == ["42"]


async def test_tool_context_cannot_be_passed_by_the_model() -> None:
    """Arguments naming the ToolContext parameter are refused; the tool does not run."""
    ran: list[str] = []

    @tool
    async def charge(amount: float, ctx: ToolContext) -> str:
        ran.append(ctx.idempotency_key)
        return "charged"

    forged = {"amount": 1, "ctx": {"idempotency_key": "forged"}}
    call = ToolCall(name="charge", arguments=forged, id="c1")
    model = ScriptedModel({"a": [ModelResponse(tool_calls=(call,)), "ok"]})
    await single_agent(Agent("a", model=model, tools=[charge])).run(S())
    assert ran == []
    content = model.requests[1].messages[-1].content
    assert '"status":"invalid_arguments"' in content
    assert "ctx: Extra inputs are not permitted" in content


async def test_tool_sync_function_past_its_timeout_has_status_timeout() -> None:
    """A sync tool past its timeout returns control to the run with status timeout."""

    @tool(timeout=0.05)
    def blocking() -> str:
        time.sleep(1)
        return "late"

    began = time.monotonic()
    status, _ = await call_once(blocking)
    assert status == "timeout"
    assert time.monotonic() - began < 0.7


async def test_tool_context_of_send_tasks_names_each_task() -> None:
    """Send-started tasks of one node are distinct callers with distinct keys."""
    seen: list[ToolContext] = []

    @tool
    async def charge(ctx: ToolContext) -> str:
        seen.append(ctx)
        return "ok"

    async def work(payload: int, ctx: NodeContext) -> None:
        await ctx.call_tool(charge)

    graph: Graph[S] = Graph(S)
    graph.add_node("work", work, tools=[charge])
    graph.add_route(START, lambda s: [Send("work", 1), Send("work", 2)], targets=["work"])
    graph.add_edge("work", END)
    await graph.compile(approvals=None).run(S(), run_id="r1")
    assert sorted((c.caller, c.idempotency_key) for c in seen) == [
        ("work[0]", "r1/1/work[0]/0"),
        ("work[1]", "r1/1/work[1]/0"),
    ]


def test_tool_check_arguments_json_form_is_the_validated_arguments_validated_again() -> None:
    """The JSON form (hashed, recorded, shown) comes from validating the validated arguments
    again, as stored runs' request hashes were made, even for a validator that is not
    idempotent; the tool itself gets the arguments validated once."""

    @tool
    async def scale(n: Annotated[int, AfterValidator(lambda v: v * 100)]) -> int:
        return n

    checked = scale.check_arguments({"n": 3})
    assert checked.arguments == {"n": 300}
    assert checked.json == {"n": 30000}  # what 78dcffd's gateway hashed for this call
