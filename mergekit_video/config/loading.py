"""Recipes as data: YAML in and out, command-line overrides, ``${...}`` interpolation, saving."""

from __future__ import annotations

import copy
import io
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .base import MISSING, ConfigError, did_you_mean, join_key


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader where ``5e-5`` is a float (YAML 1.1 wants ``5.0e-5``) and duplicate keys are errors.

    Merge keys (``<<: *anchor``) work as in YAML 1.1: explicit keys override merged ones."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # flattened by SafeConstructor below
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key {key!r} at line {line} (first defined at line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class _RecipeDumper(yaml.SafeDumper):
    """Writes recipes the way :class:`_RecipeLoader` reads them: a string it would read as a float
    (``5e-5``, ``1e3``) is quoted."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
for _cls in (_RecipeLoader, _RecipeDumper):  # YAML 1.2 floats (5e-5 without a dot), read and written alike
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _yaml_load(text: str, *, name: str | None = None) -> Any:
    """Parse YAML text; ``name`` (the file) is what YAML syntax errors point at instead of ``<unicode string>``."""
    stream: Any = text
    if name is not None:
        stream = io.StringIO(text)
        stream.name = name
    return _unshare(yaml.load(stream, Loader=_RecipeLoader))  # noqa: S506 - SafeLoader subclass


def _unshare(node: Any) -> Any:
    """A copy of a loaded YAML tree in which no two places share one dict or list.

    An anchor (``&a``) and its aliases (``*a``, ``<<: *a``) load as one object; without this an
    override of one place (``d.c.x=5``) would change every place that alias reaches."""
    return _unshare_path(node, ())


def _unshare_path(node: Any, path: tuple[int, ...]) -> Any:
    if isinstance(node, (dict, list)):
        if id(node) in path:
            raise ConfigError("a YAML alias refers to a mapping or list that contains it (a recursive anchor)")
        path = (*path, id(node))
        if isinstance(node, dict):
            return {k: _unshare_path(v, path) for k, v in node.items()}
        return [_unshare_path(v, path) for v in node]
    return node


def dump_recipe(cfg: Mapping[str, Any]) -> str:
    """YAML text of a (resolved) recipe; literal ``${`` is escaped so that reloading gives ``cfg`` back."""
    return yaml.dump(_escape_interpolations(cfg), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def is_recorded_recipe(text: str) -> bool:
    """Whether ``text`` is a recipe as a run records it (``recipe.yaml``: :func:`dump_recipe` of the resolved
    recipe), not one a person wrote (comments, ``${...}``, a layout of their own)."""
    try:
        loaded = yaml.safe_load(text)
        return isinstance(loaded, dict) and dump_recipe(_unescape_interpolations(loaded)) == text
    except (yaml.YAMLError, TypeError, ValueError):
        return False


def _map_strings(node: Any, fn: Any) -> Any:
    """``node`` with ``fn`` applied to every string inside it (mappings and lists searched; keys kept)."""
    if isinstance(node, Mapping):
        return {k: _map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_map_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def _escape_interpolations(node: Any) -> Any:
    """Every literal ``${`` as ``\\${``, which loading reads back as the literal (not an interpolation)."""
    return _map_strings(node, lambda s: s.replace("${", "\\${"))


def _unescape_interpolations(node: Any) -> Any:
    """The inverse of :func:`_escape_interpolations` (a recorded ``\\${`` is the literal ``${``)."""
    return _map_strings(node, lambda s: s.replace("\\${", "${"))


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
        ConfigError: not UTF-8 text, bad YAML, bad override, missing interpolation target or cycle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {data[exc.start]:#04x} on line {line}); "
                          "save it with UTF-8 encoding") from None
    try:
        cfg = _yaml_load(text, name=str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"recipe {path}: {exc}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping at the top level, got {type(cfg).__name__}")
    cfg = apply_overrides(cfg, overrides)
    if isinstance(cfg.get("output_dir"), str) and cfg["output_dir"]:
        # before interpolation, so that ${output_dir}/... names the same folder the run writes into:
        # ~ expanded, and . / .. folded (runs/a/../b is runs/b, whether or not runs/a exists) unless the
        # value interpolates itself (${data.root}/../runs: a .. there belongs to the interpolated path)
        cfg["output_dir"] = os.path.expanduser(cfg["output_dir"])
        if "${" not in cfg["output_dir"]:
            cfg["output_dir"] = os.path.normpath(cfg["output_dir"])
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
    plain = stripped[0] not in "[{'\""  # not a YAML list, mapping or quoted string
    # a YAML double-quoted string inside shell single quotes: '$' is not expanded, nor '#' a comment
    yaml_quoted = '"' + stripped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    quoted = shlex.quote(f"{text.split('=', 1)[0].strip()}={yaml_quoted}")
    comment = re.search(r"\s#", stripped) if plain else None
    if comment:  # YAML would drop the rest as a comment, silently
        raise ConfigError(f"override {text!r}: ' #' starts a YAML comment, which would drop "
                          f"{stripped[comment.start() + 1:]!r}; quote the value: {quoted}")
    try:
        value = _yaml_load(stripped)
    except (yaml.YAMLError, ConfigError) as exc:
        if stripped[0] in "[{'\"":
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            hint = ("; quote an interpolation inside [ ] or { }, e.g. [64, \"${data.num_frames}\"]"
                    if "${" in stripped else "")
            raise ConfigError(f"override {text!r}: cannot parse value {stripped!r} as YAML ({problem}){hint}") from None
        return stripped  # e.g. "a=@weird": keep the text as a string
    if plain and (isinstance(value, dict) or (value is None and stripped not in ("null", "Null", "NULL", "~"))):
        # "x: y" read as a mapping, "&x" as an anchor of nothing: a path or name meant as text
        got = "a mapping (write one as {key: value})" if isinstance(value, dict) else "null (write null for None)"
        raise ConfigError(f"override {text!r}: YAML reads {stripped!r} as {got}; quote the value for text: {quoted}")
    return value


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
                raise ConfigError(f"override {ov.text!r}: key {here!r} does not exist{did_you_mean(seg, node)}")
            following = ov.keys[depth + 1]
            if _is_int(following):  # an index into a list that is not there: a mapping {'0': ...} would be made
                raise ConfigError(f"override {ov.text!r}: {here!r} does not exist, so it has no item {following}; set the "
                                  f"whole list instead, e.g. {here}=[{{...}}]")
            node[key] = child = {}
        if not isinstance(child, (dict, list)):
            named = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(child), f"a {type(child).__name__}")
            kind = "null" if child is None else f"{named} ({child!r})"
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
            raise ConfigError(f"override {ov.text!r}: key {full!r} does not exist{did_you_mean(last, node)}")
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
                    f"{did_you_mean(expr, _all_paths(self.src))}"
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
        p = join_key(prefix, k)
        yield p
        yield from _all_paths(v, p)


def save_resolved_recipe(cfg: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Atomically write the resolved recipe as YAML (usually ``{output_dir}/recipe.yaml``).

    An existing file with the same content is left alone; a different one raises
    ``FileExistsError`` unless ``overwrite=True``.
    """
    from ..utils.io import atomic_write_text

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
