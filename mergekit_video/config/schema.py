"""Recipe schemas (Field, Section, Component) and validation: types, choices, bounds, paths, components."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import (
    COMPONENT_KEY,
    MISSING,
    PARTIAL_KEY,
    SPECIAL_KEYS,
    ConfigError,
    Problem,
    ValidationError,
    did_you_mean,
    join_key,
)
from .components import check_call, resolve_component

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
        min, max: inclusive numeric bounds; ``exclusive_min`` / ``exclusive_max`` make them
            strict (``lr > 0``, ``beta < 1``). Numbers must be finite (no ``.nan``/``.inf``).
        default: filled in by :func:`with_defaults` when the key is absent.
        doc: one-line description (shown by :func:`iter_schema`).
        nullable: ``null`` is accepted.
        item: schema of every element when the value is a list.
        items: schemas by position when the value is a list of fixed length (``[clips, crops]``);
            the list must have exactly that many elements, named by each spec's ``doc``.
        choices_hint: said after the allowed values when a value is not one of them (where
            more choices may come from elsewhere, e.g. a plugin).
        path: ``"file"``, ``"dir"`` or ``"exists"`` when the value names a filesystem path that
            :func:`check_paths` checks (not :func:`validate_recipe`: shipped recipes name
            datasets that exist only on the user's machine); ``"weights"`` when it is an
            open_clip tag or a weights file (checked when it looks like a file, see
            :func:`looks_like_weights_file`); ``"checkpoint"`` when it is ``auto`` or a path;
            ``"model"`` when it names a saved model or trainer checkpoint folder.
        min_items: a list value needs at least this many elements.
        distinct: a list value's elements must differ.
    """

    type: Any = None
    _: dataclasses.KW_ONLY
    required: bool = False
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    choices_hint: str | None = None
    min: float | None = None
    max: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    default: Any = MISSING
    doc: str = ""
    nullable: bool = False
    item: Field | Section | Component | None = None
    items: tuple[Field, ...] | None = None
    path: str | None = None
    min_items: int | None = None
    distinct: bool = False


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
        p = join_key(prefix, k)
        yield p, spec
        if isinstance(spec, Section):
            yield from iter_schema(spec, p)
        elif isinstance(spec, Component) and spec.fields:  # the checked arguments of a component
            yield from iter_schema(Section(spec.fields), p)
        elif isinstance(spec, Field) and isinstance(spec.item, Section):
            yield from iter_schema(spec.item, f"{p}.*")


def _spec_type(spec: Spec) -> str:
    if isinstance(spec, Section):
        return "mapping"
    if isinstance(spec, Component):
        return "component (_component_: ...)"
    if spec.item is not None:
        name = f"list of {_type_name(spec.item.type)}" if isinstance(spec.item, Field) and spec.item.type is not None else "list of mappings"
        others = [t for t in spec.type if t is not list] if isinstance(spec.type, tuple) else []
        name = " or ".join([*(_type_name(t) for t in others), name])
    elif spec.items:
        name = f"[{', '.join(f.doc or _type_name(f.type) for f in spec.items)}]"
    else:
        name = "any" if spec.type is None else _type_name(spec.type)
    return f"{name} or null" if spec.nullable else name


