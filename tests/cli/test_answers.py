"""The operator CLI answering runs that wait for a person: pending, approve, reject, edit,
answer, resolve (and what show and the timeline say about requests and their answers)."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from apps import cli_hitl_app
from rich.console import Console

from cli.support import cli, only_line, squeezed
from orchestra import Request, RunOutcome, RunStatus
from orchestra.app import CompiledGraph
from orchestra.cli.history import timeline
from orchestra.cli.requests import (
    answer_hint,
    format_schema,
    request_details,
    request_json,
    requests_table,
)
from orchestra.store import EventRow, SQLiteStore

NOW = 1_700_000_000.0


def start(db: Path, app: CompiledGraph[Any], run_id: str) -> RunOutcome[Any]:
    """Run ``app`` on ``db`` as ``run_id`` until it stops."""

    async def go() -> RunOutcome[Any]:
        with anyio.fail_after(10):
            async with SQLiteStore(db) as store:
                return await app.with_store(store).run({}, run_id=run_id)

    return anyio.run(go)


def waiting(db: Path, app: CompiledGraph[Any], run_id: str) -> Request:
    """Run ``app`` until it stops for its one request; return the request."""
    outcome = start(db, app, run_id)
    assert outcome.status is RunStatus.INTERRUPTED, outcome.stop_reason
    (request,) = outcome.pending
    return request


def final(db: Path, app: CompiledGraph[Any], run_id: str) -> tuple[str, Any]:
    """The stored status and state of a run."""

    async def go() -> tuple[str, Any]:
        async with SQLiteStore(db) as store:
            bound = app.with_store(store)
            return (await bound.get_run(run_id)).status, await bound.load_state(run_id)

    return anyio.run(go)


def open_ids(db: Path, run_id: str | None = None) -> list[str]:
    async def go() -> list[str]:
        async with SQLiteStore(db) as store:
            return [row.request_id for row in await store.requests(run_id)]

    return anyio.run(go)


def expire(db: Path, request_id: str) -> None:
    """Make a request's expiry time pass (as if an hour went by)."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE requests SET expires_at = 1 WHERE request_id = ?", (request_id,))
    conn.close()


