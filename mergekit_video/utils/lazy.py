"""Lazy package exports: names are imported from their modules on first attribute access."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's ``__name__``.
        table: exported name → module; a module starting with ``.`` is relative to ``package``.
        namespace: the package's ``globals()`` (resolved names are cached there).

    An exported name whose module fails to import raises that error (an ``AttributeError`` raised
    while importing becomes an ``ImportError`` chained to it); only a name outside ``table`` raises
    ``AttributeError``.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:  # a genuinely missing name: hasattr() is False, from-imports fail as usual
            raise AttributeError(f"module {package!r} has no attribute {name!r}", name=name, obj=sys.modules.get(package))
        # An exported name that fails to load is an import error, never an AttributeError: hasattr(),
        # getattr(..., default) and ``from package import name`` would swallow that and report the
        # name as missing. Other exceptions (ImportError, SyntaxError, ...) pass through unchanged.
        source = importlib.util.resolve_name(module, package) if module.startswith(".") else module
        try:
            loaded = importlib.import_module(source)
        except AttributeError as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
            raise ImportError(f"importing {source!r} for {package}.{name} raised AttributeError: {exc}{at}", name=source) from exc
        try:
            value = getattr(loaded, name)
        except AttributeError as exc:  # the export table is wrong, or the module's own __getattr__ failed
            raise ImportError(f"{package}.{name} is exported from {source!r}, which failed to provide it: {exc}", name=source) from exc
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(table) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
