"""Registration of the built-in runners (imported lazily by the ``runners`` registry)."""

from __future__ import annotations

from typing import Any

from . import RUNNERS


@RUNNERS.register("mote")
def mote(**kw: Any) -> Any:
    """Train a MoTE (or baseline) video model, then evaluate it."""
    from .mote import MoTERunner

    return MoTERunner(**kw)


@RUNNERS.register("evaluate")
def evaluate(**kw: Any) -> Any:
    """Evaluate a saved model on close-set / zero-shot / few-shot datasets."""
    from .evaluate import EvaluateRunner

    return EvaluateRunner(**kw)


@RUNNERS.register("compare")
def compare(**kw: Any) -> Any:
    """Compare merge strategies, each expert and ensembles on a saved model (Figure 3, Table 2c)."""
    from .evaluate import CompareRunner

    return CompareRunner(**kw)
