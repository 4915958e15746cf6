"""The one exception tree of orchestra.

Every error a user can catch derives from :class:`OrchestraError`::

    OrchestraError
    ├── DefinitionError                 the graph or its configuration is wrong
    │   └── GraphValidationError        every problem found by compile, at once (.problems)
    ├── InputValidationError            the input state of a run does not fit the state model
    ├── ModelError                      a model call failed (.model)
    │   ├── ModelRequestError           the endpoint refused the request, e.g. a 4xx (.status)
    │   ├── ModelResponseError          the endpoint answered something malformed
    │   └── ModelUnavailableError       429, 5xx, connection errors or timeouts, every retry
    ├── ToolCallError                   ctx.call_tool got no result (.tool, .status)
    │   ├── ToolDeniedError             the tool is not on the caller's allowlist
    │   ├── ToolArgumentsError          the arguments do not fit the tool's schema
    │   ├── ToolRejectedError           an operator rejected the call (or its approval expired)
    │   └── ToolConflictError           arbitration gave the call's resources to another call
    ├── RequestExpiredError             ctx.interrupt's question expired unanswered
    ├── RunError                        a run stopped on an error (.run_id, .step, .node)
    │   ├── NodeError                   a node raised; the original is chained as __cause__
    │   │   └── NodeTimeoutError        a node attempt ran past its timeout
    │   ├── RouteError                  a route function raised; the original is __cause__
    │   ├── InvalidUpdateError          a node or route returned something the graph refuses
    │   ├── StateConflictError          two writers set one plain field in one step
    │   ├── AgentOutputError            an agent's final output stayed invalid after its retries
    │   ├── AgentTurnsError             an agent used up its max_turns without a final output
    │   ├── LedgerMismatchError         a replayed step asked for a different call than recorded
    │   ├── ArbitrationError            a custom arbiter raised, or chose calls not in its conflict
    │   ├── LeaseLostError              another process took the run over; this one is fenced
    │   └── RunStoreError               the store failed while the run was recording a step
    └── StoreError                      the run store refused or failed
        ├── StoreFileError              not an orchestra database, corrupted, or a newer schema
        ├── RunNotFoundError            no run with that id
        ├── RunStatusError              the run's status does not allow that (resume completed)
        ├── GraphChangedError           the graph's structure differs from the stored run's
        ├── LeaseHeldError              another live process owns the run (.owner)
        ├── AnswerError                 an answer is for no open request, expired, or invalid
        └── StopAllActiveError          `orchestra stop-all` is in force; no run may start

Messages are built in ``__init__`` from typed arguments; the context stays available as
attributes so callers never parse a message. Control flow (interrupts, aborts) is not part of
this tree: it is never an ordinary ``Exception`` that user code could swallow.
"""

from __future__ import annotations

from collections.abc import Sequence

from .kinds import CallStatus

__all__ = (
    "AgentOutputError",
    "AgentTurnsError",
    "AnswerError",
    "ArbitrationError",
    "DefinitionError",
    "GraphChangedError",
    "GraphValidationError",
    "InputValidationError",
    "InvalidUpdateError",
    "LeaseHeldError",
    "LeaseLostError",
    "LedgerMismatchError",
    "ModelError",
    "ModelRequestError",
    "ModelResponseError",
    "ModelUnavailableError",
    "NodeError",
    "NodeTimeoutError",
    "OrchestraError",
    "RequestExpiredError",
    "RouteError",
    "RunError",
    "RunNotFoundError",
    "RunStatusError",
    "RunStoreError",
    "StateConflictError",
    "StopAllActiveError",
    "StoreError",
    "StoreFileError",
    "ToolArgumentsError",
    "ToolCallError",
    "ToolConflictError",
    "ToolDeniedError",
    "ToolRejectedError",
)


class OrchestraError(Exception):
    """Base class of every error raised by orchestra."""

    def __reduce__(self) -> tuple[object, ...]:
        # subclasses take keyword-only arguments, so rebuild from the message and attributes
        # instead of calling __init__(*args): outcomes can then be pickled and deep-copied
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[OrchestraError], args: tuple[object, ...], state: dict[str, object]
) -> OrchestraError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class DefinitionError(OrchestraError):
    """The graph, a node or a configuration value is defined wrongly."""


