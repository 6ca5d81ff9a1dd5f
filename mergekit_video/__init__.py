"""mergekit_video: build, train and merge mixtures of experts in video models.

Importing the package is light (no torch, open_clip, timm or decord); the public
names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ExpertContainer": "mergekit_video.experts",
    "add_experts": "mergekit_video.surgery",
    "collapse_experts": "mergekit_video.surgery",
    "merge_state_dicts": "mergekit_video.merging",
    "ROUTERS": "mergekit_video.registry",
    "MERGES": "mergekit_video.registry",
    "REGULARIZERS": "mergekit_video.registry",
    "load": "mergekit_video.models.checkpoint",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .experts import ExpertContainer
    from .merging import merge_state_dicts
    from .models.checkpoint import load
    from .registry import MERGES, REGULARIZERS, ROUTERS
    from .surgery import add_experts, collapse_experts


from .utils.lazy import lazy_exports  # noqa: E402  (light: no torch)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
