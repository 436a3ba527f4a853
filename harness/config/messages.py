"""pydantic's validation errors as the project's one-line ``key: problem`` messages.

Each error becomes ``dotted.key: problem (got VALUE)``; unknown keys are grouped per section with the valid keys;
a section's cross-field check (:class:`harness.config.errors.Problems`) names its own keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pydantic import ValidationError

from harness.config.errors import Problems

_YAML_HINT = (" (YAML reads an unquoted no / off / yes / on as a boolean: quote it, e.g. '\"no\"' on the command "
              "line or \"no\" in the file)")


def _members(hint: Any) -> list[Any]:
    """A type hint's alternatives, with ``Annotated`` and ``Optional`` unwrapped."""
    if typing.get_origin(hint) is typing.Annotated:
        return _members(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(hint) for member in _members(arg)]
    return [hint]


def _walk(root: type, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """The keys of an error location (without the tags pydantic adds for union members and validators) and the
    type hint found at its end (``Any`` when it cannot be told)."""
    keys: list[Any] = []
    hint: Any = root
    for part in loc:
        options = _members(hint)
        if isinstance(part, int):
            keys.append(part)
            sequence = next((h for h in options if typing.get_origin(h) in (tuple, list)), None)
            args = typing.get_args(sequence) if sequence is not None else ()
            hint = args[0] if len(args) == 2 and args[1] is Ellipsis else (args[part] if part < len(args) else Any)
            continue
        owner = next((h for h in options if dataclasses.is_dataclass(h) and part in
                      {f.name for f in dataclasses.fields(h)}), None)
        if owner is not None:
            keys.append(part)
            hint = typing.get_type_hints(owner, include_extras=True)[part]
            continue
        member = next((h for h in options if getattr(h, "__name__", None) == part), None)
        if member is not None:  # pydantic names the union member it tried: a tag, not a key
            hint = member
        elif "[" in str(part) or "-" in str(part):  # e.g. "tuple[float, ...]", "function-after[...]"
            continue
        else:
            keys.append(part)  # an unknown key
            hint = Any
    return tuple(keys), hint


def dotted(parts: tuple[Any, ...]) -> str:
    """``("heads", "tasks", 0, "name")`` -> ``"heads.tasks[0].name"``."""
    key = ""
    for part in parts:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(root: type, parts: tuple[Any, ...]) -> list[str]:
    """The field names of the dataclass at ``parts`` (empty when not one)."""
    owner = next((h for h in _members(_walk(root, parts)[1]) if dataclasses.is_dataclass(h)), None)
    return [f.name for f in dataclasses.fields(owner)] if owner is not None else []


def _tuple_length(root: type, parts: tuple[Any, ...]) -> int | str:
    """The item count of the fixed-length list at ``parts`` ("more" when it cannot be told)."""
    for hint in _members(_walk(root, parts)[1]):
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and Ellipsis not in args:
            return len(args)
    return "more"


def _problem(error: dict[str, Any]) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    got = f", got {_shown(value)}"
    hint = _YAML_HINT if isinstance(value, bool) and kind in ("string_type", "literal_error") else ""
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer{got}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number{got}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true/false{got}"
    if kind == "string_type":
        return f"expected a string{got}{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {sign} {bound}{got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}{got}{hint}"
    if kind in ("too_short", "too_long"):
        if ctx.get("min_length") == ctx.get("max_length") or (kind == "too_long" and ctx.get("max_length")):
            return f"expected {ctx.get('max_length', ctx.get('min_length'))} items, got {ctx.get('actual_length')}"
        return f"expected at least {ctx.get('min_length')} item(s){got}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list{got}"
    if kind in ("dataclass_type", "dataclass_exact_type", "model_type", "dict_type"):
        return f"expected a mapping of settings{got}"
    if kind == "missing" or kind == "missing_argument":
        return "is required"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return f"{error['msg']}{got}"


def problems_of(error: ValidationError, root: type) -> list[str]:
    """One ``key: problem`` text per bad key of a validation of ``root`` (in the order found)."""
    problems: dict[str, str] = {}
    unknown: dict[tuple[Any, ...], list[str]] = {}
    items = error.errors(include_url=False)
    deeper = {tuple(item["loc"][:n]) for item in items for n in range(len(item["loc"]))}
    for item in items:
        if item["type"] == "too_short" and tuple(item["loc"]) in deeper:
            continue  # pydantic counts a list whose items failed as empty: the items' own errors say it
        parts = _walk(root, tuple(item["loc"]))[0]
        if item["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(parts[:-1], []).append(str(parts[-1]))
            continue
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            for key, text in cause.problems:
                problems.setdefault(dotted((*parts, key)), text)
            continue
        if item["type"] == "missing" and parts and isinstance(parts[-1], int) and isinstance(item.get("input"), list):
            length = _tuple_length(root, parts[:-1])  # a fixed-length list given too few items
            problems.setdefault(dotted(parts[:-1]), f"expected {length} items, got {len(item['input'])}: "
                                                    f"{_shown(item['input'])}")
            continue
        problems.setdefault(dotted(parts) or "top level", _problem(item))
    texts = []
    for section, names in unknown.items():
        where = dotted(section) or "top level"
        valid = _fields_at(root, section)
        texts.append(f"{where + '.' if section else ''}{names[0]}: unknown key(s) {sorted(names)} in {where}"
                     + (f"; valid keys: {valid}" if valid else ""))
    texts += [f"{key}: {text}" for key, text in problems.items()]
    return texts