def render(renderable: Any, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forget the refunds and prices of other tests; keep sys.path and the cwd clean."""
    monkeypatch.setattr(cli_hitl_app, "refunds", [])
    monkeypatch.setattr(cli_hitl_app, "prices", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def approval(db: Path) -> Request:
    """Run "desk" waits for approval of refund(order_id="42", amount=30.0)."""
    return waiting(db, cli_hitl_app.desk, "desk")


@pytest.fixture
def question(db: Path) -> Request:
    """Run "ship" waits for an answer to its Shipping question."""
    return waiting(db, cli_hitl_app.shipping, "ship")


@pytest.fixture
def conflict(db: Path) -> Request:
    """Run "price" waits for a person to choose between two prices of sku A1."""
    return waiting(db, cli_hitl_app.pricing, "price")


@pytest.fixture
def in_doubt(db: Path) -> Request:
    """Run "pay" waits on a wire call that may or may not have taken effect."""
    return waiting(db, cli_hitl_app.payer, "pay")


@pytest.fixture
def breakpoint_(db: Path) -> Request:
    """Run "gate" waits at the breakpoint before its node "work"."""
    return waiting(db, cli_hitl_app.gated, "gate")


# -- pending ----------------------------------------------------------------------------------


def test_pending_lists_the_open_requests_of_every_run(
    db: Path, approval: Request, question: Request
) -> None:
    """Each open request of each run: run, id, kind, node, step, age, and what it asks."""
    result = cli(db, "pending")
    assert result.exit_code == 0, result.output
    lines = squeezed(result.stdout)
    assert lines[0] == f"2 open requests in {db}"
    assert lines[1] == "run request id kind node step asked asks"
    rows = {line.split()[0]: line for line in lines[3:] if line.split()[0] in ("desk", "ship")}
    assert rows["desk"].startswith(f"desk {approval.id} approval billing 1 ")
    assert rows["desk"].endswith("irreversible call 'refund' by 'billing' at step 1 needs approval")
    assert rows["ship"].startswith(f"ship {question.id} question ask 1 ")
    assert rows["ship"].endswith("'ask' asks at step 1: Which carrier, and how many days?")
    assert 'refund(order_id="42", amount=30.0) on order:42' in lines
    assert "answer: {carrier: string, days: integer}" in lines


def test_pending_names_the_verbs_that_answer_each_kind(
    db: Path, approval: Request, question: Request
) -> None:
    """Under the table: the CLI verbs for each kind listed, then how to go on."""
    lines = squeezed(cli(db, "pending").stdout)
    start_at = lines.index("answer with:")
    assert lines[start_at + 1 : start_at + 4] == [
        "approval orchestra approve RUN REQ, orchestra reject RUN REQ --reason TEXT, "
        "orchestra edit RUN REQ --args JSON",
        "question orchestra answer RUN REQ --json JSON",
        "then `orchestra resume RUN` (or add --resume); `orchestra show RUN` spells out the "
        "answers of each request",
    ]


def test_pending_run_option_lists_one_run(db: Path, approval: Request, question: Request) -> None:
    """--run keeps one run's requests (a unique prefix of its id will do), without a run
    column."""
    result = cli(db, "pending", "--run", "sh")
    assert result.exit_code == 0, result.output
    lines = squeezed(result.stdout)
    assert lines[0] == "1 open request in run ship"
    assert lines[1] == "request id kind node step asked asks"
    assert lines[3].startswith(f"{question.id} question ask 1 ")
    assert approval.id not in result.stdout


def test_pending_shows_the_calls_of_a_conflict(db: Path, conflict: Request) -> None:
    """A conflict lists the calls that compete, by key, and the contested resource."""
    lines = squeezed(cli(db, "pending").stdout)
    assert lines[3].endswith("2 calls at step 1 conflict over sku:A1: choose which run")
    assert lines[4:6] == [
        'pricer#1: set_price(sku="A1", price=9.5)',
        'pricer#2: set_price(sku="A1", price=8.0)',
    ]
    assert "conflict orchestra answer RUN REQ --json '{\"run\": [KEY, ...]}'" in lines


def test_pending_json_has_payload_schema_and_commands(db: Path, approval: Request) -> None:
    """--json: one object a request, with its payload, answer schema, and the commands."""
    result = cli(db, "pending", "--json")
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.stdout)
    assert (listed["run_id"], listed["id"], listed["kind"]) == ("desk", approval.id, "approval")
    assert listed["payload"]["tool"] == "refund"
    assert listed["payload"]["arguments"] == {"order_id": "42", "amount": 30.0}
    assert listed["schema"]["required"] == ["order_id", "amount"]
    assert listed["expired"] is False
    assert listed["answers"] == ["Approve()", "Reject(reason=...)", "Edit(arguments={...})"]
    assert listed["commands"] == [
        f"orchestra approve desk {approval.id}",
        f"orchestra reject desk {approval.id} --reason TEXT",
        f'orchestra edit desk {approval.id} --args \'{{"order_id":"42","amount":30.0}}\'',
    ]


def test_pending_json_of_a_question_has_its_schema(db: Path, question: Request) -> None:
    """A question's JSON carries the JSON schema of a valid answer."""
    (listed,) = json.loads(cli(db, "pending", "--json").stdout)
    assert listed["schema"]["required"] == ["carrier", "days"]
    assert listed["payload"]["prompt"] == "Which carrier, and how many days?"


def test_pending_says_when_nothing_is_open(db: Path, approval: Request) -> None:
    """No open request: one line saying so, exit 0; --json prints an empty list."""
    assert cli(db, "approve", "desk", approval.id).exit_code == 0
    result = cli(db, "pending")
    assert (result.exit_code, result.stdout) == (0, f"no open requests in {db}\n")
    assert json.loads(cli(db, "pending", "--json").stdout) == []


def test_pending_shows_when_a_request_expires(db: Path) -> None:
    """A request that expires shows when; once past, it shows "expired"."""
    request = waiting(db, cli_hitl_app.expiring, "late")
    lines = squeezed(cli(db, "pending").stdout)
    assert lines[1] == "run request id kind node step asked expires asks"
    assert " 1 just now in 59m " in lines[3]
    expire(db, request.id)
    lines = squeezed(cli(db, "pending").stdout)
    assert " 1 just now expired " in lines[3]
    assert json.loads(cli(db, "pending", "--json").stdout)[0]["expired"] is True
    # no verbs that would fail: only what settles it
    assert not any(line.startswith("answer with") for line in lines)
    assert any(line.startswith("expired requests can no longer be answered") for line in lines)


# -- approve ----------------------------------------------------------------------------------


def test_approve_records_and_names_the_next_step(db: Path, approval: Request) -> None:
    """approve says what it recorded, then that `orchestra resume RUN` goes on; nothing
    runs yet."""
    result = cli(db, "approve", "desk", approval.id)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f'run desk, request {approval.id}: approved refund(order_id="42", amount=30.0)',
        "nothing else is open: continue the run with `orchestra resume desk`",
    ]
    assert open_ids(db) == []
    assert cli_hitl_app.refunds == []


