"""Readers: the right frames for any index order, decord vs PyAV agreement, frame folders, bad files, time limit."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (cut_file, encode_frames, frame_ids, level, level_frames, write_audio_only, write_bad_files, write_frame_folder,
                          write_good_variety, write_level_video, write_noise_video, write_textured_video, write_two_stream_video,
                          zero_packet)

from mergekit_video.data import VideoReadError, open_video
from mergekit_video.data.readers import (decord_available, decord_decodes_width, keyframes_out_of_place, keyframes_reordered,
                                         probe_size, video_stream)
from mergekit_video.data.watchdog import ReadTimeoutError, run_with_timeout

BACKENDS = ["pyav"] + (["decord"] if decord_available() else [])


@pytest.fixture(scope="module")
def level_video(tmp_path_factory):
    return write_level_video(tmp_path_factory.mktemp("lv") / "levels.mp4", 40, gop=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_returns_the_frames_asked_for_in_order(level_video, backend):
    with open_video(level_video, backend=backend) as r:
        assert r.num_frames == 40
        idx = [5, 0, 17, 39, 5, 24, 8]  # unsorted, repeated, across several GOPs
        frames = r.get_frames(idx)
        assert frames.shape == (7, 48, 64, 3) and frames.dtype == torch.uint8
        assert frame_ids(frames) == idx
        assert frame_ids(r.get_frames([38, 2])) == [38, 2]  # a second call seeks back
        with pytest.raises(IndexError):
            r.get_frames([40])


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_pyav_and_decord_give_the_same_frames(tmp_path):
    path = write_textured_video(tmp_path / "tex.mp4", 48, gop=12)
    idx = [0, 3, 11, 12, 13, 30, 47, 20]
    a = open_video(path, backend="decord").get_frames(idx).float()
    b = open_video(path, backend="pyav").get_frames(idx).float()
    assert a.shape == b.shape
    assert (a - b).abs().mean().item() < 1.0  # same decoder and colour conversion: within decoding tolerance
    # long GOP (x264 default 250 > length): every frame depends on frame 0
    path = write_textured_video(tmp_path / "longgop.mp4", 40, gop=None)
    a = open_video(path, backend="decord").get_frames([39, 1]).float()
    b = open_video(path, backend="pyav").get_frames([39, 1]).float()
    assert (a - b).abs().mean().item() < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_time_short_side_resize(level_video, backend):
    frames = open_video(level_video, backend=backend, short_side=32).get_frames([3, 9])
    assert frames.shape == (2, 32, 43, 3)  # 48x64 -> 32 x round(64 * 32/48)
    assert frame_ids(frames) == [3, 9]


def test_frame_folder_reader(tmp_path):
    folder = write_frame_folder(tmp_path / "vid", 12)
    r = open_video(folder, backend="auto")
    assert r.num_frames == 12
    assert frame_ids(r.get_frames([11, 0, 4, 4])) == [11, 0, 4, 4]
    assert open_video(folder, backend="frames", num_frames=10).num_frames == 10  # the list's count wins
    assert open_video(folder, backend="frames", short_side=16).get_frames([1]).shape == (1, 16, 20, 3)
    (folder / "img_00005.jpg").unlink()
    with pytest.raises(VideoReadError, match="img_00005.jpg"):
        r.get_frames([4])
    with pytest.raises(VideoReadError, match="frame folder not found"):
        open_video(tmp_path / "nope", backend="frames")
    # a list line giving 0 frames is the list's count, not the folder's (which holds 11)
    with pytest.raises(VideoReadError, match=r"vid: the annotation list gives it 0 frames$"):
        open_video(folder, backend="frames", num_frames=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoReadError, match=r"empty: frame folder holds no frames$"):
        open_video(empty, backend="frames")


def test_frame_folders_count_only_the_templates_files_and_say_when_numbering_starts_at_0(tmp_path):
    import shutil

    folder = write_frame_folder(tmp_path / "vid", 6)
    for kind in ("flow_x", "flow_y"):  # mmaction2 extracts optical flow into the same folder
        for i in range(1, 7):
            shutil.copy(folder / f"img_{i:05d}.jpg", folder / f"{kind}_{i:05d}.jpg")
    (folder / "notes.jpg").write_bytes(b"")
    assert open_video(folder, backend="frames").num_frames == 6
    # a folder numbered from 0 (img_00000.jpg ... img_00005.jpg) is refused at open: read from 1, its frames came
    # back one off (the centre indices never reach the missing img_00006.jpg), without any error
    zero = tmp_path / "zero"
    zero.mkdir()
    for i in range(6):
        shutil.copy(folder / f"img_{i + 1:05d}.jpg", zero / f"img_{i:05d}.jpg")
    for num_frames in (6, None):
        with pytest.raises(VideoReadError, match=r"zero: frame folders are read numbered from 1 \(img_00001.jpg is frame 0\), "
                                                 r"but this one has img_00000.jpg: set frame_index_base=0"):
            open_video(zero, backend="frames", num_frames=num_frames)
    from_zero = open_video(zero, backend="frames", num_frames=6, frame_index_base=0)
    assert torch.equal(from_zero.get_frames([0, 2, 5]), open_video(folder, backend="frames").get_frames([0, 2, 5]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["truncated", "zero", "text", "missing"])
def test_bad_files_raise_an_error_naming_the_file(tmp_path, backend, kind):
    path = write_bad_files(tmp_path)[kind]
    with pytest.raises(VideoReadError) as info:
        with open_video(path, backend=backend) as r:
            r.get_frames(list(range(0, r.num_frames, 3)))
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_truncated_faststart_file_is_caught_by_pyav(tmp_path):
    # moov atom first: the container opens, the sample table lists frames that are not in the file
    import av
    import numpy as np

    path = tmp_path / "fs.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            img = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    for backend in BACKENDS:  # decord said "av_read_frame failed with 1094995529"
        with pytest.raises(VideoReadError, match=rf"^{re.escape(str(path))}: truncated \(the header lists 30 frames, the file holds \d+\)$") as info:
            open_video(path, backend=backend).get_frames([0, 29])
        assert info.value.__cause__ is not None or backend == "pyav"  # decord's own words stay in the chain


def test_open_video_validates_backend(level_video):
    with pytest.raises(ValueError, match="unknown video backend"):
        open_video(level_video, backend="opencv")
    assert frame_ids(open_video(level_video, backend="auto").get_frames([7])) == [7]
    assert level(7) == 51


def test_time_limit_abandons_a_stuck_read_and_recovers():
    t0 = time.perf_counter()
    with pytest.raises(ReadTimeoutError, match="stuck.mp4"):
        run_with_timeout(lambda: time.sleep(3), 0.2, what="stuck.mp4")
    assert time.perf_counter() - t0 < 1.5
    assert run_with_timeout(lambda: 41 + 1, 5.0) == 42  # a fresh helper thread serves the next read
    with pytest.raises(KeyError):
        run_with_timeout(lambda: {}["x"], 5.0)  # errors from the read propagate unchanged
    assert run_with_timeout(lambda: 7, None) == 7


def test_slow_reads_that_finish_late_leave_no_thread_and_do_not_add_up():
    import threading

    from mergekit_video.data import watchdog

    time.sleep(0.1)
    still_stuck = sum(h.thread.is_alive() for h in watchdog._abandoned)  # left by other tests of this process
    before = threading.active_count()
    for i in range(watchdog.MAX_ABANDONED_THREADS + 4):  # more timeouts than the give-up limit, one at a time
        with pytest.raises(ReadTimeoutError, match=rf"slow{i}\.mp4: no result after 0.01 s") as info:
            run_with_timeout(lambda: time.sleep(0.06), 0.01, what=f"slow{i}.mp4")
        assert str(info.value).endswith(f"; {still_stuck + 1} read(s) stuck in this process")
        time.sleep(0.1)  # the slow read returns; its abandoned helper thread ends
    assert run_with_timeout(lambda: 5, 1.0) == 5
    assert threading.active_count() <= before + 1  # at most the current helper is left


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_cut_by_an_edit_list_are_not_counted(tmp_path, backend):
    """A stream-copy trim (``ffmpeg -ss ... -c copy``) keeps 10 leading frames that an edit list discards."""
    import av

    src = write_level_video(tmp_path / "src.mp4", 40, gop=None)  # one keyframe: the cut frames are needed to decode
    trimmed = tmp_path / "trimmed.mp4"
    with av.open(str(src)) as inp, av.open(str(trimmed), "w", format="mp4") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        shift = 10 * int(1 / (stream_in.time_base * stream_in.average_rate))  # 10 frames in stream ticks
        for packet in inp.demux(stream_in):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = stream_out
            out.mux(packet)
    with open_video(trimmed, backend=backend) as r:
        assert r.num_frames == 30
        assert frame_ids(r.get_frames([0, 5, 17, 29])) == [10, 15, 27, 39]


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_decord_resize_sizes_it_gets_wrong_fall_back_to_a_torch_resize(tmp_path):
    """decord's decode-time resize of a 64x64 video to 48x48 fails (its buffer has another width)."""
    path = write_level_video(tmp_path / "square.mp4", 20, gop=8, h=64, w=64)
    for short_side in (48, 56):  # 48: decord's resize fails; 56: it works
        with open_video(path, backend="decord", short_side=short_side) as r, open_video(path, backend="pyav", short_side=short_side) as ref:
            frames = r.get_frames([0, 5, 17, 5])
            assert frames.shape == (4, short_side, short_side, 3) and frame_ids(frames) == [0, 5, 17, 5]
            assert (frames.float() - ref.get_frames([0, 5, 17, 5]).float()).abs().max() <= 2  # flat grey frames
            assert frame_ids(r.get_frames([3])) == [3] and r.get_frames([3]).shape == (1, short_side, short_side, 3)


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_widths_decord_cannot_decode_at_all_are_read_with_pyav(tmp_path, caplog, monkeypatch):
    """decord's frame buffers break for 48-px-wide videos even at full size (4 "channels"): PyAV reads them."""
    from mergekit_video.data import readers

    monkeypatch.setattr(readers, "_pyav_fallback_logged", False)
    path = write_level_video(tmp_path / "narrow.mp4", 20, gop=8, h=64, w=48)
    with caplog.at_level("WARNING", logger="mergekit_video.data.readers"):
        for short_side in (None, 48):
            with open_video(path, backend="decord", short_side=short_side) as r, open_video(path, backend="pyav", short_side=short_side) as ref:
                frames = r.get_frames([0, 5, 17, 5])
                assert frames.shape == (4, 64, 48, 3) and frame_ids(frames) == [0, 5, 17, 5]
                assert torch.equal(frames, ref.get_frames([0, 5, 17, 5]))
                assert frame_ids(r.get_frames([3])) == [3]
    assert caplog.text.count("decord cannot decode frames of this size") == 1  # said once
    # decord's count (which the indices were sampled over) and PyAV's may differ (edit lists): indices keep their place in time
    monkeypatch.setattr(readers.PyAVReader, "num_frames", property(lambda self: 10))
    with open_video(path, backend="decord") as r:
        assert r.num_frames == 20
        assert frame_ids(r.get_frames([0, 5, 17, 19])) == [0, 2, 8, 9]  # i * 10 // 20
        assert r.num_frames == 10 and frame_ids(r.get_frames([9])) == [9]


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_decord_decodes_every_width_but_those_decord_decodes_width_names(tmp_path):
    import decord

    from mergekit_video.data.encode import encode_video

    named = [w for w in range(2, 130, 2) if not decord_decodes_width(w)]
    assert named == [2, 4, 6, 8, 12, 16, 24, 48, 72]
    assert all(decord_decodes_width(w) for w in range(130, 4000, 2))  # rows padded by under 32 px: < 4 "channels"
    failed = []
    for w in range(2, 130, 2):
        path = tmp_path / f"w{w}.mp4"
        encode_video(path, [np.full((16, w, 3), 100, np.uint8)] * 2, width=w, height=16, fps=10, gop=1)
        try:
            decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1).get_batch([0, 1])
        except Exception:  # noqa: BLE001
            failed.append(w)
    assert failed == named


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_every_backend_reads_the_video_stream_decord_reads(tmp_path, suffix):
    """A file whose stream 0 is a thumbnail track: PyAV read stream 0 (32x32, 30 frames), decord the main video."""
    import av

    path = write_two_stream_video(tmp_path / f"two{suffix}")
    with av.open(str(path)) as c:
        assert (c.streams.video[0].codec_context.width, video_stream(c).index) == (32, 1)
    assert probe_size(path) == (48, 64)
    got = {}
    for backend in BACKENDS:
        with open_video(path, backend=backend) as r, open_video(path, backend=backend, short_side=32) as small:
            assert r.num_frames == 24
            got[backend] = r.get_frames([0, 7, 8, 23, 3]).float()
            assert got[backend].shape == (5, 48, 64, 3) and small.get_frames([23]).shape == (1, 32, 43, 3)
            assert got[backend].std().item() > 10  # the textured video, not the flat thumbnail
    if "decord" in got:
        assert (got["decord"] - got["pyav"]).abs().mean().item() < 1.0


