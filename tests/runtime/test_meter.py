"""The run's meter: model, tool and denied calls counted per run and per node, the run's
usage built from them, and the stored form a resume starts from."""

from __future__ import annotations

import dataclasses

from orchestra.outcome import COUNTERS, Usage
from orchestra.runtime.meter import Meter

RUNS_OWN = {"steps", "tasks", "wall_seconds", "by_node"}


def test_meter_model_counts_tokens_cost_and_calls_for_the_run() -> None:
    """Each model call adds its tokens, its cost and one call to the run's counters."""
    meter = Meter()
    meter.model("billing", 100, 20, 0.5)
    meter.model("support", 30, 5, 0.25)
    assert meter.counts == {
        "input_tokens": 130,
        "output_tokens": 25,
        "cost_usd": 0.75,
        "model_calls": 2,
        "tool_calls": 0,
        "denied_calls": 0,
    }


def test_meter_model_counts_per_node() -> None:
    """A model call is counted for its own node only."""
    meter = Meter()
    meter.model("billing", 100, 20)
    meter.model("billing", 10, 2)
    meter.model("support", 30, 5)
    assert meter.by_node["billing"] == {
        "input_tokens": 110,
        "output_tokens": 22,
        "model_calls": 2,
        "tool_calls": 0,
        "denied_calls": 0,
    }
    assert meter.by_node["support"]["model_calls"] == 1


def test_meter_model_records_a_nodes_cost_once_it_spent_something() -> None:
    """A node's cost_usd appears with its first priced call, not before."""
    meter = Meter()
    meter.model("billing", 10, 2)
    assert "cost_usd" not in meter.by_node["billing"]
    meter.model("billing", 10, 2, 0.25)
    meter.model("billing", 10, 2, 0.5)
    assert meter.by_node["billing"]["cost_usd"] == 0.75


def test_meter_tool_counts_a_tool_call_for_the_run_and_its_node() -> None:
    """A tool call adds one to the run's tool_calls and to its node's."""
    meter = Meter()
    meter.tool("billing")
    meter.tool("billing")
    meter.tool("support")
    assert meter.counts["tool_calls"] == 3
    assert (meter.by_node["billing"]["tool_calls"], meter.by_node["support"]["tool_calls"]) == (
        2,
        1,
    )


def test_meter_denied_counts_a_denied_call_apart_from_tool_calls() -> None:
    """A denied call adds to denied_calls, for the run and its node, not to tool_calls."""
    meter = Meter()
    meter.denied("billing")
    assert (meter.counts["denied_calls"], meter.counts["tool_calls"]) == (1, 0)
    assert meter.by_node["billing"]["denied_calls"] == 1
    assert meter.by_node["billing"]["tool_calls"] == 0


def test_meter_usage_holds_the_counters_and_the_runs_own_figures() -> None:
    """usage() is a Usage with the run's steps, tasks and wall time and the meter's counts."""
    meter = Meter()
    meter.model("billing", 100, 20, 0.5)
    meter.tool("billing")
    meter.denied("support")
    usage = meter.usage(steps=4, tasks=6, wall_seconds=1.5)
    assert usage == Usage(
        steps=4,
        tasks=6,
        wall_seconds=1.5,
        input_tokens=100,
        output_tokens=20,
        cost_usd=0.5,
        model_calls=1,
        tool_calls=1,
        denied_calls=1,
        by_node={
            "billing": {
                "input_tokens": 100,
                "output_tokens": 20,
                "model_calls": 1,
                "tool_calls": 1,
                "denied_calls": 0,
                "cost_usd": 0.5,
            },
            "support": {
                "input_tokens": 0,
                "output_tokens": 0,
                "model_calls": 0,
                "tool_calls": 0,
                "denied_calls": 1,
            },
        },
    )


def test_meter_usage_is_a_snapshot() -> None:
    """A usage taken earlier does not change as the meter goes on counting."""
    meter = Meter()
    meter.tool("billing")
    usage = meter.usage(steps=1, tasks=1, wall_seconds=0.1)
    meter.tool("billing")
    assert usage.by_node["billing"]["tool_calls"] == 1


def test_meter_stored_is_empty_until_something_was_called() -> None:
    """A meter that counted nothing stores nothing."""
    assert Meter().stored() == {}


def test_meter_stored_is_kept_after_a_denied_call_alone() -> None:
    """A denied call is a call: the meter then stores its counters."""
    meter = Meter()
    meter.denied("billing")
    assert meter.stored()["denied_calls"] == 1


def test_meter_stored_round_trips_through_a_new_meter() -> None:
    """Meter(stored) has the same counters, per run and per node, as the meter it came from."""
    meter = Meter()
    meter.model("billing", 100, 20, 0.125)
    meter.tool("billing")
    meter.denied("support")
    again = Meter(meter.stored())
    assert again.stored() == meter.stored()
    assert (again.counts, again.by_node) == (meter.counts, meter.by_node)


def test_meter_restored_goes_on_counting_from_the_stored_figures() -> None:
    """A resumed run's meter adds its calls to what the run had used before."""
    before = Meter()
    before.model("billing", 100, 20, 0.5)
    meter = Meter(before.stored())
    meter.model("billing", 1, 1, 0.25)
    assert (meter.counts["model_calls"], meter.counts["cost_usd"]) == (2, 0.75)
    assert meter.by_node["billing"]["input_tokens"] == 101


def test_meter_restored_does_not_share_the_stored_per_node_figures() -> None:
    """Counting on a restored meter leaves the mapping it was built from unchanged."""
    before = Meter()
    before.tool("billing")
    stored = before.stored()
    Meter(stored).tool("billing")
    assert stored["by_node"]["billing"]["tool_calls"] == 1


def test_meter_stored_rounds_the_cost() -> None:
    """The stored cost is rounded to 10 decimals (no float noise in the run row)."""
    meter = Meter()
    meter.model("billing", 1, 1, 0.1)
    meter.model("billing", 1, 1, 0.2)
    assert meter.counts["cost_usd"] != 0.3
    assert meter.stored()["cost_usd"] == 0.3


def test_meter_counts_exactly_the_counters() -> None:
    """The meter keeps COUNTERS, whatever else the usage it starts from holds."""
    meter = Meter({"steps": 3, "tasks": 4, "wall_seconds": 2.0, "model_calls": 2})
    assert tuple(meter.counts) == COUNTERS
    assert meter.counts["model_calls"] == 2


def test_meter_counters_are_the_usage_fields_calls_add_to() -> None:
    """COUNTERS are Usage's fields but the run's own (steps, tasks, wall time, by_node)."""
    fields = {f.name for f in dataclasses.fields(Usage)}
    assert set(COUNTERS) == fields - RUNS_OWN
    assert len(COUNTERS) == len(set(COUNTERS))
