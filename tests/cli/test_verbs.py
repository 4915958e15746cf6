"""The answer verbs: what each one answers, built from its options, and the check that it
fits the request it is given."""

from __future__ import annotations

from typing import Any

import click
import pytest

from orchestra import Request
from orchestra.cli.verbs import (
    JSON,
    answer_for,
    answer_verb,
    approve_verb,
    edit_verb,
    reject_verb,
    resolve_verb,
)
from orchestra.safeguards.interrupts import Abort, Approve, Done, Edit, Reject, Retry
from orchestra.store.base import RequestKind


def request(kind: RequestKind, payload: dict[str, Any] | None = None) -> Request:
    return Request(
        id="req_1", run_id="r1", kind=kind, step=2, node="billing", payload=payload or {}
    )


def test_json_option_reads_json_text() -> None:
    """A JSON option's value is the decoded JSON."""
    assert JSON.convert('{"days": 2}', None, None) == {"days": 2}


def test_json_option_refuses_a_bare_word_naming_the_quotes() -> None:
    """A bare word is a usage error that says a string needs its quotes."""
    with pytest.raises(click.BadParameter, match="a string needs its quotes"):
        JSON.convert("yes", None, None)


def test_approve_and_reject_go_on_or_stop() -> None:
    """approve and reject answer approvals, loops and breakpoints, without the app."""
    approve, reject = approve_verb(), reject_verb("too much")
    assert approve.answer == Approve()
    assert reject.answer == Reject("too much")
    assert approve.kinds == reject.kinds
    assert RequestKind.LOOP in approve.kinds
    assert not approve.needs_app


def test_edit_verb_refuses_arguments_that_are_not_an_object() -> None:
    """edit's --args must be a JSON object."""
    with pytest.raises(click.BadParameter, match="got list"):
        edit_verb([1, 2])


def test_edit_verb_approves_with_the_arguments() -> None:
    """edit answers an approval with the new arguments, checked with the app."""
    verb = edit_verb({"amount": 20})
    assert verb.answer == Edit(arguments={"amount": 20})
    assert verb.kinds == (RequestKind.APPROVAL,)
    assert verb.needs_app


def test_answer_verb_answers_questions_and_conflicts() -> None:
    """answer gives its value to a question or a conflict."""
    assert answer_verb("yes").kinds == (RequestKind.QUESTION, RequestKind.CONFLICT)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"done": True, "result": 1}, Done(1)),
        ({"retry": True}, Retry()),
        ({"abort": True, "reason": "x"}, Abort("x")),
        ({"abort": True}, Abort()),
    ],
)
def test_resolve_verb_gives_the_chosen_answer(options: dict[str, Any], expected: Any) -> None:
    """resolve's one chosen option decides its answer."""
    given = {"done": False, "result": None, "retry": False, "abort": False, "reason": None}
    assert resolve_verb(**{**given, **options}).answer == expected


def test_resolve_verb_refuses_two_choices() -> None:
    """resolve takes exactly one of --done, --retry and --abort."""
    with pytest.raises(click.UsageError, match="got --done and --retry"):
        resolve_verb(done=True, result=None, retry=True, abort=False, reason=None)


def test_answer_for_refuses_a_verb_of_another_kind() -> None:
    """A verb given a request it does not answer names the commands that do."""
    with pytest.raises(click.ClickException, match="does not answer request req_1 of run r1"):
        answer_for(approve_verb(), request(RequestKind.QUESTION, {"prompt": "carrier?"}))


def test_answer_for_refuses_a_conflict_answer_without_run() -> None:
    """A conflict's answer is {"run": [KEY, ...]}; the error lists the calls' keys."""
    conflict = request(RequestKind.CONFLICT, {"calls": [{"key": "billing#1"}]})
    with pytest.raises(click.ClickException, match=r"its calls: billing#1"):
        answer_for(answer_verb(["billing#1"]), conflict)


def test_answer_for_returns_the_answer() -> None:
    """A verb that fits the request gives its answer as is."""
    conflict = request(RequestKind.CONFLICT, {"calls": [{"key": "billing#1"}]})
    assert answer_for(answer_verb({"run": ["billing#1"]}), conflict) == {"run": ["billing#1"]}
