"""ScriptedModel: the deterministic fake model (list, per-agent dict, function), its usage
counting and its errors."""

from __future__ import annotations

import pytest

from orchestra.errors import ModelError
from orchestra.models import (
    Message,
    ModelRequest,
    ModelResponse,
    ScriptedModel,
    TokenUsage,
    ToolCall,
)

pytestmark = pytest.mark.anyio


def ask(text: str = "hello", *, agent: str | None = None, answered: int = 0) -> ModelRequest:
    """A request with one user message and ``answered`` earlier assistant turns."""
    messages = [Message(role="user", name="input", content=text)]
    for i in range(answered):
        messages.append(Message(role="assistant", name=agent, content=f"answer {i}"))
        messages.append(Message(role="user", name="input", content=f"more {i}"))
    return ModelRequest(messages=tuple(messages), agent=agent)


async def test_scripted_list_answers_in_call_order() -> None:
    """A list script is given out one response per call, in order."""
    model = ScriptedModel(["one", "two", "three"])
    texts = [(await model.complete(ask())).text for _ in range(3)]
    assert texts == ["one", "two", "three"]


async def test_scripted_list_ignores_the_agent_and_turn() -> None:
    """A list script advances per call, whichever agent asks and at whatever turn."""
    model = ScriptedModel(["first", "second"])
    first = await model.complete(ask(agent="a", answered=3))
    second = await model.complete(ask(agent="b"))
    assert (first.text, second.text) == ("first", "second")


async def test_scripted_dict_answers_each_agent_by_its_turn() -> None:
    """A dict script answers an agent with the entry at its turn in the conversation."""
    model = ScriptedModel({"a": ["a0", "a1", "a2"], "b": ["b0", "b1"]})
    assert (await model.complete(ask(agent="a", answered=2))).text == "a2"
    assert (await model.complete(ask(agent="b", answered=0))).text == "b0"
    assert (await model.complete(ask(agent="a", answered=0))).text == "a0"
    assert (await model.complete(ask(agent="b", answered=1))).text == "b1"


async def test_scripted_dict_gives_the_same_answer_for_the_same_turn() -> None:
    """A dict script has no cursor: asking again at the same turn repeats the answer."""
    model = ScriptedModel({"a": ["a0", "a1"]})
    again = [(await model.complete(ask(agent="a", answered=1))).text for _ in range(2)]
    assert again == ["a1", "a1"]


async def test_scripted_function_gets_the_request() -> None:
    """A plain function script is called with each request and its answer returned."""
    model = ScriptedModel(lambda request: f"echo {request.messages[-1].content}")
    response = await model.complete(ask("ping"))
    assert response.text == "echo ping"


async def test_scripted_async_function_is_awaited() -> None:
    """An async function script is awaited."""

    async def script(request: ModelRequest) -> ModelResponse:
        return ModelResponse(text=f"async {len(request.messages)}")

    model = ScriptedModel(script)
    assert (await model.complete(ask(answered=1))).text == "async 3"


async def test_scripted_string_stands_for_a_text_response() -> None:
    """A string in the script becomes a text response, finish reason stop, named model."""
    model = ScriptedModel(["plain"], name="fake-1")
    response = await model.complete(ask())
    assert isinstance(response, ModelResponse)
    assert (response.text, response.tool_calls) == ("plain", ())
    assert (response.model, response.finish_reason) == ("fake-1", "stop")


async def test_scripted_tool_calls_finish_with_tool_calls() -> None:
    """A response proposing tool calls keeps them and finishes with reason tool_calls."""
    call = ToolCall(name="lookup", arguments={"order_id": "42"})
    model = ScriptedModel([ModelResponse(tool_calls=(call,))])
    response = await model.complete(ask())
    assert response.tool_calls == (call,)
    assert response.finish_reason == "tool_calls"


async def test_scripted_records_every_request() -> None:
    """``requests`` holds every request received, in order."""
    model = ScriptedModel(["x", "y"])
    first, second = ask("first"), ask("second")
    await model.complete(first)
    await model.complete(second)
    assert model.requests == [first, second]


async def test_scripted_usage_is_counted_never_zero() -> None:
    """Usage is counted from the request and the answer: both above zero."""
    model = ScriptedModel(["an answer"])
    usage = (await model.complete(ask())).usage
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0


async def test_scripted_usage_grows_with_the_prompt() -> None:
    """A longer prompt counts more input tokens."""
    model = ScriptedModel(["ok", "ok"])
    short = (await model.complete(ask("hi"))).usage.input_tokens
    long = (await model.complete(ask("hi " * 200))).usage.input_tokens
    assert long > short + 100


async def test_scripted_usage_grows_with_the_answer() -> None:
    """A longer answer counts more output tokens."""
    model = ScriptedModel(["ok", "ok " * 100])
    short = (await model.complete(ask())).usage.output_tokens
    long = (await model.complete(ask())).usage.output_tokens
    assert long > short + 50


async def test_scripted_tool_calls_count_output_tokens() -> None:
    """A response with only tool calls still counts output tokens."""
    model = ScriptedModel([ModelResponse(tool_calls=(ToolCall(name="t", arguments={"a": 1}),))])
    assert (await model.complete(ask())).usage.output_tokens > 0


async def test_scripted_explicit_usage_is_kept() -> None:
    """A response that sets its usage keeps it as given."""
    usage = TokenUsage(input_tokens=7, output_tokens=3)
    model = ScriptedModel([ModelResponse(text="x", usage=usage)])
    assert (await model.complete(ask("a long prompt " * 50))).usage == usage


async def test_scripted_explicit_model_and_finish_reason_are_kept() -> None:
    """A response naming its model and finish reason keeps both."""
    model = ScriptedModel([ModelResponse(text="x", model="other", finish_reason="length")])
    response = await model.complete(ask())
    assert (response.model, response.finish_reason) == ("other", "length")


async def test_scripted_list_running_out_raises_model_error() -> None:
    """A call past the end of a list script raises ModelError saying how many there were."""
    model = ScriptedModel(["only"], name="fake")
    await model.complete(ask())
    with pytest.raises(ModelError, match=r"has 1 responses; call 2 has none") as caught:
        await model.complete(ask())
    assert caught.value.model == "fake"


async def test_scripted_dict_running_out_names_the_agent() -> None:
    """A turn past an agent's script raises ModelError naming the agent."""
    model = ScriptedModel({"billing": ["one"]})
    with pytest.raises(ModelError, match=r"for agent 'billing' has 1 responses; call 2"):
        await model.complete(ask(agent="billing", answered=1))


async def test_scripted_dict_unknown_agent_raises_model_error() -> None:
    """An agent with no entry in a dict script raises ModelError naming it and the known."""
    model = ScriptedModel({"triage": ["x"]})
    with pytest.raises(ModelError, match=r"no script for agent 'billing' \(scripted: 'triage'\)"):
        await model.complete(ask(agent="billing"))


async def test_scripted_function_returning_a_non_response_raises_model_error() -> None:
    """A script answer that is neither a ModelResponse nor a str raises ModelError."""
    model = ScriptedModel(lambda request: 42)
    with pytest.raises(ModelError, match="gave int"):
        await model.complete(ask())


def test_scripted_refuses_a_string_script() -> None:
    """A bare string is not a script (it would be read one character at a time)."""
    with pytest.raises(TypeError, match="list of responses"):
        ScriptedModel("hello")  # type: ignore[arg-type]
