"""Prompt templates for class text features (MoTE Table 8)."""

from __future__ import annotations

#: The 28 hand-crafted templates of MoTE Table 8 (also used by the official implementation).
MOTE_TEMPLATES: tuple[str, ...] = tuple(
    f"{prefix} {body}."
    for prefix in ("a photo of", "a video of", "a example of", "a demonstration of")
    for body in (
        "{}",
        "a person {}",
        "a person using {}",
        "a person doing {}",
        "a person during {}",
        "a person performing {}",
        "a person practicing {}",
    )
)

#: Single template, for quick experiments.
SINGLE_TEMPLATE: tuple[str, ...] = ("a video of a person {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"mote": MOTE_TEMPLATES, "single": SINGLE_TEMPLATE}


def resolve_templates(templates: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A template-set name (``mote``, ``single``) or an explicit list of ``{}`` templates."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; known: {', '.join(TEMPLATE_SETS)} or a list of strings with '{{}}'")
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise ValueError(f"every prompt template needs a '{{}}' placeholder; bad: {bad[:3]}")
    return out
