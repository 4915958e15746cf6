"""Arbitration on its own: the pure planner that settles conflicts between the calls of one
act phase (orchestra/safeguards/arbitration.py), and the resource locks a plain node's own
calls take (orchestra/safeguards/locks.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio
import pytest

from orchestra import Arbitration, Conflict
from orchestra.safeguards.arbitration import Plan, ProposedCall, find_conflicts, plan_calls
from orchestra.safeguards.locks import Held, ResourceLocks

pytestmark = pytest.mark.anyio


def call(
    key: str,
    resources: Iterable[str] = ("x",),
    *,
    writes: bool = True,
    priority: int = 0,
    tool: str = "t",
) -> ProposedCall:
    """A proposed call keyed ``"caller#index"``."""
    caller, index = key.split("#")
    return ProposedCall(
        key=key,
        caller=caller,
        call_id=f"id-{key}",
        tool=tool,
        arguments={"key": key},
        resources=frozenset(resources),
        writes=writes,
        priority=priority,
        index=int(index),
    )


def plan(
    calls: Iterable[ProposedCall],
    policy: Any = "serialize",
    tools: dict[str, Any] | None = None,
    **options: Any,
) -> Plan:
    return plan_calls(
        list(calls),
        Arbitration(policy=policy, **options),
        lambda name: (tools or {}).get(name),
    )


def waves(plan: Plan) -> list[list[list[str]]]:
    """The plan's chains as keys."""
    return [[[c.key for c in wave] for wave in chain] for chain in plan.chains]


# -- what conflicts --------------------------------------------------------------------------


def test_planner_two_readers_of_one_resource_do_not_conflict() -> None:
    """Calls that only read a resource share it: no conflict, one wave."""
    free, conflicts = find_conflicts([call("a#1", writes=False), call("b#1", writes=False)])
    assert [c.key for c in free] == ["a#1", "b#1"]
    assert conflicts == []


def test_planner_writer_and_reader_of_one_resource_conflict() -> None:
    """A writer conflicts with a reader of the same resource."""
    free, conflicts = find_conflicts([call("a#1", writes=False), call("b#1")])
    assert free == []
    ((members, resources),) = conflicts
    assert [c.key for c in members] == ["a#1", "b#1"]
    assert resources == {"x"}


def test_planner_writers_of_disjoint_resources_do_not_conflict() -> None:
    """Two writers conflict only when their resources overlap."""
    free, conflicts = find_conflicts([call("a#1", {"x"}), call("b#1", {"y"})])
    assert [c.key for c in free] == ["a#1", "b#1"]
    assert conflicts == []


def test_planner_calls_without_resources_never_conflict() -> None:
    """A writer that names no resources conflicts with nothing."""
    free, conflicts = find_conflicts([call("a#1", ()), call("b#1", ())])
    assert len(free) == 2
    assert conflicts == []


def test_planner_conflicts_linked_through_a_call_form_one_component() -> None:
    """a-x-b and b-y-c make one conflict over x and y; d on z is another."""
    free, conflicts = find_conflicts(
        [
            call("a#1", {"x"}),
            call("b#1", {"x", "y"}),
            call("c#1", {"y"}),
            call("d#1", {"z"}),
            call("e#1", {"z"}),
            call("f#1", {"w"}),
        ]
    )
    assert [c.key for c in free] == ["f#1"]
    assert [([c.key for c in members], set(res)) for members, res in conflicts] == [
        (["a#1", "b#1", "c#1"], {"x", "y"}),
        (["d#1", "e#1"], {"z"}),
    ]


def test_planner_reader_sharing_a_resource_only_with_readers_stays_free() -> None:
    """b reads x (written by a) and r; c only reads r: c is in no conflict, r not contested."""
    free, conflicts = find_conflicts(
        [
            call("a#1", {"x"}),
            call("b#1", {"x", "r"}, writes=False),
            call("c#1", {"r"}, writes=False),
        ]
    )
    assert [c.key for c in free] == ["c#1"]
    ((members, resources),) = conflicts
    assert [c.key for c in members] == ["a#1", "b#1"]
    assert resources == {"x"}


def test_planner_conflict_calls_are_in_priority_then_caller_order() -> None:
    """A conflict lists its calls by priority (highest first), then caller name, then index."""
    _, ((members, _),) = find_conflicts(
        [call("c#1"), call("a#2"), call("b#1", priority=1), call("a#1")]
    )
    assert [c.key for c in members] == ["b#1", "a#1", "a#2", "c#1"]


