"""What a node sees besides its input: the run, the step, usage so far and a bound logger."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._logging import get_logger
from .outcome import Usage

if TYPE_CHECKING:
    from .models.base import Model, ModelRequest, ModelResponse, ToolCall
    from .tools import Tool

__all__ = ("Caller", "NodeContext")


@dataclass(slots=True)
class Caller:
    """Who is calling: one task of a step, with its allowlist and its call counter."""

    node: str
    label: str
    step: int
    tools: Mapping[str, Tool]
    seq: int = 0
    priority: int = 0

    def next_seq(self) -> int:
        """Return the position of the caller's next call (model, tool or question)."""
        seq = self.seq
        self.seq += 1
        return seq


if TYPE_CHECKING:  # (typing only: protocols cost a millisecond at import)

    class CallResult(Protocol):
        """What the gateway returns for one tool call."""

        value: Any

        def raise_for_status(self) -> None: ...

    class GatewayPort(Protocol):
        """The runtime's side of a context: the one door to tools, models and people."""

        async def call(self, caller: Caller, call: ToolCall) -> CallResult: ...

        async def model_call(
            self, caller: Caller, model: Model, request: ModelRequest
        ) -> ModelResponse: ...

        async def question(
            self, caller: Caller, prompt: str, schema: Any, expires_in: float | None
        ) -> Any: ...


class NodeContext:
    """Passed to every node as its second argument.

    ``state`` is the run's state at the start of the step (for a task started by ``Send``, the
    node's first argument is the payload and ``ctx.state`` the run state). Treat both as
    read-only: a node changes the state only by returning an update.
    """

    __slots__ = (
        "_caller",
        "_gateway",
        "_label",
        "_log",
        "_tools",
        "_usage",
        "node",
        "run_id",
        "state",
        "step",
        "task",
    )

    def __init__(
        self,
        *,
        run_id: str,
        step: int,
        node: str,
        task: int,
        state: Any,
        usage: Callable[[], Usage],
        gateway: GatewayPort | None = None,
        label: str | None = None,
        tools: tuple[Tool, ...] = (),
    ) -> None:
        self.run_id = run_id
        self.step = step
        self.node = node
        self.task = task
        self.state = state
        self._usage = usage
        self._log: Any = None
        self._gateway = gateway
        self._label = label or node
        self._tools = tools
        self._caller: Caller | None = None  # made on the first call: most nodes make none

    @property
    def usage(self) -> Usage:
        """What the run has consumed so far (a snapshot)."""
        return self._usage()

    @property
    def log(self) -> Any:
        """A structlog logger bound to ``run_id``, ``step`` and ``node``."""
        if self._log is None:
            self._log = get_logger("orchestra.node").bind(
                run_id=self.run_id, step=self.step, node=self.node
            )
        return self._log

    async def call_tool(
        self, tool: str | Tool, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> Any:
        """Call a tool on this node's allowlist through the gateway; return its result.

        ``await ctx.call_tool("refund", order_id="42", amount=10.0)``. The call is validated,
        recorded in the ledger (a re-run of this step replays it instead of calling again)
        and reported as an event. Raises :class:`~orchestra.errors.ToolDeniedError` for a
        tool not given to the node (``add_node(..., tools=[...])``),
        :class:`~orchestra.errors.ToolArgumentsError` for arguments that do not fit, and
        :class:`~orchestra.errors.ToolCallError` when the tool failed, timed out or returned
        something invalid or too large.
        """
        from .models.base import ToolCall

        if self._gateway is None:
            raise RuntimeError("ctx.call_tool works only inside a running node")
        name = tool if isinstance(tool, str) else tool.name
        args = {**(arguments or {}), **kwargs}
        caller = self._get_caller()
        call = ToolCall(name=name, arguments=args, id=f"{caller.label}-{self.step}-{caller.seq}")
        outcome = await self._gateway.call(caller, call)
        outcome.raise_for_status()
        known = caller.tools[name]
        return known.load_result(outcome.value)

    async def interrupt(
        self, prompt: str, *, schema: Any = None, expires_in: float | None = None
    ) -> Any:
        """Ask a person; return their answer, validated against ``schema``.

        The first time, the step stops here and the run returns ``interrupted`` with a
        ``question`` request (``outcome.pending``); ``app.resume(run_id, answers={id:
        value})`` (or ``orchestra answer RUN REQ --json ...``) checks the answer against
        ``schema`` and re-runs the node, and this call returns it. Calls the node made
        before the question replay from the ledger; they are not made again. ``schema``:
        None (any JSON), ``str``, ``int``, ``float``, ``bool``, ``dict``, ``list`` or a
        module-level class (a pydantic model, a dataclass). ``expires_in``: seconds after
        which the question can no longer be answered; the resumed node then gets
        :class:`~orchestra.errors.RequestExpiredError` here. The prompt must be the same
        when the node runs again (it identifies the question).
        """
        if self._gateway is None:
            raise RuntimeError("ctx.interrupt works only inside a running node")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"ctx.interrupt needs a non-empty prompt, got {prompt!r}")
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or expires_in <= 0
        ):
            raise ValueError(f"expires_in must be a positive number of seconds, got {expires_in!r}")
        return await self._gateway.question(self._get_caller(), prompt, schema, expires_in)

    @property
    def label(self) -> str:
        """The task's name in events and checkpoints (``worker[2]`` for a Send task)."""
        return self._label

    async def call_model(self, model: Model, request: ModelRequest) -> ModelResponse:
        """Call a model through the ledger: a re-run of this step replays its answer, and
        the call is metered and held to the run's budgets (what an Agent's turn uses)."""
        from .models.base import ModelRequest

        if self._gateway is None:
            raise RuntimeError("ctx.call_model works only inside a running node")
        if not callable(getattr(model, "complete", None)):
            raise TypeError(f"ctx.call_model needs a Model (with complete()), got {model!r:.80}")
        if not isinstance(request, ModelRequest):
            raise TypeError(f"ctx.call_model needs a ModelRequest, got {type(request).__name__}")
        return await self._gateway.model_call(self._get_caller(), model, request)

    def _get_caller(self) -> Caller:
        caller = self._caller
        if caller is None:
            from .tools import tool_map  # tools bring pydantic models: loaded when used

            caller = self._caller = Caller(self.node, self._label, self.step, tool_map(self._tools))
        return caller

    def __repr__(self) -> str:
        return f"<NodeContext run={self.run_id} step={self.step} node={self.node!r}>"
