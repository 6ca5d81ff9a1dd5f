"""Import of official MoTE checkpoints (github.com/ZMHH-H/MoTE) as a data mapping.

The official ``train.py`` saves a torch pickle dict with ``epoch``, ``model_state_dict``
(``logit_scale`` + the OpenAI-CLIP visual tower under ``visual.``),
``fusion_model_state_dict`` (the temporal head) and ``optimizer_state_dict``; keys may
carry a ``module.`` prefix. The architecture is inferred from tensor shapes, so B/16,
L/14 and any other size convert.

Key mapping (official → mergekit_video):

==============================================================  ===============================================================
``model_state_dict``: ``visual.<k>``, ``logit_scale``             ``clip.visual.<k>``, ``clip.logit_scale`` (same names as open_clip)
``fusion``: ``spe_cls_feature``                                   ``head.source_class_features``
``fusion``: ``frame_position_embeddings.weight``                  ``head.frame_position_embeddings.weight``
``fusion``: ``transformer.resblocks.{l}.{attn.*, ln_1.*, ln_2.*}``  same
``fusion``: ``...resblocks.{l}.mlp.fc_up.{e}.{weight,bias}``      ``head.transformer.resblocks.{l}.mlp.experts.{e}.c_fc.*``
``fusion``: ``...resblocks.{l}.mlp.fc_dn.{e}.{weight,bias}``      ``head.transformer.resblocks.{l}.mlp.experts.{e}.c_proj.*``
``fusion``: ``...resblocks.{l}.mlp.mote_fusion_weight`` [E]       eval merge weights softmax(w) (mean when w = 0, as always)
``fusion``: ``...resblocks.{l}.mlp.c_fc.*`` / ``c_proj.*``        same (the baseline head, no experts)
==============================================================  ===============================================================
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .clip import build_clip_from_config, create_clip, interpolate_weights, model_config, register_bundled_model_configs
from .temporal import TemporalHead
from .video_clip import VideoCLIP, model_config_dict

log = logging.getLogger(__name__)

#: (official regex, our template) pairs for the temporal head, applied in order.
HEAD_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^spe_cls_feature$", "source_class_features"),
    (r"^frame_position_embeddings\.weight$", "frame_position_embeddings.weight"),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.fc_up\.(\d+)\.(weight|bias)$", r"transformer.resblocks.\1.mlp.experts.\2.c_fc.\3"),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.fc_dn\.(\d+)\.(weight|bias)$", r"transformer.resblocks.\1.mlp.experts.\2.c_proj.\3"),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)\.(weight|bias)$", r"transformer.resblocks.\1.mlp.\2.\3"),
    (r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.in_proj_bias|attn\.out_proj\.weight|attn\.out_proj\.bias|ln_1\.weight|ln_1\.bias|ln_2\.weight|ln_2\.bias)$", r"transformer.resblocks.\1.\2"),
)
FUSION_WEIGHT_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.mlp\.mote_fusion_weight$")
CLIP_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^visual\.(.+)$", r"visual.\1"),
    (r"^logit_scale$", "logit_scale"),
)


class ConversionError(ValueError):
    """The checkpoint does not look like an official MoTE checkpoint."""


def strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's ``module.`` prefix from every key that has it."""
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def map_keys(sd: Mapping[str, torch.Tensor], table: tuple[tuple[str, str], ...], *, what: str) -> dict[str, torch.Tensor]:
    """Rename every key of ``sd`` by the first matching (regex, template) of ``table``; unknown keys are errors."""
    out = {}
    for key, value in sd.items():
        for pattern, template in table:
            if re.match(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            raise ConversionError(f"unexpected key {key!r} in the official {what}")
    return out


@dataclass
class OfficialArchitecture:
    """Architecture inferred from an official checkpoint's tensor shapes."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    embed_dim: int
    temporal_layers: int
    num_experts: int
    num_positions: int
    num_source_classes: int


def infer_architecture(clip_sd: Mapping[str, torch.Tensor], head_sd: Mapping[str, torch.Tensor]) -> OfficialArchitecture:
    """Read patch size, widths, depths, image size and expert count from tensor shapes."""
    try:
        conv = clip_sd["visual.conv1.weight"]  # [W, 3, P, P]
        pos = clip_sd["visual.positional_embedding"]  # [(S/P)^2 + 1, W]
        proj = clip_sd["visual.proj"]  # [W, D]
        fpe = head_sd["frame_position_embeddings.weight"]  # [77, D]
    except KeyError as exc:
        raise ConversionError(f"official checkpoint lacks {exc.args[0]!r}") from None
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise ConversionError(f"visual.positional_embedding has {pos.shape[0]} rows, not a square grid + 1")
    vision_layers = 1 + max(int(m.group(1)) for k in clip_sd if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k)))
    layer_ids = {int(m.group(1)) for k in head_sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    expert_ids = {int(m.group(1)) for k in head_sd if (m := re.match(r"transformer\.resblocks\.\d+\.mlp\.fc_up\.(\d+)\.", k))}
    spe = head_sd.get("spe_cls_feature")
    return OfficialArchitecture(
        image_size=int(conv.shape[-1]) * grid,
        patch_size=int(conv.shape[-1]),
        vision_width=int(conv.shape[0]),
        vision_layers=vision_layers,
        embed_dim=int(proj.shape[1]),
        temporal_layers=len(layer_ids),
        num_experts=len(expert_ids),
        num_positions=int(fpe.shape[0]),
        num_source_classes=0 if spe is None else int(spe.shape[0]),
    )


def matching_open_clip_name(arch: OfficialArchitecture) -> str | None:
    """The open_clip model whose vision tower has this architecture (e.g. ``ViT-L-14``), if any."""
    import open_clip

    register_bundled_model_configs()
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        v = cfg.get("vision_cfg", {})
        if (
            cfg.get("embed_dim") == arch.embed_dim
            and v.get("width") == arch.vision_width
            and v.get("layers") == arch.vision_layers
            and v.get("patch_size") == arch.patch_size
            and v.get("image_size") == arch.image_size
            and "timm_model_name" not in v
            and "hf_model_name" not in cfg.get("text_cfg", {})
            and not cfg.get("custom_text")
            and not v.get("no_ln_pre")
            and v.get("pool_type", "tok") == "tok"
            and not v.get("attentional_pool")
            and not name.endswith("-quickgelu")
        ):
            return name
    return None


def _load_failure(exc: Exception) -> str:
    """One line saying why ``torch.load`` failed, without torch's multi-line advice (e.g. to drop weights_only)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the unpickler's own reason, after torch's preamble
    detail = match.group(1) if match else next((line for line in text.splitlines() if line.strip()), "")
    detail = re.split(r"(?<=[^.])\. ", detail.strip(), maxsplit=1)[0].rstrip(".")  # first sentence
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def load_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an official checkpoint (a torch pickle of plain tensors; loaded with ``weights_only=True``)."""
    import warnings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's note on protocol >2 pickles
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # foreign bytes fail inside the unpickler (UnpicklingError, KeyError, EOFError, ...)
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: it cannot be loaded safely with weights_only=True ({_load_failure(exc)})") from exc
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "fusion_model_state_dict" not in ckpt:
        keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(f"{path} is not an official MoTE checkpoint (expected model_state_dict and fusion_model_state_dict; found {keys})")
    return ckpt


def convert_official(
    ckpt: Mapping[str, Any],
    *,
    clip_name: str | None = None,
    clip_pretrained: str | None = None,
    interpolate_alpha: float | None = None,
) -> VideoCLIP:
    """Build a VideoCLIP holding the weights of an official MoTE checkpoint.

    Args:
        ckpt: the loaded official dict.
        clip_name: open_clip architecture for the text tower (default: inferred from shapes).
        clip_pretrained: open_clip tag or file with CLIP weights for the (frozen) text tower,
            which official checkpoints do not contain. None leaves it random (class
            features must then be supplied by the caller).
        interpolate_alpha: reproduce the official ``test.py`` patching
            θ_visual = α·θ_ckpt + (1−α)·θ_CLIP (α = 0.99 there); needs ``clip_pretrained``.
    """
    clip_sd = map_keys(strip_module_prefix(ckpt["model_state_dict"]), CLIP_KEY_MAP, what="model_state_dict")
    fusion = strip_module_prefix(ckpt["fusion_model_state_dict"])
    fusion_weights = {int(m.group(1)): v for k, v in fusion.items() if (m := FUSION_WEIGHT_KEY.match(k))}
    head_sd = map_keys({k: v for k, v in fusion.items() if not FUSION_WEIGHT_KEY.match(k)}, HEAD_KEY_MAP, what="fusion_model_state_dict")
    arch = infer_architecture({k: v for k, v in clip_sd.items()}, {k: v for k, v in fusion.items()})

    name = clip_name or matching_open_clip_name(arch)
    if clip_pretrained is not None:
        if name is None:
            raise ConversionError("no open_clip model matches this vision tower; pass clip_name= (--clip-name) explicitly")
        clip, clip_cfg = create_clip(name, pretrained=clip_pretrained, force_quick_gelu=True, recipe_key="--clip-pretrained")
        clip_cfg["text_weights"] = "pretrained"
    else:
        cfg = model_config(name, quick_gelu=True) if name else _fallback_clip_config(arch)
        clip = build_clip_from_config(cfg)
        clip_cfg = {"name": name or "converted-vit", "pretrained": None, "quick_gelu": True, "model_cfg": cfg, "text_weights": "missing"}
        log.warning("official checkpoints hold no text tower; its weights are random (pass --clip-pretrained to load them)")
    if interpolate_alpha is not None:
        if clip_pretrained is None:
            raise ConversionError("interpolate_alpha needs clip_pretrained (the CLIP weights to interpolate with)")
        clip_sd = interpolate_weights(clip_sd, clip.state_dict(), float(interpolate_alpha))

    merge, merge_kwargs = "mean", {}
    if fusion_weights and any(w.abs().max() > 0 for w in fusion_weights.values()):
        ws = {tuple(torch.softmax(w.float(), -1).tolist()) for w in fusion_weights.values()}
        if len(ws) > 1:
            raise ConversionError("per-layer mote_fusion_weight values differ; one merge per model is supported")
        merge, merge_kwargs = "weighted", {"weights": list(next(iter(ws)))}
    head = TemporalHead(
        width=arch.embed_dim,
        layers=arch.temporal_layers,
        num_experts=arch.num_experts,
        num_positions=arch.num_positions,
        merge=merge,
        merge_kwargs=merge_kwargs,
        num_source_classes=arch.num_source_classes,
    )
    missing = set(head.state_dict()) - set(head_sd)
    if missing:
        raise ConversionError(f"official head lacks {sorted(missing)[0]!r} (and {len(missing) - 1} more)")
    head.load_state_dict(head_sd, strict=True)
    full_clip_sd = clip.state_dict()
    full_clip_sd.update(clip_sd)
    clip.load_state_dict(full_clip_sd, strict=True)
    config = model_config_dict(clip_cfg, head.config, converted_from={"format": "mote-official", "epoch": _epoch(ckpt), "interpolate_alpha": interpolate_alpha})
    return VideoCLIP(clip=clip, head=head, config=config).eval()


def _epoch(ckpt: Mapping[str, Any]) -> int | None:
    e = ckpt.get("epoch")
    return int(e) if isinstance(e, (int, float)) or (isinstance(e, torch.Tensor) and e.numel() == 1) else None


def _fallback_clip_config(arch: OfficialArchitecture) -> dict[str, Any]:
    """An OpenAI-style CLIP config for a vision tower no open_clip config matches."""
    return {
        "embed_dim": arch.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": arch.image_size, "layers": arch.vision_layers, "width": arch.vision_width, "patch_size": arch.patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": arch.embed_dim, "heads": max(1, arch.embed_dim // 64), "layers": 12},
    }
