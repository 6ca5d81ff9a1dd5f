"""Video data pipeline: readers, sampling, transforms, datasets, loaders, synthetic data, preparation.

Importing this package is light; each name is imported from its module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_LAZY = {
    # readers
    "open_video": "readers",
    "VideoReader": "readers",
    "VideoReadError": "readers",
    "DecordReader": "readers",
    "PyAVReader": "readers",
    "FrameFolderReader": "readers",
    "decord_available": "readers",
    "ReadTimeoutError": "watchdog",
    # sampling
    "segment_indices": "sampling",
    "dense_indices": "sampling",
    "multi_clip_indices": "sampling",
    # transforms
    "TrainTransform": "transforms",
    "TestTransform": "transforms",
    "normalize_frames": "transforms",
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    # annotations and datasets
    "VideoRecord": "annotations",
    "read_class_names": "annotations",
    "read_annotation_list": "annotations",
    "write_annotation_list": "annotations",
    "write_class_names": "annotations",
    "few_shot_subset": "annotations",
    "VideoDataset": "datasets",
    "LabelError": "datasets",
    "FailureRecord": "failures",
    # loading
    "VideoSampler": "loader",
    "collate_videos": "loader",
    "build_loader": "loader",
    # synthetic data and preparation
    "write_synthetic_dataset": "synthetic",
    "SyntheticDataset": "synthetic",
    "prepare_dataset": "prepare",
    "PrepareReport": "prepare",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .annotations import (VideoRecord, few_shot_subset, read_annotation_list, read_class_names, write_annotation_list,
                              write_class_names)
    from .datasets import LabelError, VideoDataset
    from .failures import FailureRecord
    from .loader import VideoSampler, build_loader, collate_videos
    from .prepare import PrepareReport, prepare_dataset
    from .readers import (DecordReader, FrameFolderReader, PyAVReader, VideoReader, VideoReadError, decord_available,
                          open_video)
    from .sampling import dense_indices, multi_clip_indices, segment_indices
    from .synthetic import SyntheticDataset, write_synthetic_dataset
    from .transforms import CLIP_MEAN, CLIP_STD, TestTransform, TrainTransform, normalize_frames
    from .watchdog import ReadTimeoutError


__getattr__, __dir__ = lazy_exports(__name__, {k: f".{m}" for k, m in _LAZY.items()}, globals())
