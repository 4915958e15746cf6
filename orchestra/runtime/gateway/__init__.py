"""The tool gateway: the one door to side effects (see :mod:`.gateway`)."""

from .gateway import NOT_RUN as NOT_RUN
from .gateway import CallOutcome as CallOutcome
from .gateway import Gateway as Gateway

__all__ = ("NOT_RUN", "CallOutcome", "Gateway")
