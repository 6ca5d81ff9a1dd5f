"""Which frames to decode: TSN sparse segments, dense clips, multi-clip test views.

All functions return 0-based frame indices. Segment sampling of videos shorter than the number
of segments repeats frames in order; dense clips longer than the video loop (index ``% num_frames``),
as mmaction2's do. Training randomness comes only from the ``generator`` passed in,
so a seeded generator gives the same indices on every run and every worker.
"""

from __future__ import annotations

import numpy as np
import torch


def _check(num_frames: int, count: int, name: str) -> None:
    if num_frames <= 0:
        raise ValueError(f"video has {num_frames} frames; need at least 1")
    if count <= 0:
        raise ValueError(f"{name} must be positive, got {count}")


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator).item())


def segment_indices(num_frames: int, num_segments: int, *, train: bool, generator: torch.Generator | None = None) -> list[int]:
    """TSN sparse sampling: split the video into ``num_segments`` equal segments, take one frame each.

    Segment ``i`` covers frames ``[i*N//T, (i+1)*N//T)``. Training takes a uniformly random frame
    inside each segment; testing takes the frame at the segment centre, ``int((i + 0.5) * N / T)``
    computed exactly as ``(2i+1)*N // (2T)`` (TSN / mmaction2 ``SampleFrames`` test mode). When
    ``T < N < 2T`` that frame may be the first of the next integer segment (N=4, T=3: frames
    0, 2, 3): it is the frame under the centre of the real-valued segment ``[i*N/T, (i+1)*N/T)``.
    With fewer frames than segments, frames repeat in order (never looping back, which would reverse
    the motion inside the clip): testing takes the same centres (mmaction2's test frames), training a
    random point of each real-valued segment, frame ``floor((i + u) * N / T)`` with ``u`` uniform in
    [0, 1) (as the official MoTE code draws in each of its rounded segments).
    """
    _check(num_frames, num_segments, "num_segments")
    n, t = num_frames, num_segments
    if n < t and train:
        u = torch.rand(t, generator=generator, dtype=torch.float64)
        return [min(n - 1, int((i + float(u[i])) * n / t)) for i in range(t)]
    if not train:
        return [(2 * i + 1) * n // (2 * t) for i in range(t)]
    starts = torch.tensor([i * n // t for i in range(t + 1)])
    lengths = starts[1:] - starts[:-1]  # each >= 1 since n >= t
    offsets = (torch.rand(t, generator=generator, dtype=torch.float64) * lengths).long()
    offsets = torch.minimum(offsets, lengths - 1)
    return (starts[:-1] + offsets).tolist()


#: Where test views sit in their segments: ``centre`` (TSN) or ``start`` (the MoTE / Text4Vis test code).
TEST_OFFSETS = ("centre", "start")


def multi_clip_indices(num_frames: int, num_segments: int, num_clips: int, *, offsets: str = "centre") -> list[list[int]]:
    """Test-time temporal views for sparse sampling: ``num_clips`` sets of segment frames.

    ``offsets="centre"``: view ``k`` takes frame ``floor(N/T * (x + (k + 0.5)/K))`` in segment
    ``x``: the views shift the start evenly across the first (real-valued) segment, and one view
    (K=1) is the segment centre, identical to ``segment_indices(train=False)`` (mmaction2's test
    frames). Short videos repeat frames in order.

    ``offsets="start"``, the official MoTE test code (``datasets/video.py``): with ``tick = N/T``
    and the view starts ``linspace(0, tick - 1, K)`` truncated to integers, view ``k`` takes frame
    ``int(start_k + tick * x) % N``; one view (K=1, also its validation) takes the first frame of
    each segment. Short videos repeat frames (``int(tick * x)`` with ``tick < 1``).
    """
    _check(num_frames, num_segments, "num_segments")
    if num_clips <= 0:
        raise ValueError(f"num_clips must be positive, got {num_clips}")
    if offsets not in TEST_OFFSETS:
        raise ValueError(f"offsets must be one of {TEST_OFFSETS}, got {offsets!r}")
    n, t, k_total = num_frames, num_segments, num_clips
    if offsets == "start":
        tick = n / t
        starts = np.linspace(0, tick - 1, num=k_total).astype(np.int64).tolist()  # truncated, as linspace(dtype=int) did
        return [[int(start + tick * x) % n for x in range(t)] for start in starts]
    # exact integer form of floor(n * (2*K*x + 2*k + 1) / (2*T*K)); < n, non-decreasing in x (increasing when n >= t)
    return [[n * (2 * k_total * x + 2 * k + 1) // (2 * t * k_total) for x in range(t)] for k in range(k_total)]


def dense_indices(
    num_frames: int,
    clip_len: int,
    stride: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> list[int]:
    """Dense sampling (I3D/SlowFast style): ``clip_len`` frames ``stride`` apart from one start.

    The clip spans ``(clip_len-1)*stride + 1`` frames. Training draws the start uniformly in
    ``[0, N - span]``; testing with one clip centres it, with ``num_clips`` clips places clip
    ``clip_index`` at ``round(clip_index * ((N - span) / (num_clips - 1)))``, computed and rounded (half
    to even) as mmaction2's ``SampleFrames`` (first clip at the start, last at the end). Videos shorter than the
    span loop.
    """
    _check(num_frames, clip_len, "clip_len")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index {clip_index} out of range for num_clips={num_clips}")
    span = (clip_len - 1) * stride + 1
    max_start = max(0, num_frames - span)
    if train:
        start = _randint(max_start + 1, generator)
    elif num_clips == 1:
        start = max_start // 2
    else:
        start = round(clip_index * (max_start / (num_clips - 1)))  # mmaction2's float product, rounded half to even as np.round
    return [(start + j * stride) % num_frames for j in range(clip_len)]
