"""Formatting a run's open requests: what each asks, and how an operator answers it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from ..checkpoint import compact_json
from ..safeguards.interrupts import Request
from ..store.base import RequestRow
from .format import format_ago

__all__ = (
    "answer_hint",
    "format_call",
    "request_details",
    "request_json",
    "requests_table",
    "stored_request",
)

# what answers each kind of request takes, as the Python API spells them
_ANSWERS = {
    "in_doubt": (
        ("Done(result=...)", "it took effect; pass what it returned"),
        ("Retry()", "it did not; run it again, with the same idempotency key"),
        ("Abort()", "stop the run"),
    ),
    "loop": (
        ("Continue()", "it is not a loop (or worth its cost): go on, watched afresh"),
        ("Abort()", "stop the run"),
    ),
}


def stored_request(row: RequestRow) -> Request:
    """Rebuild the :class:`Request` a run raised from its stored row."""
    return Request.from_row(row)


def format_call(tool: str, arguments: Any) -> str:
    """Write a tool call as code: ``refund(order_id="42", amount=30.0)``."""
    if not isinstance(arguments, dict):
        return f"{tool}({compact_json(arguments)})"
    args = ", ".join(f"{name}={compact_json(value)}" for name, value in arguments.items())
    return f"{tool}({args})"


def request_details(request: Request) -> str:
    """Say what an operator checks before answering: for an in-doubt call, the exact call
    and the idempotency key to look for in the outside system; otherwise the payload."""
    payload = request.payload
    if request.kind == "in_doubt":
        call = format_call(str(payload.get("tool")), payload.get("arguments"))
        key = payload.get("idempotency_key")
        return f"{call}, idempotency key {key}" if key else call
    return compact_json(payload)


def request_json(request: Request) -> dict[str, Any]:
    """Return a request as a JSON-ready dict: its fields plus what it asks, in words."""
    return {
        "id": request.id,
        "kind": request.kind,
        "node": request.node,
        "step": request.step,
        "asks": request.describe(),
        "payload": request.payload,
        "schema": request.schema,
        "created_at": request.created_at,
        "expires_at": request.expires_at,
        "answers": [answer for answer, _ in _ANSWERS.get(request.kind, ())],
    }


def requests_table(requests: Sequence[Request], now: float) -> Table:
    """Build the table of a run's open requests: id, kind, node, step, age, what each asks."""
    count = len(requests)
    table = Table(
        title=f"{count} open request{'' if count == 1 else 's'}: the run waits for an answer",
        title_justify="left",
        title_style="bold yellow",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("request id", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("node")
    table.add_column("step", justify="right")
    table.add_column("asked", justify="right", no_wrap=True)
    table.add_column("asks")
    for request in requests:
        asks = Text(request.describe())
        asks.append("\n" + request_details(request), style="dim")
        table.add_row(
            request.id,
            Text(request.kind, style="yellow"),
            request.node,
            str(request.step),
            format_ago(request.created_at, now),
            asks,
        )
    return table


def answer_hint(run_id: str, requests: Sequence[Request], app_ref: str | None) -> list[str]:
    """Say how to answer the (one or more) requests: resume the run from Python with answers."""
    first = requests[0]
    kinds = sorted({r.kind for r in requests})
    options = list(dict.fromkeys(item for kind in kinds for item in _ANSWERS.get(kind, ())))
    example = options[0][0] if options else "..."
    imports = sorted({answer.split("(")[0] for answer, _ in options})
    app = f" ({app_ref})" if app_ref else ""
    lines = [f"answer from Python, with the run's app{app} on this database:"]
    if imports:
        lines.append(f"  from orchestra import {', '.join(imports)}")
    run, request = json.dumps(run_id), json.dumps(first.id)
    lines.append(f"  await app.resume({run}, answers={{{request}: {example}}})")
    for answer, meaning in options:
        lines.append(f"  {answer + ':':<18} {meaning}")
    return lines
