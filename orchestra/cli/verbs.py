"""The answer verbs: the answer each one gives, built from its command-line options, and
the check that it answers the request it is given (its kind, and a conflict's shape)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from ..safeguards.interrupts import Abort, Approve, Done, Edit, Reject, Request, Retry
from ..store.base import RequestKind
from .requests import answer_commands

__all__ = (
    "JSON",
    "Verb",
    "answer_for",
    "answer_verb",
    "approve_verb",
    "edit_verb",
    "reject_verb",
    "resolve_verb",
)


class _JSON(click.ParamType):
    """An option whose value is JSON text (bad JSON is a usage error, like a bad number)."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as exc:
            # a bare word was most likely meant as a string
            quote = "; a string needs its quotes, e.g. '\"yes\"'" if value[:1].isalpha() else ""
            self.fail(f"{value!r:.80} is not JSON: {exc}{quote}", param, ctx)


JSON = _JSON()


@dataclass(frozen=True, slots=True, kw_only=True)
class Verb:
    """What one answer verb gives: its answer, the kinds of request it answers, and
    whether checking the answer needs the run's app (without it: a note, checked anyway)."""

    name: str
    answer: Any
    kinds: tuple[RequestKind, ...]
    needs_app: bool


_GO_ON_OR_STOP = (RequestKind.APPROVAL, RequestKind.LOOP, RequestKind.BEFORE, RequestKind.AFTER)


def approve_verb() -> Verb:
    """Build ``orchestra approve``: run a held call as asked, or let a stopped run go on."""
    return Verb(name="approve", answer=Approve(), kinds=_GO_ON_OR_STOP, needs_app=False)


def reject_verb(reason: str) -> Verb:
    """Build ``orchestra reject --reason``: never run a held call, or stop the run."""
    return Verb(name="reject", answer=Reject(reason), kinds=_GO_ON_OR_STOP, needs_app=False)


def edit_verb(arguments: Any) -> Verb:
    """Build ``orchestra edit --args``, refusing arguments that are not a JSON object."""
    if not isinstance(arguments, dict):
        raise click.BadParameter(
            f"the call's arguments are a JSON object (name: value), got {type(arguments).__name__}",
            param_hint="'--args'",
        )
    return Verb(
        name="edit", answer=Edit(arguments=arguments), kinds=(RequestKind.APPROVAL,), needs_app=True
    )


def answer_verb(value: Any) -> Verb:
    """Build ``orchestra answer --json``: a question's value, or a conflict's choice."""
    return Verb(
        name="answer",
        answer=value,
        kinds=(RequestKind.QUESTION, RequestKind.CONFLICT),
        needs_app=True,
    )


def resolve_verb(*, done: bool, result: Any, retry: bool, abort: bool, reason: str | None) -> Verb:
    """Build ``orchestra resolve`` from its options: exactly one of --done (with its
    --result), --retry or --abort (with its --reason)."""
    chosen = [name for name, on in (("--done", done), ("--retry", retry), ("--abort", abort)) if on]
    if len(chosen) != 1:
        got = f" (got {' and '.join(chosen)})" if chosen else ""
        raise click.UsageError(f"give one of --done, --retry or --abort{got}")
    if result is not None and not done:
        raise click.UsageError("--result goes with --done")
    if reason is not None and not abort:
        raise click.UsageError("--reason goes with --abort")
    if done:
        return Verb(
            name="resolve --done",
            answer=Done(result),
            kinds=(RequestKind.IN_DOUBT,),
            needs_app=True,
        )
    if retry:
        return Verb(
            name="resolve --retry", answer=Retry(), kinds=(RequestKind.IN_DOUBT,), needs_app=False
        )
    return Verb(
        name="resolve --abort",
        answer=Abort(reason) if reason is not None else Abort(),
        kinds=(RequestKind.IN_DOUBT, RequestKind.LOOP, RequestKind.BEFORE, RequestKind.AFTER),
        needs_app=False,
    )


def answer_for(verb: Verb, request: Request) -> Any:
    """Refuse a verb that does not answer this kind of request (naming the ones that do);
    return the answer, shaped for the request."""
    if request.kind not in verb.kinds:
        commands = answer_commands(request, example=False)
        quoted = [f"`{c}`" for c in commands]
        listed = (
            ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else "".join(quoted)
        )
        how = f"answer it with {listed}" if commands else "this version cannot answer it"
        article = "an" if request.kind[:1] in ("a", "e", "i", "o", "u") else "a"
        raise click.ClickException(
            f"`orchestra {verb.name}` does not answer request {request.id} of run "
            f"{request.run_id}: it is {article} {request.kind} request ({request.describe()}); "
            f"{how}"
        )
    if request.kind == RequestKind.CONFLICT:
        value = verb.answer
        keys = [str(call.get("key")) for call in request.payload.get("calls") or ()]
        if not (
            isinstance(value, dict) and set(value) == {"run"} and isinstance(value["run"], list)
        ):
            raise click.ClickException(
                f"run {request.run_id}, request {request.id}: a conflict is answered with "
                f"--json '{{\"run\": [KEY, ...]}}', the keys of the calls that run in order "
                f"(its calls: {', '.join(keys)}), got {json.dumps(value):.80}"
            )
    return verb.answer
