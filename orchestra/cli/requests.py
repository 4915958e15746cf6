"""Formatting open requests: what each asks, and how an operator answers it (a CLI verb,
or an answer passed to ``app.resume`` from Python)."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from .._json import compact_json
from ..safeguards.interrupts import AnswerKind, Request
from ..store.base import RequestKind, RequestRow
from .format import format_age, format_ago

__all__ = (
    "Way",
    "answer_commands",
    "answer_hint",
    "format_answer",
    "format_call",
    "format_expiry",
    "format_recorded",
    "format_schema",
    "request_details",
    "request_json",
    "requests_table",
    "stored_request",
    "verbs_hint",
    "ways_to_answer",
)


@dataclass(frozen=True, slots=True)
class Way:
    """One way to answer a kind of request: the CLI verb's arguments after ``orchestra VERB
    RUN REQ`` (``{example}`` stands for an example filled in from the request), the answer
    as the Python API spells it, and what it means."""

    verb: str
    options: str
    python: str
    meaning: str


_GO_ON_OR_STOP: dict[str, tuple[Way, ...]] = {
    RequestKind.LOOP: (
        Way("approve", "", "Continue()", "it is not a loop (or worth its cost): go on"),
        Way("reject", "--reason TEXT", "Abort(reason=...)", "stop the run"),
    ),
    RequestKind.BEFORE: (
        Way("approve", "", "Continue()", "go on: run the step"),
        Way("reject", "--reason TEXT", "Abort(reason=...)", "stop the run before it"),
    ),
    RequestKind.AFTER: (
        Way("approve", "", "Continue()", "go on from the step"),
        Way("reject", "--reason TEXT", "Abort(reason=...)", "stop the run after it"),
    ),
}

# how each kind of request is answered, first the way an example shows (keyed by RequestKind
# members; looked up by a request's kind, which a hand-built request may hold as a bare value)
_ANSWERS: dict[str, tuple[Way, ...]] = {
    RequestKind.APPROVAL: (
        Way("approve", "", "Approve()", "let the call run, once, as asked"),
        Way("reject", "--reason TEXT", "Reject(reason=...)", "refuse it: the caller is told why"),
        Way(
            "edit",
            "--args {example}",
            "Edit(arguments={...})",
            "run it with these arguments instead (the whole set, checked against the tool)",
        ),
    ),
    RequestKind.QUESTION: (
        Way("answer", "--json JSON", "a value of its schema", "a value that fits the schema"),
    ),
    RequestKind.CONFLICT: (
        Way(
            "answer",
            "--json {example}",
            'Choose("KEY", ...)',
            "the keys of the calls that run, in this order; the others lose",
        ),
    ),
    RequestKind.IN_DOUBT: (
        Way(
            "resolve",
            "--done --result JSON",
            "Done(result=...)",
            "it took effect; pass what it returned",
        ),
        Way(
            "resolve",
            "--retry",
            "Retry()",
            "it did not; run it again, with the same idempotency key",
        ),
        Way("resolve", "--abort --reason TEXT", "Abort()", "stop the run"),
    ),
    **_GO_ON_OR_STOP,
}


def ways_to_answer(kind: str) -> tuple[Way, ...]:
    """Return the ways a request of ``kind`` is answered (none for a kind unknown here)."""
    return _ANSWERS.get(kind, ())


def stored_request(row: RequestRow) -> Request:
    """Rebuild the :class:`Request` a run raised from its stored row."""
    return Request.from_row(row)


def format_call(tool: str, arguments: Any) -> str:
    """Write a tool call as code: ``refund(order_id="42", amount=30.0)``."""
    if not isinstance(arguments, dict):
        return f"{tool}({compact_json(arguments)})"
    args = ", ".join(f"{name}={compact_json(value)}" for name, value in arguments.items())
    return f"{tool}({args})"


def format_schema(schema: Any, defs: Mapping[str, Any] | None = None) -> str:
    """Summarize a JSON schema in one line: ``{carrier: string, days: integer, note?: string}``
    (``?``: optional), ``[integer]``, ``"a" | "b"``; no schema is "any JSON value"."""
    if not isinstance(schema, dict) or not schema:
        return "any JSON value"
    if defs is None:
        defs = schema.get("$defs") or {}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        return format_schema(target, defs) if isinstance(target, dict) else ref
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(format_schema(part, defs) for part in schema[key])
    kind = schema.get("type")
    if kind == "object" and isinstance(schema.get("properties"), dict):
        required = set(schema.get("required") or ())
        fields = [
            f"{name}{'' if name in required else '?'}: {format_schema(prop, defs)}"
            for name, prop in schema["properties"].items()
        ]
        return "{" + ", ".join(fields) + "}"
    if kind == "array":
        items = schema.get("items")
        return f"[{format_schema(items, defs)}]" if isinstance(items, dict) else "array"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    return str(kind) if kind else "any JSON value"


def request_details(request: Request) -> str:
    """Say what an operator checks before answering: for a tool call (in doubt, or held for
    approval) the exact call; for a question the answer's shape; for a conflict each call;
    otherwise the payload."""
    payload = request.payload
    if request.kind == RequestKind.IN_DOUBT:
        call = format_call(str(payload.get("tool")), payload.get("arguments"))
        key = payload.get("idempotency_key")
        return f"{call}, idempotency key {key}" if key else call
    if request.kind == RequestKind.APPROVAL:
        call = format_call(str(payload.get("tool")), payload.get("arguments"))
        resources = ", ".join(payload.get("resources") or ())
        return f"{call} on {resources}" if resources else call
    if request.kind == RequestKind.QUESTION:
        shape = f"answer: {format_schema(request.schema)}"
        problem = payload.get("problem")
        return f"{shape} ({problem})" if problem else shape
    if request.kind == RequestKind.CONFLICT:
        return "\n".join(
            f"{call.get('key')}: {format_call(str(call.get('tool')), call.get('arguments'))}"
            for call in payload.get("calls") or ()
        )
    return compact_json(payload)


def _example(request: Request) -> str:
    """The example a way's options show, filled in from the request."""
    if request.kind == RequestKind.APPROVAL:
        return compact_json(request.payload.get("arguments") or {})
    return '{"run": [KEY, ...]}'