def test_readme_flow_pending_approve_resume(db: Path) -> None:
    """What a new user types: pending shows the run and request; approve; resume completes
    the run and the refund is made, once."""
    waiting(db, cli_hitl_app.desk, "desk")
    listed = squeezed(cli(db, "pending").stdout)
    run_id, request_id = listed[3].split()[:2]
    assert cli(db, "approve", run_id, request_id).exit_code == 0
    result = cli(db, "resume", run_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == "status  completed"
    assert cli_hitl_app.refunds == [("42", 30.0)]
    assert final(db, cli_hitl_app.desk, "desk")[1].resolution == '{"result":"refunded 30.0"}'


def test_approve_with_resume_completes_the_run(db: Path, approval: Request) -> None:
    """--resume resumes right after recording and prints the outcome like `resume`."""
    result = cli(db, "approve", "desk", approval.id, "--resume")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert (
        lines[0] == f'run desk, request {approval.id}: approved refund(order_id="42", amount=30.0)'
    )
    assert lines[1] == "resuming run desk (graph desk) at step 0 with apps.cli_hitl_app:desk"
    assert lines[2] == "status  completed"
    assert cli_hitl_app.refunds == [("42", 30.0)]


def test_approve_names_the_requests_still_open(db: Path) -> None:
    """With another request open, approve lists it instead of suggesting a resume."""
    outcome = start(db, cli_hitl_app.double, "double")
    first, second = sorted(outcome.pending, key=lambda r: r.payload["seq"])
    result = cli(db, "approve", "double", first.id)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == [
        f"1 request of run double still open: {second.id} (approval)",
        "answer it (`orchestra show double` says how), then `orchestra resume double`",
    ]
    assert cli(db, "reject", "double", second.id, "--reason", "no", "--resume").exit_code == 0
    assert cli_hitl_app.refunds == [("42", 30.0)]


def test_approve_while_a_process_owns_the_run_is_refused(db: Path, approval: Request) -> None:
    """A run another live process owns cannot be answered: one line, nothing recorded."""

    async def take() -> None:
        async with SQLiteStore(db, lease_seconds=60) as store:
            await store.acquire("desk", "elsewhere:1:abc")

    anyio.run(take)
    result = cli(db, "approve", "desk", approval.id)
    assert result.exit_code == 1
    assert only_line(result).startswith("Error: run desk is owned by elsewhere:1:abc")
    assert open_ids(db) == [approval.id]


def test_approve_with_resume_under_stop_all_records_nothing(db: Path, approval: Request) -> None:
    """--resume while stop-all is in force is refused before the answer is recorded."""
    assert cli(db, "stop-all", "--yes", "--reason", "incident").exit_code == 0
    result = cli(db, "approve", "desk", approval.id, "--resume")
    assert result.exit_code == 1
    assert only_line(result).startswith("Error: stop-all is in force (incident)")
    assert open_ids(db) == [approval.id]


def test_approve_takes_a_unique_prefix_of_the_ids(db: Path, approval: Request) -> None:
    """Like run ids, a request id may be shortened to a unique prefix."""
    result = cli(db, "approve", "de", approval.id[:8])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"run desk, request {approval.id}: approved ")
    assert open_ids(db) == []


def test_approve_twice_is_refused(db: Path, approval: Request) -> None:
    """An answer is used once: the second approve is one line, exit 1."""
    assert cli(db, "approve", "desk", approval.id).exit_code == 0
    result = cli(db, "approve", "desk", approval.id)
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: run desk, request {approval.id}: already answered; an answer is used once"
    )


def test_approve_an_unknown_request_is_refused(db: Path, approval: Request) -> None:
    """An unknown request id is refused, naming the open ones; nothing is recorded."""
    result = cli(db, "approve", "desk", "req_nope")
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: run desk, request req_nope: no such request (open: {approval.id})"
    )
    assert open_ids(db) == [approval.id]


def test_approve_an_expired_request_is_refused(db: Path) -> None:
    """A request past its expiry cannot be answered."""
    request = waiting(db, cli_hitl_app.expiring, "late")
    expire(db, request.id)
    result = cli(db, "approve", "late", request.id)
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: run late, request {request.id}: expired; it can no longer be answered"
    )


def test_approve_a_question_is_refused_naming_its_verb(db: Path, question: Request) -> None:
    """The wrong verb for a kind is refused, naming the command that answers it."""
    result = cli(db, "approve", "ship", question.id)
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: `orchestra approve` does not answer request {question.id} of run ship: it is "
        f"a question request ('ask' asks at step 1: Which carrier, and how many days?); "
        f"answer it with `orchestra answer ship {question.id} --json JSON`"
    )
    assert open_ids(db) == [question.id]


def test_approve_an_unknown_run_is_refused(db: Path, approval: Request) -> None:
    """An unknown run id is one line, exit 1."""
    result = cli(db, "approve", "nope", approval.id)
    assert result.exit_code == 1
    assert "nope" in only_line(result)


def test_approve_works_without_the_app_and_says_so(db: Path) -> None:
    """When the run's app cannot be imported, approve needs none: a note on stderr, and
    the answer is recorded."""
    request = waiting(db, cli_hitl_app.orphan, "orphan")
    result = cli(db, "approve", "orphan", request.id)
    assert result.exit_code == 0, result.output
    assert only_line(result).startswith("note: cannot import app 'cli_hitl_gone:app'")
    assert only_line(result).endswith("this answer needs no app, so it is checked without it")
    assert open_ids(db) == []


