"""The registry behind every extension point (advantage estimators, reward sources, prompt sampling rules):
entries found by name from YAML, the command line and Python, and ``python:MODULE:NAME`` specs that load one
from a module or a ``.py`` file.

Config validation, the trainer, ``--help`` and the docs all read the same registry, so a name is listed in one
place: where it is registered.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from gipo.errors import ConfigError

PYTHON_PREFIX = "python:"
T = TypeVar("T")


def is_python_spec(spec: str) -> bool:
    return spec.startswith(PYTHON_PREFIX) and spec.count(":") >= 2


def _import_module(name: str, spec: str, what: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{what} {spec}: file {path} does not exist.")
        loaded = importlib.util.spec_from_file_location(f"gipo_user_{path.stem}", path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # `gipo` the command does not put cwd on the path
        sys.path.append(str(Path.cwd()))
    return importlib.import_module(name)


def load_python_object(spec: str, what: str) -> Any:
    """``python:MODULE:NAME`` (MODULE a dotted name or a ``.py`` file) -> that callable; a ConfigError naming
    ``what`` and the spec when it cannot be had."""
    module_name, _, name = spec.removeprefix(PYTHON_PREFIX).rpartition(":")
    try:
        module = _import_module(module_name, spec, what)
    except ConfigError:
        raise
    except Exception as err:  # an import runs the user's code: any error means "cannot load it"
        raise ConfigError(f"{what} {spec}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    found = getattr(module, name, None)
    if not callable(found):
        raise ConfigError(f"{what} {spec}: {module_name} has no function {name!r}.")
    return found


class Registry(Generic[T]):
    """Named entries of one kind. ``from_python`` turns what a ``python:MODULE:NAME`` spec loads into an entry
    (None: such specs are not accepted); loaded specs are kept, so a file is imported once per process."""

    def __init__(self, kind: str, key: str, from_python: Callable[[str, Any], T] | None = None):
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}
        self._about: dict[str, str] = {}
        self._from_python = from_python
        self._loaded: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def register_lazy(self, name: str, target: str, about: str = "") -> None:
        """Register ``name`` as ``target`` ("package.module:attribute"), imported on first use: for an entry
        whose module pulls in an optional dependency, so that choosing another entry never imports it."""
        self._check_name(name, replace=False)
        self._lazy[name] = target
        self._about[name] = about

    def _check_name(self, name: str, replace: bool) -> None:
        if not name or ":" in name or "," in name:
            raise ValueError(f"A {self.kind} name must be non-empty, without ':' or ',' (got {name!r}).")
        if name in self and not replace:
            raise ValueError(f"A {self.kind} named {name!r} is registered already; pass replace=True to replace it.")

    def register(self, name: str, entry: T, about: str = "", *, replace: bool = False) -> T:
        self._check_name(name, replace)
        self._lazy.pop(name, None)
        self._entries[name] = entry
        self._about[name] = about
        return entry

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or loaded from a ``python:`` spec; a ConfigError listing the names."""
        if name in self._lazy:
            module_name, _, attribute = self._lazy.pop(name).partition(":")
            self._entries[name] = getattr(importlib.import_module(module_name), attribute)
        if name in self._entries:
            return self._entries[name]
        if self._from_python is not None and is_python_spec(name):
            if name not in self._loaded:
                self._loaded[name] = self._from_python(name, load_python_object(name, self.kind))
            return self._loaded[name]
        close = difflib.get_close_matches(name, self._about, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        python = " or python:MODULE:FUNCTION (MODULE a dotted name or a .py file)" if self._from_python else ""
        raise ConfigError(f"{self.key}={name!r} is not a registered {self.kind}.{hint} Registered: "
                          f"{', '.join(self._about)}{python}.")

    def names(self) -> list[str]:
        return list(self._about)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def describe(self) -> str:
        """One line for ``--help`` and the docs: every name with what it does."""
        listed = "; ".join(f"{name} ({about})" if about else name for name, about in self._about.items())
        python = "; or python:MODULE:FUNCTION" if self._from_python else ""
        return f"Registered: {listed}{python}."


class Stateless:
    """The checkpoint side of a registered rule that carries nothing between iterations."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
