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
from .checkpoint import describe_mismatches, key_summary, state_mismatches
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


def strip_module_prefix(sd: Mapping[str, torch.Tensor], *, what: str = "state dict") -> dict[str, torch.Tensor]:
    """Remove DDP's ``module.`` prefix from every key that has it; a key present both with and without
    it is ambiguous and a :class:`ConversionError`."""
    out: dict[str, torch.Tensor] = {}
    twice = []
    for k, v in sd.items():
        short = k[7:] if k.startswith("module.") else k
        if short in out:
            twice.append(short)
        out[short] = v
    if twice:
        raise ConversionError(
            f"{what} holds {len(twice)} key{'s' * (len(twice) != 1)} both with and without DDP's 'module.' prefix "
            f"({key_summary(twice)}): which of the two to convert is ambiguous; keep one of each"
        )
    return out


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


def _numbered(ids: set[int], *, what: str) -> int:
    """How many of something numbered 0..n-1 there are; a gap is a :class:`ConversionError`."""
    if ids != set(range(len(ids))):
        raise ConversionError(f"{what} must be numbered 0..n-1 without gaps; the checkpoint holds {sorted(ids)}")
    return len(ids)


def infer_architecture(clip_sd: Mapping[str, torch.Tensor], head_sd: Mapping[str, torch.Tensor]) -> OfficialArchitecture:
    """Read patch size, widths, depths, image size and expert count from tensor shapes.

    Layers (of the visual tower and of the head) and experts must be numbered 0..n-1 without gaps.
    """
    try:
        conv = clip_sd["visual.conv1.weight"]  # [W, 3, P, P]
        pos = clip_sd["visual.positional_embedding"]  # [(S/P)^2 + 1, W]
        proj = clip_sd["visual.proj"]  # [W, D]
        fpe = head_sd["frame_position_embeddings.weight"]  # [77, D]
    except KeyError as exc:
        raise ConversionError(f"official checkpoint lacks {exc.args[0]!r}") from None
    for key, t, dims in (("visual.conv1.weight", conv, 4), ("visual.positional_embedding", pos, 2), ("visual.proj", proj, 2),
                         ("frame_position_embeddings.weight", fpe, 2)):
        if t.dim() != dims or not t.numel():
            raise ConversionError(f"official checkpoint's {key!r} has shape {list(t.shape)}; a non-empty {dims}-D tensor is expected")
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise ConversionError(f"visual.positional_embedding has {pos.shape[0]} rows, not a square grid + 1")
    vision_ids = {int(m.group(1)) for k in clip_sd if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    if not vision_ids:
        raise ConversionError("official checkpoint holds no visual.transformer.resblocks.* tensors (its visual tower's layers)")
    layer_ids = {int(m.group(1)) for k in head_sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    expert_ids = {int(m.group(1)) for k in head_sd if (m := re.match(r"transformer\.resblocks\.\d+\.mlp\.fc_(?:up|dn)\.(\d+)\.", k))}
    spe = head_sd.get("spe_cls_feature")
    return OfficialArchitecture(
        image_size=int(conv.shape[-1]) * grid,
        patch_size=int(conv.shape[-1]),
        vision_width=int(conv.shape[0]),
        vision_layers=_numbered(vision_ids, what="the visual tower's layers (visual.transformer.resblocks.N)"),
        embed_dim=int(proj.shape[1]),
        temporal_layers=_numbered(layer_ids, what="the temporal head's layers (transformer.resblocks.N)"),
        num_experts=_numbered(expert_ids, what="the experts (mlp.fc_up.N / mlp.fc_dn.N)"),
        num_positions=int(fpe.shape[0]),
        num_source_classes=0 if spe is None or spe.dim() != 2 else int(spe.shape[0]),
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
        if "Unsupported global" in str(exc):  # a real pickle holding more than tensors
            raise ConversionError(f"{path} is a PyTorch checkpoint holding objects other than tensors, which cannot be loaded "
                                  f"safely (weights_only=True): {_load_failure(exc)}") from exc
        raise ConversionError(f"{path} is not a PyTorch checkpoint file ({_load_failure(exc)})") from exc
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

    Raises:
        ConversionError: the checkpoint does not supply exactly the tensors of the model its shapes
            describe: every tensor of the visual tower and ``logit_scale`` (the text tower comes from
            ``clip_pretrained`` or stays absent), every tensor of the head, layers and experts numbered
            0..n-1, one ``mote_fusion_weight`` of shape [E] per layer (or none); or an entry is not a dict
            of tensors, or a key appears with and without ``module.``. The error names the first
            offending keys and how many there are; no model is built from a partial checkpoint.
    """
    clip_sd = map_keys(_state_dict_entry(ckpt, "model_state_dict"), CLIP_KEY_MAP, what="model_state_dict")
    fusion = _state_dict_entry(ckpt, "fusion_model_state_dict")
    fusion_weights = {int(m.group(1)): v for k, v in fusion.items() if (m := FUSION_WEIGHT_KEY.match(k))}
    head_sd = map_keys({k: v for k, v in fusion.items() if not FUSION_WEIGHT_KEY.match(k)}, HEAD_KEY_MAP, what="fusion_model_state_dict")
    arch = infer_architecture(clip_sd, fusion)
    merge, merge_kwargs = _fusion_merge(fusion_weights, arch)

    if clip_name:
        model_config(clip_name, name_key="--clip-name")  # an unknown name is told by its option, before anything is built
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
    # the checkpoint supplies every tensor of the visual tower and logit_scale (the text tower is CLIP's or absent)
    target = clip.state_dict()
    tower = {k: tuple(v.shape) for k, v in target.items() if k.startswith("visual.") or k == "logit_scale"}
    what = f"open_clip {clip_name}'s vision tower (--clip-name)" if clip_name else f"the vision tower its shapes describe ({_describe_vision(arch)})"
    _require_fit("model_state_dict", tower, clip_sd, what, official=lambda k: k)
    if clip_pretrained is None:
        log.warning("official checkpoints hold no text tower; its weights are random (pass --clip-pretrained to load them)")
    if interpolate_alpha is not None:
        if clip_pretrained is None:
            raise ConversionError("interpolate_alpha needs clip_pretrained (the CLIP weights to interpolate with)")
        clip_sd = interpolate_weights(clip_sd, target, float(interpolate_alpha))

    head = TemporalHead(
        width=arch.embed_dim,
        layers=arch.temporal_layers,
        num_experts=arch.num_experts,
        num_positions=arch.num_positions,
        merge=merge,
        merge_kwargs=merge_kwargs,
        num_source_classes=arch.num_source_classes,
    )
    head_what = (f"the {arch.temporal_layers}-layer temporal head of width {arch.embed_dim} with {arch.num_experts} experts per layer "
                 f"that its shapes describe")
    _require_fit("fusion_model_state_dict", {k: tuple(v.shape) for k, v in head.state_dict().items()}, head_sd, head_what, official=official_head_key)
    head.load_state_dict(head_sd, strict=True)
    clip.load_state_dict({**target, **clip_sd}, strict=True)  # nothing of the visual tower left from the random init
    config = model_config_dict(clip_cfg, head.config, converted_from={"format": "mote-official", "epoch": _epoch(ckpt), "interpolate_alpha": interpolate_alpha})
    return VideoCLIP(clip=clip, head=head, config=config).eval()


def official_head_key(key: str) -> str:
    """The official name of one of our temporal-head keys (the inverse of :data:`HEAD_KEY_MAP`)."""
    if key == "source_class_features":
        return "spe_cls_feature"
    m = re.match(r"^(transformer\.resblocks\.\d+\.mlp\.)experts\.(\d+)\.(c_fc|c_proj)\.(weight|bias)$", key)
    if m:
        return f"{m.group(1)}{'fc_up' if m.group(3) == 'c_fc' else 'fc_dn'}.{m.group(2)}.{m.group(4)}"
    return key


def _state_dict_entry(ckpt: Mapping[str, Any], entry: str) -> dict[str, torch.Tensor]:
    """``ckpt[entry]`` without DDP's ``module.`` prefix, checked to be a dict of tensors."""
    sd = ckpt[entry]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"the checkpoint's {entry} is a {type(sd).__name__}, not a dict of tensors: not an official MoTE checkpoint")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ConversionError(f"{entry} has a key {k!r} of type {type(k).__name__}; parameter names are strings")
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{entry} entry {k!r} is an object of type {type(v).__name__}, not a tensor")
    return strip_module_prefix(sd, what=entry)


def _require_fit(entry: str, expected: dict[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor], what: str, *, official: Any) -> None:
    """A :class:`ConversionError` naming the first missing, unexpected or wrong-shaped keys (official names)."""
    missing, unexpected, wrong = state_mismatches(expected, {k: tuple(v.shape) for k, v in sd.items()})
    if missing or unexpected or wrong:
        detail = describe_mismatches([official(k) for k in missing], [official(k) for k in unexpected],
                                     [(official(k), got, want) for k, got, want in wrong])
        raise ConversionError(f"{entry} does not fit {what}: it {detail}")


def _describe_vision(arch: OfficialArchitecture) -> str:
    return (f"{arch.vision_layers} layers of width {arch.vision_width}, patch {arch.patch_size}, image {arch.image_size}, "
            f"embedding {arch.embed_dim}")


def _fusion_merge(fusion_weights: Mapping[int, torch.Tensor], arch: OfficialArchitecture) -> tuple[str, dict[str, Any]]:
    """The eval merge of the official ``mote_fusion_weight`` w (one per layer, shape [E]): softmax(w), mean when w = 0."""
    if not fusion_weights:
        return "mean", {}
    key = "transformer.resblocks.{}.mlp.mote_fusion_weight"
    if not arch.num_experts:
        raise ConversionError(f"fusion_model_state_dict has {key.format(min(fusion_weights))!r} but its head has no experts (no mlp.fc_up.N)")
    for layer, w in sorted(fusion_weights.items()):
        if layer >= arch.temporal_layers:
            raise ConversionError(f"fusion_model_state_dict has {key.format(layer)!r}, but the head has {arch.temporal_layers} layers")
        if tuple(w.shape) != (arch.num_experts,):
            raise ConversionError(f"fusion_model_state_dict's {key.format(layer)!r} has shape {list(w.shape)}; "
                                  f"the head has {arch.num_experts} experts per layer, so [{arch.num_experts}] is expected")
    absent = sorted(set(range(arch.temporal_layers)) - set(fusion_weights))
    if absent:
        raise ConversionError(f"fusion_model_state_dict lacks {key.format(absent[0])!r} ({len(absent)} of {arch.temporal_layers} layers "
                              f"have none), which the other layers have")
    if all(w.abs().max() == 0 for w in fusion_weights.values()):
        return "mean", {}
    ws = {tuple(torch.softmax(w.float(), -1).tolist()) for w in fusion_weights.values()}
    if len(ws) > 1:
        raise ConversionError("per-layer mote_fusion_weight values differ; one merge per model is supported")
    return "weighted", {"weights": list(next(iter(ws)))}


def _epoch(ckpt: Mapping[str, Any]) -> int | None:
    e = ckpt.get("epoch")
    return int(e) if isinstance(e, (int, float)) or (isinstance(e, torch.Tensor) and e.numel() == 1) else None


def _fallback_clip_config(arch: OfficialArchitecture) -> dict[str, Any]:
    """An OpenAI-style CLIP config for a vision tower no open_clip config matches."""
    return {
        "embed_dim": arch.embed_dim,
        "quick_gelu": True,
        # heads = width // 64 as OpenAI's CLIP; one head for a tower narrower than 64 (0 heads cannot build)
        "vision_cfg": {"image_size": arch.image_size, "layers": arch.vision_layers, "width": arch.vision_width, "patch_size": arch.patch_size,
                       "head_width": min(64, arch.vision_width)},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": arch.embed_dim, "heads": max(1, arch.embed_dim // 64), "layers": 12},
    }