def test_approve_with_resume_needs_the_app(db: Path) -> None:
    """--resume needs the app: without it, refused before anything is recorded."""
    request = waiting(db, cli_hitl_app.orphan, "orphan")
    result = cli(db, "approve", "orphan", request.id, "--resume")
    assert result.exit_code == 1
    assert only_line(result).startswith(
        "Error: --resume needs the run's app: cannot import app 'cli_hitl_gone:app'"
    )
    assert open_ids(db) == [request.id]


def test_approve_with_app_option_resumes_an_orphan(db: Path) -> None:
    """--app loads the graph from elsewhere, for checking and resuming."""
    request = waiting(db, cli_hitl_app.orphan, "orphan")
    result = cli(db, "approve", "orphan", request.id, "--app", "apps.cli_hitl_app:desk", "--resume")
    assert result.exit_code == 0, result.output
    assert cli_hitl_app.refunds == [("42", 30.0)]


def test_approve_lets_a_breakpoint_go_on(db: Path, breakpoint_: Request) -> None:
    """approve answers a breakpoint too: the run goes on and completes."""
    result = cli(db, "approve", "gate", breakpoint_.id, "--resume")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"run gate, request {breakpoint_.id}: go on (breakpoint before work at step 1)"
    )
    status, state = final(db, cli_hitl_app.gated, "gate")
    assert (status, state.resolution) == ("completed", "worked")


# -- reject -----------------------------------------------------------------------------------


def test_reject_tells_the_agent_why_and_the_call_never_runs(db: Path, approval: Request) -> None:
    """reject records the reason; on resume the refund does not run and the agent sees the
    rejection."""
    result = cli(db, "reject", "desk", approval.id, "--reason", "over the limit")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f'run desk, request {approval.id}: rejected refund(order_id="42", amount=30.0): '
        f"over the limit"
    )
    assert cli(db, "resume", "desk").exit_code == 0
    assert cli_hitl_app.refunds == []
    status, state = final(db, cli_hitl_app.desk, "desk")
    assert status == "completed"
    assert "over the limit" in state.resolution


def test_reject_needs_a_reason(db: Path, approval: Request) -> None:
    """--reason is required: a usage error, exit 2, nothing recorded."""
    result = cli(db, "reject", "desk", approval.id)
    assert result.exit_code == 2
    assert "Missing option '--reason'" in result.stderr
    assert open_ids(db) == [approval.id]


def test_reject_a_breakpoint_stops_the_run(db: Path, breakpoint_: Request) -> None:
    """reject at a breakpoint stops the run (aborted, with the reason); its node never runs."""
    result = cli(db, "reject", "gate", breakpoint_.id, "--reason", "not today", "--resume")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        f"run gate, request {breakpoint_.id}: stop the run: not today"
    )
    assert "status  aborted" in result.stdout.splitlines()
    status, state = final(db, cli_hitl_app.gated, "gate")
    assert (status, state.resolution) == ("aborted", None)


# -- edit -------------------------------------------------------------------------------------


def test_edit_runs_the_call_with_the_changed_arguments(db: Path, approval: Request) -> None:
    """edit approves the call with other arguments, checked against the tool's schema."""
    result = cli(db, "edit", "desk", approval.id, "--args", '{"order_id": "42", "amount": 20}')
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f'run desk, request {approval.id}: approved refund(order_id="42", amount=20.0) '
        f'(edited; it asked for refund(order_id="42", amount=30.0))'
    )
    assert cli(db, "resume", "desk").exit_code == 0
    assert cli_hitl_app.refunds == [("42", 20.0)]


def test_edit_arguments_that_do_not_fit_name_the_field(db: Path, approval: Request) -> None:
    """Arguments the tool refuses: one line naming the field, exit 1, nothing recorded."""
    result = cli(db, "edit", "desk", approval.id, "--args", '{"order_id": "42", "amount": "x"}')
    assert result.exit_code == 1
    line = only_line(result)
    assert line.startswith(
        f"Error: run desk, request {approval.id}: the edited arguments do not fit tool "
        f"'refund': amount: "
    )
    assert open_ids(db) == [approval.id]


def test_edit_needs_every_argument(db: Path, approval: Request) -> None:
    """--args is the whole set: a missing argument is named."""
    result = cli(db, "edit", "desk", approval.id, "--args", '{"order_id": "42"}')
    assert result.exit_code == 1
    assert only_line(result).endswith("'refund': amount: Field required")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"order_id": 42', "is not JSON: Expecting ',' delimiter"),
        ('["42", 30]', "the call's arguments are a JSON object (name: value), got list"),
    ],
)
def test_edit_bad_json_is_a_usage_error(db: Path, approval: Request, text: str, error: str) -> None:
    """--args that is not a JSON object is a usage error (exit 2); nothing recorded."""
    result = cli(db, "edit", "desk", approval.id, "--args", text)
    assert result.exit_code == 2
    assert "Invalid value for '--args'" in result.stderr
    assert error in result.stderr
    assert open_ids(db) == [approval.id]


