"""The chat-completions wire format: the request body orchestra sends, and what it reads
back (a completion's text, tool calls and usage; an error's detail).

A body that is not a chat completion raises :class:`~orchestra.errors.ModelResponseError`
naming what is missing; tool-call arguments that are not a JSON object stay as their text, so
the gateway can tell the model what was wrong.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ..errors import ModelResponseError
from .base import (
    Message,
    ModelRequest,
    ModelResponse,
    TokenUsage,
    ToolCall,
    ToolSpec,
    estimate_request_tokens,
    estimate_tokens,
)

__all__ = ("error_detail", "parse_completion", "request_body")

_DETAIL_LIMIT = 500


def request_body(model: str, request: ModelRequest) -> dict[str, Any]:
    """Build the JSON body of a chat completion; keys with no value are left out."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_wire_message(message) for message in request.messages],
    }
    if request.tools:
        body["tools"] = [_wire_tool(spec) for spec in request.tools]
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.stop:
        body["stop"] = list(request.stop)
    return body


def _wire_message(message: Message) -> dict[str, Any]:
    # ``name`` (provenance) is not sent: it stays internal, and some servers reject it
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["content"] = message.content or None
        wire["tool_calls"] = [_wire_tool_call(call) for call in message.tool_calls]
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    return wire


def _wire_tool_call(call: ToolCall) -> dict[str, Any]:
    # raw-string arguments go back verbatim, so the model sees what it actually wrote
    arguments = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
    wire: dict[str, Any] = {
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }
    if call.id:
        wire = {"id": call.id, **wire}
    return wire


def _wire_tool(spec: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": spec.name}
    if spec.description:
        function["description"] = spec.description
    if spec.parameters:
        function["parameters"] = spec.parameters
    return {"type": "function", "function": function}


def parse_completion(model: str, request: ModelRequest, response: httpx.Response) -> ModelResponse:
    """Read a chat completion; raise ModelResponseError naming what is missing."""
    try:
        body = response.json()
    except ValueError:
        raise ModelResponseError(
            model, f"the response is not JSON: {_truncate(response.text) or '(empty body)'}"
        ) from None
    if not isinstance(body, dict):
        raise ModelResponseError(
            model, f"the response is a JSON {type(body).__name__}, not an object"
        )
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        # some gateways answer 200 with an error object instead of a completion
        error = _error_message(body)
        why = f" (the server says: {error})" if error else ""
        raise ModelResponseError(model, f"the response has no choices{why}")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise ModelResponseError(model, "the response has no choices[0].message")
    text = _text(message.get("content"))
    calls = _tool_calls(model, message)
    finish_reason = choice.get("finish_reason")
    reported = body.get("model")
    return ModelResponse(
        text=text,
        tool_calls=calls,
        usage=_usage(body.get("usage"), request, text, calls),
        model=reported if isinstance(reported, str) and reported else model,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
    )


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # some servers answer in content parts: keep the text ones
        parts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "".join(parts) if parts else None
    return None


def _tool_calls(model: str, message: dict[str, Any]) -> tuple[ToolCall, ...]:
    raw_calls = message.get("tool_calls")
    where = "choices[0].message.tool_calls"
    if raw_calls is None and isinstance(message.get("function_call"), dict):
        # the pre-tools shape: one call, without an id (the agent assigns one)
        raw_calls = [{"function": message["function_call"]}]
        where = "choices[0].message.function_call"
    if raw_calls is None:
        return ()
    if not isinstance(raw_calls, list):
        raise ModelResponseError(model, f"{where} is not a list")
    calls = []
    for index, raw in enumerate(raw_calls):
        function = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(function, dict):
            raise ModelResponseError(model, f"{where}[{index}] has no function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ModelResponseError(model, f"{where}[{index}] has no function name")
        call_id = raw.get("id")
        calls.append(
            ToolCall(
                name=name,
                arguments=_arguments(function.get("arguments")),
                id=call_id if isinstance(call_id, str) else "",
            )
        )
    return tuple(calls)


def _arguments(raw: Any) -> dict[str, Any] | str:
    """Parse tool-call arguments; keep anything that is not a JSON object as raw text, so the
    gateway can tell the model what was wrong instead of the call failing here."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw  # some servers send the object itself, not a JSON string
    if not isinstance(raw, str):
        return json.dumps(raw)
    if not raw.strip():
        return {}  # a tool without parameters is often called with ""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw
    return parsed if isinstance(parsed, dict) else raw


def _usage(
    raw: Any, request: ModelRequest, text: str | None, calls: tuple[ToolCall, ...]
) -> TokenUsage:
    """Read the reported usage; estimate it when the server reports none, because zero
    tokens would let every call slip past a token budget."""
    if isinstance(raw, dict):
        prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
        if isinstance(prompt, int) or isinstance(completion, int):
            return TokenUsage(
                input_tokens=prompt if isinstance(prompt, int) else 0,
                output_tokens=completion if isinstance(completion, int) else 0,
            )
    output = estimate_tokens(text or "")
    for call in calls:
        args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
        output += 3 + estimate_tokens(call.name) + estimate_tokens(args)
    return TokenUsage(input_tokens=estimate_request_tokens(request), output_tokens=max(output, 1))


def error_detail(response: httpx.Response) -> str:
    """Return the server's error message: OpenAI's ``{"error": {"message"}}`` or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = _error_message(body) if isinstance(body, dict) else None
    return _truncate(message or response.text) or response.reason_phrase or "(empty body)"


def _error_message(body: dict[str, Any]) -> str | None:
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    for candidate in (error, body.get("message"), body.get("detail")):
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


def _truncate(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"
