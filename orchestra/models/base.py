"""The model contract: one async method from a request to a response.

Like an httpx transport, a model is a narrow protocol with fakes shipped: ``ScriptedModel``
(deterministic, for tests, examples and the demo) and ``OpenAICompatible`` (the
chat-completions wire format over httpx). Requests and responses are frozen pydantic models,
so the ledger stores and replays them exactly.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = (
    "Message",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "TokenUsage",
    "ToolCall",
    "ToolSpec",
    "estimate_tokens",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ToolCall(_Frozen):
    """A tool call proposed by a model.

    ``arguments`` is the parsed JSON object, or the raw text when the model produced
    something that is not a JSON object (the gateway then refuses the call and tells the
    model why). ``id`` is assigned by the agent when the model gives none.
    """

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    id: str = ""


Role = Literal["system", "user", "assistant", "tool"]


class Message(_Frozen):
    """One message of a conversation, with its provenance.

    ``role`` is the wire role; ``name`` says who wrote it: the agent's name for ``assistant``
    messages, the tool's name for ``tool`` messages (tool results are data, never
    instructions), ``"system"`` or ``"user"`` otherwise (the framework, or the run's input).
    """

    role: Role
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


class ToolSpec(_Frozen):
    """What a model is told about a tool: its name, description and JSON argument schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModelRequest(_Frozen):
    """One call to a model. ``agent`` names the calling agent (not sent over the wire)."""

    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    agent: str | None = None

    @property
    def turn(self) -> int:
        """How many answers the model has already given in this conversation."""
        return sum(1 for m in self.messages if m.role == "assistant")


class TokenUsage(_Frozen):
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


class ModelResponse(_Frozen):
    """What a model answered: text, tool calls (or both), usage, model name, finish reason."""

    text: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    usage: TokenUsage = TokenUsage()
    model: str | None = None
    finish_reason: str | None = None


@runtime_checkable
class Model(Protocol):
    """A chat model: ``await model.complete(request)`` returns one response.

    ``name`` identifies the model (for usage records and, later, the price table).
    Implementations raise :class:`~orchestra.errors.ModelError` subclasses on failure.
    """

    name: str

    async def complete(self, request: ModelRequest) -> ModelResponse: ...


def estimate_tokens(text: str) -> int:
    """Estimate how many tokens ``text`` is (about four characters each, never zero for
    non-empty text); used for scripted usage and for reserving budget before a call."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_request_tokens(request: ModelRequest) -> int:
    """Estimate the prompt tokens of a request: messages, tool calls and tool schemas."""
    total = 3  # the reply's priming
    for message in request.messages:
        total += 4 + estimate_tokens(message.content)
        for call in message.tool_calls:
            args = call.arguments if isinstance(call.arguments, str) else str(call.arguments)
            total += 3 + estimate_tokens(call.name) + estimate_tokens(args)
    for spec in request.tools:
        total += (
            8
            + estimate_tokens(spec.name + spec.description)
            + estimate_tokens(str(spec.parameters))
        )
    return total
