"""Agents: one model turn per step, tool calls in the step's act phase, validated output.

An agent's conversation is run state the framework keeps (checkpointed with every step, like
the state): it starts with the agent's instructions, and each *visit* (the agent triggered
by an edge or a route) adds the input as a user message. A turn calls the model once; when
the model proposes tool calls, they run in the act phase of the same step (through the
gateway) and the agent is scheduled again next step with their results. A final answer is
validated against the agent's output (a state field, or a pydantic model whose fields are
state fields); an invalid one goes back to the model with the validation error, up to
``output_retries`` times, then the run fails.

Every message carries its provenance in ``name``: ``system`` (the instructions), ``input``
(the run's input to this visit), ``orchestra`` (the framework's feedback), the agent's own
name, or the tool's name. Tool results travel only as ``tool`` messages: data, never
instructions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, TypeAdapter, ValidationError

from ._json import compact_json
from .errors import AgentOutputError, AgentTurnsError
from .models.base import Message, ModelRequest, ModelResponse, ToolCall, ToolSpec
from .safeguards.budgets import Budget
from .safeguards.caps import Cap
from .tools import Tool, describe_validation_error

if TYPE_CHECKING:
    from .models.base import Model
    from .state import StateSchema

__all__ = ("Agent", "AgentTurn", "TurnContext")


class TurnContext(Protocol):
    """What one agent turn needs from the run (a :class:`~orchestra.NodeContext` is one)."""

    @property
    def run_id(self) -> str: ...

    @property
    def step(self) -> int: ...

    @property
    def node(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def state(self) -> Any: ...

    async def call_model(self, model: Model, request: ModelRequest) -> ModelResponse: ...


@dataclass(slots=True)
class AgentTurn:
    """What one turn produced: messages for the conversation, proposed tool calls, a state
    update (the validated final output), and whether the agent runs again next step."""

    messages: list[Message] = field(default_factory=list)
    calls: tuple[ToolCall, ...] = ()
    update: dict[str, Any] | None = None
    again: bool = False


class Agent:
    """An agent node: ``graph.add_node(Agent("billing", model=..., tools=[...]))``.

    ``instructions`` become the system message. ``output`` is where the final answer goes:
    a state field name (the text, validated against the field's type; JSON for non-text
    types), a pydantic model whose fields are state fields (the answer must be that JSON
    object), or None (the answer stays in the conversation). ``input(state_or_payload)``
    renders the user message of a visit (default: the payload of a ``Send``, or the state,
    as JSON). ``max_turns`` bounds the model turns of one visit; ``output_retries`` how often
    an invalid answer is sent back. ``priority`` orders this agent's calls in arbitration.
    ``max_tokens``, ``temperature`` and ``stop`` go to every model request; ``timeout`` and
    ``retry`` apply to each turn as to any node. ``budget`` limits this agent's own spending
    (tokens, cost, tool calls; its ``steps`` are its turns) within the run's. ``memory``, a
    :class:`~orchestra.Cap`, holds its conversation to a number of messages: ``"refuse"``
    fails the step, ``"drop_oldest"`` forgets the oldest turns (the instructions stay), a
    hook ``messages -> messages`` compacts them.
    """

    kind = "agent"

    def __init__(
        self,
        name: str,
        *,
        model: Model,
        tools: Iterable[Tool] = (),
        instructions: str = "",
        output: str | type[BaseModel] | None = None,
        input: Callable[[Any], str] | None = None,
        max_turns: int = 10,
        output_retries: int = 2,
        priority: int = 0,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
        retry: Any = None,
        budget: Budget | None = None,
        memory: Cap | None = None,
    ) -> None:
        self.name = name
        self.budget = budget
        self.memory = memory
        self.model = model
        self.tools = tuple(tools)
        self.instructions = instructions
        self.output = output
        self.input = input
        self.max_turns = max_turns
        self.output_retries = output_retries
        self.priority = priority
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stop = tuple(stop)
        self.timeout = timeout
        self.retry = retry
        # per state model: one Agent may be compiled into graphs over different states
        self._adapters: dict[type[BaseModel], TypeAdapter[Any]] = {}
        self._tool_specs: tuple[ToolSpec, ...] | None = None
        self._system = instructions

    def __repr__(self) -> str:
        return f"<Agent {self.name!r} tools={[t.name for t in self.tools]}>"

    # -- compile ------------------------------------------------------------------------

    def problems(self, state_model: type[BaseModel], schema: StateSchema) -> list[str]:
        """Check the agent against the graph's state; prepare its output validation.

        An answer for a field with a reducer is what one write of that field adds (one item
        for ``append``, a list for ``extend``), validated as such.
        """
        where = f"agent {self.name!r}"
        found: list[str] = []
        if not callable(getattr(self.model, "complete", None)):
            found.append(f"{where}: model {self.model!r} has no async complete(request) method")
        for item in self.tools:
            if not isinstance(item, Tool):
                label = getattr(item, "__name__", repr(item))
                found.append(f"{where}: {label} is not a tool; decorate it with @tool")
        names = [t.name for t in self.tools if isinstance(t, Tool)]
        for name in sorted({n for n in names if names.count(n) > 1}):
            found.append(f"{where}: two tools are named {name!r}")
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            found.append(f"{where}: max_turns must be a positive integer, got {self.max_turns!r}")
        if not isinstance(self.output_retries, int) or self.output_retries < 0:
            found.append(f"{where}: output_retries must be 0 or more, got {self.output_retries!r}")
        if self.memory is not None and not isinstance(self.memory, Cap):
            found.append(f"{where}: memory must be a Cap, got {self.memory!r}")
        if self.budget is not None and not isinstance(self.budget, Budget):
            found.append(f"{where}: budget must be a Budget, got {self.budget!r}")
        if self.input is not None and not callable(self.input):
            found.append(f"{where}: input must be a function of the state, got {self.input!r}")
        fields = state_model.model_fields
        output = self.output
        if isinstance(output, str):
            if output not in fields:
                found.append(
                    f"{where}: output field {output!r} is not a field of {state_model.__name__}"
                )
            else:
                spec = schema.fields.get(output)
                delta = spec.delta_adapter if spec is not None else None
                adapter = delta or TypeAdapter(fields[output].annotation or Any)
                self._adapters[state_model] = adapter
        elif isinstance(output, type) and issubclass(output, BaseModel):
            missing = [name for name in output.model_fields if name not in fields]
            if missing:
                found.append(
                    f"{where}: output {output.__name__} has fields {missing} that "
                    f"{state_model.__name__} does not have; its fields become state updates"
                )
            shape = json.dumps(output.model_json_schema())
            self._system = _join(
                self.instructions,
                f"When you give your final answer, reply with only a JSON object matching "
                f"this schema: {shape}",
            )
        elif output is not None:
            found.append(
                f"{where}: output must be a state field name or a pydantic model, got {output!r}"
            )
        return found

    # -- one turn -------------------------------------------------------------------------

    async def turn(self, arg: Any, ctx: TurnContext, conversation: Sequence[Message]) -> AgentTurn:
        """Take one turn: call the model once on the conversation, then either propose tool
        calls or give the final output."""
        new: list[Message] = []
        if not conversation and self._system:
            new.append(Message(role="system", name="system", content=self._system))
        last = conversation[-1] if conversation else None
        if last is None or (last.role == "assistant" and not last.tool_calls):
            new.append(Message(role="user", name="input", content=self._render_input(arg)))
        history = [*conversation, *new]
        visit = _since_input(history)
        request = ModelRequest(
            messages=tuple(history),
            tools=self._specs(),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            stop=self.stop,
            agent=self.name,
        )
        response = await ctx.call_model(self.model, request)
        calls = tuple(
            call if call.id else call.model_copy(update={"id": f"{ctx.label}-{ctx.step}-{i}"})
            for i, call in enumerate(response.tool_calls)
        )
        new.append(
            Message(role="assistant", name=self.name, content=response.text or "", tool_calls=calls)
        )
        turns = 1 + sum(1 for m in visit if m.role == "assistant")
        if calls:
            if turns >= self.max_turns:
                raise AgentTurnsError(
                    f"agent {self.name!r} proposed tool calls at turn {turns}, its max_turns; "
                    f"it gave no final answer in this visit",
                    run_id=ctx.run_id,
                    step=ctx.step,
                    node=ctx.node,
                )
            return AgentTurn(messages=new, calls=calls, again=True)
        try:
            update = self._output_update(response.text or "", type(ctx.state))
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            retries = sum(1 for m in visit if m.role == "user" and m.name == "orchestra")
            if retries >= self.output_retries or turns >= self.max_turns:
                raise AgentOutputError(
                    f"agent {self.name!r} gave invalid output {retries + 1} times; last: "
                    f"{detail} (answer was {(response.text or '')[:200]!r})",
                    run_id=ctx.run_id,
                    step=ctx.step,
                    node=ctx.node,
                ) from exc
            new.append(
                Message(
                    role="user",
                    name="orchestra",
                    content=f"Your final answer is not valid: {detail}. "
                    f"{self._expected(type(ctx.state))}",
                )
            )
            return AgentTurn(messages=new, again=True)
        return AgentTurn(messages=new, update=update)

    def _specs(self) -> tuple[ToolSpec, ...]:
        specs = self._tool_specs
        if specs is None:
            specs = self._tool_specs = tuple(t.spec() for t in self.tools)
        return specs

    def _render_input(self, arg: Any) -> str:
        if self.input is not None:
            return str(self.input(arg))
        if isinstance(arg, BaseModel):
            return arg.model_dump_json()
        if isinstance(arg, str):
            return arg
        return compact_json(arg)

    def _output_update(self, text: str, state_model: type[BaseModel]) -> dict[str, Any] | None:
        """Validate the final answer; return the state update it makes. Raise
        ValidationError."""
        output = self.output
        if output is None:
            return None
        if isinstance(output, str):
            adapter = self._adapters[state_model]
            try:
                value = adapter.validate_python(text)
            except ValidationError as as_text:
                try:
                    value = adapter.validate_json(_unfenced(text))
                except ValidationError as as_json:
                    # not JSON at all: the type error of the text says more than "invalid JSON"
                    if all(e["type"] == "json_invalid" for e in as_json.errors()):
                        raise as_text from None
                    raise
            return {output: value}
        assert isinstance(output, type)
        model = output.model_validate_json(_unfenced(text))
        return {name: getattr(model, name) for name in type(model).model_fields}

    def _expected(self, state_model: type[BaseModel]) -> str:
        output = self.output
        if isinstance(output, type):
            return f"Reply with only a JSON object matching the {output.__name__} schema."
        adapter = self._adapters.get(state_model)
        if adapter is not None:
            schema = json.dumps(adapter.json_schema())
            return f"Reply with only a value matching this JSON schema: {schema}."
        return "Reply again."


def _since_input(history: Sequence[Message]) -> list[Message]:
    """The messages of the current visit: those after its input message."""
    for i in range(len(history) - 1, -1, -1):
        message = history[i]
        if message.role == "user" and message.name == "input":
            return list(history[i + 1 :])
    return list(history)


def _unfenced(text: str) -> str:
    """Strip a Markdown code fence around a JSON answer (models often add one)."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```"):
        body = body[3:-3]
        first, _, rest = body.partition("\n")
        return rest if first.strip().isalpha() or not first.strip() else body
    return body


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)
