"""StateSchema.apply: merging one step's writes into the typed state."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field, field_validator

from orchestra import StateConflictError, add, append, extend, merge, reducer
from orchestra.errors import InvalidUpdateError
from orchestra.state import FieldDelta, StateSchema


def _longest(current: str, value: str) -> str:
    return value if len(value) > len(current) else current


class State(BaseModel):
    topic: str = ""
    count: Annotated[int, Field(ge=0)] = 0
    log: Annotated[list[str], append] = []
    found: Annotated[list[int], extend] = []
    seen: Annotated[dict[str, int], merge] = {}
    total: Annotated[int, add] = 0
    best: Annotated[int, Field(le=100), max] = 0
    longest: Annotated[str, reducer(_longest)] = ""

    @field_validator("topic")
    @classmethod
    def _normalise_topic(cls, value: str) -> str:
        if value.startswith("!"):
            raise ValueError("a topic cannot start with '!'")
        return value.strip().lower()


SCHEMA = StateSchema(State)


def apply(writes: list[tuple[str, dict[str, object]]], state: State | None = None):
    return SCHEMA.apply(state or State(), writes, run_id="run-1", step=3)


def test_state_schema_of_a_valid_model_has_no_problems() -> None:
    """A state model whose reducers fit their field types has no schema problems."""
    assert SCHEMA.problems == []


def test_state_apply_writes_reducer_fields_in_the_given_order() -> None:
    """Writes to a reducer field are applied in the order given, writer by writer."""
    forward, _ = apply([("a", {"log": "a"}), ("b", {"log": "b"}), ("c", {"log": "c"})])
    backward, _ = apply([("c", {"log": "c"}), ("b", {"log": "b"}), ("a", {"log": "a"})])
    assert forward.log == ["a", "b", "c"]
    assert backward.log == ["c", "b", "a"]


def test_state_apply_is_deterministic() -> None:
    """Applying the same writes to the same state gives the same state every time."""
    writes = [("a", {"log": "x", "total": 2, "seen": {"k": 1}}), ("b", {"log": "y", "total": 3})]
    results = {apply(writes)[0].model_dump_json() for _ in range(5)}
    assert len(results) == 1


def test_state_apply_returns_a_new_state_and_keeps_the_old_one() -> None:
    """apply builds a new state; the state it was given is unchanged."""
    before = State(log=["old"], topic="t")
    after, _ = apply([("a", {"log": "new", "topic": "u"})], before)
    assert after is not before
    assert before.log == ["old"]
    assert before.topic == "t"
    assert after.log == ["old", "new"]
    assert after.topic == "u"


def test_state_apply_sets_a_plain_field() -> None:
    """A plain field written by one writer takes the written value."""
    new, _ = apply([("a", {"count": 5})])
    assert new.count == 5


def test_state_apply_plain_field_conflict_names_both_writers_field_and_step() -> None:
    """Two writers of one plain field in a step raise a conflict naming both, field and step."""
    with pytest.raises(StateConflictError) as caught:
        apply([("alpha", {"count": 1}), ("beta", {"count": 2})])
    error = caught.value
    assert error.writers == ("alpha", "beta")
    assert error.field == "count"
    assert error.step == 3
    assert error.run_id == "run-1"
    message = str(error)
    for part in ("'alpha'", "'beta'", "'count'", "step 3", "run-1"):
        assert part in message


def test_state_apply_same_value_from_two_writers_is_still_a_conflict() -> None:
    """Two writers of one plain field conflict even when they write the same value."""
    with pytest.raises(StateConflictError):
        apply([("a", {"topic": "x"}), ("b", {"topic": "x"})])


def test_state_apply_reducer_field_from_two_writers_is_not_a_conflict() -> None:
    """Two writers of a reducer field in one step are combined, not a conflict."""
    new, _ = apply([("a", {"total": 2}), ("b", {"total": 3})])
    assert new.total == 5


def test_state_apply_unknown_field_lists_the_known_fields() -> None:
    """Writing an unknown field raises InvalidUpdateError naming it and the known fields."""
    with pytest.raises(InvalidUpdateError) as caught:
        apply([("writer", {"nope": 1})])
    message = str(caught.value)
    assert "'nope'" in message
    for known in State.model_fields:
        assert repr(known) in message
    assert caught.value.node == "writer"
    assert caught.value.step == 3


def test_state_apply_plain_field_checks_field_constraints() -> None:
    """A plain write that breaks a field constraint raises InvalidUpdateError."""
    with pytest.raises(InvalidUpdateError) as caught:
        apply([("writer", {"count": -1})])
    assert "'count'" in str(caught.value)
    assert caught.value.node == "writer"


def test_state_apply_plain_field_checks_the_type() -> None:
    """A plain write of the wrong type raises InvalidUpdateError."""
    with pytest.raises(InvalidUpdateError, match="count"):
        apply([("writer", {"count": "many"})])


def test_state_apply_runs_field_validators_on_plain_fields() -> None:
    """A @field_validator of a plain field transforms the written value."""
    new, _ = apply([("a", {"topic": "  Refunds "})])
    assert new.topic == "refunds"


def test_state_apply_field_validator_rejection_is_an_invalid_update() -> None:
    """A @field_validator that rejects a written value raises InvalidUpdateError."""
    with pytest.raises(InvalidUpdateError, match="cannot start with"):
        apply([("a", {"topic": "!x"})])


def test_state_apply_append_validates_the_item() -> None:
    """An append write is validated as one item of the list's item type."""
    with pytest.raises(InvalidUpdateError, match="log"):
        apply([("a", {"log": ["not", "a", "str"]})])


