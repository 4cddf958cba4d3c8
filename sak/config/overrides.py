"""`key.path=value` overrides of a recipe's data, before it is structured (`load_recipe`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import yaml

from .schema import Recipe, RecipeError
from .yaml_read import StrictLoader, yaml_problem


def _list_example(keys: list[str]) -> str:
    """An example value for the recipe list at `keys` ("tasks", "student.levels"): `[{name: ...}]` for a list
    of sections with a `name`, `[{...}]` for other sections, `[...]` for values (or a path the schema lacks)."""
    tp: Any = Recipe
    for key in keys:
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if key not in hints:
            return "[...]"
        tp = hints[key]
        if typing.get_origin(tp) in (Union, types.UnionType):  # `list[int] | None`
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
    if dataclasses.is_dataclass(item):
        return "[{name: ...}]" if "name" in {f.name for f in dataclasses.fields(item)} else "[{...}]"
    return "[...]"


def _in_mapping(keys: list[str]) -> bool:
    """Whether `keys` ("student.lora", "teachers.0.options.model_kwargs") lead into a free-form mapping of the
    recipe (a `dict` field, whose keys the schema does not know)."""
    tp: Any = Recipe
    for key in keys:
        if typing.get_origin(tp) is dict or tp is dict:
            return True
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0] if key.isdigit() and typing.get_args(tp) else None
            continue
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if key not in hints:
            return False
        tp = hints[key]
        if typing.get_origin(tp) in (Union, types.UnionType):  # `dict | None`
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return typing.get_origin(tp) is dict or tp is dict


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML; list items addressed by index: teachers.0.weights)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r} is not of the form key.path=value")
    path, raw = override.split("=", 1)
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({yaml_problem(exc)})") from None
    except ValueError as exc:  # PyYAML's int() of a number past Python's 4300-digit limit
        raise RecipeError(f"override {override[:60]!r}...: a value YAML cannot read ({exc})") from None
    if "#" in raw and "#" not in repr(value):  # `run.name='exp #3'` became 'exp': the rest read as a comment
        raise RecipeError(f"override {override!r}: YAML reads ' #' as the start of a comment, so the value became "
                          f"{value!r}; quote the value inside the shell's quotes: {path}='\"{raw}\"'")  # fmt: skip
    parts = path.strip().split(".")
    node: Any = data
    keys: list[str] = []  # the path as walked: one key of a mapping may hold dots (peft's `rank_pattern:
    while len(".".join(keys).split(".")) < len(parts) or not keys:  # {blocks.0.attn.qkv: 4}`), the longest there
        rest = parts[len(".".join(keys).split(".")) if keys else 0 :]
        key = rest[0]
        if isinstance(node, dict):
            key = next((k for n in range(len(rest), 1, -1) if (k := ".".join(rest[:n])) in node), key)
        keys.append(key)
        i, last = len(keys) - 1, len(".".join(keys).split(".")) == len(parts)
        if isinstance(node, list):
            if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
                raise RecipeError(
                    f"override {override!r}: {'.'.join(keys[:i])} has {len(node)} items; {key!r} is not an index"
                )
            key = int(key)
            if last:
                node[key] = value
            else:
                if node[key] is None:  # an item left empty in the file (`teachers: [~]`)
                    node[key] = {}
                node = node[key]
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override {override!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            continue
        if last:
            node[key] = value
        else:
            if node.get(key) is None:  # absent, or a section left empty in the file (`cache:`)
                following = parts[len(".".join(keys).split("."))]
                if following.isdigit():  # an item of a list that is not there (stage 1's tasks)
                    section = ".".join(keys[: i + 1])
                    state = "has no items" if key in node else "is not in the recipe"
                    whole = f"give the whole list, e.g. '{section}={_list_example(keys[: i + 1])}'"
                    if _in_mapping(keys[:i]):  # or a new key with dots there ("blocks.0.attn.qkv"): the whole mapping
                        mapping = ".".join(keys[:i])
                        dotted = ".".join(parts[len(mapping.split(".")) :])
                        whole += f"; or, for a key with dots, the whole mapping, e.g. '{mapping}={{{dotted}: ...}}'"
                    raise RecipeError(f"override {override!r}: {section} {state}; {whole}")
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {override!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
