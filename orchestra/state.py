"""Apply node updates to the typed state at a step's barrier.

A :class:`StateSchema` is built once per compiled graph from the pydantic state model: for
every field, its reducer (if any) and how to validate a written value. Merging a step's writes
then costs O(written fields): plain fields are validated through the model's own assignment
validator (field constraints and field validators apply), append/extend/merge writes validate
only the written items, never the whole accumulated value.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import InvalidUpdateError, StateConflictError
from .reducers import Reducer

__all__ = ("FieldDelta", "StateSchema")

_LIST_ORIGINS = (list, Sequence)
_DICT_ORIGINS = (dict, Mapping)


@dataclass(frozen=True, slots=True)
class FieldDelta:
    """What one step did to one field: ``kind`` "set" (``value`` is the new value) or
    "append" (``value`` is the list of items added at the end)."""

    kind: str
    value: Any


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    reducer: Reducer | None
    delta_adapter: TypeAdapter[Any] | None
    validate_result: bool
    items_adapter: TypeAdapter[Any] | None = None


def _as_reducer(item: Any) -> Reducer | None:
    if isinstance(item, Reducer):
        return item
    if isinstance(item, types.FunctionType | types.BuiltinFunctionType):
        return Reducer(item, "custom", getattr(item, "__name__", "custom"))
    return None


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = get_args(annotation)
    if get_origin(annotation) in (types.UnionType, Union) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _item_type(annotation: Any) -> Any:
    args = get_args(annotation)
    return args[0] if args else Any


class StateSchema:
    """How to merge and validate writes for one state model."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self.problems: list[str] = []
        self.fields: dict[str, FieldSpec] = {}
        self._validator = model.__pydantic_validator__
        decorators = model.__pydantic_decorators__
        # without custom serializers, a plain value's JSON form is the value itself
        self.plain_serialization = not (
            decorators.field_serializers or decorators.model_serializers
        )
        for name, info in model.model_fields.items():
            reducers = [r for r in map(_as_reducer, info.metadata) if r is not None]
            if len(reducers) > 1:
                self.problems.append(
                    f"state field {name!r} has {len(reducers)} reducers; give it at most one"
                )
            reducer = reducers[0] if reducers else None
            self.fields[name] = self._field_spec(name, info.annotation, reducer)

    def _field_spec(self, name: str, annotation: Any, reducer: Reducer | None) -> FieldSpec:
        if reducer is None:
            return FieldSpec(name, None, None, validate_result=True)
        annotation = _without_none(annotation)  # Optional[list[X]] appends like list[X]
        origin = get_origin(annotation) or annotation
        kind = reducer.kind
        if kind in ("append", "extend"):
            if origin not in _LIST_ORIGINS:
                self.problems.append(
                    f"state field {name!r} uses the {kind} reducer but is typed "
                    f"{_type_name(annotation)}; {kind} needs a list"
                )
                return FieldSpec(name, reducer, None, validate_result=True)
            item = _item_type(annotation)
            items = TypeAdapter(list[item])  # type: ignore[valid-type]
            adapter = TypeAdapter(item) if kind == "append" else items
            return FieldSpec(name, reducer, adapter, validate_result=False, items_adapter=items)
        if kind == "merge":
            if origin not in _DICT_ORIGINS:
                self.problems.append(
                    f"state field {name!r} uses the merge reducer but is typed "
                    f"{_type_name(annotation)}; merge needs a dict"
                )
                return FieldSpec(name, reducer, None, validate_result=True)
            return FieldSpec(name, reducer, TypeAdapter(annotation), validate_result=False)
        return FieldSpec(name, reducer, None, validate_result=True)

    def serialization_problem(self) -> str | None:
        """Return why pydantic cannot serialize the state model, or None."""
        try:
            self.model.model_json_schema(mode="serialization")
        except Exception as exc:
            return (
                f"state model {self.model.__name__} cannot be serialized to JSON: "
                f"{type(exc).__name__}: {exc}"
            )
        return None

    def apply(
        self,
        state: BaseModel,
        writes: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        run_id: str,
        step: int,
    ) -> tuple[BaseModel, dict[str, FieldDelta]]:
        """Merge ``writes`` (writer label, update) in the given order into a new state.

        Returns the new state and what changed per field. Raises
        :class:`StateConflictError` when two writers set one plain field, and
        :class:`InvalidUpdateError` for unknown fields or values that do not validate.
        """
        values = dict(state.__dict__)
        plain: dict[str, tuple[str, Any]] = {}
        added: dict[str, list[Any]] = {}  # append/extend: items gathered, joined once
        reduced: dict[str, str] = {}  # reducer field -> its last writer
        for writer, update in writes:
            for key, value in update.items():
                spec = self.fields.get(key)
                if spec is None:
                    raise InvalidUpdateError(
                        f"update sets unknown field {key!r}; {self.model.__name__} has "
                        f"{', '.join(repr(f) for f in self.fields) or 'no fields'}",
                        run_id=run_id,
                        step=step,
                        node=writer,
                    )
                reducer = spec.reducer
                if reducer is None:
                    if key in plain:
                        raise StateConflictError(
                            run_id=run_id, step=step, field=key, writers=(plain[key][0], writer)
                        )
                    plain[key] = (writer, value)
                    continue
                if spec.delta_adapter is not None:
                    value = self._validate(spec.delta_adapter, value, key, writer, run_id, step)
                kind = reducer.kind
                if kind == "append" or kind == "extend":
                    items = added.get(key)
                    if items is None:
                        items = added[key] = []
                    if kind == "append":
                        items.append(value)
                    else:
                        items.extend(value)
                    continue
                try:
                    values[key] = reducer(values[key], value)
                except Exception as exc:
                    raise InvalidUpdateError(
                        f"reducer {reducer.name!r} of field {key!r} failed: "
                        f"{type(exc).__name__}: {exc}",
                        run_id=run_id,
                        step=step,
                        node=writer,
                    ) from exc
                reduced[key] = writer
        deltas: dict[str, FieldDelta] = {}
        for key, items in added.items():
            values[key] = [*(values[key] or ()), *items]
            deltas[key] = FieldDelta("append", items)
        new = _copy_with(state, values)
        for key, (writer, value) in plain.items():
            self._assign(new, key, value, writer, run_id, step)
        for key, writer in reduced.items():
            if self.fields[key].validate_result:  # custom and add: the combined value, once
                self._assign(new, key, new.__dict__[key], writer, run_id, step)
        for key in (*plain, *reduced):
            deltas[key] = FieldDelta("set", new.__dict__[key])
        return new, deltas

    def _assign(
        self, new: BaseModel, key: str, value: Any, writer: str, run_id: str, step: int
    ) -> None:
        try:
            self._validator.validate_assignment(new, key, value)
        except ValidationError as exc:
            raise _invalid(exc, key, writer, run_id, step) from exc

    @staticmethod
    def _validate(
        adapter: TypeAdapter[Any], value: Any, key: str, writer: str, run_id: str, step: int
    ) -> Any:
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise _invalid(exc, key, writer, run_id, step) from exc


def _invalid(exc: ValidationError, key: str, writer: str, run_id: str, step: int) -> Exception:
    return InvalidUpdateError(
        f"value written to field {key!r} is invalid: {describe_validation_error(exc, key)}",
        run_id=run_id,
        step=step,
        node=writer,
    )


def _copy_with(state: BaseModel, values: dict[str, Any]) -> BaseModel:
    """Make a new instance of the state's class holding ``values`` (already valid)."""
    new = object.__new__(type(state))
    setattr_ = object.__setattr__
    setattr_(new, "__dict__", values)
    setattr_(new, "__pydantic_fields_set__", set(state.__pydantic_fields_set__))
    setattr_(new, "__pydantic_extra__", state.__pydantic_extra__)
    private = state.__pydantic_private__
    setattr_(new, "__pydantic_private__", None if private is None else dict(private))
    return new


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or repr(annotation)


def describe_validation_error(exc: ValidationError, what: str = "value") -> str:
    """Summarise a ValidationError in one line a model (or a person) can act on."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or what
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