def _write_level_b_frames(path: Path, codec: str, *, b_frames: int, open_gop: bool = True, fragmented: bool = False) -> Path:
    """30 level-coded 64x48 frames at 10 fps, a keyframe every 8, in the container ``path``'s suffix names: H.264 with
    ``b_frames`` B-frames, or MPEG-4 part 2 (``I B B P B B P B | I ...``); ``open_gop``: the B-frames before each
    keyframe are decoded after it (x264 ``open-gop``; FFmpeg's mpeg4 encoder without ``+cgop``); ``fragmented``: an
    mp4 whose samples are listed in ``moof`` boxes (as DASH downloads are)."""
    from fractions import Fraction

    import av

    options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"} if fragmented else {}
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=Fraction(10))
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        if codec == "libx264":
            s.options = {"x264-params": f"keyint=8:min-keyint=8:scenecut=0:bframes={b_frames}:open-gop={int(open_gop)}"}
        else:
            s.codec_context.max_b_frames, s.codec_context.gop_size, s.bit_rate = b_frames, 8, 4_000_000  # flat frames keep their level
            s.options = {"sc_threshold": "1000000000"}  # no scene-cut keyframes (each frame has another level)
            if not open_gop:
                s.codec_context.flags |= av.codec.context.Flags.closed_gop
        encode_frames(c, s, level_frames(30))
    return path


