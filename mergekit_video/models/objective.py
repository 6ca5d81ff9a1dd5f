"""The MoTE training objective (Eq. 4, 8, 9, 10).

One training forward of the temporal head produces

- expert-path logits: each container sends the whole batch to one expert drawn with
  P ∝ exp(i) (Eq. 4–5);
- WMR-path logits: every container runs with merged weights softmax(i/τ), τ drawn per
  container from {±0.6, ±1.2, ±2.4, ±4.8, ±9.6, ∞} (Eq. 7–8);
- the MSE between the WMR path's per-frame output (after the residual) and the input
  frame features (Eq. 9),

and L = CE(s·logits) + λ·CE(s·logits_wmr) + η·MSE (Eq. 10), λ = 0.5, η = 0.1.

By default both paths run in **one** batched forward: the frame features are stacked
``[2B, T, D]`` and a routing plan sends the first half through the routed experts and the
second half through the merged weights. Attention, LayerNorms and position embeddings
then run once on twice the batch instead of twice, which is what makes the MoTE step
cheap on a GPU. The result is identical to two separate forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..experts import collect_aux_losses, find_containers, routing_plan
from ..regularizers import FeatureMSE, LoadBalanceLoss, WeightMergingRegularizer
from .temporal import TemporalHead, cosine_logits

WMR_LOSSES = ("ce", "kl", "mse")
EXPERT_DATA = ("routed", "all")


@dataclass
class MoTEStepOutput:
    """Everything one training forward produces.

    Attributes:
        loss: the total loss (Eq. 10) to back-propagate.
        terms: detached loss terms for logging (``te``, ``wmr``, ``mse``, ``aux``).
        logits: ``[B, C]`` expert-path cosine logits (unscaled).
        logits_wmr: ``[B, C]`` WMR-path cosine logits, or None when WMR is off.
        taus: τ drawn per container for the WMR path.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor
    logits_wmr: torch.Tensor | None = None
    taus: dict[str, float] = field(default_factory=dict)


