"""Recipes: YAML files turned into plain dicts, overridden, interpolated, validated, instantiated.

A recipe is a YAML mapping. Nodes with a ``_component_`` key name what to build: a dotted
import path (``mergekit_video.models.build_mote_model``) or a registry reference
``registry:name`` (``routers:multinomial``, ``merges:ties``). Every recipe has an
``output_dir`` key and may list ``plugins:`` (modules imported before validation).

    cfg = load_recipe("recipes/mote_vitb16.yaml", ["train.epochs=3", "~model.tfm"])
    validate_recipe(cfg, MY_SCHEMA)          # raises ValidationError listing every problem
    model = instantiate(cfg["model"], _path="model")

Pipeline of :func:`load_recipe`: YAML (``5e-5`` is a float, duplicate keys are errors) →
command-line overrides (``a.b=value``, ``~a.b``, ``a.0.b=1``) → ``${...}`` interpolation.

This module does not import torch; validation runs before anything heavy.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COMPONENT_KEY",
    "PARTIAL_KEY",
    "BASE_FIELDS",
    "Component",
    "ConfigError",
    "Field",
    "InstantiationError",
    "MISSING",
    "Override",
    "Problem",
    "Section",
    "ValidationError",
    "apply_overrides",
    "check_components",
    "dump_recipe",
    "format_problems",
    "instantiate",
    "iter_schema",
    "load_recipe",
    "load_recipe_plugins",
    "parse_override",
    "print_validation_error",
    "recipe_schema",
    "resolve_component",
    "resolve_interpolations",
    "save_resolved_recipe",
    "select",
    "validate_recipe",
    "with_defaults",
]

COMPONENT_KEY = "_component_"
PARTIAL_KEY = "_partial_"
_SPECIAL_KEYS = (COMPONENT_KEY, PARTIAL_KEY)


class _Missing:
    """Sentinel for "no value" (``None`` is a valid recipe value)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A recipe problem; the message names the offending key."""


class InstantiationError(ConfigError):
    """Building a ``_component_`` failed; the message names the key path and the target."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: the full key path (``train.lr``) and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<recipe>'}: {self.message}"


def format_problems(problems: Sequence[Problem], *, source: str | None = None) -> str:
    """Plain-text report of ``problems``, one per line, under a header naming ``source``."""
    what = f"recipe {source}" if source else "recipe"
    n = len(problems)
    head = f"{what} is invalid ({n} problem{'s' if n != 1 else ''}):"
    return "\n".join([head, *(f"  - {p}" for p in problems)])