def test_edit_a_question_is_refused(db: Path, question: Request) -> None:
    """edit answers approvals only."""
    result = cli(db, "edit", "ship", question.id, "--args", "{}")
    assert result.exit_code == 1
    assert only_line(result).startswith(
        f"Error: `orchestra edit` does not answer request {question.id} of run ship"
    )


# -- answer -----------------------------------------------------------------------------------


def test_answer_a_question_hands_the_node_its_value(db: Path, question: Request) -> None:
    """The value is checked against the schema; on resume the node gets a Shipping back."""
    result = cli(db, "answer", "ship", question.id, "--json", '{"carrier": "ups", "days": 2}')
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"run ship, request {question.id}: answered 'Which carrier, and how many days?': "
        f'{{"carrier":"ups","days":2}}'
    )
    assert cli(db, "resume", "ship").exit_code == 0
    assert final(db, cli_hitl_app.shipping, "ship")[1].resolution == "ups in 2 days"


def test_answer_that_does_not_fit_the_schema_names_the_field(db: Path, question: Request) -> None:
    """A value the schema refuses: one line naming the field, exit 1, nothing recorded."""
    result = cli(db, "answer", "ship", question.id, "--json", '{"carrier": "ups", "days": "soon"}')
    assert result.exit_code == 1
    assert only_line(result).startswith(f"Error: run ship, request {question.id}: days: ")
    assert open_ids(db) == [question.id]


def test_answer_bad_json_is_a_usage_error(db: Path, question: Request) -> None:
    """--json that is not JSON: exit 2, nothing recorded."""
    result = cli(db, "answer", "ship", question.id, "--json", "ups, 2 days")
    assert result.exit_code == 2
    assert "Invalid value for '--json': 'ups, 2 days' is not JSON" in result.stderr
    assert "a string needs its quotes, e.g. '\"yes\"'" in result.stderr
    assert open_ids(db) == [question.id]


def test_answer_needs_the_app_to_check_a_question(db: Path, question: Request) -> None:
    """A question's answer is checked with the run's app: a bad --app is refused."""
    result = cli(
        db, "answer", "ship", question.id, "--json", "1", "--app", "apps.cli_hitl_app:nope"
    )
    assert result.exit_code == 1
    assert (
        only_line(result) == "Error: cannot import app 'apps.cli_hitl_app:nope': "
        "apps.cli_hitl_app has no attribute 'nope'"
    )
    assert open_ids(db) == [question.id]


def test_answer_with_resume_completes_the_run(db: Path, question: Request) -> None:
    """answer --resume records, resumes and prints the outcome."""
    result = cli(
        db, "answer", "ship", question.id, "--json", '{"carrier": "dhl", "days": 3}', "--resume"
    )
    assert result.exit_code == 0, result.output
    assert "status  completed" in result.stdout.splitlines()
    assert final(db, cli_hitl_app.shipping, "ship")[1].resolution == "dhl in 3 days"


def test_answer_a_conflict_runs_the_chosen_call(db: Path, conflict: Request) -> None:
    """{"run": [keys]} settles a conflict: the chosen call runs, the other loses."""
    result = cli(db, "answer", "price", conflict.id, "--json", '{"run": ["pricer#2"]}')
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"run price, request {conflict.id}: chose pricer#2 to run; pricer#1 loses"
    )
    assert cli(db, "resume", "price").exit_code == 0
    assert cli_hitl_app.prices == [("A1", 8.0)]


def test_answer_a_conflict_with_an_unknown_key_is_refused(db: Path, conflict: Request) -> None:
    """Keys must be calls of the conflict: refused, naming them."""
    result = cli(db, "answer", "price", conflict.id, "--json", '{"run": ["pricer#9"]}')
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: run price, request {conflict.id}: choose calls of the conflict, each once: "
        f"got ['pricer#9']; its calls are pricer#1, pricer#2"
    )
    assert open_ids(db) == [conflict.id]


def test_answer_a_conflict_needs_the_run_object(db: Path, conflict: Request) -> None:
    """A conflict's answer is {"run": [...]}: anything else is refused, showing the form."""
    result = cli(db, "answer", "price", conflict.id, "--json", '["pricer#1"]')
    assert result.exit_code == 1
    assert only_line(result) == (
        f"Error: run price, request {conflict.id}: a conflict is answered with --json "
        f"'{{\"run\": [KEY, ...]}}', the keys of the calls that run in order (its calls: "
        f'pricer#1, pricer#2), got ["pricer#1"]'
    )


