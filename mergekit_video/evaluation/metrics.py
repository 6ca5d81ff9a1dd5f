"""Accuracy and the paper's summary scores (MoTE §4.3, Table 4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample hit indicators ``{k: bool [N]}`` for top-k accuracy (k is clipped to the class count)."""
    maxk = min(max(ks), scores.shape[-1])
    top = scores.topk(maxk, dim=-1).indices  # [N, maxk]
    hits = top == labels.view(-1, 1)
    return {k: hits[:, : min(k, maxk)].any(dim=-1) for k in ks}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (HM_ZS over UCF, HMDB and K600, MoTE Table 4)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic mean of no values")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def trade_off(close_set_top1: float, hm_zero_shot: float) -> float:
    """"Trade-off" score: harmonic mean of K400 top-1 and HM_ZS (MoTE Table 4)."""
    return harmonic_mean([close_set_top1, hm_zero_shot])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation across splits (as zero-shot protocols report)."""
    vals = [float(v) for v in values]
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
