"""The chat-completions wire format on its own: the request body built from a ModelRequest,
a completion read back from a real httpx.Response (text, tool calls, usage), malformed bodies
refused naming what is missing, and an error response's detail."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from orchestra.errors import ModelResponseError
from orchestra.models import Message, ModelRequest, ToolCall, ToolSpec
from orchestra.models.base import estimate_request_tokens
from orchestra.models.chat_format import error_detail, parse_completion, request_body

REQUEST = ModelRequest(messages=(Message(role="user", content="hello"),))


def response(
    body: Any = None, *, status: int = 200, content: bytes | None = None
) -> httpx.Response:
    """A real response to a POST, with ``body`` as JSON or ``content`` as raw bytes."""
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    if content is not None:
        return httpx.Response(status, content=content, request=request)
    return httpx.Response(status, json=body, request=request)


def completion(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"choices": [{"message": message, "finish_reason": "stop"}], **extra}


def parse(body: Any) -> Any:
    return parse_completion("gpt-test", REQUEST, response(body))


# -- request_body ------------------------------------------------------------------------------


def test_request_body_holds_only_model_and_messages_when_nothing_else_is_set() -> None:
    """Options that are not set are left out of the body."""
    assert request_body("gpt-test", REQUEST) == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hello"}],
    }


def test_request_body_sends_max_tokens_temperature_and_stop_when_set() -> None:
    """Each option that is set goes into the body; ``stop`` as a list."""
    request = REQUEST.model_copy(update={"max_tokens": 64, "temperature": 0.2, "stop": ("END",)})
    body = request_body("gpt-test", request)
    assert (body["max_tokens"], body["temperature"], body["stop"]) == (64, 0.2, ["END"])


def test_request_body_sends_a_zero_temperature() -> None:
    """Temperature 0 is a setting, not a missing value."""
    body = request_body("gpt-test", REQUEST.model_copy(update={"temperature": 0.0}))
    assert body["temperature"] == 0.0


def test_request_body_describes_tools_as_functions() -> None:
    """Each tool spec becomes a function with its name, description and parameters."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    spec = ToolSpec(name="weather", description="Look up the weather.", parameters=schema)
    body = request_body("gpt-test", REQUEST.model_copy(update={"tools": (spec,)}))
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Look up the weather.",
                "parameters": schema,
            },
        }
    ]


def test_request_body_leaves_out_an_empty_tool_description_and_schema() -> None:
    """A tool with no description and no parameters is sent by name alone."""
    body = request_body("gpt-test", REQUEST.model_copy(update={"tools": (ToolSpec(name="ping"),)}))
    assert body["tools"] == [{"type": "function", "function": {"name": "ping"}}]


def test_request_body_does_not_send_message_provenance() -> None:
    """A message's ``name`` stays internal: some servers reject it."""
    request = ModelRequest(messages=(Message(role="user", content="hi", name="user"),))
    assert request_body("gpt-test", request)["messages"] == [{"role": "user", "content": "hi"}]


def test_request_body_sends_an_assistant_tool_call_with_json_string_arguments() -> None:
    """An assistant's tool call is sent with its id and its arguments as a JSON string, and
    an empty text as null content."""
    call = ToolCall(name="weather", arguments={"city": "Oslo"}, id="call-1")
    request = ModelRequest(messages=(Message(role="assistant", tool_calls=(call,)),))
    (wire,) = request_body("gpt-test", request)["messages"]
    assert wire == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }


def test_request_body_sends_raw_text_arguments_back_verbatim() -> None:
    """Arguments kept as text go back exactly as the model wrote them."""
    call = ToolCall(name="weather", arguments="{city: Oslo", id="call-1")
    request = ModelRequest(messages=(Message(role="assistant", tool_calls=(call,)),))
    (wire,) = request_body("gpt-test", request)["messages"]
    assert wire["tool_calls"][0]["function"]["arguments"] == "{city: Oslo"


def test_request_body_leaves_out_a_missing_tool_call_id() -> None:
    """A tool call without an id is sent without one."""
    call = ToolCall(name="ping")
    request = ModelRequest(messages=(Message(role="assistant", tool_calls=(call,)),))
    (wire,) = request_body("gpt-test", request)["messages"]
    assert "id" not in wire["tool_calls"][0]


def test_request_body_sends_a_tool_result_with_its_call_id() -> None:
    """A tool message names the call it answers."""
    message = Message(role="tool", content='{"result": 3}', name="add", tool_call_id="call-1")
    (wire,) = request_body("gpt-test", ModelRequest(messages=(message,)))["messages"]
    assert wire == {"role": "tool", "content": '{"result": 3}', "tool_call_id": "call-1"}