def _placeholder(kind: str) -> str:
    return "'{\"run\": [KEY, ...]}'" if kind == RequestKind.CONFLICT else "JSON"


def _command(request: Request, way: Way, *, example: bool = True) -> str:
    options = way.options
    if "{example}" in options:
        filled = shlex.quote(_example(request)) if example else _placeholder(request.kind)
        options = options.replace("{example}", filled)
    run, req = shlex.quote(request.run_id), shlex.quote(request.id)
    return f"orchestra {way.verb} {run} {req}" + (f" {options}" if options else "")


def answer_commands(request: Request, *, example: bool = True) -> list[str]:
    """Return the CLI commands that answer ``request``, one per way (``example``: fill in
    an example argument where there is one, e.g. the call's arguments for ``edit``)."""
    return [_command(request, way, example=example) for way in ways_to_answer(request.kind)]


def verbs_hint(kinds: Sequence[str]) -> list[str]:
    """Say which CLI verbs answer each of ``kinds`` (for requests of many runs)."""
    rows = []
    for kind in dict.fromkeys(kinds):
        ways = ways_to_answer(kind)
        if ways:
            verbs = [f"orchestra {way.verb} RUN REQ {way.options}".rstrip() for way in ways]
            rows.append((kind, ", ".join(verbs).replace("{example}", _placeholder(kind))))
    return _aligned(rows, "  ")


def format_answer(answer: Mapping[str, Any]) -> str:
    """Say in a few words what a recorded answer (its stored JSON, decoded) says:
    ``approve``, ``reject: too much``, ``value {"days":2}``, ``done, result "ok"``."""
    said = str(answer.get("answer", "?"))
    reason = answer.get("reason")
    if said in (AnswerKind.ABORT, AnswerKind.REJECT) and reason:
        return f"{said}: {reason}"
    if said == AnswerKind.DONE:
        return f"done, result {json.dumps(answer.get('result'), ensure_ascii=False)}"
    if said == AnswerKind.EDIT:
        return f"edit, arguments {compact_json(answer.get('arguments'))}"
    if said == AnswerKind.VALUE:
        return f"value {compact_json(answer.get('value'))}"
    if said == AnswerKind.CHOOSE:
        return f"choose {', '.join(map(str, answer.get('run') or ())) or 'none'}"
    return said


def format_recorded(request: Request, answer: Mapping[str, Any]) -> str:
    """Say what an answer just recorded for ``request`` will do, in the request's terms."""
    payload = request.payload
    said = answer.get("answer")
    reason = answer.get("reason")
    call = format_call(str(payload.get("tool")), payload.get("arguments"))
    if request.kind == RequestKind.APPROVAL:
        if said == AnswerKind.APPROVE:
            return f"approved {call}"
        if said == AnswerKind.REJECT:
            return f"rejected {call}: {reason}"
        if said == AnswerKind.EDIT:
            edited = format_call(str(payload.get("tool")), answer.get("arguments"))
            return f"approved {edited} (edited; it asked for {call})"
    if request.kind in (RequestKind.LOOP, RequestKind.BEFORE, RequestKind.AFTER):
        if said == AnswerKind.CONTINUE:
            return f"go on ({request.describe()})"
        if said == AnswerKind.ABORT:
            return f"stop the run: {reason}"
    if request.kind == RequestKind.QUESTION and said == AnswerKind.VALUE:
        return f"answered {payload.get('prompt')!r}: {compact_json(answer.get('value'))}"
    if request.kind == RequestKind.CONFLICT and said == AnswerKind.CHOOSE:
        chosen = [str(key) for key in answer.get("run") or ()]
        others = [
            str(c.get("key")) for c in payload.get("calls") or () if c.get("key") not in chosen
        ]
        ran = f"chose {', '.join(chosen)} to run" if chosen else "chose no call to run"
        if not others:
            return ran
        return f"{ran}; {', '.join(others)} {'loses' if len(others) == 1 else 'lose'}"
    if request.kind == RequestKind.IN_DOUBT:
        if said == AnswerKind.DONE:
            return f"{call} took effect, result {json.dumps(answer.get('result'))}"
        if said == AnswerKind.RETRY:
            return f"{call} did not take effect: it runs again on resume"
        if said == AnswerKind.ABORT:
            return f"stop the run: {reason}"
    return format_answer(answer)


