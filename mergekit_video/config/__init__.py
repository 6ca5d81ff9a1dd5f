"""Recipes: YAML files turned into plain dicts, overridden, interpolated, validated, instantiated.

A recipe is a YAML mapping. Nodes with a ``_component_`` key name what to build: a dotted
import path (``mergekit_video.models.build_video_clip``) or a registry reference
``registry:name`` (``routers:multinomial``, ``merges:ties``). Every recipe has an
``output_dir`` key and may list ``plugins:`` (modules imported before validation).

    cfg = load_recipe("recipes/mote_vitb16.yaml", ["schedule.epochs=3", "~objective.wmr"])
    validate_recipe(cfg, MY_SCHEMA)          # raises ValidationError listing every problem
    model = instantiate(cfg["model"], _path="model")

Pipeline of :func:`load_recipe`: YAML (``5e-5`` is a float, duplicate keys are errors) →
command-line overrides (``a.b=value``, ``~a.b``, ``a.0.b=1``) → ``${...}`` interpolation.

The steps live in one module each: :mod:`.base` (keys, ``MISSING``, errors), :mod:`.loading`
(YAML, overrides, interpolation, saving), :mod:`.components` (``_component_`` targets and
:func:`instantiate`) and :mod:`.schema` (schemas and validation). None imports torch;
validation runs before anything heavy.
"""

from __future__ import annotations

from .base import (
    COMPONENT_KEY,
    MISSING,
    PARTIAL_KEY,
    ConfigError,
    InstantiationError,
    Problem,
    ValidationError,
    format_problems,
    print_validation_error,
)
from .components import instantiate, resolve_component
from .loading import (
    Override,
    apply_overrides,
    dump_recipe,
    is_recorded_recipe,
    load_recipe,
    parse_override,
    resolve_interpolations,
    save_resolved_recipe,
    select,
)
from .schema import (
    BASE_FIELDS,
    Component,
    Field,
    Section,
    check_components,
    check_paths,
    explain_schema,
    iter_schema,
    load_recipe_plugins,
    recipe_schema,
    schema_default,
    validate_recipe,
    with_defaults,
)

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
    "check_paths",
    "dump_recipe",
    "explain_schema",
    "format_problems",
    "is_recorded_recipe",
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
    "schema_default",
    "select",
    "validate_recipe",
    "with_defaults",
]

