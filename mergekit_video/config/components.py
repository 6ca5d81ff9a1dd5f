"""``_component_`` nodes: resolving targets (import paths, ``registry:name``) and building them."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .base import (
    COMPONENT_KEY,
    PARTIAL_KEY,
    SPECIAL_KEYS,
    ConfigError,
    InstantiationError,
    did_you_mean,
    join_key,
)


def resolve_component(target: str, *, path: str = "") -> Callable[..., Any]:
    """Return the callable named by a ``_component_`` value.

    ``target`` is a dotted import path (``package.module.attr``), ``package.module:attr``, or
    a registry reference ``registry:name`` resolved via :func:`mergekit_video.registry.get_registry`.
    Errors are :class:`ConfigError` naming ``path`` (e.g. ``model.head._component_``).
    """
    where = join_key(path, COMPONENT_KEY)
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{where}: must be a dotted import path or 'registry:name', got {target!r}")
    target = target.strip()
    if ":" in target:
        prefix, _, name = target.partition(":")
        from ..registry import REGISTRIES, RegistryError, get_registry

        if prefix in REGISTRIES or ("." not in prefix and importlib.util.find_spec(prefix) is None):
            try:
                return get_registry(prefix).get(name)
            except RegistryError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            except ImportError as exc:
                raise ConfigError(f"{where}: loading registry {prefix!r} failed: {exc}") from exc
        module_name, attrs = prefix, name.split(".")  # package.module:attr
        module = _import_module(module_name, where, target)
        return _getattr_chain(module, module_name, attrs, where, target)
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(f"{where}: importing {module_name!r} for {target!r} failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the module exists but fails to import
            raise ConfigError(f"{where}: importing {module_name!r} for {target!r} failed: {type(exc).__name__}: {exc}") from exc
        return _getattr_chain(module, module_name, parts[i:], where, target)
    raise ConfigError(f"{where}: cannot import {target!r}: no module named {parts[0]!r}")


def _import_module(name: str, where: str, target: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{where}: importing {name!r} for {target!r} failed: {type(exc).__name__}: {exc}") from exc


def _getattr_chain(obj: Any, owner: str, attrs: Sequence[str], where: str, target: str) -> Any:
    if not attrs:
        raise ConfigError(f"{where}: {target!r} is a module, not a callable")
    for attr in attrs:
        # not hasattr(): it turns any AttributeError (e.g. one raised while a lazily exported module
        # imports) into "missing"; only a lookup that fails on this very name of this object is one
        loading = f"loading {owner}.{attr}" + ("" if f"{owner}.{attr}" == target.replace(":", ".") else f" for {target!r}")
        try:
            value = getattr(obj, attr)
        except AttributeError as exc:
            public = [a for a in dir(obj) if not a.startswith("_")]
            if _is_missing(exc, obj, attr, public):
                raise ConfigError(f"{where}: {owner!r} has no attribute {attr!r} (from {target!r}){did_you_mean(attr, public)}") from None
            raise ConfigError(f"{where}: {loading} failed: AttributeError: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a lazy export whose module fails to import, a raising property
            raise ConfigError(f"{where}: {loading} failed: {type(exc).__name__}: {exc}") from exc
        obj = value
        owner = f"{owner}.{attr}"
    if not callable(obj):
        raise ConfigError(f"{where}: {target!r} is not callable (its type: {type(obj).__name__})")
    return obj


def _is_missing(exc: AttributeError, obj: Any, attr: str, listed: Sequence[str]) -> bool:
    """Whether ``exc`` from ``getattr(obj, attr)`` means ``attr`` is absent (not an error inside the lookup).

    A name that ``dir(obj)`` lists (a lazy export) is there; an error naming another attribute or
    another object was raised by code the lookup ran (e.g. a module importing).
    """
    if attr in listed:
        return False
    name, owner = getattr(exc, "name", None), getattr(exc, "obj", None)
    return (name is None or name == attr) and (owner is None or owner is obj)


def _target_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: skip the check
        return None


def _accepted_arguments(fn: Any, sig: inspect.Signature) -> list[str] | None:
    """The keyword arguments ``fn`` accepts; None when unknowable (``**kwargs`` that go anywhere).

    A class whose ``__init__`` passes ``**kw`` on to its base classes' (as the routers do) accepts
    the named arguments along that chain, up to the first ``__init__`` without ``**kw``.
    """
    def named(params: Any) -> list[str]:
        return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]

    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return named(sig.parameters)
    if not inspect.isclass(fn):
        return None
    accepted: list[str] = []
    for cls in fn.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        if cls is object or not inspect.isfunction(init):
            return None  # the chain ends in code whose arguments cannot be read
        params = inspect.signature(init).parameters
        accepted += [n for n in named(params) if n not in accepted]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return accepted
    return None


def check_call(fn: Any, kwargs: Iterable[str], *, path: str, allow_missing: Iterable[str] | bool = (),
               hidden: Iterable[str] = ()) -> list[str]:
    """Messages for unknown / missing keyword arguments of ``fn`` (empty when fine or unknowable).
    ``hidden`` names parameters the caller supplies itself (a merge's ``tensors``): not accepted from
    the recipe, not listed as allowed, not missing."""
    sig = _signature(fn)
    if sig is None:
        return []
    hidden = set(hidden)
    params = {n: p for n, p in sig.parameters.items() if n not in hidden}
    accepted = _accepted_arguments(fn, sig)
    if accepted is not None:
        accepted = [n for n in accepted if n not in hidden]
    unknown = [] if accepted is None else [k for k in kwargs if k not in accepted]
    msgs = []
    name = _target_name(fn)
    allowed = ", ".join(accepted if accepted is not None else
                        [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]) or "(none)"
    for k in unknown:
        msgs.append(f"{join_key(path, k)}: unknown argument {k!r} for {name}{did_you_mean(k, accepted)} (allowed: {allowed})")
    if allow_missing is not True:
        given = set(kwargs) | set(allow_missing or ())
        missing = [
            n for n, p in params.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in given
        ]
        for n in missing:
            msgs.append(f"{path or '<recipe>'}: missing required argument {n!r} for {name} (allowed: {allowed})")
    return msgs


def instantiate(node: Any, /, *, _path: str = "", **kwargs: Any) -> Any:
    """Build the object described by a ``_component_`` node, recursively.

    Nested ``_component_`` nodes (in mappings and lists) are built first and passed as keyword
    arguments; plain mappings/lists are passed with their nested components built. ``kwargs``
    are extra keyword arguments for the top node (runtime objects such as ``params=...``); they
    override recipe keys and are not themselves instantiated. ``_partial_: true`` returns a
    ``functools.partial`` instead of calling. ``None`` gives ``None``.

    Args:
        node: a mapping with a ``_component_`` key (or None).
        _path: the node's key path in the recipe (``"model"``), used in error messages.

    Raises:
        ConfigError: bad target or arguments, naming the key path and the allowed parameters.
        InstantiationError: the target raised; the original exception is chained.
    """
    if node is None:
        return None
    if not isinstance(node, Mapping) or COMPONENT_KEY not in node:
        kind = type(node).__name__
        raise ConfigError(f"{_path or '<recipe>'}: expected a mapping with a {COMPONENT_KEY!r} key, got {kind}"
                          + (f" with keys {sorted(map(str, node))}" if isinstance(node, Mapping) else ""))
    return _build(node, _path, kwargs)


def _build(node: Mapping[str, Any], path: str, extra: Mapping[str, Any]) -> Any:
    fn = resolve_component(node[COMPONENT_KEY], path=path)
    partial = node.get(PARTIAL_KEY, False)
    if not isinstance(partial, bool):
        raise ConfigError(f"{join_key(path, PARTIAL_KEY)}: must be true or false, got {partial!r}")
    args = {str(k): _instantiate_value(v, join_key(path, k)) for k, v in node.items() if k not in SPECIAL_KEYS}
    args.update(extra)
    problems = check_call(fn, args, path=path, allow_missing=True if partial else ())
    if problems:
        raise ConfigError("; ".join(problems))
    if partial:
        return functools.partial(fn, **args)
    try:
        return fn(**args)
    except InstantiationError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the key path
        raise InstantiationError(
            f"{path or '<recipe>'}: building {_target_name(fn)} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _instantiate_value(value: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        if COMPONENT_KEY in value:
            return _build(value, path, {})
        return {k: _instantiate_value(v, join_key(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_instantiate_value(v, join_key(path, i)) for i, v in enumerate(value)]
    return value