def test_answer_an_approval_is_refused(db: Path, approval: Request) -> None:
    """answer does not approve: refused, naming approve, reject and edit."""
    result = cli(db, "answer", "desk", approval.id, "--json", "true")
    assert result.exit_code == 1
    assert only_line(result).endswith(
        f"answer it with `orchestra approve desk {approval.id}`, `orchestra reject desk "
        f"{approval.id} --reason TEXT` or `orchestra edit desk {approval.id} --args JSON`"
    )


# -- resolve ----------------------------------------------------------------------------------


def test_resolve_done_records_the_result(db: Path, in_doubt: Request) -> None:
    """--done --result: the call took effect; on resume the agent gets that result."""
    result = cli(db, "resolve", "pay", in_doubt.id, "--done", "--result", '"wired"', "--resume")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f'run pay, request {in_doubt.id}: wire(account="acme", amount=99.5) took effect, '
        f'result "wired"'
    )
    assert final(db, cli_hitl_app.payer, "pay")[1].resolution == '{"result":"wired"}'


def test_resolve_done_with_a_result_that_does_not_fit_is_refused(
    db: Path, in_doubt: Request
) -> None:
    """The result is checked against the tool's return type."""
    result = cli(db, "resolve", "pay", in_doubt.id, "--done", "--result", '{"no": 1}')
    assert result.exit_code == 1
    assert f"run pay, request {in_doubt.id}: the result does not fit tool 'wire'" in (
        only_line(result)
    )
    assert open_ids(db) == [in_doubt.id]


def test_resolve_retry_records_it(db: Path, in_doubt: Request) -> None:
    """--retry: the call runs again on resume."""
    result = cli(db, "resolve", "pay", in_doubt.id, "--retry")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f'run pay, request {in_doubt.id}: wire(account="acme", amount=99.5) did not take '
        f"effect: it runs again on resume"
    )


def test_resolve_abort_stops_the_run(db: Path, in_doubt: Request) -> None:
    """--abort --reason: resume stops the run, aborted with the reason."""
    result = cli(db, "resolve", "pay", in_doubt.id, "--abort", "--reason", "double pay")
    assert result.exit_code == 0, result.output
    assert cli(db, "resume", "pay").exit_code == 1
    assert final(db, cli_hitl_app.payer, "pay")[0] == "aborted"


def test_resolve_abort_stops_a_run_at_a_breakpoint(db: Path, breakpoint_: Request) -> None:
    """--abort also answers a breakpoint."""
    result = cli(db, "resolve", "gate", breakpoint_.id, "--abort", "--resume")
    assert result.exit_code == 1
    assert "status  aborted" in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ((), "give one of --done, --retry or --abort"),
        (("--done", "--retry"), "give one of --done, --retry or --abort (got --done and --retry)"),
        (("--retry", "--result", "1"), "--result goes with --done"),
        (("--done", "--reason", "x"), "--reason goes with --abort"),
        (("--done", "--result", "{"), "Invalid value for '--result'"),
    ],
)
def test_resolve_usage_errors(
    db: Path, in_doubt: Request, options: tuple[str, ...], error: str
) -> None:
    """Exactly one of --done, --retry, --abort; --result with --done, --reason with
    --abort; bad JSON: usage errors, exit 2."""
    result = cli(db, "resolve", "pay", in_doubt.id, *options)
    assert result.exit_code == 2
    assert error in result.stderr
    assert open_ids(db) == [in_doubt.id]


def test_resolve_done_on_an_approval_is_refused(db: Path, approval: Request) -> None:
    """resolve --done answers in-doubt calls only."""
    result = cli(db, "resolve", "desk", approval.id, "--done")
    assert result.exit_code == 1
    assert only_line(result).startswith(
        f"Error: `orchestra resolve --done` does not answer request {approval.id} of run desk: "
        f"it is an approval request"
    )


# -- show -------------------------------------------------------------------------------------


def test_show_hints_the_cli_verbs_of_an_approval(db: Path, approval: Request) -> None:
    """show lists each way to answer as a command, then the Python alternative."""
    lines = cli(db, "show", "desk").stdout.splitlines()
    start_at = next(i for i, line in enumerate(lines) if line.startswith("answer with the CLI"))
    hint = squeezed("\n".join(lines[start_at : start_at + 8]))
    assert hint == [
        "answer with the CLI, then `orchestra resume desk` (or add --resume to the last answer):",
        f"orchestra approve desk {approval.id} let the call run, once, as asked",
        f"orchestra reject desk {approval.id} --reason TEXT refuse it: the caller is told why",
        f'orchestra edit desk {approval.id} --args \'{{"order_id":"42","amount":30.0}}\' '
        f"run it with these arguments instead (the whole set, checked against the tool)",
        "or from Python, with the run's app (apps.cli_hitl_app:desk) on this database:",
        "from orchestra import Approve, Edit, Reject",
        f'await app.resume("desk", answers={{"{approval.id}": Approve()}})',
        "(answers: Approve(), Reject(reason=...), Edit(arguments={...}))",
    ]


