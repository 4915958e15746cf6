"""Model providers: the :class:`Model` protocol, :class:`ScriptedModel` (deterministic, for
tests and examples) and :class:`OpenAICompatible` (chat completions over httpx: OpenAI,
Ollama, vLLM, llama.cpp server)."""

from typing import TYPE_CHECKING, Any

from .base import Message as Message
from .base import Model as Model
from .base import ModelRequest as ModelRequest
from .base import ModelResponse as ModelResponse
from .base import TokenUsage as TokenUsage
from .base import ToolCall as ToolCall
from .base import ToolSpec as ToolSpec
from .base import estimate_tokens as estimate_tokens
from .scripted import ScriptedModel as ScriptedModel

if TYPE_CHECKING:
    from .openai import OpenAICompatible as OpenAICompatible

__all__ = (
    "Message",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "OpenAICompatible",
    "ScriptedModel",
    "TokenUsage",
    "ToolCall",
    "ToolSpec",
    "estimate_tokens",
)


def __getattr__(name: str) -> Any:
    # httpx costs tens of milliseconds to import: load it only when the client is used
    if name == "OpenAICompatible":
        from .openai import OpenAICompatible

        return OpenAICompatible
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
