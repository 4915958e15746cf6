"""The tool gateway: the one door to side effects (see :mod:`.gateway`).

One module per step of a call: :mod:`.calls` (permission, validation), :mod:`.approval`,
:mod:`.arbitration`, :mod:`.execute` (ledger, execution); :mod:`.gateway` composes them.
"""

from ...tools import NOT_RUN as NOT_RUN
from .calls import CallOutcome as CallOutcome
from .gateway import Gateway as Gateway

__all__ = ("NOT_RUN", "CallOutcome", "Gateway")