def test_show_timeline_has_the_answer_and_the_approval(db: Path, approval: Request) -> None:
    """After an edit and resume, the timeline has the operator's answer and the decision."""
    cli(db, "edit", "desk", approval.id, "--args", '{"order_id": "42", "amount": 20}', "--resume")
    lines = squeezed(cli(db, "show", "desk").stdout)
    assert any(
        line.endswith(
            f"operator answered approval request {approval.id} (billing): edit, arguments "
            f'{{"order_id":"42","amount":20.0}}'
        )
        for line in lines
    )
    assert any(
        line.endswith(f"refund call approved with changed arguments {approval.id} (billing)")
        for line in lines
    )


def test_show_timeline_has_the_conflict_settled(db: Path, conflict: Request) -> None:
    """An escalated conflict's entry says an operator chose, which call ran and which lost."""
    cli(db, "answer", "price", conflict.id, "--json", '{"run": ["pricer#1"]}', "--resume")
    lines = squeezed(cli(db, "show", "price").stdout)
    assert any(
        line.endswith(
            "conflict over sku:A1 settled: escalate an operator chose; ran pricer#1 "
            'set_price(sku="A1", price=9.5); lost pricer#2 set_price(sku="A1", price=8.0)'
        )
        for line in lines
    )


# -- the formatters ---------------------------------------------------------------------------


def request(kind: str, payload: dict[str, Any], schema: dict[str, Any] | None = None) -> Request:
    return Request(
        id="req_1",
        run_id="r1",
        kind=kind,
        step=2,
        node="billing",
        payload=payload,
        schema=schema,
        created_at=NOW - 30,
    )


def event(kind: str, at: float, step: int, /, **data: Any) -> EventRow:
    return EventRow(step=step, kind=kind, at=at, data=json.dumps({"step": step, **data}))


def test_request_details_of_an_approval_is_the_call() -> None:
    """An approval shows the exact call and the resources it touches."""
    held = request(
        "approval", {"tool": "refund", "arguments": {"order_id": "42"}, "resources": ["order:42"]}
    )
    assert request_details(held) == 'refund(order_id="42") on order:42'


def test_request_details_of_a_question_is_its_answers_shape() -> None:
    """A question shows the shape of its answer (and a problem with an earlier answer)."""
    schema = {
        "type": "object",
        "properties": {"days": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["days"],
    }
    asked = request("question", {"prompt": "How long?"}, schema)
    assert request_details(asked) == "answer: {days: integer, note?: string}"
    again = request("question", {"prompt": "How long?", "problem": "it no longer fits"}, schema)
    assert request_details(again) == "answer: {days: integer, note?: string} (it no longer fits)"


@pytest.mark.parametrize(
    ("schema", "text"),
    [
        (None, "any JSON value"),
        ({"type": "string"}, "string"),
        ({"type": "array", "items": {"type": "integer"}}, "[integer]"),
        ({"enum": ["a", "b"]}, '"a" | "b"'),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "string | null"),
        (
            {
                "$defs": {"Size": {"enum": ["S", "L"]}},
                "type": "object",
                "properties": {"size": {"$ref": "#/$defs/Size"}},
                "required": ["size"],
            },
            '{size: "S" | "L"}',
        ),
    ],
)
def test_format_schema(schema: dict[str, Any] | None, text: str) -> None:
    """A JSON schema is summarized in one line."""
    assert format_schema(schema) == text


def test_request_json_of_a_loop_has_go_on_and_stop() -> None:
    """A suspected loop is answered with approve (go on) or reject (stop)."""
    data = request_json(request("loop", {"message": "same call 3 times"}), NOW)
    assert data["answers"] == ["Continue()", "Abort(reason=...)"]
    assert data["commands"] == [
        "orchestra approve r1 req_1",
        "orchestra reject r1 req_1 --reason TEXT",
    ]
    assert data["expired"] is False


def test_answer_hint_for_several_requests_groups_them() -> None:
    """Several requests: the commands of each under its id, one Python example."""
    lines = answer_hint(
        "r1",
        [
            request("question", {"prompt": "Carrier?"}, {"type": "string"}),
            request("loop", {"message": "again"}),
        ],
        None,
    )
    assert squeezed("\n".join(lines)) == [
        "answer with the CLI, then `orchestra resume r1` (or add --resume to the last answer):",
        "req_1 (question):",
        "orchestra answer r1 req_1 --json JSON a value that fits the schema",
        "req_1 (loop):",
        "orchestra approve r1 req_1 it is not a loop (or worth its cost): go on",
        "orchestra reject r1 req_1 --reason TEXT stop the run",
        "or from Python, with the run's app on this database:",
        "from orchestra import Abort, Continue",
        'await app.resume("r1", answers={"req_1": ...})',
        "(answers: Continue(), Abort(reason=...), a value of its schema)",
    ]


