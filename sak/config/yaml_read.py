"""Reading YAML as recipes are read: the strict loader (a key given twice refused; YAML 1.2's numbers), copies
without shared containers, and KEY=VALUE pairs of a command line read the same way."""

from __future__ import annotations

import typing
from typing import Any

import yaml

from .schema import DOTTED_FLOAT, EXPONENT_FLOAT, YAML12_INT, RecipeError


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data, no tags that run code) that refuses a key given twice in one mapping:
    PyYAML would keep the last silently, e.g. a second `optim:` section replacing the first. Merge keys
    (`<<: *anchor`) work as in YAML: the mapping's own keys win over the merged ones."""

    def flatten_mapping(self, node):
        # Checked here, once per node, before merging rewrites `node.value` in place: a mapping that merges
        # another holds the merged keys beside its own afterwards, and would be refused when merged again.
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            self._refuse_repeated_keys(node)
        super().flatten_mapping(node)

    def _refuse_repeated_keys(self, node) -> None:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # merged by SafeLoader, not a key of its own
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found a {type(key).__name__} as a key",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)


# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent: `1e-3`, `1e5` and `1.0e5` stay strings.
# Typed recipe fields convert them, but mappings passed on as they are (model_kwargs, lora) would not, and the
# string fails deep inside the model ("linspace() received an invalid combination of arguments"). Read them as
# YAML 1.2 does; integers are matched first, by the resolver PyYAML registers before this one.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))
# and integers as YAML 1.2 does: YAML 1.1 read `010` as octal 8 and `1:30` as base-60 90, without a word. Those
# stay strings now, which an integer field refuses by name; hexadecimal (0x) and octal written 0o still read.
# So do base-60 floats (`1:30.5` was 90.5): PyYAML's float pattern is replaced by one without that form.
_YAML11 = {"tag:yaml.org,2002:int": YAML12_INT, "tag:yaml.org,2002:float": DOTTED_FLOAT}
for _first, _resolvers in StrictLoader.yaml_implicit_resolvers.items():
    StrictLoader.yaml_implicit_resolvers[_first] = [
        (tag, _YAML11[tag] if tag in _YAML11 and regexp is not EXPONENT_FLOAT else regexp) for tag, regexp in _resolvers
    ]


# and no timestamps, which YAML 1.2's core schema does not have: `2024-01-01` (a run named by its date) is a string,
# not a datetime.date, which a string field refused and a free-form mapping carried into run records that JSON
# cannot hold
for _first, _resolvers in StrictLoader.yaml_implicit_resolvers.items():
    StrictLoader.yaml_implicit_resolvers[_first] = [r for r in _resolvers if r[0] != "tag:yaml.org,2002:timestamp"]


def unshared(value: Any) -> Any:
    """A copy without shared containers: YAML anchors, aliases and merge keys give several places in a recipe the
    same dict or list, so an override of one (`teachers.1.options.model_kwargs.embed_dim=64`) changed the other."""
    if isinstance(value, dict):
        return {k: unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unshared(v) for v in value]
    return value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: its problem ("expected ',' or '}', but got '<stream end>'"), not the
    several lines of marks and carets PyYAML's text holds."""
    problem = getattr(exc, "problem", None)
    return problem if problem else " ".join(str(exc).split())


def read_pairs(pairs: list[str], flag: str, error: type[ValueError] = ValueError) -> dict:
    """A command line's KEY=VALUE pairs (`--option model=...`), each value read as a recipe's (1e-3 a
    number); a pair without `=` or a value that is not YAML is `error` naming `flag` and the pair."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise error(f"{flag} {pair!r}: expected KEY=VALUE, e.g. model=vit_small_patch14_dinov2")
        try:
            values[key] = yaml.load(raw, Loader=StrictLoader)
        except yaml.YAMLError as exc:
            raise error(f"{flag} {pair!r}: the value is not valid YAML ({yaml_problem(exc)})") from None
        refuse_keys_without_values(values[key], f"{flag} {key}", error)
    return values


def refuse_keys_without_values(value: Any, where: str, error: type[ValueError] = RecipeError) -> None:
    """YAML reads `{depth:2}` (no space after the colon) as the key "depth:2" without a value: a mapping passed
    on as written (model_kwargs, options) then built another model, or failed far from the recipe. Such a key
    is refused, naming it and the space it needs."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key and not key.endswith(":"):
                name, _, rest = key.partition(":")
                raise error(
                    f"{where or 'the recipe'}: {key!r} is a key without a value; YAML needs a space after the colon: "
                    f"`{name}: {rest}`"
                )
            refuse_keys_without_values(item, f"{where}.{key}" if where else str(key), error)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            refuse_keys_without_values(item, f"{where}.{i}" if where else str(i), error)