# -- parse_completion: what is read -------------------------------------------------------------


def test_parse_completion_reads_the_text() -> None:
    """The first choice's message content is the answer's text."""
    assert parse(completion({"role": "assistant", "content": "hi there"})).text == "hi there"


def test_parse_completion_joins_the_text_of_content_parts() -> None:
    """Content sent as parts keeps the text parts, joined."""
    parts = [{"type": "text", "text": "one "}, {"type": "image"}, {"type": "text", "text": "two"}]
    assert parse(completion({"content": parts})).text == "one two"


def test_parse_completion_reads_the_reported_model_and_finish_reason() -> None:
    """The model the server names and the finish reason are kept."""
    answer = parse(completion({"content": "x"}, model="gpt-test-2024"))
    assert (answer.model, answer.finish_reason) == ("gpt-test-2024", "stop")


def test_parse_completion_falls_back_to_the_asked_model_name() -> None:
    """Without a reported model the answer names the model asked."""
    assert parse(completion({"content": "x"})).model == "gpt-test"


def test_parse_completion_parses_json_string_arguments_of_tool_calls() -> None:
    """Tool-call arguments sent as a JSON string become an object, with the call's id."""
    message = {
        "content": None,
        "tool_calls": [
            {"id": "c1", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "function": {"name": "time", "arguments": '{"zone": "UTC"}'}},
        ],
    }
    answer = parse(completion(message))
    assert answer.text is None
    assert answer.tool_calls == (
        ToolCall(name="weather", arguments={"city": "Oslo"}, id="c1"),
        ToolCall(name="time", arguments={"zone": "UTC"}, id="c2"),
    )


@pytest.mark.parametrize("raw", ["[1, 2]", '"Oslo"', "{city: Oslo"], ids=["list", "str", "bad"])
def test_parse_completion_keeps_arguments_that_are_not_a_json_object_as_text(raw: str) -> None:
    """Arguments that are not a JSON object stay as the model's text, for the gateway to
    refuse with a reason."""
    message = {"tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": raw}}]}
    assert parse(completion(message)).tool_calls[0].arguments == raw


def test_parse_completion_reads_empty_arguments_as_no_arguments() -> None:
    """An empty arguments string is a call without arguments."""
    message = {"tool_calls": [{"id": "c1", "function": {"name": "ping", "arguments": ""}}]}
    assert parse(completion(message)).tool_calls[0].arguments == {}


