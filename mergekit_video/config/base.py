"""Recipe keys, the MISSING sentinel and the errors every recipe step reports with."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

COMPONENT_KEY = "_component_"
PARTIAL_KEY = "_partial_"
SPECIAL_KEYS = (COMPONENT_KEY, PARTIAL_KEY)


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


def did_you_mean(word: str, candidates: Iterable[Any], *, n: int = 3) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the close matches of ``word`` (case-insensitive), else ``""``."""
    lowered: dict[str, str] = {}
    for c in candidates:
        lowered.setdefault(str(c).lower(), str(c))
    if str(word).lower() in lowered:  # wrong case only
        return f"; did you mean {lowered[str(word).lower()]!r}?"
    close = difflib.get_close_matches(str(word).lower(), lowered, n=n, cutoff=0.6)  # case-insensitive
    close = [lowered[c] for c in close]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def join_key(path: str, key: Any) -> str:
    """The dotted recipe key of ``key`` under ``path`` (``"data" + "root" -> "data.root"``)."""
    return f"{path}.{key}" if path else str(key)


