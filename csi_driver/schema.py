"""Config sections as typed dataclasses, validated with errors that name the key.

We used pydantic first; it cost ~19 MB of the driver's ~56 MB idle RSS (its core plus the schema
machinery) for the dozen fields a config file has, so this small loader does the same job.
A field's type comes from its annotation (str, int, bool, float, `X | None`, Literal[...]); a field
may add `metadata={"convert": fn}` to convert and check the raw value (raising ValueError).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class SchemaError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _check_type(annotation: Any, value: Any) -> Any:
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(arg, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError("must be a list")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ValueError("must be a whole number, not true/false")
    if not isinstance(value, annotation):
        raise ValueError(f"must be {_describe(annotation)}, got {type(value).__name__}")
    return value


def _describe(annotation: Any) -> str:
    return {str: "a string", int: "a whole number", bool: "true or false",
            float: "a number"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def load(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """An instance of dataclass `cls` from `data`, or SchemaError naming the first bad key."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        raise SchemaError(where or "(top level)", "must be a mapping")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise SchemaError(f"{prefix}{key}",
                              f"unknown key; known: {', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if name not in data:
            if required:
                raise SchemaError(f"{prefix}{name}", "required")
            continue
        raw = data[name]
        try:
            convert = f.metadata.get("convert")
            values[name] = convert(raw) if convert else _check_type(hints[name], raw)
        except ValueError as exc:
            raise SchemaError(f"{prefix}{name}", str(exc)) from None
    try:
        return cls(**values)
    except ValueError as exc:  # a check across fields, from the dataclass's __post_init__
        raise SchemaError(where or "(top level)", str(exc)) from None