def test_parse_completion_takes_arguments_sent_as_an_object() -> None:
    """Arguments sent as the object itself are taken as they are."""
    message = {"tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]}
    call = parse(completion(message)).tool_calls[0]
    assert (call.arguments, call.id) == ({"a": 1}, "")


def test_parse_completion_reads_the_legacy_function_call() -> None:
    """The pre-tools ``function_call`` shape is one call without an id."""
    message = {"function_call": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    assert parse(completion(message)).tool_calls == (
        ToolCall(name="weather", arguments={"city": "Oslo"}),
    )


def test_parse_completion_reads_the_reported_usage() -> None:
    """Reported prompt and completion tokens are the answer's usage."""
    body = completion({"content": "x"}, usage={"prompt_tokens": 120, "completion_tokens": 7})
    usage = parse(body).usage
    assert (usage.input_tokens, usage.output_tokens) == (120, 7)


def test_parse_completion_estimates_usage_the_server_does_not_report() -> None:
    """Without usage the tokens are estimated from the request and the answer, never zero."""
    usage = parse(completion({"content": "a" * 40})).usage
    assert usage.input_tokens == estimate_request_tokens(REQUEST)
    assert usage.output_tokens == 10


def test_parse_completion_estimates_at_least_one_output_token() -> None:
    """An empty answer without reported usage still counts one output token."""
    assert parse(completion({"content": ""})).usage.output_tokens == 1


def test_parse_completion_counts_tool_calls_in_estimated_usage() -> None:
    """The estimate counts the tool calls' names and arguments, not only the text."""
    bare = parse(completion({"content": "ok"})).usage.output_tokens
    message = {
        "content": "ok",
        "tool_calls": [{"function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
    }
    assert parse(completion(message)).usage.output_tokens > bare


# -- parse_completion: what is refused -------------------------------------------------------------


def test_parse_completion_refuses_a_body_that_is_not_json() -> None:
    """A body that is not JSON raises ModelResponseError quoting it."""
    bad = response(content=b"<html>gateway timeout</html>")
    with pytest.raises(ModelResponseError, match="not JSON: <html>gateway timeout</html>") as info:
        parse_completion("gpt-test", REQUEST, bad)
    assert info.value.model == "gpt-test"


def test_parse_completion_refuses_an_empty_body() -> None:
    """An empty body is named as such."""
    with pytest.raises(ModelResponseError, match=r"not JSON: \(empty body\)"):
        parse_completion("gpt-test", REQUEST, response(content=b""))


def test_parse_completion_refuses_a_json_value_that_is_not_an_object() -> None:
    """A JSON array is not a completion."""
    with pytest.raises(ModelResponseError, match="a JSON list, not an object"):
        parse([{"choices": []}])


@pytest.mark.parametrize("body", [{}, {"choices": []}, {"choices": "x"}], ids=str)
def test_parse_completion_refuses_a_body_without_choices(body: dict[str, Any]) -> None:
    """A body with no (or empty) choices raises ModelResponseError saying so."""
    with pytest.raises(ModelResponseError, match=r"the response has no choices$"):
        parse(body)


def test_parse_completion_quotes_an_error_sent_instead_of_choices() -> None:
    """A 200 carrying an error object quotes the server's message."""
    body = {"error": {"message": "quota exceeded", "type": "insufficient_quota"}}
    with pytest.raises(ModelResponseError, match=r"no choices \(the server says: quota exceeded\)"):
        parse(body)


def test_parse_completion_refuses_a_choice_without_a_message() -> None:
    """A first choice with no message object names choices[0].message."""
    with pytest.raises(ModelResponseError, match=r"no choices\[0\]\.message"):
        parse({"choices": [{"text": "legacy completion"}]})


def test_parse_completion_refuses_tool_calls_that_are_not_a_list() -> None:
    """A tool_calls value that is not a list is named."""
    with pytest.raises(
        ModelResponseError, match=r"choices\[0\]\.message\.tool_calls is not a list"
    ):
        parse(completion({"tool_calls": {"function": {"name": "x"}}}))


def test_parse_completion_refuses_a_tool_call_without_a_function() -> None:
    """A tool call with no function object is named by its index."""
    message = {"tool_calls": [{"function": {"name": "ok"}}, {"id": "c2"}]}
    with pytest.raises(ModelResponseError, match=r"tool_calls\[1\] has no function$"):
        parse(completion(message))


def test_parse_completion_refuses_a_tool_call_without_a_function_name() -> None:
    """A function without a name is named by its index."""
    message = {"tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}
    with pytest.raises(ModelResponseError, match=r"tool_calls\[0\] has no function name"):
        parse(completion(message))


# -- error_detail ----------------------------------------------------------------------------------


def test_error_detail_reads_an_openai_error_message() -> None:
    """OpenAI's ``{"error": {"message"}}`` gives the message alone."""
    body = {"error": {"message": "Invalid API key", "code": "invalid_api_key"}}
    assert error_detail(response(body, status=401)) == "Invalid API key"


@pytest.mark.parametrize("key", ["message", "detail"])
def test_error_detail_reads_a_top_level_message_or_detail(key: str) -> None:
    """Servers that send ``message`` or ``detail`` at the top level are read too."""
    assert error_detail(response({key: "model not found"}, status=404)) == "model not found"


def test_error_detail_reads_an_error_given_as_a_string() -> None:
    """An ``error`` that is a plain string is the message."""
    assert error_detail(response({"error": "overloaded"}, status=503)) == "overloaded"


def test_error_detail_falls_back_to_the_body_text() -> None:
    """A body that is not JSON is quoted, stripped of surrounding space."""
    assert error_detail(response(content=b"  upstream broke\n", status=502)) == "upstream broke"


def test_error_detail_quotes_a_json_body_without_a_message() -> None:
    """A JSON body with no message is quoted whole."""
    failed = response(content=b'{"code": 7}', status=500)
    assert error_detail(failed) == '{"code": 7}'


def test_error_detail_of_an_empty_body_is_the_reason_phrase() -> None:
    """With no body at all the HTTP reason phrase is the detail."""
    assert error_detail(response(content=b"", status=503)) == "Service Unavailable"


def test_error_detail_truncates_a_long_message() -> None:
    """A long message is cut to 500 characters, the last an ellipsis."""
    detail = error_detail(response({"error": {"message": "x" * 2000}}, status=400))
    assert len(detail) == 500
    assert detail == "x" * 499 + "…"


def test_error_detail_keeps_a_message_of_exactly_the_limit() -> None:
    """A message of exactly 500 characters is kept whole."""
    assert error_detail(response({"error": {"message": "y" * 500}}, status=400)) == "y" * 500