def format_expiry(request: Request, now: float) -> str:
    """Say when a request expires: ``in 12m``, ``expired``, or nothing if it does not."""
    if request.expires_at is None:
        return ""
    if request.expired(now):
        return "expired"
    return f"in {format_age(request.expires_at - now)}"


def request_json(request: Request, now: float | None = None) -> dict[str, Any]:
    """Return a request as a JSON-ready dict: its fields, what it asks in words, whether it
    expired, and the answers it takes (Python) and the commands that give them (CLI)."""
    ways = ways_to_answer(request.kind)
    return {
        "run_id": request.run_id,
        "id": request.id,
        "kind": request.kind,
        "node": request.node,
        "step": request.step,
        "asks": request.describe(),
        "payload": request.payload,
        "schema": request.schema,
        "created_at": request.created_at,
        "expires_at": request.expires_at,
        "expired": request.expired(time.time() if now is None else now),
        "answers": list(dict.fromkeys(way.python for way in ways)),
        "commands": answer_commands(request),
    }


def requests_table(
    requests: Sequence[Request], now: float, *, title: str | None = None, runs: bool = False
) -> Table:
    """Build the table of open requests: (run,) id, kind, node, step, age, (expiry,) what
    each asks. ``runs``: a column for the run (requests of several runs); the expiry column
    shows when a request expires."""
    count = len(requests)
    if title is None:
        title = f"{count} open request{'' if count == 1 else 's'}: the run waits for an answer"
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold yellow",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    expiring = any(request.expires_at is not None for request in requests)
    if runs:
        table.add_column("run", no_wrap=True)
    table.add_column("request id", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("node")
    table.add_column("step", justify="right")
    table.add_column("asked", justify="right", no_wrap=True)
    if expiring:
        table.add_column("expires", justify="right", no_wrap=True)
    table.add_column("asks")
    for request in requests:
        asks = Text(request.describe())
        asks.append("\n" + request_details(request), style="dim")
        cells: list[Any] = [request.run_id] if runs else []
        cells += [
            request.id,
            Text(request.kind, style="yellow"),
            request.node,
            str(request.step),
            format_ago(request.created_at, now),
        ]
        if expiring:
            expiry = format_expiry(request, now)
            cells.append(Text(expiry, style="red" if expiry == "expired" else ""))
        table.add_row(*cells, asks)
    return table


def _aligned(rows: Sequence[tuple[str, str]], indent: str) -> list[str]:
    """Two columns, the second aligned (a first column too long for it pushes it right)."""
    width = max((len(left) for left, _ in rows if len(left) <= 72), default=0)
    return [f"{indent}{left:<{width}}  {right}".rstrip() for left, right in rows]


def answer_hint(run_id: str, requests: Sequence[Request], app_ref: str | None) -> list[str]:
    """Say how to answer the (one or more) requests of a run: the CLI verb for each way,
    then the same from Python, with the run's app."""
    lines: list[str] = []
    known = [request for request in requests if ways_to_answer(request.kind)]
    if known:
        resume = f"orchestra resume {shlex.quote(run_id)}"
        lines.append(f"answer with the CLI, then `{resume}` (or add --resume to the last answer):")
        for request in known:
            rows = [(_command(request, way), way.meaning) for way in ways_to_answer(request.kind)]
            if len(known) > 1:
                lines.append(f"  {request.id} ({request.kind}):")
            lines += _aligned(rows, "    " if len(known) > 1 else "  ")
    first = requests[0]
    ways = [way for kind in sorted({r.kind for r in requests}) for way in ways_to_answer(kind)]
    pythons = list(dict.fromkeys(way.python for way in ways))
    imports = sorted({p.split("(")[0] for p in pythons if "(" in p})
    app = f" ({app_ref})" if app_ref else ""
    lead = "or from Python" if known else "answer from Python"
    lines.append(f"{lead}, with the run's app{app} on this database:")
    if imports:
        lines.append(f"  from orchestra import {', '.join(imports)}")
    example = next((way.python for way in ways_to_answer(first.kind) if "(" in way.python), "...")
    run, first_id = json.dumps(run_id), json.dumps(first.id)
    lines.append(f"  await app.resume({run}, answers={{{first_id}: {example}}})")
    if len(pythons) > 1:
        lines.append(f"  (answers: {', '.join(pythons)})")
    return lines