# -- serialize --------------------------------------------------------------------------------


def test_planner_calls_in_no_conflict_run_together_in_one_wave() -> None:
    """Free calls are one chain of one wave; no decision is made for them."""
    result = plan([call("a#1", {"x"}), call("b#1", {"y"})])
    assert waves(result) == [[["a#1", "b#1"]]]
    assert result.decisions == []


def test_planner_serialize_runs_conflicting_calls_one_wave_each_by_priority() -> None:
    """Conflicting writers run one after another, highest priority first, then by name."""
    result = plan([call("c#1"), call("a#1"), call("b#1", priority=2)])
    assert waves(result) == [[["b#1"], ["a#1"], ["c#1"]]]
    (decision,) = result.decisions
    assert (decision.policy, decision.run, decision.lost) == (
        "serialize",
        ["b#1", "a#1", "c#1"],
        {},
    )


def test_planner_serialize_lets_calls_of_a_conflict_that_do_not_clash_share_a_wave() -> None:
    """Two readers after a writer run together; a writer of y runs beside the first one."""
    result = plan(
        [
            call("a#1", {"x"}, priority=1),
            call("b#1", {"x"}, writes=False),
            call("c#1", {"x"}, writes=False),
            call("d#1", {"x", "y"}),
        ]
    )
    assert waves(result) == [[["a#1"], ["b#1", "c#1"], ["d#1"]]]


def test_planner_separate_conflicts_are_separate_chains() -> None:
    """Each conflict is its own chain, run concurrently with the free calls."""
    result = plan([call("a#1", {"x"}), call("b#1", {"x"}), call("c#1", {"y"}), call("d#1", {"z"})])
    assert waves(result) == [[["c#1", "d#1"]], [["a#1"], ["b#1"]]]


# -- first_wins, priority_wins, reject_all -------------------------------------------------------


def test_planner_first_wins_goes_by_proposal_order_ignoring_priority() -> None:
    """The first caller by name wins even against a higher priority; the others lose."""
    result = plan([call("b#1", priority=9), call("a#1"), call("c#1")], "first_wins")
    assert waves(result) == [[["a#1"]]]
    assert sorted(result.lost) == ["b#1", "c#1"]
    assert "(a#1)" in result.lost["b#1"]
    assert "policy first_wins" in result.lost["b#1"]


def test_planner_first_wins_keeps_a_callers_own_order() -> None:
    """Between one caller's calls the one proposed first wins."""
    result = plan([call("a#2"), call("a#1")], "first_wins")
    assert result.decisions[0].run == ["a#1"]
    assert list(result.lost) == ["a#2"]


def test_planner_first_wins_runs_every_call_that_clashes_with_no_winner() -> None:
    """a wins x; b (x, y) loses to a; c on y then clashes with no winner and runs too."""
    result = plan([call("a#1", {"x"}), call("b#1", {"x", "y"}), call("c#1", {"y"})], "first_wins")
    assert result.decisions[0].run == ["a#1", "c#1"]
    assert waves(result) == [[["a#1", "c#1"]]]
    assert list(result.lost) == ["b#1"]


def test_planner_priority_wins_goes_by_priority_then_name() -> None:
    """The highest priority wins; between equal priorities the first name."""
    top = plan([call("a#1"), call("b#1", priority=3)], "priority_wins")
    assert top.decisions[0].run == ["b#1"]
    assert "(b#1)" in top.lost["a#1"]
    assert "policy priority_wins" in top.lost["a#1"]
    tie = plan([call("b#1", priority=3), call("a#1", priority=3)], "priority_wins")
    assert tie.decisions[0].run == ["a#1"]


def test_planner_reject_all_runs_none_of_the_conflict() -> None:
    """Every call of the conflict loses; calls outside it still run."""
    result = plan([call("a#1"), call("b#1"), call("c#1", {"y"})], "reject_all")
    assert result.decisions[0].run == []
    assert sorted(result.lost) == ["a#1", "b#1"]
    assert "reject_all" in result.lost["a#1"]
    assert [k for chain in waves(result) for wave in chain for k in wave] == ["c#1"]


# -- escalate and custom arbiters ----------------------------------------------------------------


def test_planner_escalate_leaves_the_conflict_for_a_person() -> None:
    """An escalated conflict is neither run nor lost: it waits in ``escalated``."""
    result = plan([call("a#1"), call("b#1"), call("c#1", {"y"})], "escalate")
    (conflict,) = result.escalated
    assert [c.key for c in conflict.calls] == ["a#1", "b#1"]
    assert (conflict.policy, conflict.resources) == ("escalate", {"x"})
    assert result.decisions == []
    assert result.lost == {}
    assert waves(result) == [[["c#1"]]]


