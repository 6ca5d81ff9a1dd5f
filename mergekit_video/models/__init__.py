"""The MoTE video model: CLIP frame encoder + temporal head with merged experts.

Light on import: submodules import open_clip only when a CLIP is built.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "VideoCLIP": "mergekit_video.models.video_clip",
    "build_video_clip": "mergekit_video.models.video_clip",
    "video_clip_from_config": "mergekit_video.models.video_clip",
    "TemporalHead": "mergekit_video.models.temporal",
    "TemporalTransformer": "mergekit_video.models.temporal",
    "cosine_logits": "mergekit_video.models.temporal",
    "semantic_association": "mergekit_video.models.modulation",
    "MoTEObjective": "mergekit_video.models.objective",
    "MoTEStepOutput": "mergekit_video.models.objective",
    "create_clip": "mergekit_video.models.clip",
    "encode_class_names": "mergekit_video.models.clip",
    "ClassFeatureCache": "mergekit_video.models.clip",
    "MOTE_TEMPLATES": "mergekit_video.models.prompts",
    "save_model": "mergekit_video.models.checkpoint",
    "load": "mergekit_video.models.checkpoint",
    "export_dense": "mergekit_video.models.checkpoint",
    "convert_official": "mergekit_video.models.convert",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_video.models' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