class GraphValidationError(DefinitionError):
    """Compile found problems; ``problems`` lists every one of them."""

    def __init__(self, graph: str, problems: Sequence[str]) -> None:
        self.graph = graph
        self.problems = tuple(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"graph {graph!r} has {count} {noun}:\n{lines}")


class InputValidationError(OrchestraError):
    """The input of a run does not validate against the graph's state model."""

    def __init__(self, state_model: str, detail: str) -> None:
        self.state_model = state_model
        self.detail = detail
        super().__init__(f"input does not fit state model {state_model}: {detail}")


class ModelError(OrchestraError):
    """A model call failed; ``model`` names the model."""

    def __init__(self, model: str, detail: str) -> None:
        self.model = model
        self.detail = detail
        super().__init__(f"model {model!r}: {detail}")


class ModelRequestError(ModelError):
    """The endpoint refused the request (a 4xx other than 429, or any other status that is
    not retried); retrying will not help."""

    def __init__(self, model: str, status: int, detail: str) -> None:
        self.status = status
        super().__init__(model, f"request refused with HTTP {status}: {detail}")


class ModelResponseError(ModelError):
    """The endpoint answered with something that is not a chat completion."""


class ModelUnavailableError(ModelError):
    """Rate limits, server errors, connection errors or timeouts outlasted every retry."""

    def __init__(self, model: str, attempts: int, detail: str) -> None:
        self.attempts = attempts
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        super().__init__(model, f"unavailable after {tries}: {detail}")


class ToolCallError(OrchestraError):
    """A tool call made with ``ctx.call_tool`` returned no result.

    ``status`` says why: ``denied``, ``invalid_arguments``, ``error`` (the tool raised),
    ``timeout``, ``too_large``, ``invalid_result``, ``rejected`` or ``conflict``.
    """

    def __init__(self, tool: str, status: str, detail: str) -> None:
        self.tool = tool
        self.status = status
        self.detail = detail
        super().__init__(f"tool {tool!r} {status.replace('_', ' ')}: {detail}")


class ToolDeniedError(ToolCallError):
    """The tool is not on the calling node's or agent's allowlist; it did not run."""

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(tool, CallStatus.DENIED, detail)


class ToolArgumentsError(ToolCallError):
    """The arguments do not validate against the tool's schema; it did not run."""

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(tool, CallStatus.INVALID_ARGUMENTS, detail)


class ToolRejectedError(ToolCallError):
    """An operator rejected the call (``Reject``), or its approval expired; it did not run."""

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(tool, CallStatus.REJECTED, detail)


class ToolConflictError(ToolCallError):
    """Arbitration let another call have the call's resources; it did not run."""

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(tool, CallStatus.CONFLICT, detail)


class RequestExpiredError(OrchestraError):
    """A question asked with ``ctx.interrupt(..., expires_in=...)`` was not answered in
    time. The node may catch it and go on without the answer."""

    def __init__(self, run_id: str, request_id: str, prompt: str) -> None:
        self.run_id = run_id
        self.request_id = request_id
        self.prompt = prompt
        super().__init__(f"run {run_id}, request {request_id} expired unanswered: {prompt!r:.120}")


class RunError(OrchestraError):
    """A run stopped on an error; names the run, and the step and node where there is one."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        step: int | None = None,
        node: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.step = step
        self.node = node
        self.reason = message
        where = [f"run {run_id}"]
        if step is not None:
            where.append(f"step {step}")
        if node is not None:
            where.append(f"node {node!r}")
        super().__init__(f"{', '.join(where)}: {message}")


class NodeError(RunError):
    """A node raised an exception (after its retries); the original is ``__cause__``."""

    def __init__(
        self, *, run_id: str, step: int, node: str, attempts: int, error: BaseException
    ) -> None:
        self.attempts = attempts
        tries = "" if attempts == 1 else f" after {attempts} attempts"
        super().__init__(
            f"node failed{tries}: {type(error).__name__}: {error}",
            run_id=run_id,
            step=step,
            node=node,
        )


class NodeTimeoutError(NodeError):
    """A node attempt did not finish within the node's timeout."""

    def __init__(self, *, run_id: str, step: int, node: str, attempts: int, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            run_id=run_id,
            step=step,
            node=node,
            attempts=attempts,
            error=TimeoutError(f"no result within {timeout:g}s"),
        )