def test_planner_settled_escalation_runs_the_chosen_calls_in_order() -> None:
    """An operator's choice (by digest) decides: the chosen run in order, the rest lose."""
    result = plan_calls(
        [call("a#1"), call("b#1"), call("c#1")],
        Arbitration(policy="escalate"),
        settled={"D": {"run": ["c#1", "a#1"]}},
        digest=lambda conflict: "D",
    )
    assert result.escalated == []
    assert waves(result) == [[["c#1"], ["a#1"]]]
    assert list(result.lost) == ["b#1"]
    assert "an operator chose" in result.lost["b#1"]
    assert result.decisions[0].replayed is True


def test_planner_custom_arbiter_order_is_kept() -> None:
    """A custom arbiter's keys run in the order it gives; the others lose."""
    seen: list[Conflict] = []

    def last_first(conflict: Conflict) -> list[str]:
        seen.append(conflict)
        return [c.key for c in reversed(conflict.calls)][:2]

    result = plan([call("a#1"), call("b#1"), call("c#1")], last_first)
    assert [c.key for c in seen[0].calls] == ["a#1", "b#1", "c#1"]
    assert waves(result) == [[["c#1"], ["b#1"]]]
    assert list(result.lost) == ["a#1"]
    assert "arbiter" in result.lost["a#1"]
    assert result.decisions[0].policy.endswith("last_first")


@pytest.mark.parametrize(
    "choice",
    [pytest.param(["a#1", "nobody#1"], id="unknown"), pytest.param(["a#1", "a#1"], id="twice")],
)
def test_planner_custom_arbiter_naming_calls_not_in_the_conflict_is_refused(
    choice: list[str],
) -> None:
    """An arbiter returning an unknown key, or a key twice, raises ValueError."""
    with pytest.raises(ValueError, match="must name calls of the conflict"):
        plan([call("a#1"), call("b#1")], lambda conflict: choice)


def test_planner_recorded_decision_is_reused_without_asking_the_arbiter() -> None:
    """A conflict settled by an earlier run of the step is not decided again."""
    asked: list[int] = []

    def arbiter(conflict: Conflict) -> list[str]:
        asked.append(1)
        return ["a#1"]

    recorded = {"run": ["b#1"], "lost": {"a#1": "lost before"}}
    result = plan_calls(
        [call("a#1"), call("b#1")],
        Arbitration(policy=arbiter),
        settled={"D": recorded},
        digest=lambda conflict: "D",
    )
    assert asked == []
    assert (result.decisions[0].run, result.lost) == (["b#1"], {"a#1": "lost before"})
    assert result.decisions[0].replayed is True


# -- which policy applies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        pytest.param(("serialize", "first_wins"), "first_wins", id="first_wins>serialize"),
        pytest.param(("first_wins", "priority_wins"), "priority_wins", id="priority>first"),
        pytest.param(("priority_wins", "custom"), "custom", id="custom>priority"),
        pytest.param(("custom", "escalate"), "escalate", id="escalate>custom"),
        pytest.param(("escalate", "reject_all"), "reject_all", id="reject_all>escalate"),
    ],
)
def test_planner_strictest_policy_of_a_conflict_applies(
    policies: tuple[str, str], expected: str
) -> None:
    """Calls of one conflict naming different policies are settled by the strictest."""

    def custom(conflict: Conflict) -> list[str]:
        return [conflict.calls[-1].key]

    named = {p: (custom if p == "custom" else p) for p in policies}
    tools = {"t1": named[policies[0]], "t2": named[policies[1]]}
    result = plan([call("a#1", tool="t1"), call("b#1", tool="t2")], tools=tools)
    applied = result.escalated[0].policy if result.escalated else result.decisions[0].policy
    assert applied.rsplit(".", 1)[-1] == expected


def test_planner_per_resource_pattern_picks_the_policy() -> None:
    """A conflict over a resource matching a pattern follows that pattern's policy."""
    result = plan(
        [call("a#1", {"acct:1"}), call("b#1", {"acct:1"}), call("a#2", {"x"}), call("b#2", {"x"})],
        per_resource={"acct:*": "reject_all"},
    )
    by_policy = {d.policy: d.run for d in result.decisions}
    assert by_policy == {"reject_all": [], "serialize": ["a#2", "b#2"]}


