"""H.264 encoding with PyAV/libx264 (synthetic data, dataset preparation), written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np

from ..utils.io import atomic_path


def x264_options(*, gop: int | None, fastdecode: bool = False, preset: str | None = None, crf: int | None = None) -> dict[str, str]:
    """libx264 options: a fixed keyframe interval ``gop`` (no scene-cut keyframes), ``tune=fastdecode``.

    ``gop=None`` keeps x264's default (a keyframe every 250 frames, plus scene cuts), as raw
    downloads often have.
    """
    opts: dict[str, str] = {}
    if preset:
        opts["preset"] = preset
    if fastdecode:
        opts["tune"] = "fastdecode"
    if crf is not None:
        opts["crf"] = str(crf)
    if gop is not None:
        if gop <= 0:
            raise ValueError(f"gop must be positive, got {gop}")
        opts["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0"
    return opts


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB → ``[H·3/2, W]`` uint8 planar YUV 4:2:0 (BT.601, limited range).

    The layout ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes: Y rows, then the U and
    V planes (each ``[H/2, W/2]``) packed two rows per row. Converting here rather than through
    swscale keeps encodes of the same pictures byte-identical across processes: swscale's RGB
    path gave rare run-to-run differences, and a seeded synthetic dataset must not change.
    """
    h, w, _ = rgb.shape
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + 0.256788 * r + 0.504129 * g + 0.097906 * b  # [H, W]
    quad = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))  # [H/2, W/2, 3]; chroma of the 2x2 mean
    qr, qg, qb = quad[..., 0], quad[..., 1], quad[..., 2]
    u = 128.0 - 0.148223 * qr - 0.290993 * qg + 0.439216 * qb
    v = 128.0 + 0.439216 * qr - 0.367788 * qg - 0.071427 * qb
    y8, u8, v8 = (np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v))
    return np.concatenate([y8, u8.reshape(h // 4, w), v8.reshape(h // 4, w)], axis=0)


def encode_video(
    path: str | os.PathLike,
    frames: Iterable[Any],
    *,
    width: int,
    height: int,
    fps: float | Fraction,
    gop: int | None = None,
    fastdecode: bool = False,
    preset: str | None = None,
    crf: int | None = None,
    threads: int = 1,
    overwrite: bool = True,
) -> int:
    """Encode RGB frames (``[H, W, 3]`` uint8 arrays or ``av.VideoFrame``) to an H.264 mp4; returns the frame count.

    Width and height must be even (yuv420p). The file appears only when encoding succeeded.
    """
    import av

    if width % 2 or height % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {width}x{height}")
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    count = 0
    with atomic_path(path, overwrite=overwrite) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = x264_options(gop=gop, fastdecode=fastdecode, preset=preset, crf=crf)
            stream.codec_context.thread_count = max(0, int(threads))
            for frame in frames:
                if isinstance(frame, np.ndarray):
                    if frame.shape[:2] == (height, width) and height % 4 == 0:
                        frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
                    else:
                        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                if frame.width != width or frame.height != height or frame.format.name != "yuv420p":
                    frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BILINEAR")
                frame.pts, frame.time_base = count, 1 / rate  # constant frame rate, whatever the source stamps
                frame.pict_type = 0  # NONE: a decoded source I-frame would otherwise force a keyframe
                for packet in stream.encode(frame):
                    container.mux(packet)
                count += 1
            for packet in stream.encode():
                container.mux(packet)
        if count == 0:
            raise ValueError(f"{path}: no frames to encode")
    return count


def keyframe_indices(path: str | os.PathLike) -> tuple[list[int], int]:
    """(display-order indices of keyframes, number of frames), from packet flags (no decoding)."""
    import av

    from .readers import video_stream

    with av.open(str(path)) as container:
        stream = video_stream(container)
        pts, key = [], []
        for pkt in container.demux(stream):
            if pkt.size == 0:
                continue
            pts.append(pkt.pts if pkt.pts is not None else len(pts))
            key.append(bool(pkt.is_keyframe))
    order = sorted(range(len(pts)), key=lambda i: pts[i])
    return [rank for rank, i in enumerate(order) if key[i]], len(pts)


def video_info(path: str | os.PathLike) -> dict:
    """Header facts of a video: width, height, fps, frame count (0 if unknown), codec."""
    import av

    from .readers import video_stream

    with av.open(str(path)) as container:
        s = video_stream(container)
        rate = s.average_rate or s.guessed_rate or Fraction(0)
        return {"width": int(s.codec_context.width), "height": int(s.codec_context.height), "fps": float(rate),
                "frames": int(s.frames or 0), "codec": s.codec_context.name}

