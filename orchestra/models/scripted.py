"""ScriptedModel: a deterministic model for tests, examples and the demo."""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ..errors import ModelError
from .base import (
    ModelRequest,
    ModelResponse,
    TokenUsage,
    estimate_request_tokens,
    estimate_tokens,
)

__all__ = ("ScriptedModel",)

Reply = ModelResponse | str
Script = (
    Sequence[Reply]
    | Mapping[str, Sequence[Reply]]
    | Callable[[ModelRequest], Reply | Awaitable[Reply]]
)


class ScriptedModel:
    """Answer from a script instead of a network model.

    ``script`` is one of:

    - a list of responses, given out in call order (across every agent that shares the model);
    - a dict from agent name to that agent's list, indexed by the agent's turn in its
      conversation, so the answers stay right after a resume in another process;
    - a function ``request -> response`` (plain or async), for scripts that depend on the
      conversation.

    A string stands for ``ModelResponse(text=...)``. Token usage is counted from the request
    and the response text (about four characters a token), never reported as zero; a
    response that sets ``usage`` (even to zeros) keeps it. ``requests`` records every
    request received.
    """

    def __init__(self, script: Script, *, name: str = "scripted") -> None:
        if isinstance(script, str | bytes):
            raise TypeError("ScriptedModel takes a list of responses, a dict or a function")
        self.name = name
        self._script = script
        self._cursor = 0
        self.requests: list[ModelRequest] = []

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Return the scripted answer to ``request``, with its token usage counted."""
        self.requests.append(request)
        reply = await self._next(request)
        if isinstance(reply, str):
            reply = ModelResponse(text=reply)
        elif not isinstance(reply, ModelResponse):
            raise ModelError(
                self.name, f"the script gave {type(reply).__name__}, not a ModelResponse or str"
            )
        update: dict[str, Any] = {}
        if reply.model is None:
            update["model"] = self.name
        if reply.finish_reason is None:
            update["finish_reason"] = "tool_calls" if reply.tool_calls else "stop"
        if "usage" not in reply.model_fields_set:
            output = _output_tokens(reply)
            if request.max_tokens is not None and output > request.max_tokens:
                # a real model stops at max_tokens: the answer is cut, and so is its usage
                output = request.max_tokens
                update["finish_reason"] = "length"
            update["usage"] = TokenUsage(
                input_tokens=estimate_request_tokens(request), output_tokens=output
            )
        return reply.model_copy(update=update) if update else reply

    async def _next(self, request: ModelRequest) -> Any:
        script = self._script
        if callable(script):
            reply = script(request)
            if inspect.isawaitable(reply):
                reply = await reply
            return reply
        if isinstance(script, Mapping):
            agent = request.agent or ""
            if agent not in script:
                known = ", ".join(map(repr, script)) or "none"
                raise ModelError(self.name, f"no script for agent {agent!r} (scripted: {known})")
            replies, index = script[agent], request.turn
            who = f" for agent {agent!r}"
        else:
            replies, index = script, self._cursor
            self._cursor += 1
            who = ""
        if index >= len(replies):
            raise ModelError(
                self.name,
                f"the script{who} has {len(replies)} responses; call {index + 1} has none",
            )
        return replies[index]


def _output_tokens(reply: ModelResponse) -> int:
    tokens = estimate_tokens(reply.text or "")
    for call in reply.tool_calls:
        args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
        tokens += 3 + estimate_tokens(call.name) + estimate_tokens(args)
    return max(tokens, 1)