def _allowed(spec: Spec) -> str:
    if not isinstance(spec, Field):
        return ""
    if spec.choices is not None:
        choices = spec.choices() if callable(spec.choices) else spec.choices
        return "one of " + ", ".join(str(c) for c in choices)
    def number(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    bounds = []
    if spec.min_items:
        bounds.append(f"at least {spec.min_items} item{'s' * (spec.min_items != 1)}")
    if spec.distinct:
        bounds.append("distinct items")
    if spec.min is not None:
        bounds.append(f"{'>' if spec.exclusive_min else '>='} {number(spec.min)}")
    if spec.max is not None:
        bounds.append(f"{'<' if spec.exclusive_max else '<='} {number(spec.max)}")
    return ", ".join(bounds)


def explain_schema(schema: Section) -> list[dict[str, str]]:
    """One row per key of ``schema``: ``key``, ``type``, ``default`` (``required`` when it must be
    given), ``allowed`` (choices or bounds) and ``doc`` (what ``mergevid validate --explain`` prints)."""
    rows = []
    for key, spec in iter_schema(schema):
        if isinstance(spec, Field) and spec.default is not MISSING:
            try:  # as YAML writes it: null, true, "auto", [0.9, 0.999]
                default = json.dumps(spec.default)
            except TypeError:
                default = str(spec.default)
        else:
            default = "required" if spec.required else ""
        rows.append({"key": key, "type": _spec_type(spec), "default": default, "allowed": _allowed(spec), "doc": spec.doc})
    return rows


def schema_default(schema: Section, key: str) -> Any:
    """The default the schema fills in for the dotted ``key`` (list items by index:
    ``eval.datasets.0.on_error``), or ``MISSING`` where it fills in none."""
    spec: Any = schema
    for part in key.split("."):
        if isinstance(spec, Field) and spec.item is not None and part.isdigit():
            spec = spec.item
        elif isinstance(spec, (Section, Component)) and part in spec.fields:
            spec = spec.fields[part]
        else:
            return MISSING
    return spec.default if isinstance(spec, Field) else MISSING


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
    def __init__(self, root: Section | None = None) -> None:
        self.problems: list[Problem] = []
        self.checked_components: set[str] = set()
        self.root = root  # the whole recipe's schema: an unknown key is looked for in other sections too

    def _elsewhere(self, key: Any, path: str) -> str:
        """``"; did you mean 'train.keep_last'?"`` for an unknown ``key`` at ``path`` that is a key of another
        section (``keep_last=2`` given at the top level), else ``""``."""
        if self.root is None:
            return ""
        word = str(key).lower()
        found = [full for full, _ in iter_schema(self.root)
                 if full.rsplit(".", 1)[-1].lower() == word and full != join_key(path, key)]
        return f"; did you mean {' or '.join(repr(f) for f in found[:3])}?" if found else ""

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
                    self.add(join_key(path, k), f"is required{doc}")
                continue
            self.check(value[k], sub, join_key(path, k))
        if not spec.allow_unknown:
            for k in value:
                if k not in spec.fields:
                    known = ", ".join(spec.fields) or "(none)"
                    hint = self._elsewhere(k, path) or did_you_mean(k, spec.fields)  # the exact key elsewhere first
                    self.add(join_key(path, k), f"unknown key{hint} (known keys here: {known})")

    def field(self, value: Any, spec: Field, path: str) -> None:
        if not _type_ok(value, spec.type):
            self.add(path, f"expected {_type_name(spec.type)}, got {_value_kind(value)} ({value!r})")
            return
        choices = spec.choices() if callable(spec.choices) else spec.choices
        if choices is not None and value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            close = did_you_mean(value, choices)
            hint = f"; {spec.choices_hint}" if spec.choices_hint and not close else ""  # a typo of a known name needs no other hint
            self.add(path, f"{value!r} is not one of: {allowed}{close}{hint}")
        if isinstance(value, float) and not math.isfinite(value):
            self.add(path, f"must be a finite number, got {value!r}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if spec.min is not None and (value < spec.min or (spec.exclusive_min and value == spec.min)):
                self.add(path, f"must be {'>' if spec.exclusive_min else '>='} {spec.min}, got {value!r}")
            if spec.max is not None and (value > spec.max or (spec.exclusive_max and value == spec.max)):
                self.add(path, f"must be {'<' if spec.exclusive_max else '<='} {spec.max}, got {value!r}")
        if isinstance(value, list) and spec.min_items is not None and len(value) < spec.min_items:
            self.add(path, f"needs at least {spec.min_items} item{'s' * (spec.min_items != 1)}, got {value!r}")
        if isinstance(value, list) and spec.distinct:
            repeated = [v for i, v in enumerate(value) if v in value[:i]]
            if repeated:
                self.add(path, f"lists {repeated[0]!r} more than once ({value!r}); each item once")
        if spec.item is not None and isinstance(value, list):
            for i, v in enumerate(value):
                self.check(v, spec.item, join_key(path, i))
        if spec.items is not None and isinstance(value, list):
            if len(value) != len(spec.items):
                names = ", ".join(s.doc or "?" for s in spec.items)
                self.add(path, f"expected a list of {len(spec.items)} ([{names}]), got {len(value)} item{'s' * (len(value) != 1)} ({value!r})")
            else:
                for i, (v, sub) in enumerate(zip(value, spec.items)):
                    before = len(self.problems)
                    self.check(v, sub, join_key(path, i))
                    if sub.doc:  # say which element: "train.val_views.1: crops: 2 is not one of: 1, 3"
                        self.problems[before:] = [Problem(p.path, f"{sub.doc}: {p.message}") for p in self.problems[before:]]

    def component(self, value: Any, spec: Component, path: str) -> None:
        if not isinstance(value, Mapping) or COMPONENT_KEY not in value:
            self.add(path, f"expected a mapping with a {COMPONENT_KEY!r} key, got {_value_kind(value)}")
            return
        self.checked_components.add(path)
        self.component_node(value, path, allow_missing=spec.runtime_kwargs)
        for k, sub in spec.fields.items():
            if k in value:
                self.check(value[k], sub, join_key(path, k))

    def component_node(self, value: Mapping[str, Any], path: str, *, allow_missing: Iterable[str] | bool) -> None:
        try:
            fn = resolve_component(value[COMPONENT_KEY], path=path)
        except ConfigError as exc:
            msg = str(exc)
            prefix = join_key(path, COMPONENT_KEY) + ": "
            self.add(join_key(path, COMPONENT_KEY), msg[len(prefix):] if msg.startswith(prefix) else msg)
            return
        partial = value.get(PARTIAL_KEY, False)
        if not isinstance(partial, bool):
            self.add(join_key(path, PARTIAL_KEY), f"must be true or false, got {partial!r}")
        keys = [str(k) for k in value if k not in SPECIAL_KEYS]
        for msg in check_call(fn, keys, path=path, allow_missing=True if partial is True else allow_missing):
            where, _, text = msg.partition(": ")
            self.add(where if where != "<recipe>" else "", text)

    def walk_components(self, node: Any, path: str) -> None:
        """Check every ``_component_`` node that no Component spec covered (imports + unknown kwargs)."""
        if isinstance(node, Mapping):
            if COMPONENT_KEY in node and path not in self.checked_components:
                self.checked_components.add(path)
                self.component_node(node, path, allow_missing=True)
            for k, v in node.items():
                if k not in SPECIAL_KEYS:
                    self.walk_components(v, join_key(path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.walk_components(v, join_key(path, i))


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
    v = _Validator(schema if isinstance(schema, Section) else None)
    if not isinstance(cfg, Mapping):
        raise ValidationError([Problem("", f"a recipe must be a mapping, got {_value_kind(cfg)}")], source=source)
    plugins = cfg.get("plugins") or []
    if load_plugins and isinstance(plugins, list):
        # first: plugin modules register parts that components below may refer to
        from ..registry import import_plugins

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


#: Weight-file suffixes: a value ending so (or holding a path separator) is a file, not an open_clip tag.
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def looks_like_weights_file(value: str) -> bool:
    """Whether a ``pretrained``-style value names a file rather than an open_clip tag (``openai``)."""
    return os.sep in value or "/" in value or value.endswith(WEIGHT_FILE_SUFFIXES)


#: ``train.resume`` values that start fresh (besides null / false); ``auto`` takes the latest checkpoint.
RESUME_FRESH_WORDS = ("", "none", "null", "false", "never")


def resume_names_a_path(value: str) -> bool:
    """Whether a ``train.resume`` string names a checkpoint path (not ``auto`` or a word for starting fresh)."""
    return value.strip().lower() not in (*RESUME_FRESH_WORDS, "auto")


def holds_saved_model(path: Path) -> bool:
    """Whether ``path`` is a folder holding a saved model (``config.json``) or trainer checkpoint (``state.json``),
    or a checkpoints folder's ``latest`` pointer file naming one (the trainer checkpoint it names is loaded)."""
    if path.name == "latest" and path.is_file():
        try:
            path = path.parent / path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return False
    return (path / "config.json").is_file() or (path / "state.json").is_file()


def _not_a_saved_model(value: str, p: Path) -> str:
    """The problem of an existing path that holds no saved model, naming the run's model/ when it is a run folder."""
    if (p / "model" / "config.json").is_file():
        return f"{value} holds a run's outputs, not a saved model: its trained model is {p / 'model'}"
    return f"{value} is not a saved model or trainer checkpoint (no config.json or state.json in it)"


# path kind -> (Path test, message, whether a value is a path at all)
_PATH_KINDS: dict[str, tuple[Callable[[Path], bool], str, Callable[[str], bool]]] = {
    "file": (Path.is_file, "file not found", lambda v: True),
    "dir": (Path.is_dir, "folder not found", lambda v: True),
    "exists": (Path.exists, "path not found", lambda v: True),
    "weights": (Path.is_file, "weights file not found", looks_like_weights_file),
    "checkpoint": (Path.exists, "checkpoint not found", resume_names_a_path),
    "model": (holds_saved_model, "saved model not found", lambda v: True),
}


def _path_fields(cfg: Mapping[str, Any], schema: Section) -> list[tuple[str, str, Field]]:
    """``(key, value, spec)`` of every path-valued key (``Field(path=...)``) that ``cfg`` sets to a string."""
    found: list[tuple[str, str, Field]] = []

    def walk(value: Any, spec: Spec, path: str) -> None:
        if isinstance(spec, (Section, Component)) and isinstance(value, Mapping):
            for k, sub in spec.fields.items():
                if k in value:
                    walk(value[k], sub, join_key(path, k))
        elif isinstance(spec, Field):
            if spec.path is not None and isinstance(value, str):
                found.append((path, value, spec))
            elif spec.item is not None and isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, spec.item, join_key(path, i))

    walk(cfg, schema, "")
    return found


def check_paths(cfg: Mapping[str, Any], schema: Section) -> list[Problem]:
    """Problems for every path-valued key (``Field(path=...)``) whose file or folder is missing.

    Runners call this once synthetic data is written and before anything heavy is built, so a
    mistyped list fails in a second with its key instead of after the model is built;
    ``mergevid validate --check-paths`` runs it on demand.
    """
    problems: list[Problem] = []
    for path, value, spec in _path_fields(cfg, schema):
        test, what, is_path = _PATH_KINDS[spec.path]
        p = Path(value).expanduser()
        if is_path(value) and not test(p):
            if spec.path == "model" and p.exists():
                problems.append(Problem(path, _not_a_saved_model(value, p)))
            elif spec.path == "file" and p.is_dir():
                problems.append(Problem(path, f"{value} is a folder; a file is expected here"))
            elif spec.path == "dir" and p.is_file():
                problems.append(Problem(path, f"{value} is a file; a folder is expected here"))
            else:
                problems.append(Problem(path, f"{what}: {value}"))
    return problems


def path_values(cfg: Mapping[str, Any], schema: Section) -> list[tuple[str, str]]:
    """``(key, value)`` of every path-valued key (``Field(path=...)``) that ``cfg`` sets to a non-empty string."""
    return [(key, value) for key, value, _ in _path_fields(cfg, schema) if value]


def expand_user_paths(cfg: dict[str, Any], schema: Section) -> dict[str, Any]:
    """Expand a leading ``~`` (:func:`os.path.expanduser`) in ``output_dir`` and in every path-valued
    key (``Field(path=...)``) of ``cfg``, in place; return ``cfg``.

    :func:`check_paths` looks paths up with ``~`` expanded; runners call this first so that what they
    read and write is what was checked (not a literal ``./~`` folder).
    """

    def expand(value: Any) -> Any:
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    def walk(node: Any, spec: Spec) -> None:
        if isinstance(spec, (Section, Component)) and isinstance(node, dict):
            for k, sub in spec.fields.items():
                if k not in node:
                    continue
                if isinstance(sub, Field) and sub.path is not None:
                    node[k] = expand(node[k])
                else:
                    walk(node[k], sub)
        elif isinstance(spec, Field) and spec.item is not None and isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(spec.item, Field) and spec.item.path is not None:
                    node[i] = expand(v)
                else:
                    walk(v, spec.item)

    if isinstance(cfg, dict):
        if "output_dir" in cfg:
            cfg["output_dir"] = expand(cfg["output_dir"])
        walk(cfg, schema)
    return cfg


def load_recipe_plugins(cfg: Mapping[str, Any]) -> list[str]:
    """Import the modules listed under the recipe's ``plugins:`` key; return their names.

    :func:`validate_recipe` does this too; runners that skip validation call it before
    :func:`instantiate`. Raises :class:`ConfigError` naming ``plugins.<i>``.
    """
    plugins = cfg.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    from ..registry import import_plugins

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


