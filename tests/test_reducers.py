"""Reducers: pure functions combining a field's current value with one written value."""

from __future__ import annotations

import pytest

from orchestra import Reducer, add, append, extend, merge, reducer


def test_append_adds_the_value_as_one_item() -> None:
    """append adds the written value as a single item at the end."""
    assert append(["a"], ["b", "c"]) == ["a", ["b", "c"]]


def test_append_starts_a_list_from_none() -> None:
    """append treats a missing current value as an empty list."""
    assert append(None, "a") == ["a"]


def test_append_does_not_mutate_the_current_list() -> None:
    """append returns a new list and leaves the current one alone."""
    current = ["a"]
    append(current, "b")
    assert current == ["a"]


def test_extend_adds_every_item() -> None:
    """extend adds every item of the written iterable at the end."""
    assert extend(["a"], ("b", "c")) == ["a", "b", "c"]


def test_extend_starts_a_list_from_none() -> None:
    """extend treats a missing current value as an empty list."""
    assert extend(None, ["a"]) == ["a"]


def test_extend_refuses_a_str() -> None:
    """extend refuses a string instead of splitting it into characters."""
    with pytest.raises(TypeError, match="str"):
        extend(["a"], "bc")


def test_extend_refuses_a_mapping() -> None:
    """extend refuses a mapping instead of adding its keys."""
    with pytest.raises(TypeError, match="dict"):
        extend(["a"], {"b": 1})


def test_merge_written_keys_win() -> None:
    """merge combines two mappings, the written keys replacing current ones."""
    assert merge({"a": 1, "b": 2}, {"b": 3, "c": 4}) == {"a": 1, "b": 3, "c": 4}


def test_merge_starts_a_dict_from_none() -> None:
    """merge treats a missing current value as an empty dict."""
    assert merge(None, {"a": 1}) == {"a": 1}


def test_merge_does_not_mutate_the_current_dict() -> None:
    """merge returns a new dict and leaves the current one alone."""
    current = {"a": 1}
    merge(current, {"a": 2})
    assert current == {"a": 1}


def test_merge_refuses_a_non_mapping() -> None:
    """merge refuses a value that is not a mapping."""
    with pytest.raises(TypeError, match="list"):
        merge({"a": 1}, [("b", 2)])


def test_add_sums_numbers() -> None:
    """add adds the written number to the current one."""
    assert add(2, 3) == 5
    assert add(0.5, 0.25) == 0.75


def test_add_starts_from_none() -> None:
    """add takes the written value when there is no current one."""
    assert add(None, 7) == 7


def test_builtin_reducers_are_named_by_kind() -> None:
    """Each built-in reducer carries its kind and name."""
    for built_in, kind in ((append, "append"), (extend, "extend"), (merge, "merge"), (add, "add")):
        assert isinstance(built_in, Reducer)
        assert built_in.kind == kind
        assert built_in.name == kind


def test_reducer_wraps_a_custom_function() -> None:
    """reducer(fn) makes a custom Reducer that calls fn(current, value)."""

    def keep_longest(current: str, value: str) -> str:
        return value if len(value) > len(current) else current

    longest = reducer(keep_longest)
    assert isinstance(longest, Reducer)
    assert longest.kind == "custom"
    assert longest.name == "keep_longest"
    assert longest("abc", "de") == "abc"
    assert longest("abc", "defg") == "defg"


def test_reducer_repr_names_the_function() -> None:
    """A reducer's repr names it."""

    def keep_max(current: int, value: int) -> int:
        return max(current, value)

    assert "keep_max" in repr(reducer(keep_max))
    assert "append" in repr(append)


def test_reducer_built_from_a_plain_function_is_custom() -> None:
    """A Reducer built directly from a function defaults to the custom kind."""
    assert Reducer(max).kind == "custom"
    assert Reducer(max)(3, 5) == 5
