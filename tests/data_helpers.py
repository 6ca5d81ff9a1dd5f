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


def write_two_stream_video(path: Path) -> Path:
    """Two H.264 video streams in the container ``path``'s suffix names: stream 0 a flat 32x32 "thumbnail" track,
    stream 1 the main video (24 textured 64x48 frames, :func:`write_textured_video`'s), the one decord reads.

    decord's FFmpeg 4.1 ranks streams by frames seen while probing (up to 5), then bit rate. An mp4 is probed from
    its header (no frames seen): the textured main video's higher bit rate wins over the thumbnail's 30 frames. A
    Matroska file is probed by reading packets: the thumbnail has only 3 frames there.
    """
    from fractions import Fraction

    import av

    from mergekit_video.data.synthetic import class_catalogue, render_clip

    main = render_clip(class_catalogue()[0], frames=24, size=(48, 64), rng=np.random.default_rng(0), texture=0.8)
    thumb = np.full((30 if path.suffix != ".mkv" else 3, 32, 32, 3), 40, dtype=np.uint8)
    with av.open(str(path), "w") as c:
        streams = [c.add_stream("libx264", rate=Fraction(10)) for _ in range(2)]
        for s, frames in zip(streams, (thumb, main)):
            s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            s.options = {"x264-params": "keyint=8:min-keyint=8:scenecut=0"}
        for s, frames in zip(streams, (thumb, main)):
            encode_frames(c, s, frames)
    return path


def encode_frames(container, stream, frames) -> None:
    """Encode RGB ``frames`` ([N, H, W, 3] uint8) into ``stream`` with pts 0..N-1 and mux them, then flush it."""
    import av

    for i, a in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


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


def write_noise_video(path: Path, n: int = 48, *, codec: str = "libx264", h: int = 48, w: int = 64, fps: int = 25,
                      pts: list[int] | None = None, time_base=None, audio: str | None = None, audio_s: float = 0.0,
                      options: dict | None = None) -> Path:
    """A video of random-noise frames in the container ``path``'s suffix names (.mkv, .webm, .avi, .mp4).

    Noise keeps every frame about the same number of bytes, so keeping the first half of the file keeps about
    half the frames. ``pts`` (in ``time_base`` units) gives irregular frame times (VFR, dropped-frame slots);
    ``audio`` adds a silent audio stream of that codec, ``audio_s`` seconds long.
    """
    import sys
    from fractions import Fraction

    import av

    if codec.startswith("libvpx") and "decord" in sys.modules:  # decord's FFmpeg libraries break PyAV's VP8/VP9 encoder
        return _write_in_fresh_process(path, n, codec=codec, h=h, w=w, fps=fps, pts=pts, audio=audio, audio_s=audio_s,
                                       options=options, time_base=None if time_base is None else [time_base.numerator, time_base.denominator])
    rng = np.random.default_rng(0)
    tb = time_base or Fraction(1, fps)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.time_base = tb
        if options:
            s.options = options
        a = c.add_stream(audio, rate=48000) if audio else None
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = (pts[i] if pts is not None else i), tb
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            cc = a.codec_context
            size, channels = cc.frame_size or 1024, len(cc.layout.channels)
            dtype = {"flt": np.float32, "s16": np.int16, "s32": np.int32}[cc.format.name.rstrip("p")]
            for start in range(0, int(audio_s * cc.sample_rate), size):
                silence = np.zeros((channels, size) if cc.format.is_planar else (1, size * channels), dtype=dtype)
                af = av.AudioFrame.from_ndarray(silence, format=cc.format.name, layout=cc.layout.name)
                af.sample_rate, af.pts = cc.sample_rate, start
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


def _write_in_fresh_process(path: Path, n: int, **kw) -> Path:
    """:func:`write_noise_video` in a Python process that has not loaded decord."""
    import json
    import subprocess
    import sys

    script = ("import json, sys; from fractions import Fraction; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
              "from data_helpers import write_noise_video; kw = json.loads(sys.argv[4]); "
              "kw['time_base'] = kw['time_base'] and Fraction(*kw['time_base']); write_noise_video(Path(sys.argv[2]), int(sys.argv[3]), **kw)")
    subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(path), str(n), json.dumps(kw)], check=True, timeout=120)
    return path


def cut_file(path: Path, dest: Path, fraction: float = 0.5) -> Path:
    """``dest`` holding the first ``fraction`` of ``path``'s bytes: an interrupted download."""
    data = path.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def _shift_start(src: Path, dest: Path, seconds: float) -> Path:
    """``src``'s video packets copied into ``dest`` with their timestamps moved ``seconds`` later."""
    import av

    with av.open(str(src)) as inp, av.open(str(dest), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        shift = int(seconds / stream_in.time_base)
        for packet in inp.demux(stream_in):
            if packet.size == 0:
                continue
            packet.pts = None if packet.pts is None else packet.pts + shift
            packet.dts = None if packet.dts is None else packet.dts + shift
            packet.stream = stream_out
            out.mux(packet)
    return dest


def write_good_variety(folder: Path) -> dict[str, int]:
    """Untruncated videos whose headers the truncation check must accept; returns name -> frame count.

    B-frames, VFR (ms timestamps), an audio track longer than the video (Matroska's segment duration is the
    audio's), AVI headers that count an audio delay or dropped-frame slots, timestamps starting at 5 s.
    """
    from fractions import Fraction

    folder.mkdir(parents=True, exist_ok=True)
    ms, t = [], 0
    for i in range(24):
        ms.append(t)
        t += 30 if i % 3 else 70
    slots = [i for i in range(40) if i % 4 != 1][:24]  # every 4th frame slot dropped
    specs = {  # one stem per file: `data prepare` names its outputs STEM.mp4
        "bframes.mkv": {"options": {"bf": "3"}},
        "vfr_mkv.mkv": {"pts": ms, "time_base": Fraction(1, 1000)},
        "vfr_webm.webm": {"codec": "libvpx", "pts": ms, "time_base": Fraction(1, 1000)},
        "vfr_mp4.mp4": {"pts": ms, "time_base": Fraction(1, 1000)},
        "long_audio_mkv.mkv": {"audio": "aac", "audio_s": 2.0},
        "long_audio_webm.webm": {"codec": "libvpx", "audio": "libopus", "audio_s": 2.0},
        "audio_delay.avi": {"codec": "mpeg4", "audio": "libmp3lame", "audio_s": 1.5},  # the header counts 25 frames
        "dropped_slots.avi": {"codec": "mpeg4", "pts": slots},  # the header counts 32 frame slots
        "x264.mp4": {},
    }
    for name, kw in specs.items():
        write_noise_video(folder / name, 24, **kw)
    _shift_start(folder / "bframes.mkv", folder / "starts_at_5s.mkv", 5.0)
    return {name: 24 for name in [*specs, "starts_at_5s.mkv"]}


def zero_packet(path: Path, dest: Path, frame: int) -> Path:
    """``dest``: ``path`` with the bytes of the packet of display frame ``frame`` (pts order) zeroed, a corrupt spot."""
    import av

    with av.open(str(path)) as c:
        packets = sorted((p.pts, p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size)
    _, pos, size = packets[frame]
    data = bytearray(path.read_bytes())
    data[pos:pos + size] = bytes(size)
    dest.write_bytes(bytes(data))
    return dest


def write_audio_only(path: Path) -> Path:
    """An mp4 holding one second of AAC audio and no video."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        wave = np.sin(np.arange(16000) / 10.0).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
