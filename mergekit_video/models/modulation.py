"""Temporal Feature Modulation (MoTE §3.4, Eq. 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.device import autocast_disabled


def semantic_association(
    frame_features: torch.Tensor,
    target_class_features: torch.Tensor,
    source_class_features: torch.Tensor,
    *,
    k: int = 5,
    gamma: float = 0.05,
) -> torch.Tensor:
    """ρ = exp(−(1 − M(y_t · y_fᵀ)) / γ) per sample (MoTE Eq. 11).

    1. x̄ = normalize(mean_T e)  (the pooled CLIP feature);
    2. y_t, y_f = the K target / source class features nearest to x̄;
    3. S = y_t · y_fᵀ  ``[B, K, K]``;
    4. M = mean over the K target rows of the max over the source columns;
    5. ρ = exp(−(1 − M)/γ).

    The class features are L2-normalised here (the pipeline's prompt-ensemble features already
    are, as in the official implementation, so for them this changes nothing; raw text-tower
    features would otherwise make M, and so ρ, unbounded).

    Args:
        frame_features: ``[B, T, D]`` CLIP frame features e.
        target_class_features: ``[C_t, D]`` test-time classes y_t.
        source_class_features: ``[C_s, D]`` fine-tuning classes y_f.

    Returns:
        ``[B]`` fp32 modulation weights ρ in (0, 1].

    Always computed in fp32 with autocast off, as the official test code: ρ amplifies the
    error of M by 1/γ (20), and bf16 rounding left a few dozen distinct values.
    """
    if source_class_features.numel() == 0:
        raise ValueError("temporal feature modulation needs the source (fine-tuning) class features; none are stored")
    with autocast_disabled(frame_features.device.type):
        x = F.normalize(frame_features.float().mean(dim=1), dim=-1)  # [B, D]
        yt = F.normalize(target_class_features.float(), dim=-1)  # [C_t, D]
        ys = F.normalize(source_class_features.float(), dim=-1)  # [C_s, D]
        kt, ks = min(k, yt.shape[0]), min(k, ys.shape[0])
        idx_t = (x @ yt.t()).topk(kt, dim=-1).indices  # [B, K]
        idx_s = (x @ ys.t()).topk(ks, dim=-1).indices  # [B, K]
        yt_k, ys_k = yt[idx_t], ys[idx_s]  # [B, K, D]
        sim = torch.bmm(yt_k, ys_k.transpose(1, 2))  # [B, K, K]
        m = sim.max(dim=-1).values.mean(dim=-1).clamp(max=1.0)  # [B]; rounding can put a cosine a few ulp above 1
        return torch.exp(-(1.0 - m) / gamma)
