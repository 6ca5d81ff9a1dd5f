"""The temporal module h(·) of MoTE (Eq. 2) and the video head built on it.

:class:`TemporalTransformer` is L pre-LN residual blocks of width D with D // 64 heads,
attention plus an FFN (D → 4D, QuickGELU, 4D → D), LayerNorm eps 1e-12, learned frame
position embeddings (77 positions) and N(0, 0.02) init, as in the reference implementation.
State-dict keys match it (``transformer.resblocks.{l}.attn.in_proj_weight``, ``mlp.c_fc``...).

With ``num_experts > 0`` every FFN becomes an :class:`~mergekit_video.experts.ExpertContainer`
through the public surgery (:func:`~mergekit_video.surgery.add_experts`); in eval mode the
experts are merged once (mean, Eq. 6) and cached.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import checkpoint_routed, find_containers
from ..surgery import add_experts
from ..utils.device import autocast_disabled
from .modulation import semantic_association

LAYER_NORM_EPS = 1e-12


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the activation of OpenAI CLIP and of the MoTE temporal FFN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x · σ(1.702 x), elementwise."""
        return x * torch.sigmoid(1.702 * x)


class TemporalAttention(nn.Module):
    """Multi-head self-attention over frames with fused SDPA.

    Parameters are named like ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) so that reference checkpoints load as is.
    """

    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the T frames of x [B, T, D] (no mask)."""
        b, t, d = x.shape  # [B, T, D]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3D]
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """The temporal FFN: D → 4D, QuickGELU, 4D → D (keys ``c_fc``, ``c_proj``)."""

    def __init__(self, *, width: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, width * mlp_ratio)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(width * mlp_ratio, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """c_proj(QuickGELU(c_fc(x))) on x [..., D]."""
        return self.c_proj(self.gelu(self.c_fc(x)))


class TemporalBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = TemporalAttention(width=width, heads=heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = FeedForward(width=width)

    def forward(self, x: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """``[B, T, D]`` → ``[copies·B, T, D]``.

        With ``copies > 1`` the attention half runs once on ``x`` and its output is stacked
        ``copies`` times before the FFN, which sees a batch of ``copies`` identical segments
        (the expert and WMR paths of MoTE training, routed per segment).
        """
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if copies > 1:
            x, h = x.repeat(copies, 1, 1), h.repeat(copies, 1, 1)  # [copies·B, T, D]
        return x + self.mlp(h)


class TemporalTransformer(nn.Module):
    """L :class:`TemporalBlock` s of width D; batch-first ``[B, T, D]``."""

    replays_routing = True  # its gradient checkpointing is experts.checkpoint_routed

    def __init__(self, *, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([TemporalBlock(width=width, heads=heads) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """``[B, T, D]`` → ``[copies·B, T, D]``: ``copies`` identical inputs share the first attention."""
        for i, block in enumerate(self.resblocks):
            n = copies if i == 0 else 1
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint_routed(block, block, x, n)  # recomputation replays the routing
            else:
                x = block(x, n)
        return x


def init_temporal_weights(module: nn.Module) -> None:
    """Reference init: Linear / Embedding weights N(0, 0.02), biases 0, LayerNorm 1 / 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def cosine_logits(video_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the time-pooled video embedding with each class (unscaled).

    Args:
        video_features: ``[B, T, D]`` per-frame video features (e + ρ·h(e)).
        class_features: ``[C, D]``.

    Returns:
        ``[B, C]`` fp32 logits in [−1, 1].

    Always computed in fp32 with autocast off, as the official test code: under bf16 the
    cosines of close classes (CLIP class features share a direction) round to exact ties.
    """
    with autocast_disabled(video_features.device.type):
        z = F.normalize(video_features.float().mean(dim=1), dim=-1)  # [B, D]
        y = F.normalize(class_features.float(), dim=-1)  # [C, D]
        return z @ y.t()


class TemporalHead(nn.Module):
    """MoTE video head: z = AvgPool_T(e + ρ·h(e)) (Eq. 2 with TFM, Eq. 11) → cosine logits.

    Works on precomputed frame features: ``head(e[B,T,D], y[C,D], modulation=...) -> [B, C]``.

    Args:
        width: D, the CLIP embedding size.
        layers: L temporal blocks (4 for ViT-B/16, 6 for ViT-L/14 in the paper).
        heads: attention heads (default D // 64).
        num_positions: frame position table size (77, as the reference).
        num_experts: N experts per FFN (0 = plain FFN, the Text4Vis baseline).
        router / router_kwargs / expert_init / merge: passed to :func:`add_experts`.
        tfm_k / tfm_gamma: K and γ of temporal feature modulation (5, 0.05).
        num_source_classes: rows of the stored source class features y_f (filled later).
    """

    def __init__(
        self,
        *,
        width: int,
        layers: int,
        heads: int | None = None,
        num_positions: int = 77,
        num_experts: int = 4,
        router: str = "multinomial",
        router_kwargs: dict[str, Any] | None = None,
        expert_init: str = "normal",
        merge: str = "mean",
        merge_kwargs: dict[str, Any] | None = None,
        tfm_k: int = 5,
        tfm_gamma: float = 0.05,
        num_source_classes: int = 0,
    ) -> None:
        super().__init__()
        if int(tfm_k) != tfm_k or tfm_k < 1:
            raise ValueError(f"tfm_k (K of temporal feature modulation) must be an integer >= 1, got {tfm_k}")
        if not (0 < tfm_gamma < math.inf):
            raise ValueError(f"tfm_gamma (γ of temporal feature modulation) must be a positive finite number, got {tfm_gamma}")
        heads = heads or max(1, width // 64)
        #: JSON-able constructor arguments: ``TemporalHead(**head.config)`` rebuilds the architecture
        self.config: dict[str, Any] = {
            "width": width, "layers": layers, "heads": heads, "num_positions": num_positions,
            "num_experts": num_experts, "router": router, "router_kwargs": dict(router_kwargs or {}),
            "expert_init": expert_init, "merge": merge, "merge_kwargs": dict(merge_kwargs or {}),
            "tfm_k": tfm_k, "tfm_gamma": tfm_gamma, "num_source_classes": num_source_classes,
        }
        self.width, self.num_positions = width, num_positions
        self.tfm_k, self.tfm_gamma = int(tfm_k), float(tfm_gamma)
        self.frame_position_embeddings = nn.Embedding(num_positions, width)
        self.transformer = TemporalTransformer(width=width, layers=layers, heads=heads)
        self.apply(init_temporal_weights)
        self.num_experts = int(num_experts)
        if self.num_experts > 0:
            add_experts(
                self,
                "transformer.resblocks.*.mlp",
                self.num_experts,
                router=router,
                init=expert_init,
                merge=merge,
                merge_kwargs=merge_kwargs,
                **dict(router_kwargs or {}),
            )
        self.register_buffer("source_class_features", torch.zeros(num_source_classes, width))

    # -- features -------------------------------------------------------------------
    def temporal_features(self, frame_features: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """h(e): ``[B, T, D]`` → ``[copies·B, T, D]`` (position embeddings + temporal transformer).

        ``copies > 1`` runs the same input through several routing segments at once (see
        :meth:`ExpertContainer.forward` plans): the work before the first FFN is shared.
        """
        t = frame_features.shape[1]
        if t > self.num_positions:
            raise ValueError(f"{t} frames exceed the {self.num_positions} frame position embeddings")
        x = frame_features + self.frame_position_embeddings.weight[:t].to(frame_features.dtype)  # [B, T, D]
        return self.transformer(x, copies).to(frame_features.dtype)

    def video_features(self, frame_features: torch.Tensor, rho: torch.Tensor | float | None = None, copies: int = 1) -> torch.Tensor:
        """Per-frame video features e + ρ·h(e), ``[copies·B, T, D]`` (ρ = 1 when None)."""
        h = self.temporal_features(frame_features, copies)
        if copies > 1:
            frame_features = frame_features.repeat(copies, 1, 1)  # [copies·B, T, D]
        if rho is None:
            return frame_features + h
        if isinstance(rho, torch.Tensor):
            rho = rho.to(h.dtype).view(-1, *([1] * (h.dim() - 1))).repeat(copies, 1, 1)  # [copies·B, 1, 1]
        return frame_features + rho * h

    def modulation_weights(self, frame_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        """ρ ``[B]`` of temporal feature modulation against the stored source classes (Eq. 11)."""
        return semantic_association(
            frame_features, class_features, self.source_class_features, k=self.tfm_k, gamma=self.tfm_gamma
        )

    def forward(
        self,
        frame_features: torch.Tensor,
        class_features: torch.Tensor,
        modulation: bool = False,
        *,
        rho: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cosine logits ``[B, C]`` (unscaled) from frame features ``[B, T, D]`` and class features ``[C, D]``.

        With ``modulation``, ρ of Eq. 11 scales h(e); ``rho`` (``[B]``, from :meth:`modulation_weights`
        on the same inputs) reuses one computed before, as an evaluation of several merges does.
        """
        if not modulation:
            rho = None
        elif rho is None:
            rho = self.modulation_weights(frame_features, class_features)
        return cosine_logits(self.video_features(frame_features, rho), class_features)

    # -- source classes --------------------------------------------------------------
    def set_source_class_features(self, features: torch.Tensor) -> None:
        """Store the fine-tuning class features y_f ``[C_src, D]`` (any class count)."""
        if features.dim() != 2 or features.shape[1] != self.width:
            raise ValueError(f"source class features must be [C, {self.width}], got {tuple(features.shape)}")
        self.source_class_features = features.detach().to(self.frame_position_embeddings.weight)
        self.config["num_source_classes"] = int(features.shape[0])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "source_class_features"
        if key in state_dict and state_dict[key].shape != self.source_class_features.shape:
            # the class count is data, not architecture: resize before loading
            self.source_class_features = torch.zeros_like(state_dict[key], device=self.source_class_features.device)
            self.config["num_source_classes"] = int(state_dict[key].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_experts(self) -> bool:
        """Whether any FFN is an :class:`~mergekit_video.experts.ExpertContainer`."""
        return bool(find_containers(self))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute temporal blocks in backward to save memory."""
        self.transformer.grad_checkpointing = enable