class MoTEObjective:
    """Computes the MoTE loss L = L_TE + λ·L_WMR + η·L_MSE (Eq. 10) for a :class:`TemporalHead` on frame features.

    Args:
        wmr_weight: λ (0 switches WMR off).
        mse_weight: η (0 switches the MSE off).
        wmr: the weight-merging regularizer, or its keyword arguments (β, sampling...).
        wmr_loss: ``ce`` (the paper), ``kl`` or ``mse`` (Table 7c variants).
        expert_data: ``routed`` (one expert per batch) or ``all`` (every expert sees every
            batch, outputs averaged; Table 2a "All").
        aux_weight: coefficient of the ``topk`` routers' Switch load-balancing loss; their router z-loss
            gets a tenth of it (the defaults, 1e-2 and 1e-3, are Switch Transformer's and ST-MoE's).
        fuse_paths: run the expert and WMR paths as one batched forward ([2B, T, D]) that
            computes the first block's attention half once for both.
        label_smoothing: for the cross-entropy terms.
    """

    def __init__(
        self,
        *,
        wmr_weight: float = 0.5,
        mse_weight: float = 0.1,
        wmr: WeightMergingRegularizer | dict[str, Any] | None = None,
        wmr_loss: str = "ce",
        expert_data: str = "routed",
        aux_weight: float = 1e-2,
        fuse_paths: bool = True,
        label_smoothing: float = 0.0,
    ) -> None:
        if wmr_loss not in WMR_LOSSES:
            raise ValueError(f"wmr_loss must be one of {WMR_LOSSES}, got {wmr_loss!r}")
        if expert_data not in EXPERT_DATA:
            raise ValueError(f"expert_data must be one of {EXPERT_DATA}, got {expert_data!r}")
        self.wmr_weight = float(wmr_weight)
        self.mse_weight = float(mse_weight)
        self.wmr = wmr if isinstance(wmr, WeightMergingRegularizer) else WeightMergingRegularizer(**(wmr or {}))
        self.wmr_loss = wmr_loss
        self.expert_data = expert_data
        self.fuse_paths = bool(fuse_paths)
        self.label_smoothing = float(label_smoothing)
        self.feature_mse = FeatureMSE()
        self.aux = LoadBalanceLoss(coef=aux_weight, z_coef=aux_weight * 0.1)

    @property
    def uses_wmr_path(self) -> bool:
        """Whether a second (merged-weights) temporal path is run."""
        return self.wmr_weight > 0 or self.mse_weight > 0

    def generators(self) -> dict[str, torch.Generator]:
        """Named RNGs of this objective (for checkpoints)."""
        return {"wmr": self.wmr.generator}

    def __call__(
        self,
        head: TemporalHead,
        frame_features: torch.Tensor,
        class_features: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> MoTEStepOutput:
        """Loss (Eq. 10) and logits for frame features ``[B, T, D]``, class features ``[C, D]`` and labels ``[B]``."""
        has_experts = bool(find_containers(head))
        if not has_experts and self.wmr_weight > 0:
            raise ValueError("WMR needs experts: set model.num_experts > 0 or objective.wmr_weight=0")
        expert_plan = "routed" if self.expert_data == "routed" else "ensemble"
        b = frame_features.shape[0]
        taus: dict[str, float] = {}
        feats_wmr = None
        expert_aux = None  # the routers' auxiliary loss of the expert path, read before a second forward clears it
        if has_experts and self.uses_wmr_path:
            wmr_plan = self.wmr.sample_plan(head)
            taus = dict(self.wmr.last_taus)
            if self.fuse_paths:
                plan = {name: [(b, expert_plan), (b, w)] for name, w in wmr_plan.items()}
                with routing_plan(head, plan):
                    both = head.video_features(frame_features, copies=2)  # [2B, T, D]
                feats, feats_wmr = both[:b], both[b:]
            else:
                with routing_plan(head, expert_plan):
                    feats = head.video_features(frame_features)
                if collect_aux_losses(head):
                    expert_aux = self.aux(head)
                with routing_plan(head, wmr_plan):  # a merged-weights forward forgets the routing of the one before
                    feats_wmr = head.video_features(frame_features)
        elif has_experts:
            with routing_plan(head, expert_plan):
                feats = head.video_features(frame_features)
        else:
            feats = head.video_features(frame_features)
            if self.mse_weight > 0:
                feats_wmr = feats  # baseline + MSE: regularise the only path

        scale = logit_scale
        logits = cosine_logits(feats, class_features)  # [B, C]
        te = F.cross_entropy(scale * logits.float(), labels, label_smoothing=self.label_smoothing)
        terms = {"te": te}
        loss = te
        logits_wmr = None
        if feats_wmr is not None and has_experts:
            logits_wmr = cosine_logits(feats_wmr, class_features)
            if self.wmr_weight > 0:
                if self.wmr_loss == "ce":
                    wmr = F.cross_entropy(scale * logits_wmr.float(), labels, label_smoothing=self.label_smoothing)
                elif self.wmr_loss == "kl":
                    wmr = F.kl_div(
                        F.log_softmax(scale * logits_wmr.float(), dim=-1),
                        F.log_softmax(scale * logits.detach().float(), dim=-1),
                        log_target=True,
                        reduction="batchmean",
                    )
                else:
                    wmr = self.feature_mse(feats_wmr, feats.detach())
                terms["wmr"] = wmr
                loss = loss + self.wmr_weight * wmr
        if feats_wmr is not None and self.mse_weight > 0:
            mse = self.feature_mse(feats_wmr, frame_features)
            terms["mse"] = mse
            loss = loss + self.mse_weight * mse
        if expert_aux is None and has_experts and collect_aux_losses(head):
            expert_aux = self.aux(head)
        if expert_aux is not None:
            terms["aux"] = expert_aux
            loss = loss + expert_aux
        return MoTEStepOutput(
            loss=loss,
            terms={k: v.detach() for k, v in terms.items()},
            logits=logits.detach(),
            logits_wmr=None if logits_wmr is None else logits_wmr.detach(),
            taus=taus,
        )
