"""Typed configs from plain data, by pydantic: the plain dataclasses validated strictly (unknown keys, wrong
types and non-finite numbers refused, then each class's own ``__post_init__`` checks), every error one line
naming the dotted key; and each field's meaning, read from the docstring under it, for the help and the
config reference. Light to import: no torch, and the config classes need no pydantic of their own."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline.settings import ConfigError, UserError

# Strict, from JSON-like data: a mapping stands for a nested dataclass, and nothing is coerced (no "3" for 3,
# no 1 for true, no true for 1.0); NaN and infinities are refused.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

EXPECTED = {  # a pydantic error type -> what the key wanted, in our words
    "int_type": "an integer", "float_type": "a finite number", "finite_number": "a finite number",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
    "dataclass_type": "a mapping",
}
UNION_MEMBERS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True)
class FieldDoc:
    """One config field: its annotation as written, its default (None when required) and its meaning."""

    name: str
    annotation: str
    default: Any
    meaning: str


@cache
def _adapter(cls: type) -> TypeAdapter:
    """A validator of ``cls`` under ``STRICT``: a one-field root carries the settings, so ``cls`` (and the
    dataclasses inside it, which inherit them) stays a plain dataclass."""
    root = dataclasses.make_dataclass(f"{cls.__name__}Root", [("value", cls)], frozen=True)
    root.__pydantic_config__ = STRICT
    return TypeAdapter(root)


def parse(cls: type, data: Any, where: str = ""):
    """Dataclass ``cls`` from plain data (YAML or JSON values), or a ConfigError in one line naming the dotted key
    (``where`` prefixes the keys: the section ``data`` came from)."""
    try:
        return _adapter(cls).validate_json(json.dumps({"value": data}, default=str)).value
    except ValidationError as error:
        raise ConfigError(_one_line(error, cls, where)) from None


def _one_line(error: ValidationError, cls: type, where: str) -> str:
    """The first problem of ``error`` in our words: the dotted key, what it wanted and what it got."""
    problems = [(_Place(cls, e["loc"][1:], where), e) for e in error.errors()]
    place, first = problems[0]
    if first["type"] == "value_error":  # a __post_init__ check: UserErrors name their key, the others their section
        cause = first["ctx"]["error"]
        return str(cause) if isinstance(cause, UserError) or not place.key else f"{place.key}: {cause}"
    if first["type"] == "unexpected_keyword_argument":  # the unknown key ends the location
        key = ".".join(part for part in (place.key, place.member) if part)
        return f"unknown key {key}; valid keys here: {', '.join(f.name for f in dataclasses.fields(place.holder))}"
    if first["type"] == "missing_argument":
        return f"{place.key} is required"
    if place.member is not None:  # every member of a union refused the value
        members = [(p, e) for p, e in problems if p.key == place.key and p.member is not None]
        wanted = " or ".join(dict.fromkeys(p.wanted for p, _ in members))
        given = next(e["input"] for p, e in members if p.at_member)
        return f"{place.key} must be {wanted}, got {given!r}"
    if first["type"] in EXPECTED:
        return f"{place.key or 'config'} must be {EXPECTED[first['type']]}, got {first.get('input')!r}"
    return f"{place.key or 'config'}: {first['msg']}"


class _Place:
    """A pydantic error location as config keys: ``('ray', 'actors', 'list[int]', 1)`` is key ``ray.actors``,
    inside the union member tagged ``list[int]``; ``parent`` is the last dataclass on the way, ``holder`` the one
    whose fields the member was looked for in."""

    def __init__(self, cls: type, loc: tuple, where: str):
        parts, hint, self.parent, self.member, self.at_member = [], cls, cls, None, False
        for i, part in enumerate(loc):
            if dataclasses.is_dataclass(hint) and part in {f.name for f in dataclasses.fields(hint)}:
                self.parent, hint = hint, typing.get_type_hints(hint)[part]
                parts.append(part)
            elif isinstance(part, int) and parts:
                parts[-1] += f"[{part}]"
            else:
                self.member, self.at_member = str(part), i == len(loc) - 1
                break
        self.key = ".".join(([where] if where else []) + parts)
        self.holder = hint if dataclasses.is_dataclass(hint) else self.parent  # the section a member was looked up in

    @property
    def wanted(self) -> str:
        """What the union member wanted, in words, from its tag (``int``, ``list[int]``)."""
        return "a list" if self.member.startswith(("list", "tuple")) else UNION_MEMBERS.get(self.member, self.member)


@cache
def field_docs(cls: type) -> dict[str, FieldDoc]:
    """The fields of config dataclass ``cls`` by name, in their written order, each meaning the docstring under it."""
    schema = _adapter(cls).json_schema(mode="serialization")
    described = schema["$defs"][cls.__name__]["properties"]
    return {f.name: FieldDoc(f.name, str(f.type), _default(f), described.get(f.name, {}).get("description", ""))
            for f in dataclasses.fields(cls)}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return None if field.default_factory is dataclasses.MISSING else field.default_factory()
