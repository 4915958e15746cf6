"""The graph's data: Send and Command are frozen values, RetryPolicy validates itself and
computes bounded backoff delays, the edge, effect and node-kind specs, and the empty
definition a Graph builder starts from."""

from __future__ import annotations

import dataclasses

import pytest

from orchestra.specs import (
    END,
    NO_PAYLOAD,
    START,
    Command,
    EdgeSpec,
    Effect,
    GraphDefinition,
    NodeKind,
    RetryPolicy,
    Send,
)

# -- virtual nodes, Send, Command -------------------------------------------------------------


def test_virtual_nodes_are_the_reserved_names() -> None:
    """START and END are the reserved names "__start__" and "__end__"."""
    assert (START, END) == ("__start__", "__end__")


def test_send_is_frozen() -> None:
    """A Send cannot be changed once made."""
    send = Send("worker", {"n": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        send.node = "other"  # type: ignore[misc]


def test_send_payload_defaults_to_none() -> None:
    """A Send made with a node only carries no payload."""
    assert Send("worker").payload is None


def test_send_compares_by_value() -> None:
    """Two Sends to the same node with equal payloads are equal and hash alike."""
    assert Send("worker", 1) == Send("worker", 1)
    assert hash(Send("worker", 1)) == hash(Send("worker", 1))
    assert Send("worker", 1) != Send("worker", 2)


def test_command_is_frozen() -> None:
    """A Command cannot be changed once made."""
    command = Command(update={"n": 1}, goto="next")
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.goto = "elsewhere"  # type: ignore[misc]


def test_command_defaults_to_no_update_and_no_targets() -> None:
    """A bare Command updates nothing and adds no targets."""
    command = Command()
    assert command.update is None
    assert command.goto == ()


# -- RetryPolicy: validation --------------------------------------------------------------------


def test_retry_policy_is_keyword_only() -> None:
    """RetryPolicy takes its settings by keyword only."""
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[call-arg]


def test_retry_policy_is_frozen() -> None:
    """A RetryPolicy cannot be changed once made."""
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 9  # type: ignore[misc]


def test_retry_policy_refuses_fewer_than_one_attempt() -> None:
    """attempts counts the first try, so it must be at least 1."""
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        RetryPolicy(attempts=0)


@pytest.mark.parametrize(
    "settings",
    [{"backoff": -0.1}, {"max_backoff": -1.0}, {"multiplier": 0.5}],
    ids=["negative-backoff", "negative-max-backoff", "shrinking-multiplier"],
)
def test_retry_policy_refuses_a_backoff_that_is_negative_or_shrinks(
    settings: dict[str, float],
) -> None:
    """backoff and max_backoff must not be negative, nor the multiplier below 1."""
    with pytest.raises(ValueError, match="backoff >= 0, max_backoff >= 0, multiplier >= 1"):
        RetryPolicy(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("jitter", [-0.01, 1.01])
def test_retry_policy_refuses_a_jitter_outside_zero_to_one(jitter: float) -> None:
    """jitter is a fraction of the delay, within [0, 1]."""
    with pytest.raises(ValueError, match=f"jitter must be within \\[0, 1\\], got {jitter}"):
        RetryPolicy(jitter=jitter)


@pytest.mark.parametrize(
    "settings",
    [
        {"attempts": 1},
        {"backoff": 0.0, "max_backoff": 0.0},
        {"multiplier": 1.0},
        {"jitter": 0.0},
        {"jitter": 1.0},
    ],
    ids=["one-attempt", "zero-backoff", "flat-multiplier", "no-jitter", "full-jitter"],
)
def test_retry_policy_accepts_the_bounds_themselves(settings: dict[str, float]) -> None:
    """The limits of each range are valid settings."""
    policy = RetryPolicy(**settings)  # type: ignore[arg-type]
    for name, value in settings.items():
        assert getattr(policy, name) == value


# -- RetryPolicy: delay and retries ---------------------------------------------------------


def test_retry_policy_delay_starts_at_backoff() -> None:
    """Without jitter the first retry waits exactly ``backoff`` seconds."""
    assert RetryPolicy(backoff=0.75, jitter=0.0).delay(1) == 0.75


def test_retry_policy_delay_grows_by_the_multiplier() -> None:
    """Without jitter each retry waits ``multiplier`` times longer than the one before."""
    policy = RetryPolicy(backoff=0.5, multiplier=3.0, max_backoff=100.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 13.5]


def test_retry_policy_delay_is_capped_at_max_backoff() -> None:
    """No retry waits longer than ``max_backoff``, however many came before."""
    policy = RetryPolicy(backoff=1.0, multiplier=2.0, max_backoff=5.0, jitter=0.0)
    assert [policy.delay(n) for n in (3, 4, 10)] == [4.0, 5.0, 5.0]


def test_retry_policy_delay_with_a_flat_multiplier_stays_at_backoff() -> None:
    """With multiplier 1 every retry waits ``backoff``."""
    policy = RetryPolicy(backoff=2.0, multiplier=1.0, jitter=0.0)
    assert {policy.delay(n) for n in range(1, 8)} == {2.0}


def test_retry_policy_delay_jitter_stays_within_its_fraction_of_the_delay() -> None:
    """With jitter j every delay lies in [base * (1 - j), base]."""
    policy = RetryPolicy(backoff=4.0, multiplier=2.0, max_backoff=100.0, jitter=0.25)
    delays = [policy.delay(2) for _ in range(500)]
    assert all(6.0 <= d <= 8.0 for d in delays)


def test_retry_policy_delay_jitter_spreads_the_delays() -> None:
    """With jitter the delays of one retry differ, not all at the full base."""
    policy = RetryPolicy(backoff=4.0, jitter=0.5)
    delays = {policy.delay(1) for _ in range(200)}
    assert len(delays) > 100
    assert min(delays) < 3.0  # well into the lower half of [2, 4]


def test_retry_policy_delay_under_full_jitter_never_goes_negative() -> None:
    """With jitter 1 a delay lies in [0, base]."""
    policy = RetryPolicy(backoff=1.0, jitter=1.0)
    assert all(0.0 <= policy.delay(1) <= 1.0 for _ in range(500))


def test_retry_policy_retries_the_listed_exception_types() -> None:
    """An error of a type in ``on`` is worth another attempt."""
    assert RetryPolicy(on=(TimeoutError,)).retries(TimeoutError("slow"))


def test_retry_policy_retries_subclasses_of_the_listed_types() -> None:
    """A subclass of a listed type is retried too."""
    assert RetryPolicy(on=(OSError,)).retries(ConnectionResetError())


def test_retry_policy_does_not_retry_other_exception_types() -> None:
    """An error of a type not in ``on`` fails at once."""
    assert not RetryPolicy(on=(TimeoutError,)).retries(ValueError("bad input"))


def test_retry_policy_by_default_retries_exceptions_but_not_base_exceptions() -> None:
    """The default ``on`` is Exception: a cancellation-like BaseException is never retried."""
    policy = RetryPolicy()
    assert policy.retries(RuntimeError("flaky"))
    assert not policy.retries(KeyboardInterrupt())


# -- edges, effects, node kinds, definitions --------------------------------------------------


def test_edge_spec_from_one_source_is_not_a_join() -> None:
    """An edge with a single source is a plain edge."""
    assert not EdgeSpec(("a",), "b").is_join


def test_edge_spec_from_several_sources_is_a_join() -> None:
    """An edge with more than one source waits for all of them: a join."""
    assert EdgeSpec(("a", "b"), "c").is_join


def test_effect_values_are_the_stored_strings() -> None:
    """Each Effect's value is the string kept in stores and plans."""
    assert {e.name: e.value for e in Effect} == {
        "READ": "read",
        "WRITE": "write",
        "IRREVERSIBLE": "irreversible",
    }


def test_effect_is_read_back_from_its_stored_string() -> None:
    """A stored effect string gives back its member."""
    assert Effect("irreversible") is Effect.IRREVERSIBLE


def test_node_kind_values_are_the_stored_strings() -> None:
    """Each NodeKind's value is the string kept in plans."""
    assert {k.name: k.value for k in NodeKind} == {"FUNCTION": "function", "AGENT": "agent"}


def test_no_payload_repr_names_it() -> None:
    """NO_PAYLOAD shows as its own name, not as an anonymous object."""
    assert repr(NO_PAYLOAD) == "NO_PAYLOAD"


def test_no_payload_is_not_none() -> None:
    """NO_PAYLOAD differs from None, so a Send with payload None is still a Send payload."""
    assert NO_PAYLOAD is not None
    assert Send("worker").payload is not NO_PAYLOAD


def test_graph_definition_starts_empty() -> None:
    """A new definition has no nodes, edges, routes or problems."""
    definition = GraphDefinition()
    assert (definition.nodes, definition.edges, definition.routes, definition.problems) == (
        [],
        [],
        [],
        [],
    )


def test_graph_definitions_do_not_share_their_lists() -> None:
    """What one definition records does not appear in another."""
    first, second = GraphDefinition(), GraphDefinition()
    first.problems.append("node 'x' added twice")
    first.edges.append(EdgeSpec(("a",), "b"))
    assert second.problems == []
    assert second.edges == []