def test_requests_table_has_an_expiry_column_only_when_one_expires() -> None:
    """The expires column appears when a request expires: "in ..." or "expired"."""
    plain = request("loop", {"message": "again"})
    assert squeezed(render(requests_table([plain], NOW)))[1] == (
        "request id kind node step asked asks"
    )
    soon = replace(plain, id="req_2", expires_at=NOW + 600)
    gone = replace(plain, id="req_3", expires_at=NOW - 1)
    lines = squeezed(render(requests_table([plain, soon, gone], NOW)))
    assert lines[1] == "request id kind node step asked expires asks"
    assert lines[3].startswith("req_1 loop billing 2 30s ago suspected loop")
    assert lines[5].startswith("req_2 loop billing 2 30s ago in 10m suspected loop")
    assert lines[7].startswith("req_3 loop billing 2 30s ago expired suspected loop")


def test_timeline_approval_decided_entry() -> None:
    """Each decision on a held call is an entry: what became of the call, and why."""
    entries = timeline(
        [
            event("approval_decided", 1.0, 2, node="billing", tool="refund", call_id="c1",
                  request_id="req_1", decision="approved", reason=None),
            event("approval_decided", 2.0, 2, node="billing", tool="refund", call_id="c2",
                  request_id="req_2", decision="rejected", reason="over the limit"),
            event("approval_decided", 3.0, 2, node="billing", tool="refund", call_id="c3",
                  request_id="req_3", decision="expired",
                  reason="its approval request expired unanswered"),
        ]
    )  # fmt: skip
    assert [(e.step, e.what, e.notes, e.style) for e in entries] == [
        (2, "refund call approved", "req_1 (billing)", "bold"),
        (2, "refund call rejected", "req_2 (billing): over the limit", "yellow"),
        (
            2,
            "refund call not approved in time",
            "req_3 (billing): its approval request expired unanswered",
            "yellow",
        ),
    ]


def test_timeline_conflict_arbitrated_entry() -> None:
    """A settled conflict: the resources, the policy, the calls that ran and lost."""
    calls = [
        {"key": "a#1", "tool": "set_price", "arguments": {"price": 1}},
        {"key": "b#1", "tool": "set_price", "arguments": {"price": 2}},
    ]
    (entry,) = timeline(
        [
            event("conflict_arbitrated", 1.0, 3, policy="first_wins", resources=["sku:A1"],
                  calls=json.dumps(calls), run=["a#1"], lost=json.dumps({"b#1": "lost"}),
                  replayed=True),
        ]
    )  # fmt: skip
    assert (entry.step, entry.what, entry.style) == (
        3,
        "conflict over sku:A1 settled: first_wins",
        "yellow",
    )
    assert entry.notes == (
        "ran a#1 set_price(price=1); lost b#1 set_price(price=2); decided before: replayed "
        "from the ledger"
    )


@pytest.mark.parametrize("status", ["rejected", "conflict"])
def test_timeline_call_that_was_not_made_is_a_warning(status: str) -> None:
    """A call an operator rejected, or that lost a conflict, did not run: yellow, not red."""
    (entry,) = timeline(
        [
            event("tool_called", 1.0, 2, node="billing", tool="refund", call_id="c1",
                  status=status, duration=0.0, error="the call was not made", replayed=False),
        ]
    )  # fmt: skip
    assert (entry.notes, entry.style) == (f"{status}: the call was not made", "yellow")


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({"answer": "approve"}, "approve"),
        ({"answer": "reject", "reason": "no"}, "reject: no"),
        ({"answer": "edit", "arguments": {"amount": 20}}, 'edit, arguments {"amount":20}'),
        ({"answer": "value", "value": {"days": 2}}, 'value {"days":2}'),
        ({"answer": "choose", "run": ["a#1", "b#1"]}, "choose a#1, b#1"),
        ({"answer": "choose", "run": []}, "choose none"),
        ({"answer": "continue"}, "continue"),
    ],
)
def test_timeline_request_answered_entry(answer: dict[str, Any], said: str) -> None:
    """An operator's answer of any kind says what it was."""
    (entry,) = timeline(
        [
            event("request_answered", 1.0, 2, node="billing", request_id="req_1",
                  request_kind="approval", answer=json.dumps(answer)),
        ]
    )  # fmt: skip
    assert entry.what == "operator answered approval request"
    assert entry.notes == f"req_1 (billing): {said}"


def test_resume_that_stops_again_names_what_it_waits_for(db: Path, approval: Request) -> None:
    """A resume that stops at a request (here the same approval, unanswered) lists it and
    where to answer it, then exits 1."""
    result = cli(db, "resume", "desk")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"waits   {approval.id} (approval): {approval.describe()}" in lines
    assert lines[-1] == "answer  see `orchestra pending --run desk`"
