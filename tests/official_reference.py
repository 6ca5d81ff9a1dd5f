"""An independent re-statement of the official MoTE implementation's inference semantics.

Used only by tests: it is written from the official code's behaviour (TF-style LayerNorm
with eps inside the sqrt, sequence-first ``nn.MultiheadAttention``, experts stored as
``fc_up`` / ``fc_dn`` module lists merged with softmax(``mote_fusion_weight``), temporal
feature modulation with K = 5 and γ = 0.05, OpenAI-CLIP visual tower), and uses the
official parameter names so that its state dicts are official-format checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class TFLayerNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + self.eps)) + self.bias


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class RefMoTEFFN(nn.Module):
    def __init__(self, d: int, num_experts: int) -> None:
        super().__init__()
        self.fc_up = nn.ModuleList([nn.Linear(d, 4 * d) for _ in range(num_experts)])
        self.fc_dn = nn.ModuleList([nn.Linear(4 * d, d) for _ in range(num_experts)])
        self.mote_fusion_weight = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x):
        w = F.softmax(self.mote_fusion_weight, dim=-1)
        up_w = sum(w[i] * self.fc_up[i].weight for i in range(len(self.fc_up)))
        up_b = sum(w[i] * self.fc_up[i].bias for i in range(len(self.fc_up)))
        dn_w = sum(w[i] * self.fc_dn[i].weight for i in range(len(self.fc_dn)))
        dn_b = sum(w[i] * self.fc_dn[i].bias for i in range(len(self.fc_dn)))
        return F.linear(quick_gelu(F.linear(x, up_w, up_b)), dn_w, dn_b)


class RefPlainFFN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(quick_gelu(self.c_fc(x)))


class RefBlock(nn.Module):
    def __init__(self, d: int, num_experts: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, max(1, d // 64))
        self.ln_1 = TFLayerNorm(d)
        self.mlp = RefMoTEFFN(d, num_experts) if num_experts >= 1 else RefPlainFFN(d)
        self.ln_2 = TFLayerNorm(d)

    def forward(self, x):  # [T, B, D]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTemporalTransformer(nn.Module):
    def __init__(self, d: int, layers: int, num_experts: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(d, num_experts) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVideoHeader(nn.Module):
    """Inference semantics of the official ``video_header`` (sim_header 'Transf', interaction 'DP')."""

    def __init__(self, d: int, layers: int, num_experts: int, num_source_classes: int) -> None:
        super().__init__()
        self.spe_cls_feature = nn.Parameter(torch.zeros(num_source_classes, d), requires_grad=False)
        self.frame_position_embeddings = nn.Embedding(77, d)
        self.transformer = RefTemporalTransformer(d, layers, num_experts)

    def agg_video_feat(self, x, gen_cls_feat=None):
        b, t, c = x.shape
        if gen_cls_feat is not None:
            x_clip = x.mean(dim=1)
            x_clip = x_clip / x_clip.norm(dim=-1, keepdim=True)
            gen_idx = (x_clip @ gen_cls_feat.t()).topk(5, -1, True, True).indices
            spe_idx = (x_clip @ self.spe_cls_feature.t()).topk(5, -1, True, True).indices
            gen = torch.gather(gen_cls_feat.unsqueeze(0).expand(b, -1, -1), 1, gen_idx.unsqueeze(-1).expand(-1, -1, c))
            spe = torch.gather(self.spe_cls_feature.unsqueeze(0).expand(b, -1, -1), 1, spe_idx.unsqueeze(-1).expand(-1, -1, c))
            sim = torch.bmm(gen, spe.permute(0, 2, 1)).max(dim=-1).values
            rho = (1 / torch.exp((1 - sim.mean(dim=-1)) / 0.05)).view(b, 1, 1)
        else:
            rho = torch.ones(1)
        x0 = x
        x = x + self.frame_position_embeddings(torch.arange(t).unsqueeze(0).expand(b, -1))
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return rho * x + x0

    def forward(self, vid_emb, cls_emb, modulation=True):
        v = self.agg_video_feat(vid_emb, cls_emb if modulation else None).mean(dim=1)
        v = v / v.norm(dim=-1, keepdim=True)
        c = cls_emb / cls_emb.norm(dim=-1, keepdim=True)
        return v @ c.t()


class RefResidualBlock(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(w, max(1, w // 64))
        self.ln_1 = nn.LayerNorm(w)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(w, 4 * w)), ("gelu", nn.Identity()), ("c_proj", nn.Linear(4 * w, w))]))
        self.ln_2 = nn.LayerNorm(w)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp.c_proj(quick_gelu(self.mlp.c_fc(self.ln_2(x))))


class RefVisualTransformer(nn.Module):
    """OpenAI CLIP's ViT image tower (QuickGELU), sequence-first attention."""

    def __init__(self, image_size: int, patch: int, width: int, layers: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[RefResidualBlock(width) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefVideoCLIP(nn.Module):
    def __init__(self, visual: RefVisualTransformer) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def encode_image(self, frames):  # [B, T, 3, H, W]
        b, t = frames.shape[:2]
        return self.visual(frames.flatten(0, 1)).view(b, t, -1)


def official_checkpoint(*, width=64, layers=2, image=32, patch=8, embed=64, t_layers=2, experts=4, classes=7, fusion=None, seed=0):
    """A random official-format checkpoint (``epoch``, ``model_state_dict``, ``fusion_model_state_dict``,
    ``optimizer_state_dict``, keys with ``module.``) and the reference modules holding its weights."""
    torch.manual_seed(seed)
    visual = RefVisualTransformer(image, patch, width, layers, embed)
    clip = RefVideoCLIP(visual)
    head = RefVideoHeader(embed, t_layers, experts, classes)
    with torch.no_grad():
        for p in head.parameters():  # non-trivial values everywhere (biases, LN affine too)
            p.normal_(0, 0.05)
        head.spe_cls_feature.copy_(F.normalize(torch.randn(classes, embed), dim=-1))
        for blk in head.transformer.resblocks:
            if experts:
                blk.mlp.mote_fusion_weight.copy_(torch.zeros(experts) if fusion is None else torch.tensor(fusion))
        for p in visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = {
        "epoch": 19,
        "model_state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()},
        "fusion_model_state_dict": {f"module.{k}": v for k, v in head.state_dict().items()},
        "optimizer_state_dict": {"state": {}, "param_groups": []},
    }
    return ckpt, clip.eval(), head.eval()