def test_planner_first_matching_per_resource_pattern_wins() -> None:
    """Patterns are tried in their order; the first that matches decides."""
    arbitration = Arbitration(per_resource={"acct:vip*": "reject_all", "acct:*": "first_wins"})
    assert arbitration.policy_for({"acct:vip1"}) == "reject_all"
    assert arbitration.policy_for({"acct:2"}) == "first_wins"
    assert arbitration.policy_for({"slot:2"}) == "serialize"


@pytest.mark.parametrize(
    "patterns",
    [
        {"slot:*": "reject_all", "acct:*": "first_wins"},
        {"acct:*": "first_wins", "slot:*": "reject_all"},
    ],
)
def test_planner_conflict_over_resources_of_different_policies_takes_the_strictest(
    patterns: dict[str, str],
) -> None:
    """One conflict over resources whose patterns name different policies follows the
    strictest of them, whatever the patterns' order or the resources' names."""
    result = plan(
        [call("a#1", {"acct:1"}), call("b#1", {"acct:1", "slot:1"}), call("c#1", {"slot:1"})],
        per_resource=patterns,
    )
    assert [(d.policy, d.run) for d in result.decisions] == [("reject_all", [])]


def test_planner_tool_policy_overrides_the_graph_and_per_resource() -> None:
    """A tool's own arbitration beats the per-resource and default policies."""
    result = plan(
        [call("a#1", {"acct:1"}, tool="pay"), call("b#1", {"acct:1"}, tool="pay")],
        "reject_all",
        tools={"pay": "priority_wins"},
        per_resource={"acct:*": "reject_all"},
    )
    assert (result.decisions[0].policy, result.decisions[0].run) == ("priority_wins", ["a#1"])


# -- configuration ----------------------------------------------------------------------------


def test_arbitration_problems_empty_for_a_good_configuration() -> None:
    """Known names and functions are fine."""
    good = Arbitration(policy=lambda conflict: [], per_resource={"a:*": "escalate"})
    assert good.problems() == []


def test_arbitration_problems_names_every_bad_policy() -> None:
    """An unknown name and a value that is no policy are each reported, with where."""
    problems = Arbitration(policy="coin_flip", per_resource={"a:*": 3}).problems()  # type: ignore[dict-item]
    assert len(problems) == 2
    assert "arbitration policy: unknown policy 'coin_flip'" in problems[0]
    assert "per_resource['a:*']" in problems[1]
    assert "got 3" in problems[1]


# -- resource locks ---------------------------------------------------------------------------


async def take(locks: ResourceLocks, keys: Iterable[str], **options: Any) -> Held:
    options.setdefault("write", True)
    options.setdefault("policy", "serialize")
    got = await locks.acquire(keys, **options)
    assert isinstance(got, Held), got
    return got


class Waiter:
    """Acquires in a task; ``got`` is what it got once it has it."""

    def __init__(self, locks: ResourceLocks, keys: Iterable[str], **options: Any) -> None:
        self.locks, self.keys, self.options = locks, list(keys), options
        self.got: Held | tuple[str, str] | None = None

    async def __call__(self) -> None:
        self.got = await self.locks.acquire(self.keys, **self.options)


async def test_locks_readers_share_a_key() -> None:
    """A second reader gets a key a reader holds at once."""
    locks = ResourceLocks()
    with anyio.fail_after(5):
        await take(locks, ["x"], write=False, holder="a")
        second = await locks.acquire(["x"], write=False, holder="b", policy="first_wins")
    assert isinstance(second, Held)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(True, True, id="writer-writer"),
        pytest.param(True, False, id="writer-reader"),
        pytest.param(False, True, id="reader-writer"),
    ],
)
async def test_locks_writer_has_a_key_alone_until_released(first: bool, second: bool) -> None:
    """Under serialize a call waits for a conflicting holder, and gets the key once released."""
    locks = ResourceLocks()
    held = await take(locks, ["x"], write=first, holder="a")
    waiter = Waiter(locks, ["x"], write=second, holder="b", policy="serialize")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert waiter.got is None
            locks.release(held)
    assert isinstance(waiter.got, Held)
    assert waiter.got.keys == ["x"]


async def test_locks_keys_are_taken_in_sorted_order() -> None:
    """Whatever order they are given in, keys are held in sorted order."""
    held = await take(ResourceLocks(), ["c", "a", "b", "a"], holder="h")
    assert held.keys == ["a", "b", "c"]