@pytest.mark.parametrize("codec,b_frames", [("libx264", 3), ("libx264", 0), ("mpeg4", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_avi_without_timestamps_or_with_b_frames_gives_the_frames_asked_for(tmp_path, backend, codec, b_frames):
    """decord has no timestamps for these: it counted 0 frames (H.264) or 19 of 30 (MPEG-4 with B-frames, the
    leading frames "cut"), and its seeks gave frames 1, 3, 1, 0, 5 for 17, 3, 25, 8, 29; PyAV matched no frame
    to the packets' decode-order times ("frame 1 could not be decoded")."""
    path = _write_level_b_frames(tmp_path / f"{codec}_{b_frames}.avi", codec, b_frames=b_frames)
    with open_video(path, backend=backend) as r:
        assert r.num_frames == 30
        assert frame_ids(r.get_frames([17, 3, 25, 8, 29, 0, 3])) == [17, 3, 25, 8, 29, 0, 3]
        assert frame_ids(r.get_frames([2])) == [2]


def test_keyframes_out_of_place_compares_decode_and_display_order():
    # open GOP: I0 P3 B1 B2 I6 B4 B5 (decode order); I6 is the 5th packet but the 7th frame
    assert keyframes_out_of_place(np.array([0, 3, 1, 2, 6, 4, 5]), np.array([0, 4]))
    # closed GOP: I0 P3 B1 B2 I4 P7 B5 B6; no B-frames; no keyframe past the first
    assert not keyframes_out_of_place(np.array([0, 3, 1, 2, 4, 7, 5, 6]), np.array([0, 4]))
    assert not keyframes_out_of_place(np.arange(6), np.array([0, 3]))
    assert not keyframes_out_of_place(np.array([0, 2, 1]), np.array([0]))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("codec,open_gop", [("mpeg4", True), ("libx264", True), ("mpeg4", False), ("libx264", False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_open_gop_b_frames_give_the_frames_asked_for(tmp_path, backend, suffix, codec, open_gop):
    """decord places each keyframe by its place in decode order: with B-frames in an open GOP (MPEG-4 part 2 as Xvid
    writes it, x264 open-gop) it decoded other frames than asked, without a word: 3, 10, 17, 27, 27 (mpeg4 in mp4)
    or 3, 11, 20, 29, 29 (x264 in mp4) for 3, 8, 17, 25, 29. Such files go to PyAV; closed GOPs stay with decord."""
    path = _write_level_b_frames(tmp_path / f"{codec}{suffix}", codec, b_frames=2 if codec == "mpeg4" else 3, open_gop=open_gop)
    assert keyframes_reordered(path) is open_gop
    with open_video(path, backend=backend) as r:
        assert r.num_frames == 30
        assert frame_ids(r.get_frames([17, 3, 25, 8, 29, 0, 3])) == [17, 3, 25, 8, 29, 0, 3]
        assert [frame_ids(r.get_frames([i]))[0] for i in (17, 3, 25, 8, 29)] == [17, 3, 25, 8, 29]
        if backend == "decord":
            assert (r._pyav is not None) is open_gop


@pytest.mark.parametrize("open_gop", [True, False])
def test_a_fragmented_mp4_is_checked_by_its_packets(tmp_path, open_gop):
    """A fragmented mp4's sample tables are empty (its samples are in moof boxes): its packets' timestamps are
    scanned instead; decord gave 5, 20, 32, 44, 53 for 5, 17, 29, 41, 53 in an open-GOP one."""
    path = _write_level_b_frames(tmp_path / "frag.mp4", "libx264", b_frames=3, open_gop=open_gop, fragmented=True)
    assert keyframes_reordered(path) is open_gop
    with open_video(path, backend="auto") as r:
        assert r.num_frames == 30
        assert frame_ids(r.get_frames([17, 3, 25, 8, 29])) == [17, 3, 25, 8, 29]


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_open_gop_file_warns_once_and_without_fallback_is_refused(tmp_path, caplog, monkeypatch):
    from mergekit_video.data import readers

    monkeypatch.setattr(readers, "_pyav_handoffs_logged", set())
    a = _write_level_b_frames(tmp_path / "a.mp4", "mpeg4", b_frames=2)
    b = _write_level_b_frames(tmp_path / "b.mkv", "libx264", b_frames=3)
    with caplog.at_level("WARNING", logger="mergekit_video.data.readers"):
        for path in (a, b):
            with open_video(path, backend="decord") as r:
                assert frame_ids(r.get_frames([9, 26])) == [9, 26]
    warnings = [rec.getMessage() for rec in caplog.records if "keyframes out of display order" in rec.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{a}: ") and "mergevid data prepare" in warnings[0]
    with pytest.raises(VideoReadError, match=rf"^{re.escape(str(a))}: decord would seek to wrong frames in this file: "
                                             r"keyframes out of display order"):
        readers.DecordReader(path=a, pyav_fallback=False)


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_the_open_gop_check_of_an_mp4_reads_only_its_sample_tables(tmp_path, monkeypatch):
    """mp4/mov: no PyAV probe, no packet scan; an x264 mp4 with B-frames in closed GOPs stays with decord."""
    from mergekit_video.data import readers

    path = _write_level_b_frames(tmp_path / "x264.mp4", "libx264", b_frames=3, open_gop=False)
    readers._probe_cached.cache_clear()
    seen: list[tuple[list[int], list[int]]] = []
    real = readers.keyframes_out_of_place
    monkeypatch.setattr(readers, "keyframes_out_of_place", lambda pts, keys: seen.append((list(pts), list(keys))) or real(pts, keys))
    with open_video(path, backend="decord") as r:
        assert r._pyav is None and r.num_frames == 30
    assert readers._probe_cached.cache_info().misses == 0
    (pts, keys), = seen
    assert keys == [0, 8, 16, 24] and len(pts) == 30 and pts != sorted(pts)  # B-frames, keyframes in place


class _SlowFinalizer:
    """A cycle whose finalizer takes 0.5 s (like a freed DataLoader iterator joining its workers)."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        time.sleep(0.5)


def test_garbage_collector_pauses_do_not_count_against_the_time_limit():
    import gc

    def read_that_meets_a_slow_collection() -> int:
        _SlowFinalizer()
        gc.collect()  # 0.5 s in the collector, inside the read's helper thread
        return 42

    t0 = time.perf_counter()
    assert run_with_timeout(read_that_meets_a_slow_collection, 0.2, what="good.mp4") == 42  # was: "decoder hung"
    assert time.perf_counter() - t0 >= 0.5
    with pytest.raises(ReadTimeoutError, match="stuck2.mp4"):  # a read itself stuck still times out
        run_with_timeout(lambda: time.sleep(1.0), 0.2, what="stuck2.mp4")


_OPEN_AS_OTHER_USER = """
import os, sys
import av, decord  # imported before dropping root: the interpreter may live where "nobody" cannot read
from mergekit_video.data.readers import VideoReadError, open_video
for backend in ("decord", "pyav"):  # a first read imports what the readers load lazily (av.subtitles, ...), as root
    open_video(sys.argv[2], backend=backend)
if os.geteuid() == 0:  # root reads everything: ask as "nobody"
    os.setgid(65534)
    os.setuid(65534)
for backend in ("decord", "pyav"):
    for path in sys.argv[1:]:
        try:
            open_video(path, backend=backend)
            print("read")
        except VideoReadError as e:
            print(e)
"""


def test_files_this_user_cannot_read_say_permission_denied(level_video):
    import shutil
    import subprocess
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="perm"))  # a folder others may search, unlike tmp_path
    try:
        folder.chmod(0o755)
        unreadable, readable = folder / "noperm.mp4", folder / "ok.mp4"
        shutil.copy(level_video, unreadable)
        shutil.copy(level_video, readable)
        unreadable.chmod(0o000)
        readable.chmod(0o644)
        (folder / "locked").mkdir()
        hidden = folder / "locked" / "hidden.mp4"
        shutil.copy(level_video, hidden)
        hidden.parent.chmod(0o000)  # a folder that cannot be searched
        paths = [str(unreadable), str(readable), str(hidden)]
        proc = subprocess.run([sys.executable, "-c", _OPEN_AS_OTHER_USER, *paths], capture_output=True, text=True, timeout=120)
        out = proc.stdout.splitlines()
        assert out == [f"{unreadable}: permission denied (the file is not readable by this user)", "read",
                       f"{hidden}: permission denied (a folder on its path cannot be searched by this user)"] * 2, proc.stderr  # decord, PyAV
    finally:
        (folder / "locked").chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def good_variety(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variety")
    return folder, write_good_variety(folder)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_good_file_is_taken_for_a_truncated_one(good_variety, backend):
    """Headers that are a little off (an AVI audio delay, dropped-frame slots, a longer audio track, a start at 5 s)."""
    folder, frames = good_variety
    for name, n in frames.items():
        with open_video(folder / name, backend=backend) as r:
            assert r.num_frames == n, name
            assert r.get_frames([0, n // 2, n - 1]).shape == (3, 48, 64, 3)


@pytest.fixture(scope="module")
def full_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    return {name: write_noise_video(folder / name, 48, codec=codec)  # 1.92 s at 25 fps
            for name, codec in [("x264.mkv", "libx264"), ("vp8.webm", "libvpx"), ("mpeg4.avi", "mpeg4")]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x264.mkv", "vp8.webm", "mpeg4.avi"])
def test_videos_cut_short_are_refused_with_what_the_header_says_and_what_the_file_holds(tmp_path, full_videos, backend, name):
    """An interrupted download of an mkv/webm/avi (no sample table) read silently: decord gave 24 of 48 frames;
    PyAV caught it only where the header counts frames (AVI)."""
    full = full_videos[name]
    with open_video(full, backend=backend) as r:
        assert r.num_frames == 48
    cut = cut_file(full, tmp_path / f"cut_{name}")
    with pytest.raises(VideoReadError) as info:
        with open_video(cut, backend=backend) as r:
            r.get_frames([0, r.num_frames - 1])
    assert re.fullmatch(rf"{re.escape(str(cut))}: truncated \(the header gives the video 1.92 s, the file holds "
                        r"(0\.\d\d) s in (\d+) frames\)", str(info.value)), str(info.value)
    assert info.value.path == str(cut)


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_decord_probes_only_the_headers_it_needs_and_once_per_file(tmp_path):
    """mp4/mov: no probe (a cut one does not open); mkv/webm/avi: one cached PyAV probe, shared with the short-side one."""
    from mergekit_video.data import readers

    mp4, mkv = write_noise_video(tmp_path / "a.mp4", 12), write_noise_video(tmp_path / "a.mkv", 12)
    readers._probe_cached.cache_clear()
    open_video(mp4, backend="decord").get_frames([0, 11])
    assert readers._probe_cached.cache_info().misses == 0
    for short_side in (None, 32, None):
        open_video(mkv, backend="decord", short_side=short_side).get_frames([0, 11])
    assert readers._probe_cached.cache_info().misses == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_without_a_video_stream_says_so(tmp_path, backend):
    """decord said "Check failed: st_nb >= 0 (-1381258232 vs. 0) ... wanted index: -1"."""
    path = write_audio_only(tmp_path / "audio.mp4")
    with pytest.raises(VideoReadError, match=rf"^{re.escape(str(path))}: no video stream \(it holds only audio\)$") as info:
        open_video(path, backend=backend)
    assert info.value.__cause__ is not None or backend == "pyav"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mp4_cut_inside_its_index_is_called_truncated_not_streamless(tmp_path, backend):
    """An mp4 whose index (moov, at the end) was cut short opened with only a data track: "no video stream", as if
    it were an audio file."""
    whole = write_level_video(tmp_path / "whole.mp4", n=20).read_bytes()
    assert whole.find(b"moov") > len(whole) // 2  # the index at the end, as a download cut short loses it
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[:-900])
    with pytest.raises(VideoReadError, match=rf"^{re.escape(str(cut))}: no video stream: the file holds no audio or video "
                                             r"streams \(truncated or corrupt\)$"):
        open_video(cut, backend=backend)
    cut.write_bytes(whole[:-100])  # the index keeps its sample table but loses where the samples lie: no packet left
    with pytest.raises(VideoReadError, match=rf"^{re.escape(str(cut))}: truncated \(the header lists 20 frames, the file holds 0\)$"):
        open_video(cut, backend=backend)  # said "video has no frames"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_frame_says_where_decoding_stopped(tmp_path, backend):
    """decord said "Check failed: avcodec_send_packet(...) >= 0 (-1094995529 vs. 0)", PyAV "Invalid data found when
    processing input: 'avcodec_send_packet()'"."""
    path = zero_packet(write_level_video(tmp_path / "src.mp4", 24, gop=8), tmp_path / "bad.mp4", 8)  # keyframe 8
    with open_video(path, backend=backend) as r:
        with pytest.raises(VideoReadError, match=rf"^{re.escape(str(path))}: truncated or corrupt: decoding stopped at frame 10 "
                                                 r"\(of 24\)$") as info:
            r.get_frames([20, 0, 4, 10])
        assert info.value.__cause__ is not None  # the decoder's own words


def test_a_damaged_moov_size_is_not_read_into_memory_and_the_packets_decide(tmp_path):
    """A 64-bit moov size of 2**40 (FFmpeg and decord still open the file) made the table check read a terabyte
    (MemoryError, which no bad-data policy skips); its packets are scanned instead."""
    import struct

    good = _write_level_b_frames(tmp_path / "open.mp4", "libx264", b_frames=3, open_gop=True)
    data = good.read_bytes()
    at = data.find(b"moov") - 4
    bad = tmp_path / "moov_1tib.mp4"
    bad.write_bytes(data[:at] + struct.pack(">I4sQ", 1, b"moov", 2**40) + data[at + 8:])
    assert keyframes_reordered(bad) is True
    try:
        with open_video(bad, backend="auto") as r:
            assert frame_ids(r.get_frames([17, 3, 25])) == [17, 3, 25]
    except VideoReadError:
        pass  # a reader that refuses the damaged file says so; no MemoryError
