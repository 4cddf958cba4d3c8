"""dict -> dataclass, checking every key and type, with errors that name the key path and what would be right."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

from .schema import RecipeError

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false (`precision.mixed: no`)
            value = "no"
        if value not in args:
            hint = ""
            if isinstance(value, bool):  # a bare yes / on / no / off: "quote it" only where quoting gives a choice
                words = ("yes", "on", "true", "y") if value else ("no", "off", "false", "n")
                hint = (
                    "; quote it (YAML reads yes / no / on / off unquoted as true / false)"
                    if any(w in args for w in words)
                    else " (YAML reads a bare yes / no / on / off as true / false; none of them is a choice here)"
                )
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return structure(tp, value, where)
    if value is None and (origin in (list, dict) or tp is dict):  # a key left empty (`tasks:`, `options:`)
        return [] if origin is list else {}
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            whole = isinstance(value, float) and value.is_integer() and abs(value) < 2**53
            hint = f"; write {int(value)}" if whole else _null_hint(value)  # (2e3 reads as a float)
            raise RecipeError(f"{where}: expected an integer, got {value!r} ({type(value).__name__}){hint}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r} ({type(value).__name__}){_null_hint(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise RecipeError(f"{where}: {len(str(abs(value)))}-digit integer, too large for a number") from None
    if tp is str:
        if not isinstance(value, str):
            # YAML reads yes / no / on / off as booleans and digits as numbers: such a name must be quoted
            if isinstance(value, bool):
                hint = "; quote it (YAML reads yes / no / on / off unquoted as true / false)"
            else:
                hint = "; quote it (YAML read it as a number)" if isinstance(value, (int, float)) else ""
            raise RecipeError(f"{where}: expected a string, got {value!r} ({type(value).__name__}){hint}")
        return value
    raise RecipeError(  # (a plug-in's Options field: its author's to change)
        f"{where}: unsupported field type {tp!r}; an Options field is a bool, int, float, str, list[...], dict, "
        "Literal[...], a dataclass, or one of these | None (a tuple: list[int], say)"
    )


def _null_hint(value: Any) -> str:
    """For the strings 'None' / 'null' where a number belongs: YAML's null is written null or ~."""
    return (
        "; YAML's null is written null (or ~)" if isinstance(value, str) and value.strip() in ("None", "none") else ""
    )


def structure(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            raise RecipeError(f"unknown key {path!r}{hint} valid keys here: {', '.join(fields) or '(none)'}")
        kwargs[key] = _convert(value, hints[key], path)
    required = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if required:  # (a plug-in's Options may have fields without a default; cls() raised a bare TypeError)
        shown = ", ".join(repr(f"{where}.{k}" if where else k) for k in required)
        raise RecipeError(f"{where or 'recipe'}: missing key(s) {shown}, which {cls.__qualname__} has no default for")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except ValueError as exc:  # a section's own check of its values together (TeacherSpec's __post_init__)
        raise RecipeError(f"{where or 'recipe'}: {exc}") from None


def build_options(owner: type, options: dict, where: str) -> Any:
    """The `Options` dataclass of a registered class (teacher, dataset, ...) from a recipe mapping."""
    cls = getattr(owner, "options_type", None) or getattr(owner, "Options", None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):  # (a plug-in's: dataclasses.fields' TypeError)
        raise RecipeError(
            f"{where}: {owner.__qualname__}.Options must be a @dataclass of its options (an empty one where it takes "
            f"none), found {cls!r}"
        )
    return structure(cls, options or {}, f"{where}.options")
