"""Frame sampling: TSN segments, multi-clip test views, dense clips; indices checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_video.data import dense_indices, multi_clip_indices, segment_indices


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_segment_test_indices_are_segment_centres_by_hand():
    # 300 frames, 8 segments of 37.5 frames: centres 18.75, 56.25, 93.75, ... floored
    assert segment_indices(300, 8, train=False) == [18, 56, 93, 131, 168, 206, 243, 281]
    # 10 frames, 4 segments [0,2) [2,5) [5,7) [7,10): centres floor(1.25), floor(3.75), floor(6.25), floor(8.75)
    assert segment_indices(10, 4, train=False) == [1, 3, 6, 8]
    assert segment_indices(8, 8, train=False) == list(range(8))
    assert segment_indices(1, 1, train=False) == [0]


def test_segment_train_indices_stay_in_their_segment_and_cover_it_uniformly():
    g = gen(0)
    counts = torch.zeros(40, dtype=torch.long)
    for _ in range(2000):
        idx = segment_indices(40, 4, train=True, generator=g)  # segments of 10 frames
        for i, v in enumerate(idx):
            assert 10 * i <= v < 10 * (i + 1)
            counts[v] += 1
    # each frame drawn ~200 times (binomial sd ~13.4): all within 6 sd, every frame reachable
    assert counts.min() > 200 - 80 and counts.max() < 200 + 80


@pytest.mark.parametrize("n", [8, 9, 13, 31, 100, 257])
@pytest.mark.parametrize("t", [1, 3, 8])
def test_segment_indices_in_range_sorted_and_in_segment(n, t):
    if n < t:
        return
    idx = segment_indices(n, t, train=True, generator=gen(n * t))
    assert len(idx) == t and idx == sorted(idx)
    for i, v in enumerate(idx):
        assert i * n // t <= v < (i + 1) * n // t
    test = segment_indices(n, t, train=False)
    for i, v in enumerate(test):  # the frame under the centre (i + 0.5) * n / t of the real-valued segment
        assert v <= (i + 0.5) * n / t < v + 1


def _mmaction2_test_frames(n: int, t: int) -> list[int]:
    """mmaction2 SampleFrames (test mode, clip_len=1, num_clips=t): ``int(arange(t) * n/t + (n/t) / 2)``."""
    avg_interval = n / float(t)
    return (np.arange(t) * avg_interval + avg_interval / 2.0).astype(np.int32).tolist()


def test_segment_test_frames_are_mmaction2s_and_multi_clip_stays_consistent():
    grid = [(n, t) for t in (1, 2, 3, 5, 8, 16, 32) for n in range(t, 4 * t + 3)] + [(300, 8), (1000, 32), (97, 16)]
    for n, t in grid:
        assert segment_indices(n, t, train=False) == _mmaction2_test_frames(n, t), (n, t)
        assert multi_clip_indices(n, t, 1) == [segment_indices(n, t, train=False)]
        for k in (2, 3, 4):  # every view: sorted, in range, the frame under its sample point
            views = multi_clip_indices(n, t, k)
            for j, v in enumerate(views):
                assert v == sorted(set(v)) and 0 <= v[0] and v[-1] < n, (n, t, k)
                assert all(i <= n / t * (x + (j + 0.5) / k) < i + 1 for x, i in enumerate(v)), (n, t, k)
    assert segment_indices(4, 3, train=False) == [0, 2, 3]  # was [0, 1, 3]
    assert segment_indices(9, 8, train=False) == [0, 1, 2, 3, 5, 6, 7, 8]  # frame 7 is used (was never)


def test_short_videos_repeat_frames_in_order_and_dense_clips_loop():
    """Fewer frames than segments: in order (mmaction2's test frames; looping back would reverse the motion)."""
    assert segment_indices(5, 8, train=False) == [0, 0, 1, 2, 2, 3, 4, 4]  # floor(5 * (i + 0.5) / 8)
    assert segment_indices(3, 8, train=False) == _mmaction2_test_frames(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    counts = np.zeros((8, 5), dtype=np.int64)
    for seed in range(2000):
        idx = segment_indices(5, 8, train=True, generator=gen(seed))
        assert idx == sorted(idx) and len(idx) == 8
        for i, v in enumerate(idx):  # a frame under the real-valued segment [5i/8, 5(i+1)/8)
            assert v == int(i * 5 / 8) or v == int((i + 1) * 5 / 8 - 1e-9)
            counts[i, v] += 1
    # segment 1 covers [0.625, 1.25): frame 0 with p 0.6, frame 1 with p 0.4 (sd ~22 of 2000)
    assert abs(counts[1, 0] - 1200) < 110 and counts[1, 0] + counts[1, 1] == 2000
    assert set(np.flatnonzero(counts.sum(0))) == {0, 1, 2, 3, 4}  # every frame drawn
    assert segment_indices(5, 8, train=True, generator=gen(3)) == segment_indices(5, 8, train=True, generator=gen(3))
    assert multi_clip_indices(5, 8, 1) == [segment_indices(5, 8, train=False)]
    assert dense_indices(10, 4, 4, train=False) == [0, 4, 8, 2]  # span 13 > 10 frames: wraps round


def test_segment_train_is_reproducible_from_the_generator():
    a = [segment_indices(300, 8, train=True, generator=gen(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert segment_indices(300, 8, train=True, generator=gen(8)) != a[0]


def test_multi_clip_views_shift_across_the_first_segment_by_hand():
    # one view is the segment centre, like segment_indices(train=False)
    assert multi_clip_indices(300, 8, 1) == [segment_indices(300, 8, train=False)]
    views = multi_clip_indices(300, 8, 4)
    # view k takes floor(37.5 * (x + (k + 0.5) / 4)) in segment x
    assert [v[0] for v in views] == [4, 14, 23, 32]
    assert views[0][:3] == [4, 42, 79]
    assert views[3][-1] == 295
    for v in views:
        for x, i in enumerate(v):
            assert x * 300 // 8 <= i < (x + 1) * 300 // 8
    assert len({tuple(v) for v in views}) == 4
    # short video: each view repeats frames in order, from 4/6 * (x + 0.25) and (x + 0.75)
    assert multi_clip_indices(4, 6, 2) == [[0, 0, 1, 2, 2, 3], [0, 1, 1, 2, 3, 3]]
    # uneven segments (T <= N < 2T): one view is mmaction2's centre frames
    assert multi_clip_indices(4, 3, 1) == [[0, 2, 3]]  # centres 0.67, 2.0, 3.33
    assert multi_clip_indices(9, 8, 2) == [[0, 1, 2, 3, 4, 5, 7, 8], [0, 1, 3, 4, 5, 6, 7, 8]]  # 9/8 * (x + 0.25), (x + 0.75)


def test_start_offsets_are_the_official_mote_test_frames_by_hand():
    # tick = 300/8 = 37.5; one view (also MoTE's validation): int(37.5 * x), the first frame of each segment
    assert multi_clip_indices(300, 8, 1, offsets="start") == [[0, 37, 75, 112, 150, 187, 225, 262]]
    # 4 views: starts linspace(0, 36.5, 4) truncated = [0, 12, 24, 36]; frame int(start + 37.5 * x)
    views = multi_clip_indices(300, 8, 4, offsets="start")
    assert [v[0] for v in views] == [0, 12, 24, 36]
    assert views[1][:3] == [12, 49, 87] and views[3][-1] == 298
    # 3 views of 10 frames in 4 segments: tick 2.5, starts linspace(0, 1.5, 3) = [0, 0.75, 1.5] → [0, 0, 1]
    assert multi_clip_indices(10, 4, 3, offsets="start") == [[0, 2, 5, 7], [0, 2, 5, 7], [1, 3, 6, 8]]
    # a short video repeats frames: int(0.5 * x)
    assert multi_clip_indices(4, 8, 1, offsets="start") == [[0, 0, 1, 1, 2, 2, 3, 3]]
    with pytest.raises(ValueError, match=r"offsets must be one of \('centre', 'start'\), got 'end'"):
        multi_clip_indices(300, 8, 1, offsets="end")


def test_dense_indices_by_hand():
    # 100 frames, 8 frames 4 apart: span 29, last start 71
    assert dense_indices(100, 8, 4, train=False) == [35 + 4 * j for j in range(8)]
    starts = [dense_indices(100, 8, 4, train=False, clip_index=k, num_clips=3)[0] for k in range(3)]
    assert starts == [0, 36, 71]  # 35.5 rounds to the even 36
    # 62 frames, 8 frames 8 apart: span 57, last start 5; 2.5 rounds to the even 2, as mmaction2's np.round
    assert [dense_indices(62, 8, 8, train=False, clip_index=k, num_clips=3)[0] for k in range(3)] == [0, 2, 5]
    # mmaction2's float product: 7 · (29 / 14) = 14.500000000000002 rounds to 15 (7 · 29 / 14 = 14.5 would give 14)
    assert dense_indices(30, 1, 1, train=False, clip_index=7, num_clips=15) == [15]
    g = gen(0)
    for _ in range(200):
        idx = dense_indices(100, 8, 4, train=True, generator=g)
        assert 0 <= idx[0] <= 71 and idx == [idx[0] + 4 * j for j in range(8)]


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError):
        segment_indices(0, 8, train=False)
    with pytest.raises(ValueError):
        segment_indices(10, 0, train=False)
    with pytest.raises(ValueError):
        multi_clip_indices(10, 4, 0)
    with pytest.raises(ValueError):
        dense_indices(10, 4, 0, train=False)
    with pytest.raises(ValueError):
        dense_indices(10, 4, 2, train=False, clip_index=3, num_clips=3)
