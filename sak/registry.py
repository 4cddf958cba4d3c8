"""One small registry type, filled at import time by decorators.

Teachers, tasks, datasets, losses, adapters and routers each get a `Registry`. A name that is not
registered is an error that lists the known names and hints at the recipe's `imports:` key, because
the usual cause is a plug-in module that nobody imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class DuplicateNameError(ValueError):
    """Raised for a name registered a second time with another entry."""


class UnknownNameError(KeyError):
    """Raised for a name that no registered entry carries."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """A named mapping from string to class (or factory), filled with `@registry.register("name")`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is registered twice: {self._entries[name]!r} and {obj!r}"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known names: {known}. "
                "If it lives in a plug-in module, name that module: under `imports:` in a recipe, or with "
                "`--import MODULE` on the command line (sak teachers, sak select)."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


TEACHERS: Registry = Registry("teacher")
TASKS: Registry = Registry("task")
DATASETS: Registry = Registry("dataset")
LOSSES: Registry = Registry("loss")
ADAPTERS: Registry = Registry("adapter")
ROUTERS: Registry = Registry("router")
STUDENTS: Registry = Registry("student architecture")


def check_call(entry: Callable, args: tuple[Any, ...], what: str, wants: str) -> None:
    """Raise a ValueError naming `what` when a registered plug-in cannot be called with `args` (the arguments
    `wants` describes), before calling it: a TypeError from inside the call would be the plug-in's own."""
    try:
        inspect.signature(entry).bind(*args)
    except TypeError as exc:
        raise ValueError(f"{what} ({entry.__name__}): the constructor must take {wants}: {exc}") from None