def test_state_apply_append_coerces_the_item() -> None:
    """An append write is coerced like a list item would be."""

    class Numbers(BaseModel):
        values: Annotated[list[int], append] = []

    new, _ = StateSchema(Numbers).apply(Numbers(), [("a", {"values": "7"})], run_id="r", step=1)
    assert new.values == [7]


def test_state_apply_append_validates_only_the_item() -> None:
    """An append write does not revalidate the items already in the list."""

    class Numbers(BaseModel):
        values: Annotated[list[int], append] = []

    legacy = Numbers.model_construct(values=["not-a-number"])
    new, _ = StateSchema(Numbers).apply(legacy, [("a", {"values": 1})], run_id="r", step=1)
    assert new.values == ["not-a-number", 1]


def test_state_apply_extend_validates_every_item() -> None:
    """An extend write is validated as a list of items."""
    new, _ = apply([("a", {"found": ["1", 2]})])
    assert new.found == [1, 2]
    with pytest.raises(InvalidUpdateError, match="found"):
        apply([("a", {"found": ["x"]})])


def test_state_apply_merge_validates_the_mapping() -> None:
    """A merge write is validated as the field's dict type."""
    new, _ = apply([("a", {"seen": {"k": "3"}})])
    assert new.seen == {"k": 3}
    with pytest.raises(InvalidUpdateError, match="seen"):
        apply([("a", {"seen": {"k": "many"}})])


def test_state_apply_custom_plain_function_reducer() -> None:
    """A plain function in Annotated metadata is a custom reducer."""
    new, _ = apply([("a", {"best": 7}), ("b", {"best": 3})])
    assert new.best == 7


def test_state_apply_custom_reducer_function() -> None:
    """A reducer(fn) in Annotated metadata combines the writes with fn."""
    new, _ = apply([("a", {"longest": "abc"}), ("b", {"longest": "de"})])
    assert new.longest == "abc"


def test_state_apply_validates_a_custom_reducer_result() -> None:
    """The value a custom reducer returns is validated against the field."""
    with pytest.raises(InvalidUpdateError, match="best"):
        apply([("a", {"best": 500})])


def test_state_apply_failing_reducer_is_an_invalid_update() -> None:
    """A reducer that raises becomes InvalidUpdateError chaining the original."""
    with pytest.raises(InvalidUpdateError, match="total") as caught:
        apply([("a", {"total": "lots"})])
    assert isinstance(caught.value.__cause__, TypeError)


def test_state_apply_returns_append_deltas_with_the_new_items() -> None:
    """The delta of an append or extend field lists only the items added this step."""
    _, deltas = apply(
        [("a", {"log": "x", "found": [1, 2]}), ("b", {"log": "y", "found": [3]})],
        State(log=["old"], found=[0]),
    )
    assert deltas["log"] == FieldDelta("append", ["x", "y"])
    assert deltas["found"] == FieldDelta("append", [1, 2, 3])


def test_state_apply_returns_set_deltas_with_the_new_values() -> None:
    """The delta of a plain, merge, add or custom field is the field's new value."""
    _, deltas = apply(
        [("a", {"topic": " T ", "total": 2, "seen": {"k": 1}}), ("b", {"total": 3, "best": 4})],
        State(seen={"j": 0}),
    )
    assert deltas["topic"] == FieldDelta("set", "t")
    assert deltas["total"] == FieldDelta("set", 5)
    assert deltas["seen"] == FieldDelta("set", {"j": 0, "k": 1})
    assert deltas["best"] == FieldDelta("set", 4)


def test_state_apply_deltas_name_only_written_fields() -> None:
    """Fields no writer touched have no delta."""
    _, deltas = apply([("a", {"count": 1})])
    assert set(deltas) == {"count"}


@pytest.mark.parametrize(
    ("annotation", "kind"),
    [
        (Annotated[int, append], "append"),
        (Annotated[str, extend], "extend"),
        (Annotated[list[str], merge], "merge"),
    ],
)
def test_state_schema_reducer_on_the_wrong_type_is_a_problem(annotation: object, kind: str) -> None:
    """A list reducer on a non-list field, or merge on a non-dict, is a schema problem."""

    class Wrong(BaseModel):
        field: annotation  # type: ignore[valid-type]

    problems = StateSchema(Wrong).problems
    assert len(problems) == 1
    assert "'field'" in problems[0]
    assert kind in problems[0]


def test_state_schema_two_reducers_on_one_field_is_a_problem() -> None:
    """A field with two reducers is a schema problem."""

    class Twice(BaseModel):
        items: Annotated[list[str], append, extend] = []

    problems = StateSchema(Twice).problems
    assert len(problems) == 1
    assert "'items'" in problems[0]
    assert "2 reducers" in problems[0]
