"""orchestra: run multi-agent AI systems in production.

Define a graph over a typed state, compile it (every problem reported at once), run it in
supersteps. Everything public is importable from here or from a named subpackage
(``orchestra.errors``, ``orchestra.events``, ``orchestra.models``).
"""

import typing as _typing

from ._version import __version__ as __version__
from .app import CompiledGraph as CompiledGraph
from .context import NodeContext as NodeContext
from .errors import GraphValidationError as GraphValidationError
from .errors import NodeError as NodeError
from .errors import OrchestraError as OrchestraError
from .errors import RunError as RunError
from .errors import StateConflictError as StateConflictError
from .graph import Graph as Graph
from .outcome import RunOutcome as RunOutcome
from .outcome import RunStatus as RunStatus
from .outcome import Usage as Usage
from .reducers import Reducer as Reducer
from .reducers import add as add
from .reducers import append as append
from .reducers import extend as extend
from .reducers import merge as merge
from .reducers import reducer as reducer
from .safeguards.approvals import Approvals as Approvals
from .safeguards.arbitration import Arbitration as Arbitration
from .safeguards.arbitration import Conflict as Conflict
from .safeguards.budgets import Budget as Budget
from .safeguards.budgets import register_price as register_price
from .safeguards.caps import Cap as Cap
from .safeguards.interrupts import Abort as Abort
from .safeguards.interrupts import Approve as Approve
from .safeguards.interrupts import Choose as Choose
from .safeguards.interrupts import Continue as Continue
from .safeguards.interrupts import Done as Done
from .safeguards.interrupts import Edit as Edit
from .safeguards.interrupts import Reject as Reject
from .safeguards.interrupts import Request as Request
from .safeguards.interrupts import Retry as Retry
from .specs import END as END
from .specs import START as START
from .specs import Command as Command
from .specs import RetryPolicy as RetryPolicy
from .specs import Send as Send

if _typing.TYPE_CHECKING:
    from .agents import Agent as Agent
    from .tools import Effect as Effect
    from .tools import Tool as Tool
    from .tools import ToolContext as ToolContext
    from .tools import tool as tool

__all__ = (
    "END",
    "START",
    "Abort",
    "Agent",
    "Approvals",
    "Approve",
    "Arbitration",
    "Budget",
    "Cap",
    "Choose",
    "Command",
    "CompiledGraph",
    "Conflict",
    "Continue",
    "Done",
    "Edit",
    "Effect",
    "Graph",
    "GraphValidationError",
    "NodeContext",
    "NodeError",
    "OrchestraError",
    "Reducer",
    "Reject",
    "Request",
    "Retry",
    "RetryPolicy",
    "RunError",
    "RunOutcome",
    "RunStatus",
    "Send",
    "StateConflictError",
    "Tool",
    "ToolContext",
    "Usage",
    "__version__",
    "add",
    "append",
    "extend",
    "merge",
    "reducer",
    "register_price",
    "tool",
)


# Agents and tools bring the model types with them (pydantic models that take tens of
# milliseconds to build): loaded on first use, so a graph without agents does not pay.
_LAZY = {
    "Agent": "agents",
    "Effect": "tools",
    "Tool": "tools",
    "ToolContext": "tools",
    "tool": "tools",
}


if not _typing.TYPE_CHECKING:  # type checkers see the imports above, and typos

    def __getattr__(name: str) -> _typing.Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'orchestra' has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
