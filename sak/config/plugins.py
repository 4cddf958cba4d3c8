"""Importing the plug-in modules a recipe (or a command's --import) names: the one way a recipe runs code, with
one line naming the module, the error and the plug-in's own line when its code fails."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

from ..registry import DuplicateNameError
from .schema import RecipeError


def import_plugins(modules: list[str], where: str = "imports") -> None:
    """Import plug-in modules named by a recipe (in every process); the one way a recipe runs code."""
    for i, name in enumerate(modules):
        if not isinstance(name, str) or not name or name.startswith("."):
            raise RecipeError(
                f"{where}[{i}]: {name!r} is not a module name; give an absolute dotted name, e.g. my_pkg.teachers"
            )
        try:
            _import_here_too(name)
        except DuplicateNameError as exc:  # a name registered twice (two modules, or a module under two names)
            raise RecipeError(f"{where}[{i}]: plug-in module {name!r}: {exc}") from exc
        except ImportError as exc:
            if _missing_is_the_plugin(exc, name):
                raise RecipeError(f"{where}[{i}]: cannot import plug-in module {name!r}: {exc} (a plug-in is found as "
                                  "Python finds modules: installed, on PYTHONPATH, or in the current directory)") from exc  # fmt: skip
            raise RecipeError(_failed(where, i, name, exc)) from exc  # (a module the plug-in imports is missing)
        except Exception as exc:  # its own code failed (a SyntaxError, an error at module level): where, in one line
            raise RecipeError(_failed(where, i, name, exc)) from exc


def _missing_is_the_plugin(exc: ImportError, name: str) -> bool:
    """Whether the module Python could not find is the plug-in itself or a package above it (not found: a name
    or path to fix in the recipe), rather than something its code imports (a dependency to install)."""
    missing = getattr(exc, "name", None)
    parts = name.split(".")
    return missing is None or missing in {".".join(parts[: k + 1]) for k in range(len(parts))}


def _plugin_files(top: str) -> tuple[list[str], str | None]:
    """The plug-in's own code: its top-level package's folders, or its module file."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return [], None
    folders = [os.path.abspath(d) + os.sep for d in spec.submodule_search_locations or ()]
    return folders, None if folders or spec.origin is None else os.path.abspath(spec.origin)


def _failed(where: str, i: int, name: str, exc: BaseException) -> str:
    """One line for a plug-in module whose own code failed while importing: the error, and the line of the
    plug-in's own code it came from (a SyntaxError names its line itself)."""
    at = ""
    if not isinstance(exc, SyntaxError):
        frames = traceback.extract_tb(exc.__traceback__)
        folders, file = _plugin_files(name.split(".")[0])
        own = [f for f in frames if (p := os.path.abspath(f.filename)) == file or p.startswith(tuple(folders))]
        frame = (own or frames or [None])[-1]  # (the plug-in's own line, not the library's it called)
        at = f" (raised at {frame.filename}:{frame.lineno})" if frame is not None else ""
    return f"{where}[{i}]: plug-in module {name!r} failed while importing: {type(exc).__name__}: {exc}{at}"


def _import_here_too(name: str) -> None:
    """Import `name`, finding it in the current directory too: `python -m sak.train` and `accelerate launch -m`
    put the current directory on sys.path, the `sak` command does not, and both must accept one recipe."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)  # after everything installed, as python -m puts it before: no shadowing here
        try:
            importlib.import_module(name)
        except ImportError:
            sys.path.remove(here)
            raise
