"""Tools: ``@tool``, their effects, resource keys and argument schemas.

A tool's argument schema comes from its signature through pydantic, so the model is told
exactly what it may pass and every call is validated before it runs. A parameter annotated
:class:`ToolContext` is not an argument: the gateway fills it in with the call's run, step
and idempotency key.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import anyio
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model
from pydantic_core import to_jsonable_python

from ._json import compact_json
from .errors import ToolArgumentsError
from .kinds import NOT_RUN as NOT_RUN
from .kinds import CallStatus as CallStatus
from .models.base import ToolSpec
from .specs import Effect as Effect
from .state import describe_validation_error as describe_validation_error

__all__ = (
    "NOT_RUN",
    "CallStatus",
    "CheckedArguments",
    "Effect",
    "Tool",
    "ToolContext",
    "tool",
    "tool_map",
)

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RESULT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckedArguments:
    """Arguments a tool accepts (:meth:`Tool.check_arguments`): ``arguments`` as the tool
    gets them, ``json`` their JSON form (what is recorded, hashed and shown to people) and
    ``resources`` the resource keys a call with them touches."""

    arguments: dict[str, Any]
    json: dict[str, Any]
    resources: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolContext:
    """What a tool may learn about its call: pass ``idempotency_key`` to external systems
    so that a retried request is recognised by them too."""

    run_id: str
    step: int
    caller: str
    call_id: str
    idempotency_key: str


class Tool:
    """A function the gateway may call for an agent or a node; made by :func:`tool`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        effect: Effect = Effect.WRITE,
        resources: Callable[[dict[str, Any]], Iterable[str]] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        arbitration: Any = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@tool needs a function, got {fn!r}")
        self.fn = fn
        self.name = name or fn.__name__
        self.description = description or _first_paragraph(inspect.getdoc(fn))
        self.effect = Effect(effect)
        self.resources = resources
        if arbitration is not None:
            from .safeguards.arbitration import policy_problem

            problem = policy_problem(arbitration)
            if problem is not None:
                raise ValueError(f"tool {self.name!r}: arbitration: {problem}")
        self.arbitration = arbitration
        if timeout is not None and timeout <= 0:
            raise ValueError(f"tool {self.name!r}: timeout must be positive, got {timeout}")
        if max_result_bytes <= 0:
            raise ValueError(f"tool {self.name!r}: max_result_bytes must be positive")
        self.timeout = timeout
        self.max_result_bytes = max_result_bytes
        self.is_async = inspect.iscoroutinefunction(fn)
        self._spec: ToolSpec | None = None
        self.arguments, self.context_param, self.result = _signature_models(self.name, fn)
        functools.update_wrapper(self, fn)

    def spec(self) -> ToolSpec:
        """Describe the tool to a model: name, description, JSON schema of its arguments."""
        spec = self._spec
        if spec is None:  # made once: a JSON schema costs far more than a model turn
            schema = self.arguments.model_json_schema()
            schema.pop("title", None)
            spec = self._spec = ToolSpec(
                name=self.name, description=self.description, parameters=schema
            )
        return spec

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate arguments against the schema; return them as the tool will get them.

        Raises pydantic's ValidationError.
        """
        model = self.arguments.model_validate(dict(arguments))
        return {name: getattr(model, name) for name in type(model).model_fields}

    def check_arguments(self, arguments: object) -> CheckedArguments:
        """Check arguments (a model's, or an operator's ``Edit``) the one way every caller
        does: a JSON object, valid against the schema, that the resources function accepts.

        Raises :class:`~orchestra.errors.ToolArgumentsError`, whose ``detail`` says what is
        wrong; the caller turns it into a refusal (the call is not made, the answer is not
        taken).
        """
        if not isinstance(arguments, Mapping):
            raise ToolArgumentsError(
                self.name, f"arguments must be a JSON object, got {type(arguments).__name__}"
            )
        try:
            validated = self.validate(arguments)
            # the JSON form (what is hashed, recorded and shown) is the validated arguments'
            # own dump, validated again, as it has always been: a stored run's request hashes
            # stay the same
            json_arguments = self.arguments.model_validate(validated).model_dump(mode="json")
        except ValidationError as exc:
            raise ToolArgumentsError(
                self.name, describe_validation_error(exc, "arguments")
            ) from exc
        try:
            resources = self.resource_keys(json_arguments)
        except Exception as exc:  # the user's resources function: its caller is told
            raise ToolArgumentsError(
                self.name, f"the tool's resources function failed: {type(exc).__name__}: {exc}"
            ) from exc
        return CheckedArguments(
            arguments=validated,
            json=json_arguments,
            resources=resources,
        )

    def resource_keys(self, arguments: Mapping[str, Any]) -> frozenset[str]:
        """The resources a call with these (validated, JSON-form) arguments touches."""
        if self.resources is None:
            return frozenset()
        keys = self.resources(dict(arguments))
        if isinstance(keys, str):
            return frozenset((keys,))
        return frozenset(str(k) for k in keys)

    async def invoke(self, arguments: Mapping[str, Any], context: ToolContext) -> Any:
        """Run the function (a sync one in a worker thread) with validated arguments."""
        kwargs = dict(arguments)
        if self.context_param is not None:
            kwargs[self.context_param] = context
        if self.is_async:
            return await self.fn(**kwargs)
        call = functools.partial(self.fn, **kwargs)
        if self.effect is Effect.IRREVERSIBLE:
            # a thread cannot be interrupted: abandoning it would leave an irreversible call
            # running unrecorded, so it is waited for (past its timeout or an abort) and its
            # real result recorded
            with anyio.CancelScope(shield=True):
                return await anyio.to_thread.run_sync(call)
        # abandoned on cancellation: the call's timeout or an abort returns control to the
        # run at once (a read or write may run to its end in the background)
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)

    def dump_result(self, value: Any) -> Any:
        """Return the result in JSON form, validated against the return annotation if any.

        Raises ValidationError (result does not fit the annotation) or TypeError/ValueError
        (not serializable).
        """
        if self.result is not None:
            return self.result.dump_python(self.result.validate_python(value), mode="json")
        return to_jsonable_python(value)

    def load_result(self, data: Any) -> Any:
        """Rebuild a result from its JSON form (live and replayed calls return the same)."""
        if self.result is not None:
            return self.result.validate_python(data)
        return data

    def result_size(self, data: Any) -> int:
        return len(compact_json(data).encode())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly (outside a run: no gateway, no ledger)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Tool {self.name!r} effect={self.effect.value}>"


def tool_map(tools: Iterable[Any]) -> Mapping[str, Tool]:
    """Index tools by name (anything that is not a Tool is left out)."""
    return {t.name: t for t in tools if isinstance(t, Tool)}


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    effect: Effect = Effect.WRITE,
    resources: Callable[[dict[str, Any]], Iterable[str]] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    arbitration: Any = None,
) -> Any:
    """Make a function (sync or async) a tool: ``@tool`` or ``@tool(effect=Effect.READ)``.

    ``effect`` defaults to ``WRITE`` (a tool not declared read-only is assumed to change
    something). ``resources(arguments)`` returns the resource keys a call touches, for
    arbitration; ``arbitration`` overrides the graph's policy for conflicts this tool's
    calls are in (a policy name or an arbiter function). ``timeout`` bounds each call in
    seconds (None: no bound); a result whose JSON is larger than ``max_result_bytes`` is
    refused. The description shown to models is the docstring's first paragraph. Sync
    functions run in a worker thread; a thread cannot be interrupted, so a sync
    ``IRREVERSIBLE`` tool is waited for even past its timeout or an abort, and its real
    result recorded (an async one is cancelled, and is in doubt).
    """

    def make(function: Callable[..., Any]) -> Tool:
        return Tool(
            function,
            name=name,
            description=description,
            effect=effect,
            resources=resources,
            timeout=timeout,
            max_result_bytes=max_result_bytes,
            arbitration=arbitration,
        )

    return make(fn) if fn is not None else make


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n", 1)[0].replace("\n", " ")


def _signature_models(
    name: str, fn: Callable[..., Any]
) -> tuple[type[BaseModel], str | None, TypeAdapter[Any] | None]:
    """Build the arguments model from the signature; find the ToolContext parameter and the
    return annotation's adapter."""
    signature = inspect.signature(fn)
    try:
        hints = get_type_hints(fn, include_extras=True)
    except Exception as exc:  # a forward reference that cannot be resolved
        raise TypeError(f"tool {name!r}: cannot resolve its annotations: {exc}") from exc
    fields: dict[str, Any] = {}
    context_param = None
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"tool {name!r}: *args and **kwargs cannot be described to a model; "
                f"name every parameter"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(f"tool {name!r}: parameter {param.name!r} is positional-only")
        annotation = hints.get(param.name, Any)
        if annotation is ToolContext:
            context_param = param.name
            continue
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    returns = hints.get("return", Any)
    result = None if returns in (Any, inspect.Signature.empty) else TypeAdapter(returns)
    return model, context_param, result