async def test_locks_opposite_orders_never_deadlock() -> None:
    """Calls taking {a, b} and {b, a} behind a third holder of a always both finish."""
    locks = ResourceLocks()
    finished: list[str] = []

    async def both(name: str, keys: list[str]) -> None:
        held = await take(locks, keys, holder=name)
        await anyio.lowlevel.checkpoint()
        locks.release(held)
        finished.append(name)

    with anyio.fail_after(5):
        for _ in range(50):
            third = await take(locks, ["a"], holder="third")
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(both, "p", ["a", "b"])
                tasks.start_soon(both, "q", ["b", "a"])
                await anyio.wait_all_tasks_blocked()
                locks.release(third)
    assert finished.count("p") == finished.count("q") == 50
    assert not locks.busy()


async def test_locks_waiting_call_holds_no_key_after_the_one_it_waits_for() -> None:
    """A call waiting for a has not taken b (keys go in sorted order): b is free."""
    locks = ResourceLocks()
    third = await take(locks, ["a"], holder="third")
    waiter = Waiter(locks, ["b", "a"], write=True, holder="w", policy="serialize")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            free = await locks.acquire(["b"], write=True, holder="x", policy="first_wins")
            assert isinstance(free, Held)
            locks.release(free)
            locks.release(third)
    assert isinstance(waiter.got, Held)
    assert waiter.got.keys == ["a", "b"]


@pytest.mark.parametrize("policy", ["first_wins", "reject_all"])
async def test_locks_first_wins_loses_at_once_naming_the_holder(policy: str) -> None:
    """The call does not wait: it gets (holder, key) and keeps nothing it took before."""
    locks = ResourceLocks()
    await take(locks, ["b"], holder="alice#0")
    with anyio.fail_after(5):
        lost = await locks.acquire(["a", "b"], write=True, holder="bob#0", policy=policy)
        assert lost == ("alice#0", "b")
        # "a" was taken before "b" was found held, and was given back
        free = await locks.acquire(["a"], write=True, holder="carol#0", policy="first_wins")
    assert isinstance(free, Held)


@pytest.mark.parametrize(
    ("holder_priority", "lost"),
    [
        pytest.param(1, False, id="lower-holder-waited-for"),
        pytest.param(5, True, id="equal-holder-wins"),
        pytest.param(9, True, id="higher-holder-wins"),
    ],
)
async def test_locks_priority_wins_waits_only_for_a_lower_priority_holder(
    holder_priority: int, lost: bool
) -> None:
    """A priority-5 call waits for a lower-priority holder; loses to an equal or higher one."""
    locks = ResourceLocks()
    held = await take(locks, ["x"], holder="h", priority=holder_priority)
    waiter = Waiter(locks, ["x"], write=True, holder="w", policy="priority_wins", priority=5)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert (waiter.got == ("h", "x")) is lost
            locks.release(held)
    if not lost:
        assert isinstance(waiter.got, Held)


async def test_locks_priority_wins_against_readers_uses_their_highest_priority() -> None:
    """A writer loses to readers when any of them has its priority or more."""
    locks = ResourceLocks()
    await take(locks, ["x"], write=False, holder="low", priority=0)
    await take(locks, ["x"], write=False, holder="high", priority=7)
    with anyio.fail_after(5):
        got = await locks.acquire(["x"], write=True, holder="w", policy="priority_wins", priority=7)
    assert isinstance(got, tuple)
    assert got[1] == "x"


async def test_locks_cancelled_while_waiting_holds_nothing() -> None:
    """A call cancelled while it waits for its second key gives back the first."""
    locks = ResourceLocks()
    held_b = await take(locks, ["b"], holder="h")
    waiter = Waiter(locks, ["a", "b"], write=True, holder="w", policy="serialize")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            tasks.cancel_scope.cancel()
        assert waiter.got is None
        # "a" is free again: another call takes it without waiting
        free = await locks.acquire(["a"], write=True, holder="x", policy="first_wins")
    assert isinstance(free, Held)
    locks.release(free)
    locks.release(held_b)
    assert not locks.busy()


async def test_locks_release_frees_every_key() -> None:
    """Once every holder released, no key is held."""
    locks = ResourceLocks()
    reader = await take(locks, ["x", "y"], write=False, holder="r")
    writer = await take(locks, ["z"], holder="w")
    assert locks.busy()
    locks.release(reader)
    locks.release(writer)
    assert not locks.busy()
    assert (reader.keys, writer.keys) == ([], [])
