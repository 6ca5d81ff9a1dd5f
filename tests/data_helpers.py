"""Shared fixtures and file makers for the data-pipeline tests (imported by tests/test_data_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Frame i of a "level-coded" video is a flat grey picture at LEVELS[i]: the decoded mean tells
# which frame came back (x264 keeps a flat picture's level within +-2).
LEVEL_STEP = 5


def level(i: int) -> int:
    """Grey level of frame ``i`` in a level-coded video."""
    return 16 + LEVEL_STEP * i


def level_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """``[n, h, w, 3]`` uint8, frame i flat at ``level(i)``."""
    assert level(n - 1) < 250
    return np.stack([np.full((h, w, 3), level(i), dtype=np.uint8) for i in range(n)])


def frame_ids(frames) -> list[int]:
    """Recover frame numbers of level-coded frames (``[T, H, W, 3]`` tensor)."""
    means = frames.float().mean(dim=(1, 2, 3)).tolist()
    return [round((m - 16) / LEVEL_STEP) for m in means]


def write_level_video(path: Path, n: int = 40, *, gop: int | None = 8, h: int = 48, w: int = 64, faststart: bool = False) -> Path:
    """An H.264 mp4 whose frame i is flat grey ``level(i)``."""
    from mergekit_video.data.encode import encode_video

    encode_video(path, level_frames(n, h, w), width=w, height=h, fps=10, gop=gop)
    return path


def write_textured_video(path: Path, n: int = 40, *, gop: int | None = 8, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    """An H.264 mp4 with a moving textured picture (for decoder cross-checks)."""
    from mergekit_video.data.encode import encode_video
    from mergekit_video.data.synthetic import class_catalogue, render_clip

    clip = render_clip(class_catalogue()[0], frames=n, size=(h, w), rng=np.random.default_rng(seed), texture=0.8)
    encode_video(path, clip, width=w, height=h, fps=10, gop=gop)
    return path


def write_bad_files(folder: Path) -> dict[str, Path]:
    """truncated mp4 (cut in half), zero-byte mp4, a text file named .mp4, and a path that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_level_video(folder / "source.mp4", 40)
    data = good.read_bytes()
    truncated = folder / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    zero = folder / "zero.mp4"
    zero.write_bytes(b"")
    text = folder / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    return {"truncated": truncated, "zero": zero, "text": text, "missing": folder / "missing.mp4"}


def write_frame_folder(folder: Path, n: int, h: int = 32, w: int = 40) -> Path:
    """TSN frame folder: img_00001.jpg ... with frame i flat at ``level(i)``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(level_frames(n, h, w)):
        Image.fromarray(frame).save(folder / f"img_{i + 1:05d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A small synthetic dataset shared by the data tests: 3 classes x 3 videos, 24 frames of 48x64."""
    from mergekit_video.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(root, num_classes=3, videos_per_class=3, val_per_class=1, num_novel_classes=2, frames=24,
                                   size=(48, 64), seed=0, overwrite=True)
