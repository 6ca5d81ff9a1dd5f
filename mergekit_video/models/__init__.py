"""The MoTE video model: CLIP frame encoder + temporal head with merged experts.

Light on import: submodules import open_clip only when a CLIP is built.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_LAZY = {
    "VideoCLIP": ".video_clip",
    "build_video_clip": ".video_clip",
    "video_clip_from_config": ".video_clip",
    "TemporalHead": ".temporal",
    "TemporalTransformer": ".temporal",
    "cosine_logits": ".temporal",
    "semantic_association": ".modulation",
    "MoTEObjective": ".objective",
    "MoTEStepOutput": ".objective",
    "create_clip": ".clip",
    "encode_class_names": ".clip",
    "ClassFeatureCache": ".clip",
    "MOTE_TEMPLATES": ".prompts",
    "save_model": ".checkpoint",
    "load": ".checkpoint",
    "export_dense": ".checkpoint",
    "convert_official": ".convert",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
