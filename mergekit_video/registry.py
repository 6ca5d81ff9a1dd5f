"""Named registries of pluggable parts, and plugin loading.

One :class:`Registry` per kind of part (``ROUTERS``, ``MERGES``, ``REGULARIZERS``, ...).
Built-in parts register themselves when their module is imported; the registry imports
that module the first time it is used, together with every installed package that
declares the ``mergekit_video.plugins`` entry-point group.

    @ROUTERS.register("my_router")
    class MyRouter(Router): ...

    router = ROUTERS.build("my_router", num_experts=4)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

PLUGIN_ENTRY_POINT_GROUP = "mergekit_video.plugins"

_entry_points_loaded = False
_imported_plugin_modules: set[str] = set()
_importing_plugins: list[str] = []  # the plugin modules being imported now (innermost last): their registrations are theirs
_ALL_REGISTRIES: list[Registry] = []  # every registry made, for undoing a plugin that fails half-way


def _keyword_parameters(factory: Any) -> list[str] | None:
    """Keyword arguments ``factory`` accepts, following a class's ``**kwargs`` up its bases; None if open-ended."""
    owners = [c.__init__ for c in factory.__mro__ if "__init__" in vars(c)] if inspect.isclass(factory) else [factory]
    names: list[str] = []
    for fn in owners:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to read (builtins): the call reports
            return None
        names += [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self" and n not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _close(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class RegistryError(KeyError):
    """Raised for unknown or duplicate names; its message is meant for the user."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def load_entry_point_plugins() -> list[str]:
    """Import every installed package that declares the ``mergekit_video.plugins`` group.

    Runs once per process; returns the names of the entry points that were loaded.
    A plugin that fails to import is logged and skipped, so one broken package does
    not take the whole toolkit down.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        before = _registry_snapshot()
        _importing_plugins.append(ep.module)
        try:
            ep.load()
            loaded.append(ep.name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin (even one calling sys.exit) must not end the CLI
            _restore_registries(before, ep.module)  # skipped whole: nothing it registered before failing stays
            log.warning("plugin %r (%s) failed to load and is skipped: %s", ep.name, ep.value, _describe_failure(exc),
                        exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            _importing_plugins.pop()
    return loaded


def _describe_failure(exc: BaseException) -> str:
    """``Type: message (file:line)`` of an exception raised while importing a plugin (where the plugin's code failed)."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    elif exc.__traceback__ is not None:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = os.path.dirname(os.path.abspath(__file__))
        # the plugin's own line: the last frame outside this package and importlib (a duplicate name raises in register())
        importlib_dir = os.path.dirname(os.path.abspath(importlib.__file__))
        theirs = [f for f in frames if not f.filename.startswith((ours, "<frozen", importlib_dir))]
        if theirs:  # a module that is not there at all has no line of its own: none is named
            where = f" ({theirs[-1].filename}:{theirs[-1].lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def import_plugins(modules: Iterable[str]) -> None:
    """Import plugin modules by dotted name (a recipe's ``plugins:`` key).

    Raises ``ImportError`` naming the module when one cannot be imported, whatever the module
    raised (a missing dependency, a syntax error, a name registered twice), with where it failed;
    what it registered before failing is dropped.
    """
    for name in modules:
        if name in _imported_plugin_modules:
            continue
        before = _registry_snapshot()
        _importing_plugins.append(name)
        try:
            importlib.import_module(name)
        except ImportError as exc:
            _restore_registries(before, name)
            hint = ""
            top = name.split(".")[0]
            if isinstance(exc, ModuleNotFoundError) and exc.name == top:  # the plugin itself, not one of its imports
                hint = (f" (install its package, or put the folder that holds {top}/ or {top}.py on PYTHONPATH: "
                        "the working directory is not searched by the mergevid command)")
            raise ImportError(f"plugin module {name!r} could not be imported: {exc}{hint}") from exc
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - named as the plugin's failure (sys.exit too), not a bare error from inside it
            _restore_registries(before, name)
            raise ImportError(f"plugin module {name!r} failed while importing: {_describe_failure(exc)}") from exc
        finally:
            _importing_plugins.pop()
        _imported_plugin_modules.add(name)


_Snapshot = list[tuple["Registry", dict[str, Any], dict[str, str]]]


def _registry_snapshot() -> _Snapshot:
    for r in _ALL_REGISTRIES:  # built-ins first: a restore must not drop them (their modules import only once)
        r._load_builtins()
    return [(r, dict(r._entries), dict(r._owners)) for r in _ALL_REGISTRIES]


def _restore_registries(snapshot: _Snapshot, module: str) -> None:
    """Undo what the failed import of the plugin ``module`` registered since ``snapshot``: its own code's (and its
    submodules') registrations, also those a function of another module made for it. Parts that the top-level code
    of another module registered stay (that module imported fine and is not imported again), recorded as that
    module's rather than the failed plugin's."""

    def importer(registry: Registry, name: str) -> str:
        return registry._importers.get(name, "")

    def from_plugin(registry: Registry, name: str) -> bool:
        where = importer(registry, name)
        return where == module or where.startswith(module + ".") or where not in sys.modules

    for registry, entries, owners in snapshot:
        for name, obj in list(registry._entries.items()):
            if entries.get(name) is obj:
                continue
            if not from_plugin(registry, name):
                if registry._owners.get(name) == module:  # the failed plugin would not import: the module that did
                    registry._owners[name] = importer(registry, name)
            elif name in entries:
                registry._entries[name] = entries[name]  # an override it made: the previous part is back
                registry._owners[name] = owners.get(name, "")
            else:
                del registry._entries[name]


def _module_being_imported(frame: Any) -> str:
    """The module whose top-level code runs at ``frame`` or below it (the innermost module-level frame's
    ``__name__``): the module being imported, whichever module's function registers on its behalf."""
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


class Registry:
    """A name → object table for one kind of part.

    Args:
        kind: what is registered, used in messages ("router", "merge strategy", ...).
        builtin_module: dotted module whose import registers the built-in parts.
    """

    def __init__(self, kind: str, *, builtin_module: str | None = None, check: Callable[[str, Any], None] | None = None) -> None:
        self.kind = kind
        self._check = check  # called with (name, obj) on registration: refuses what cannot work as this kind
        self._builtin_module = builtin_module
        self._builtins_loaded = builtin_module is None
        self._entries: dict[str, Any] = {}
        self._owners: dict[str, str] = {}  # name → the module that registered it (what a saved model imports)
        self._importers: dict[str, str] = {}  # name → the module whose import ran the registration (see _restore_registries)
        _ALL_REGISTRIES.append(self)

    # -- registration -------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Raises :class:`RegistryError` if ``name`` exists, unless ``override=True``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def _add(o: Any, _caller_depth: int = 1) -> Any:
            # the module whose code registers it (its frame calls _add: a decorator, or register() below),
            # whatever the object's own __module__ (a functools.partial, a part defined elsewhere); while a
            # plugin imports, the plugin, even where a function of another module registers for it
            caller = sys._getframe(_caller_depth)
            owner, importer = caller.f_globals.get("__name__", ""), _module_being_imported(caller)
            if _importing_plugins and importer.split(".")[0] != "mergekit_video":  # not a built-in module it imports
                owner = _importing_plugins[-1]
            elif importer not in ("", "__main__", owner) and importer.split(".")[0] != "mergekit_video":
                owner = importer  # a package imported plainly whose import calls another module's function to register
            # Built-ins first, so that an override registered before the first lookup
            # is not clobbered (or refused) when the built-in module is imported later.
            self._load_builtins()
            if name in self._entries and not override and self._entries[name] is not o:
                existing = self._entries[name]
                where = getattr(existing, "__module__", "?")
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (by {where}); "
                    f"pass override=True to replace it"
                )
            if self._check is not None:
                self._check(name, o)
            self._entries[name] = o
            self._owners[name] = owner
            self._importers[name] = importer
            return o

        return _add if obj is None else _add(obj, 2)

    # -- lookup ----------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            importlib.import_module(self._builtin_module)  # type: ignore[arg-type]

    def _ensure_loaded(self) -> None:
        self._load_builtins()
        load_entry_point_plugins()

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``; unknown names list close matches."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._entries, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._entries))})"
            ) from None

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the registered factory ``name`` with keyword arguments."""
        factory = self.get(name)
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} is not callable and cannot be built")
        accepted = _keyword_parameters(factory)
        if accepted is not None:
            unknown = [k for k in kwargs if k not in accepted]
            if unknown:
                raise TypeError(f"{self.kind} {name!r} got an unexpected argument {unknown[0]!r}{_close(unknown[0], accepted)} "
                                f"(accepted arguments: {', '.join(accepted) or 'none'})")
        return factory(**kwargs)

    def owner(self, name: str) -> str | None:
        """The module whose code registered ``name`` (``__main__`` for a script; the plugin module for what it registered
        while it was imported), or None when it is not registered."""
        self._ensure_loaded()
        return self._owners.get(name) if name in self._entries else None

    def names_of(self, obj: Any) -> list[str]:
        """The names ``obj`` is registered under (a router class, a merge function)."""
        self._ensure_loaded()
        return sorted(n for n, o in self._entries.items() if o is obj)

    def names(self) -> list[str]:
        """Sorted registered names."""
        self._ensure_loaded()
        return sorted(self._entries)

    def doc(self, name: str) -> str:
        """The first paragraph of the registered object's docstring, as one line (a summary wrapped over
        several source lines is not cut mid-sentence)."""
        doc = (getattr(self.get(name), "__doc__", None) or "").strip()
        paragraph = doc.split("\n\n")[0] if doc else ""
        return " ".join(line.strip() for line in paragraph.splitlines())

    def items(self) -> list[tuple[str, Any]]:
        """(name, object) pairs in name order."""
        self._ensure_loaded()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def check_merge_signature(name: str, fn: Any) -> None:
    """Refuse a merge strategy that cannot be called as ``fn(tensors, *, base=None, **arguments) -> Tensor``."""
    contract = "a merge strategy is fn(tensors, *, base=None, <keyword arguments>) -> Tensor"
    if not callable(fn):
        raise TypeError(f"merge strategy {name!r} is not callable; {contract}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): taken on trust
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        star = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
        if star is not None:  # fn(tensors) would hand it a 1-tuple holding the list
            raise TypeError(f"merge strategy {name!r} takes *{star}, but the tensors come as one list argument; {contract}")
        raise TypeError(f"merge strategy {name!r} takes no positional argument for the tensors; {contract}")
    # arguments come by keyword (fn(tensors, base=..., **arguments)): only a required positional-only one cannot be given
    required = [p.name for p in positional[1:] if p.default is p.empty and p.kind is p.POSITIONAL_ONLY]
    if required:
        raise TypeError(f"merge strategy {name!r} requires positional-only argument {required[0]!r} besides the tensors; {contract}")
    takes_base = any(p.name == "base" and p.kind is not p.POSITIONAL_ONLY for p in params) or any(p.kind is p.VAR_KEYWORD for p in params)
    if not takes_base:
        raise TypeError(f"merge strategy {name!r} does not accept base=; {contract}")
    base = next((p for p in params if p.name == "base"), None)
    if base is not None and base.default is base.empty:
        raise TypeError(f"merge strategy {name!r} requires base; give it a default (base=None); {contract}")


ROUTERS = Registry("router", builtin_module="mergekit_video.routers")
MERGES = Registry("merge strategy", builtin_module="mergekit_video.merging", check=check_merge_signature)
REGULARIZERS = Registry("regularizer", builtin_module="mergekit_video.regularizers")

REGISTRIES: dict[str, Registry] = {
    "routers": ROUTERS,
    "merges": MERGES,
    "regularizers": REGULARIZERS,
}


def get_registry(kind: str) -> Registry:
    """Return the registry for ``kind`` (``routers``, ``merges``, ...)."""
    try:
        return REGISTRIES[kind]
    except KeyError:
        close = difflib.get_close_matches(kind, REGISTRIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"unknown registry {kind!r}{hint} (known: {', '.join(REGISTRIES)})"
        ) from None


def add_registry(key: str, registry: Registry) -> Registry:
    """Add a registry for another kind of part (used by later subsystems)."""
    if key in REGISTRIES and REGISTRIES[key] is not registry:
        raise RegistryError(f"registry {key!r} already exists")
    REGISTRIES[key] = registry
    return registry


def callable_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a callable, for messages."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
