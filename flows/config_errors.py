"""pydantic's validation errors as the config's own messages: one "field.path: message" line per problem.

    select.methd: unknown field; did you mean 'method'?
    train.batch_size: expected int, got str '8'
    select.budget: must be in (0, 1], got 1.5

pydantic's wording ("Input should be a valid integer") names neither the YAML key nor what was given, and an unknown
key gets no hint; the known names come from the models themselves, found by walking the error's location.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing

from pydantic import BaseModel, ValidationError

TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}
MAPPING_ERRORS = {"model_type", "dataclass_type", "dict_type", "model_attributes_type"}


def error_lines(error: ValidationError, root: type[BaseModel]) -> list[str]:
    lines = []
    for e in error.errors():
        where, kind, given = field_path(e["loc"]), e["type"], e["input"]
        if kind == "config_rules":  # a section's check(): lines already name their field within the section
            lines += [f"{where}.{line}" if where else line for line in e["msg"].splitlines()]
            continue
        if kind in TYPE_NAMES:
            message = f"expected {TYPE_NAMES[kind]}, got {type(given).__name__} {given!r}"
        elif kind in MAPPING_ERRORS:
            message = f"expected a mapping, got {type(given).__name__}"
        elif kind == "list_type":
            message = f"expected a list, got {type(given).__name__}"
        elif kind == "missing":
            message = "required field is missing"
        elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
            message = _unknown_field(str(e["loc"][-1]), known_fields(root, e["loc"][:-1]))
        elif kind == "literal_error":
            choices = re.findall(r"'([^']*)'", e["ctx"]["expected"])
            message = f"must be one of {', '.join(choices)}, got {given!r}"
        elif kind == "value_error":  # a field validator's own message
            message = str(e["ctx"]["error"])
        else:
            message = e["msg"]
        lines.append(f"{where or 'config'}: {message}")
    return lines


def field_path(loc: tuple) -> str:
    """("data", "pool", 0, "format", "type") -> "data.pool[0].format.type"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def known_fields(root: type, loc: tuple) -> list[str]:
    """The field names of the model (or dataclass) at `loc` below `root`."""
    cls = root
    parts = list(loc)
    while parts:
        cls = _strip_optional(cls)
        origin = typing.get_origin(cls)
        if origin in (list, dict):  # the next part is an index or a key, not a field
            parts.pop(0)
            cls = typing.get_args(cls)[-1]
            continue
        cls = typing.get_type_hints(cls)[parts.pop(0)]
    cls = _strip_optional(cls)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return [f.name for f in dataclasses.fields(cls)]


def _strip_optional(cls):
    if typing.get_origin(cls) in (typing.Union, types.UnionType):
        (cls,) = [a for a in typing.get_args(cls) if a is not type(None)]
    return cls


def _unknown_field(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown field; did you mean '{close[0]}'?"
    return f"unknown field; known fields: {', '.join(sorted(known))}"