class RouteError(RunError):
    """A route function raised an exception; the original is ``__cause__``."""

    def __init__(self, *, run_id: str, step: int, node: str, error: BaseException) -> None:
        super().__init__(
            f"route after this node failed: {type(error).__name__}: {error}",
            run_id=run_id,
            step=step,
            node=node,
        )


class InvalidUpdateError(RunError):
    """A node or route returned an update, target or value the graph does not accept."""


class StateConflictError(RunError):
    """Two writers set the same plain (reducer-less) field in one step."""

    def __init__(self, *, run_id: str, step: int, field: str, writers: Sequence[str]) -> None:
        self.field = field
        self.writers = tuple(writers)
        names = " and ".join(repr(w) for w in self.writers)
        super().__init__(
            f"field {field!r} has no reducer but was written by {names} in the same step; "
            f"give it a reducer (Annotated[..., append] or a custom function) or let one "
            f"node write it",
            run_id=run_id,
            step=step,
            node=self.writers[0],
        )


class AgentOutputError(RunError):
    """An agent's final output did not validate against its output type, after every retry."""


class AgentTurnsError(RunError):
    """An agent reached ``max_turns`` model turns in one visit without a final output."""


class ArbitrationError(RunError):
    """A conflict could not be settled: a custom arbiter raised, or chose calls that are not
    in its conflict. Nothing of the step's act phase ran."""


class LedgerMismatchError(RunError):
    """Re-running an unfinished step asked for a different call than the ledger recorded
    for the same position: the node is not deterministic up to its calls."""


class LeaseLostError(RunError):
    """Another process took this run over (its lease expired); this process may not write."""

    def __init__(self, *, run_id: str, step: int | None, epoch: int) -> None:
        self.epoch = epoch
        super().__init__(
            f"lost ownership of the run (epoch {epoch} was fenced off by a newer owner); "
            f"nothing more was written",
            run_id=run_id,
            step=step,
        )


class RunStoreError(RunError):
    """The store failed (locked, disk full, I/O error) while the run was recording; the
    original :class:`StoreError` is ``__cause__``. The last committed step is intact."""

    def __init__(self, *, run_id: str, step: int | None, error: BaseException) -> None:
        super().__init__(f"the run store failed: {error}", run_id=run_id, step=step)
        self.__cause__ = error


class StoreError(OrchestraError):
    """The run store refused an operation or failed."""


class StoreFileError(StoreError):
    """The database file cannot be used: not orchestra's, corrupted, or a newer schema."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


class RunNotFoundError(StoreError):
    """No run with that id exists in the store."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} not found")


class RunStatusError(StoreError):
    """The run's status does not allow the operation (e.g. resuming a completed run)."""

    def __init__(self, run_id: str, status: str, action: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(f"run {run_id} is {status}; cannot {action}")


class GraphChangedError(StoreError):
    """The graph's structure hash differs from the one stored with the run."""

    def __init__(self, run_id: str, stored: str, current: str) -> None:
        self.run_id = run_id
        self.stored = stored
        self.current = current
        super().__init__(
            f"run {run_id} was started by a graph with structure {stored}, this graph is "
            f"{current}; its checkpoints may not fit. Pass allow_graph_change=True "
            f"(--allow-graph-change) to resume anyway"
        )


class LeaseHeldError(StoreError):
    """Another live process owns the run."""

    def __init__(self, run_id: str, owner: str, expires_in: float) -> None:
        self.run_id = run_id
        self.owner = owner
        self.expires_in = expires_in
        super().__init__(
            f"run {run_id} is owned by {owner} (lease valid for {max(expires_in, 0):.1f}s "
            f"more); if that process is gone, resume after the lease expires"
        )


class AnswerError(StoreError):
    """An answer given to ``resume`` was refused; nothing was changed."""

    def __init__(self, run_id: str, request_id: str, detail: str) -> None:
        self.run_id = run_id
        self.request_id = request_id
        self.detail = detail
        super().__init__(f"run {run_id}, request {request_id}: {detail}")


class StopAllActiveError(StoreError):
    """``stop-all`` is in force: no run may start or resume until it is released."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"stop-all is in force{why}; no run may start until `orchestra stop-all --release`"
        )