class ValidationError(ConfigError):
    """Raised by :func:`validate_recipe`; lists ALL problems found, each with its key path.

    Attributes:
        problems: the :class:`Problem` list, in recipe order.
        source: the recipe file, when known.
    """

    def __init__(self, problems: Sequence[Problem], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(format_problems(self.problems, source=source))


def print_validation_error(err: ValidationError, console: Any = None) -> None:
    """Print ``err`` with rich: key paths highlighted, one problem per line (to stderr by default)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True, highlight=False)
    what = f"recipe {escape(err.source)}" if err.source else "recipe"
    n = len(err.problems)
    console.print(f"[bold red]{what} is invalid[/] ({n} problem{'s' if n != 1 else ''}):")
    for p in err.problems:
        console.print(f"  [red]•[/] [bold cyan]{escape(p.path or '<recipe>')}[/]: {escape(p.message)}")


def _did_you_mean(word: str, candidates: Iterable[Any], *, n: int = 3) -> str:
    lowered: dict[str, str] = {}
    for c in candidates:
        lowered.setdefault(str(c).lower(), str(c))
    if str(word).lower() in lowered:  # wrong case only
        return f"; did you mean {lowered[str(word).lower()]!r}?"
    close = difflib.get_close_matches(str(word).lower(), lowered, n=n, cutoff=0.6)  # case-insensitive
    close = [lowered[c] for c in close]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ----------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader where ``5e-5`` is a float (YAML 1.1 wants ``5.0e-5``) and duplicate keys are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(
                    f"duplicate key {key!r} at line {line} of {key_node.start_mark.name} "
                    f"(first defined at line {seen[key] + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - SafeLoader subclass


def dump_recipe(cfg: Mapping[str, Any]) -> str:
    """YAML text of a (resolved) recipe; literal ``${`` is escaped so that reloading gives ``cfg`` back."""
    return yaml.safe_dump(_escape_interpolations(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _escape_interpolations(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_escape_interpolations(v) for v in node]
    if isinstance(node, str):
        return node.replace("${", "\\${")
    return node


# ----------------------------------------------------------------------------------------------
# Loading and overrides
# ----------------------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply command-line ``overrides``, resolve ``${...}`` interpolations.

    Args:
        path: the YAML file; its top level must be a mapping.
        overrides: ``a.b=value`` (value parsed as YAML: ``3``, ``5e-5``, ``null``, ``[a, b]``,
            ``{k: v}``), ``~a.b`` (remove), ``a.0.b=1`` (list index), ``+a.new=1`` (add a key
            that must not exist yet). Plain ``a.new=1`` adds keys too; unknown keys are caught
            later by :func:`validate_recipe`.

    Returns:
        A plain ``dict`` (lists, str, int, float, bool, None inside).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: bad YAML, bad override, missing interpolation target or cycle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        cfg = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"recipe {path}: {exc}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping at the top level, got {type(cfg).__name__}")
    cfg = apply_overrides(cfg, overrides)
    return resolve_interpolations(cfg)


@dataclass(frozen=True)
class Override:
    """A parsed command-line override: ``op`` is ``set``, ``add`` (``+key=``) or ``delete`` (``~key``)."""

    op: str
    keys: tuple[str, ...]
    value: Any = None
    text: str = ""

    @property
    def key(self) -> str:
        """The dotted key."""
        return ".".join(self.keys)


_KEY_SEGMENT = re.compile(r"^[^.=~\s]+$")


def parse_override(text: str) -> Override:
    """Parse one override string (see :func:`load_recipe`); raises :class:`ConfigError` on bad syntax."""
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r} must be a string")
    raw = text.strip()
    if raw.startswith("~"):
        if "=" in raw:
            raise ConfigError(f"override {text!r}: '~key' removes a key and takes no value")
        op, key_text, value = "delete", raw[1:], None
    else:
        if "=" not in raw:
            raise ConfigError(f"override {text!r} is neither 'key=value' nor '~key'")
        key_text, value_text = raw.split("=", 1)
        key_text = key_text.strip()
        op = "set"
        if key_text.startswith("+"):
            op, key_text = "add", key_text[1:]
        value = _parse_value(value_text, text)
    keys = tuple(key_text.split("."))
    if not key_text or not all(_KEY_SEGMENT.match(k) for k in keys):
        raise ConfigError(f"override {text!r}: {key_text!r} is not a dotted key like 'train.epochs'")
    return Override(op=op, keys=keys, value=value, text=text)


def _parse_value(value_text: str, text: str) -> Any:
    stripped = value_text.strip()
    if stripped == "":
        raise ConfigError(f"override {text!r} has no value; write key=null for None or key='' for an empty string")
    try:
        return _yaml_load(stripped)
    except (yaml.YAMLError, ConfigError) as exc:
        if stripped[0] in "[{'\"":
            raise ConfigError(f"override {text!r}: cannot parse value {stripped!r}: {exc}") from None
        return stripped  # e.g. "a=@weird": keep the text as a string


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str | Override]) -> dict[str, Any]:
    """Return a deep copy of ``cfg`` with ``overrides`` applied in order."""
    out = copy.deepcopy(dict(cfg))
    for ov in overrides:
        ov = ov if isinstance(ov, Override) else parse_override(ov)
        _apply_one(out, ov)
    return out


def _lookup_child(node: Any, seg: str) -> tuple[Any, Any]:
    """(container key, child) of ``node`` for segment ``seg``; child is MISSING when absent."""
    if isinstance(node, dict):
        if seg in node:
            return seg, node[seg]
        if _is_int(seg) and int(seg) in node:
            return int(seg), node[int(seg)]
        return seg, MISSING
    if isinstance(node, list):
        if not _is_int(seg):
            return seg, MISSING
        i = int(seg)
        return (i, node[i]) if -len(node) <= i < len(node) else (i, MISSING)
    return seg, MISSING


def _is_int(seg: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", seg))


def _apply_one(cfg: dict, ov: Override) -> None:
    node: Any = cfg
    for depth, seg in enumerate(ov.keys[:-1]):
        here = ".".join(ov.keys[: depth + 1])
        key, child = _lookup_child(node, seg)
        if child is MISSING:
            if isinstance(node, list):
                raise ConfigError(f"override {ov.text!r}: {here!r} is out of range (list of {len(node)} items)" if _is_int(seg)
                                  else f"override {ov.text!r}: {'.'.join(ov.keys[:depth]) or '<recipe>'} is a list; use an integer index, not {seg!r}")
            if ov.op == "delete":
                raise ConfigError(f"override {ov.text!r}: key {here!r} does not exist{_did_you_mean(seg, node)}")
            node[key] = child = {}
        if not isinstance(child, (dict, list)):
            kind = "null" if child is None else f"a {type(child).__name__} ({child!r})"
            raise ConfigError(
                f"override {ov.text!r}: cannot go into {here!r}, which is {kind}, not a mapping; "
                f"set the whole value instead, e.g. {here}={{...}}"
            )
        node = child
    last = ov.keys[-1]
    full = ov.key
    parent = ".".join(ov.keys[:-1]) or "<recipe>"
    key, existing = _lookup_child(node, last)
    if isinstance(node, list):
        if not _is_int(last):
            raise ConfigError(f"override {ov.text!r}: {parent} is a list; use an integer index, not {last!r}")
        if existing is MISSING:
            raise ConfigError(f"override {ov.text!r}: index {last} is out of range for {parent} (list of {len(node)} items)")
        if ov.op == "delete":
            del node[key]
        elif ov.op == "add":
            raise ConfigError(f"override {ov.text!r}: {full!r} already exists; drop the '+' to change it")
        else:
            node[key] = ov.value
        return
    if ov.op == "delete":
        if existing is MISSING:
            raise ConfigError(f"override {ov.text!r}: key {full!r} does not exist{_did_you_mean(last, node)}")
        del node[key]
    elif ov.op == "add" and existing is not MISSING:
        raise ConfigError(f"override {ov.text!r}: {full!r} already exists; drop the '+' to change it")
    else:
        node[key] = ov.value


def select(cfg: Any, key: str, default: Any = MISSING) -> Any:
    """The value at dotted ``key`` (list indices allowed); ``default`` when absent, else KeyError."""
    node = cfg
    for seg in key.split(".") if key else []:
        _, node = _lookup_child(node, seg)
        if node is MISSING:
            if default is not MISSING:
                return default
            raise KeyError(f"recipe has no key {key!r}")
    return node


# ----------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------
_INTERP = re.compile(r"(\\)?\$\{([^{}]*)\}")


def resolve_interpolations(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Replace ``${a.b}`` with the value at key ``a.b`` (absolute dotted path, list indices allowed).

    A string that is exactly one ``${...}`` takes the referenced value with its type (int, list,
    mapping, ...); otherwise references are formatted into the string (``${output_dir}/data``).
    ``${env:NAME}`` / ``${env:NAME,default}`` read environment variables; ``\\${...}`` is a literal.

    Raises:
        ConfigError: naming the key that holds the reference, for missing targets and cycles.
    """
    return _Resolver(dict(cfg)).run()


class _Resolver:
    def __init__(self, src: dict[str, Any]) -> None:
        self.src = src
        self.memo: dict[tuple, Any] = {}
        self.stack: list[tuple] = []

    def run(self) -> dict[str, Any]:
        return self.resolve(())

    def resolve(self, path: tuple) -> Any:
        if path in self.memo:
            return self.memo[path]
        if path in self.stack:
            chain = self.stack[self.stack.index(path):] + [path]
            raise ConfigError("interpolation cycle: " + " -> ".join(_dotted(p) or "<recipe>" for p in chain))
        node = self._raw(path)
        self.stack.append(path)
        try:
            if isinstance(node, dict):
                out: Any = {k: self.resolve(path + (k,)) for k in node}
            elif isinstance(node, list):
                out = [self.resolve(path + (i,)) for i in range(len(node))]
            elif isinstance(node, str) and "${" in node:
                out = self._interpolate(node, path)
            else:
                out = node
        finally:
            self.stack.pop()
        self.memo[path] = out
        return out

    def _raw(self, path: tuple) -> Any:
        node: Any = self.src
        for k in path:
            node = node[k]
        return node

    def _ref(self, expr: str, where: tuple) -> Any:
        expr = expr.strip()
        if ":" in expr:
            resolver, _, arg = expr.partition(":")
            if resolver != "env":
                raise ConfigError(f"{_dotted(where)}: unknown interpolation resolver {resolver!r} in '${{{expr}}}' (known: env)")
            name, sep, default = arg.partition(",")
            value = os.environ.get(name.strip())
            if value is None:
                if not sep:
                    raise ConfigError(f"{_dotted(where)}: environment variable {name.strip()!r} is not set ('${{{expr}}}')")
                return _yaml_load(default.strip()) if default.strip() else ""
            return value
        if not expr:
            raise ConfigError(f"{_dotted(where)}: empty interpolation '${{}}'")
        node: Any = self.src
        target: list[Any] = []
        segs = expr.split(".")
        for i, seg in enumerate(segs):
            parent = node
            key, node = _lookup_child(parent, seg)
            if node is MISSING:
                raise ConfigError(
                    f"{_dotted(where)}: '${{{expr}}}' refers to a missing key {expr!r}"
                    f"{_did_you_mean(expr, _all_paths(self.src))}"
                )
            if isinstance(parent, list) and key < 0:
                key += len(parent)
            target.append(key)
            if isinstance(node, str) and "${" in node and i < len(segs) - 1:
                # the prefix is itself a reference (a: ${b}); continue inside its resolved value
                rest = ".".join(segs[i + 1:])
                value = self.resolve(tuple(target))
                try:
                    return copy.deepcopy(select(value, rest))
                except KeyError:
                    raise ConfigError(f"{_dotted(where)}: '${{{expr}}}' refers to a missing key {expr!r}") from None
        return copy.deepcopy(self.resolve(tuple(target)))

    def _interpolate(self, text: str, path: tuple) -> Any:
        m = _INTERP.fullmatch(text)
        if m and not m.group(1):
            return self._ref(m.group(2), path)

        def sub(match: re.Match) -> str:
            if match.group(1):  # escaped: \${...} -> ${...}
                return match.group(0)[1:]
            value = self._ref(match.group(2), path)
            if isinstance(value, (dict, list)) or value is None:
                kind = "null" if value is None else type(value).__name__
                raise ConfigError(
                    f"{_dotted(path)}: '${{{match.group(2)}}}' is {kind} and cannot be formatted into the string {text!r}"
                )
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value)

        return _INTERP.sub(sub, text)


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def _all_paths(node: Any, prefix: str = "") -> Iterator[str]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        p = _join(prefix, k)
        yield p
        yield from _all_paths(v, p)


# ----------------------------------------------------------------------------------------------
# Components and instantiation
# ----------------------------------------------------------------------------------------------
def resolve_component(target: str, *, path: str = "") -> Callable[..., Any]:
    """Return the callable named by a ``_component_`` value.

    ``target`` is a dotted import path (``package.module.attr``), ``package.module:attr``, or
    a registry reference ``registry:name`` resolved via :func:`mergekit_video.registry.get_registry`.
    Errors are :class:`ConfigError` naming ``path`` (e.g. ``model.head._component_``).
    """
    where = _join(path, COMPONENT_KEY)
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"{where}: must be a dotted import path or 'registry:name', got {target!r}")
    target = target.strip()
    if ":" in target:
        prefix, _, name = target.partition(":")
        from .registry import REGISTRIES, RegistryError, get_registry

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
        if not hasattr(obj, attr):
            public = [a for a in dir(obj) if not a.startswith("_")]
            raise ConfigError(f"{where}: {owner!r} has no attribute {attr!r} (from {target!r}){_did_you_mean(attr, public)}")
        obj = getattr(obj, attr)
        owner = f"{owner}.{attr}"
    if not callable(obj):
        raise ConfigError(f"{where}: {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def _target_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: skip the check
        return None


def _check_call(fn: Any, kwargs: Iterable[str], *, path: str, allow_missing: Iterable[str] | bool = ()) -> list[str]:
    """Messages for unknown / missing keyword arguments of ``fn`` (empty when fine or unknowable)."""
    sig = _signature(fn)
    if sig is None:
        return []
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown: list[str] = []
    else:
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in accepted]
    msgs = []
    name = _target_name(fn)
    allowed = ", ".join(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or "(none)"
    for k in unknown:
        msgs.append(f"{_join(path, k)}: unknown argument {k!r} for {name}{_did_you_mean(k, params)} (allowed: {allowed})")
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
        raise ConfigError(f"{_join(path, PARTIAL_KEY)}: must be true or false, got {partial!r}")
    args = {str(k): _instantiate_value(v, _join(path, k)) for k, v in node.items() if k not in _SPECIAL_KEYS}
    args.update(extra)
    problems = _check_call(fn, args, path=path, allow_missing=True if partial else ())
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
        return {k: _instantiate_value(v, _join(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_instantiate_value(v, _join(path, i)) for i, v in enumerate(value)]
    return value


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", list: "list", dict: "mapping", type(None): "null"}


@dataclass(frozen=True)
class Field:
    """A leaf key of a recipe schema.

    Args:
        type: accepted Python type(s): ``int``, ``float`` (ints accepted), ``str``, ``bool``,
            ``list``, ``dict``; a tuple for several; None accepts anything.
        required: the key must be present.
        choices: allowed values ("one of"), listed in the error message; a callable returning
            them is evaluated at validation time (e.g. a registry's names, plugins included).
        min, max: inclusive numeric bounds; ``exclusive_min`` makes ``min`` strict (``lr > 0``).
        default: filled in by :func:`with_defaults` when the key is absent.
        doc: one-line description (shown by :func:`iter_schema`).
        nullable: ``null`` is accepted.
        item: schema of every element when the value is a list.
        path: ``"file"``, ``"dir"`` or ``"exists"`` when the value names a filesystem path that
            :func:`check_paths` checks (not :func:`validate_recipe`: shipped recipes name
            datasets that exist only on the user's machine).
    """

    type: Any = None
    _: dataclasses.KW_ONLY
    required: bool = False
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    min: float | None = None
    max: float | None = None
    exclusive_min: bool = False
    default: Any = MISSING
    doc: str = ""
    nullable: bool = False
    item: Field | Section | Component | None = None
    path: str | None = None


@dataclass(frozen=True)
class Section:
    """A mapping in a recipe schema: its known keys (unknown keys are errors unless ``allow_unknown``)."""

    fields: Mapping[str, Field | Section | Component] = dataclasses.field(default_factory=dict)
    _: dataclasses.KW_ONLY
    required: bool = False
    nullable: bool = False
    allow_unknown: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Component:
    """A ``_component_`` node in a recipe schema.

    Its target must import (or be a registry entry), its keys must be parameters of the target
    (checked against the signature, nothing is instantiated), and required parameters must be
    given, except ``runtime_kwargs`` that the runner passes to :func:`instantiate` itself.
    """

    _: dataclasses.KW_ONLY
    required: bool = False
    nullable: bool = False
    runtime_kwargs: tuple[str, ...] = ()
    doc: str = ""
    fields: Mapping[str, Field | Section] = dataclasses.field(default_factory=dict)
    """Value checks for the component's arguments (types, choices, bounds), when present."""


Spec = Field | Section | Component

BASE_FIELDS: dict[str, Spec] = {
    "output_dir": Field(str, required=True, doc="every file a run produces is written under this folder"),
    "plugins": Field(list, item=Field(str), default=[], doc="modules imported before validation (they register parts)"),
}


def recipe_schema(fields: Mapping[str, Spec] | Section, *, doc: str = "") -> Section:
    """A top-level recipe schema: ``fields`` plus ``output_dir`` (required) and ``plugins``."""
    if isinstance(fields, Section):
        merged = {**BASE_FIELDS, **fields.fields}
        return dataclasses.replace(fields, fields=merged, required=True)
    return Section({**BASE_FIELDS, **fields}, required=True, doc=doc)


def iter_schema(schema: Section, prefix: str = "") -> Iterator[tuple[str, Spec]]:
    """(dotted key, spec) for every key of ``schema``, depth first (for ``--explain`` tables)."""
    for k, spec in schema.fields.items():
        p = _join(prefix, k)
        yield p, spec
        if isinstance(spec, Section):
            yield from iter_schema(spec, p)
        elif isinstance(spec, Field) and isinstance(spec.item, Section):
            yield from iter_schema(spec.item, f"{p}.*")


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def _value_kind(v: Any) -> str:
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def _type_ok(value: Any, t: Any) -> bool:
    if t is None:
        return True
    types = t if isinstance(t, tuple) else (t,)
    for ty in types:
        if ty is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if ty is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if ty is dict and isinstance(value, Mapping):
            return True
        if ty not in (int, float, dict) and isinstance(value, ty):
            return True
    return False


class _Validator:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.checked_components: set[str] = set()

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def check(self, value: Any, spec: Spec, path: str) -> None:
        if value is None:
            if not spec.nullable:
                self.add(path, f"must not be null (expected {self._expected(spec)})")
            return
        if isinstance(spec, Section):
            self.section(value, spec, path)
        elif isinstance(spec, Component):
            self.component(value, spec, path)
        else:
            self.field(value, spec, path)

    @staticmethod
    def _expected(spec: Spec) -> str:
        if isinstance(spec, Section):
            return "a mapping"
        if isinstance(spec, Component):
            return f"a mapping with {COMPONENT_KEY!r}"
        if spec.choices is not None:
            choices = spec.choices() if callable(spec.choices) else spec.choices
            return "one of " + ", ".join(repr(c) for c in choices)
        return _type_name(spec.type) if spec.type is not None else "a value"

    def section(self, value: Any, spec: Section, path: str) -> None:
        if not isinstance(value, Mapping):
            self.add(path, f"expected a mapping, got {_value_kind(value)} ({value!r})")
            return
        for k, sub in spec.fields.items():
            if k not in value:
                if sub.required:
                    doc = f" ({sub.doc})" if sub.doc else ""
                    self.add(_join(path, k), f"is required{doc}")
                continue
            self.check(value[k], sub, _join(path, k))
        if not spec.allow_unknown:
            for k in value:
                if k not in spec.fields:
                    known = ", ".join(spec.fields) or "(none)"
                    self.add(_join(path, k), f"unknown key{_did_you_mean(k, spec.fields)} (known keys here: {known})")

    def field(self, value: Any, spec: Field, path: str) -> None:
        if not _type_ok(value, spec.type):
            self.add(path, f"expected {_type_name(spec.type)}, got {_value_kind(value)} ({value!r})")
            return
        choices = spec.choices() if callable(spec.choices) else spec.choices
        if choices is not None and value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            self.add(path, f"{value!r} is not one of: {allowed}{_did_you_mean(value, choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if spec.min is not None and (value < spec.min or (spec.exclusive_min and value == spec.min)):
                self.add(path, f"must be {'>' if spec.exclusive_min else '>='} {spec.min}, got {value!r}")
            if spec.max is not None and value > spec.max:
                self.add(path, f"must be <= {spec.max}, got {value!r}")
        if spec.item is not None and isinstance(value, list):
            for i, v in enumerate(value):
                self.check(v, spec.item, _join(path, i))

    def component(self, value: Any, spec: Component, path: str) -> None:
        if not isinstance(value, Mapping) or COMPONENT_KEY not in value:
            self.add(path, f"expected a mapping with a {COMPONENT_KEY!r} key, got {_value_kind(value)}")
            return
        self.checked_components.add(path)
        self.component_node(value, path, allow_missing=spec.runtime_kwargs)
        for k, sub in spec.fields.items():
            if k in value:
                self.check(value[k], sub, _join(path, k))

    def component_node(self, value: Mapping[str, Any], path: str, *, allow_missing: Iterable[str] | bool) -> None:
        try:
            fn = resolve_component(value[COMPONENT_KEY], path=path)
        except ConfigError as exc:
            msg = str(exc)
            prefix = _join(path, COMPONENT_KEY) + ": "
            self.add(_join(path, COMPONENT_KEY), msg[len(prefix):] if msg.startswith(prefix) else msg)
            return
        partial = value.get(PARTIAL_KEY, False)
        if not isinstance(partial, bool):
            self.add(_join(path, PARTIAL_KEY), f"must be true or false, got {partial!r}")
        keys = [str(k) for k in value if k not in _SPECIAL_KEYS]
        for msg in _check_call(fn, keys, path=path, allow_missing=True if partial is True else allow_missing):
            where, _, text = msg.partition(": ")
            self.add(where if where != "<recipe>" else "", text)

    def walk_components(self, node: Any, path: str) -> None:
        """Check every ``_component_`` node that no Component spec covered (imports + unknown kwargs)."""
        if isinstance(node, Mapping):
            if COMPONENT_KEY in node and path not in self.checked_components:
                self.checked_components.add(path)
                self.component_node(node, path, allow_missing=True)
            for k, v in node.items():
                if k not in _SPECIAL_KEYS:
                    self.walk_components(v, _join(path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.walk_components(v, _join(path, i))


def validate_recipe(
    cfg: Mapping[str, Any],
    schema: Section | Mapping[str, Spec] | None = None,
    *,
    check_components: bool = True,
    load_plugins: bool = True,
    source: str | None = None,
) -> None:
    """Check a loaded recipe; raise :class:`ValidationError` listing every problem found.

    Checks, in order: ``output_dir`` (required string) and ``plugins`` (imported via
    :func:`mergekit_video.registry.import_plugins`, so that plugin parts are known); ``schema``
    (types, required keys, choices, bounds, unknown keys with suggestions) when given; every
    ``_component_`` target imports (or is registered) and its keys are parameters of the target.
    Nothing is instantiated.
    """
    v = _Validator()
    if not isinstance(cfg, Mapping):
        raise ValidationError([Problem("", f"a recipe must be a mapping, got {_value_kind(cfg)}")], source=source)
    plugins = cfg.get("plugins") or []
    if load_plugins and isinstance(plugins, list):
        # first: plugin modules register parts that components below may refer to
        from .registry import import_plugins

        for i, mod in enumerate(plugins):
            if isinstance(mod, str):
                try:
                    import_plugins([mod])
                except ImportError as exc:
                    v.add(f"plugins.{i}", str(exc))
    full = recipe_schema(schema if schema is not None else Section(allow_unknown=True))
    if schema is None or (isinstance(schema, Section) and schema.allow_unknown):
        full = dataclasses.replace(full, allow_unknown=True)
    v.section(cfg, full, "")
    if isinstance(cfg.get("output_dir"), str) and not cfg["output_dir"].strip():
        v.add("output_dir", "must not be empty")
    if check_components:
        # a Section's Component specs were checked above; now every other _component_ node
        v.walk_components(cfg, "")
    if v.problems:
        raise ValidationError(_dedupe(v.problems), source=source)


_PATH_KINDS = {"file": ("is_file", "file not found"), "dir": ("is_dir", "folder not found"), "exists": ("exists", "path not found")}


def check_paths(cfg: Mapping[str, Any], schema: Section) -> list[Problem]:
    """Problems for every path-valued key (``Field(path=...)``) whose file or folder is missing.

    Runners call this once synthetic data is written and before anything heavy is built, so a
    mistyped list fails in a second with its key instead of after the model is built;
    ``mergevid validate --check-paths`` runs it on demand.
    """
    problems: list[Problem] = []

    def walk(value: Any, spec: Spec, path: str) -> None:
        if value is None:
            return
        if isinstance(spec, (Section, Component)) and isinstance(value, Mapping):
            for k, sub in spec.fields.items():
                if k in value:
                    walk(value[k], sub, _join(path, k))
        elif isinstance(spec, Field):
            if spec.path is not None and isinstance(value, str):
                test, what = _PATH_KINDS[spec.path]
                p = Path(value).expanduser()
                if not getattr(p, test)():
                    hint = " (it is a folder)" if spec.path == "file" and p.is_dir() else " (it is a file)" if spec.path == "dir" and p.is_file() else ""
                    problems.append(Problem(path, f"{what}: {value}{hint}"))
            elif spec.item is not None and isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, spec.item, _join(path, i))

    walk(cfg, schema, "")
    return problems


def load_recipe_plugins(cfg: Mapping[str, Any]) -> list[str]:
    """Import the modules listed under the recipe's ``plugins:`` key; return their names.

    :func:`validate_recipe` does this too; runners that skip validation call it before
    :func:`instantiate`. Raises :class:`ConfigError` naming ``plugins.<i>``.
    """
    plugins = cfg.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    from .registry import import_plugins

    for i, mod in enumerate(plugins):
        try:
            import_plugins([mod])
        except ImportError as exc:
            raise ConfigError(f"plugins.{i}: {exc}") from exc
    return list(plugins)


def check_components(cfg: Mapping[str, Any]) -> list[Problem]:
    """Problems with the ``_component_`` nodes of ``cfg`` (import + unknown arguments), without raising."""
    v = _Validator()
    v.walk_components(cfg, "")
    return v.problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def with_defaults(cfg: Mapping[str, Any], schema: Section | Mapping[str, Spec]) -> dict[str, Any]:
    """A deep copy of ``cfg`` with every absent key that has a ``default`` in ``schema`` filled in.

    Absent sections are created when they get defaults, except nullable ones (optional blocks
    such as ``data.synthetic`` whose presence switches a feature on).
    """
    section = schema if isinstance(schema, Section) else Section(dict(schema))
    out = copy.deepcopy(dict(cfg))
    _fill(out, section)
    return out


def _fill(node: dict, section: Section) -> bool:
    """Fill defaults into ``node``; return True when anything was added."""
    added = False
    for k, spec in section.fields.items():
        if isinstance(spec, Field):
            if k not in node and spec.default is not MISSING:
                node[k] = copy.deepcopy(spec.default)
                added = True
        elif isinstance(spec, Section):
            if k in node:
                if isinstance(node[k], dict):
                    added |= _fill(node[k], spec)
            elif not spec.nullable:  # an absent optional (nullable) section stays absent: it is a feature switch
                child: dict = {}
                if _fill(child, spec):
                    node[k] = child
                    added = True
    return added


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_resolved_recipe(cfg: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Atomically write the resolved recipe as YAML (usually ``{output_dir}/recipe.yaml``).

    An existing file with the same content is left alone; a different one raises
    ``FileExistsError`` unless ``overwrite=True``.
    """
    from .utils.io import atomic_write_text

    path = Path(path)
    text = dump_recipe(cfg)
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return path
        if not overwrite:
            raise FileExistsError(
                f"{path} exists and holds a different recipe; refusing to overwrite it "
                f"(use another output_dir, or pass --overwrite)"
            )
    return atomic_write_text(path, text, overwrite=True)
