"""Video readers: decord (default), PyAV (fallback and cross-check) and frame folders.

Every reader decodes only the frames asked for, in one pass over sorted unique indices, and
returns them as a uint8 tensor ``[T, H, W, 3]`` in the order asked (repeats allowed). A short-side
resize can happen at decode time (decord's ``width``/``height``, swscale for PyAV). Any failure
(missing, empty, corrupt or truncated file) raises :class:`VideoReadError` naming the file.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:  # PyAV is optional: only for the annotations
    from av.container import InputContainer
    from av.video.stream import VideoStream

BACKENDS = ("auto", "decord", "pyav", "frames")
DEFAULT_IMAGE_TEMPLATE = "img_{:05d}.jpg"  # TSN frame folders, 1-based

log = logging.getLogger(__name__)
_pyav_fallback_logged = False  # the PyAV fallback is announced once per process
_pyav_handoffs_logged: set[str] = set()  # and each reason a file is handed to PyAV (no timestamps, open GOP)

#: A video that ends more than this many frames, and more than this fraction of its length, before its
#: header says counts as truncated (headers of good files may be off by a frame or two).
TRUNCATION_TOLERANCE_FRAMES = 3
TRUNCATION_TOLERANCE_FRACTION = 0.01


class VideoReadError(RuntimeError):
    """A video could not be read; the message and ``path`` name the file.

    ``path`` is optional so that the error is rebuilt as itself from its message alone (pickling,
    torch's re-raise of a DataLoader worker's error).
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


@runtime_checkable
class VideoReader(Protocol):
    """What the dataset needs from a video: its length and a batched frame read."""

    @property
    def num_frames(self) -> int:
        """Number of frames in the video."""
        ...

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` (0-based, any order, repeats allowed) as uint8 ``[T, H, W, 3]``."""
        ...

    def close(self) -> None:
        """Release the file and decoder."""
        ...


def decord_available() -> bool:
    """True when decord can be imported (it has no wheel for macOS arm64 or aarch64)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def resize_dims(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side scaled to ``short_side`` and the aspect ratio kept."""
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(1, round(width * scale))
    return max(1, round(height * scale)), short_side


def decord_decodes_width(width: int) -> bool:
    """False for the frame widths decord 0.6 cannot decode at all: 2, 4, 6, 8, 12, 16, 24, 48 and 72 (even ones).

    Its RGB rows are padded to a multiple of 32 pixels, and where the padded row is a whole multiple of the width it
    takes that multiple for the number of channels (48 px: 64·3 / 48 = 4 "channels"): its buffer has the wrong size.
    """
    padded = -(-width // 32) * 32
    return padded == width or (3 * padded) % width != 0


def no_video_stream(container: InputContainer) -> str:
    """Why a file has no video stream, in plain words: it holds other media (an audio-only file), or no media
    at all (an mp4 cut inside its index leaves none, or only a data track: truncated or corrupt)."""
    media = sorted({str(s.type) for s in container.streams} - {"data", "attachment"})
    if not media:
        return "no video stream: the file holds no audio or video streams (truncated or corrupt)"
    return f"no video stream (it holds only {', '.join(media)})"


def video_stream(container: InputContainer) -> VideoStream | None:
    """The video stream of ``container`` (open with PyAV) that decord reads; None if it has none.

    decord takes FFmpeg's ``av_find_best_stream`` as its FFmpeg 4.1 ranks the streams: the most frames seen
    while probing (up to 5), then the highest bit rate, then the lowest index. Newer FFmpeg (PyAV's) ranks a
    stream flagged *default* first (an mp4's first track is), so ``streams.best("video")`` is asked with
    that flag cleared for the call: ``streams.video[0]`` or a plain ``best`` could read a cover picture or a
    second camera while decord reads the main video. Every PyAV code path opens the stream this gives.
    """
    videos = container.streams.video
    if len(videos) <= 1:
        return videos[0] if videos else None
    from contextlib import suppress

    saved = [s.disposition for s in videos]
    best = None
    with suppress(AttributeError, TypeError, ValueError):  # a PyAV without writable dispositions: stream 0
        for s in videos:
            s.disposition = type(s.disposition)(int(s.disposition) & ~1)  # AV_DISPOSITION_DEFAULT
        best = container.streams.best("video")
    with suppress(AttributeError, TypeError, ValueError):
        for s, d in zip(videos, saved):
            s.disposition = d
    return best if best is not None else videos[0]


@dataclass(frozen=True)
class HeaderLength:
    """What a container's header says about the length of its video stream (to catch truncated files).

    ``frames``: the exact frame count of an mp4/mov sample table (0: none); ``end_s``: when the video ends,
    in seconds (Matroska/WebM duration, AVI frame count; None: unknown).
    """

    frames: int = 0
    end_s: float | None = None


def _hms_seconds(text: str) -> float | None:
    """``"00:00:03.840000000"`` (a Matroska ``DURATION`` tag) in seconds; None if it is not that."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*", text)
    return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


def header_length(container: InputContainer, stream: VideoStream) -> HeaderLength:
    """The length the header of ``container`` (open with PyAV) gives its video ``stream``.

    Only headers written when the file was finished count: the mp4/mov sample table, the AVI stream
    length, and Matroska/WebM's per-track ``DURATION`` tag (else the segment duration, when the video is
    the only stream: an audio track may outlast it). Other containers: nothing known.
    """
    names = set(container.format.name.split(","))
    if names & {"mov", "mp4"}:
        return HeaderLength(frames=int(stream.frames or 0))
    if "avi" in names:
        if stream.frames and stream.time_base:  # strh length, in stream ticks (dropped-frame slots included)
            return HeaderLength(end_s=float(stream.frames * stream.time_base))
        return HeaderLength()
    if names & {"matroska", "webm"}:
        for key, value in stream.metadata.items():
            if key.upper().split("-")[0] == "DURATION":
                end = _hms_seconds(value)
                if end is not None:
                    return HeaderLength(end_s=end)
        if len(container.streams) == 1 and container.duration:
            return HeaderLength(end_s=container.duration / 1_000_000)  # AV_TIME_BASE
    return HeaderLength()


def truncation(header: HeaderLength, *, frames: int, end_s: float | None, frame_s: float | None) -> str | None:
    """Why a video of ``frames`` frames ending at ``end_s`` seconds is shorter than ``header`` says, or None.

    An mp4/mov sample table is exact; a duration may be off by :data:`TRUNCATION_TOLERANCE_FRAMES` frames
    of ``frame_s`` seconds or :data:`TRUNCATION_TOLERANCE_FRACTION` of it, whichever is more.
    """
    if header.frames > 0 and frames < header.frames:
        return f"the header lists {header.frames} frame{'s' * (header.frames != 1)}, the file holds {frames}"
    if header.end_s is not None and end_s is not None:
        slack = max(TRUNCATION_TOLERANCE_FRAMES * (frame_s or 0.0), TRUNCATION_TOLERANCE_FRACTION * header.end_s)
        if end_s < header.end_s - slack:
            return (f"the header gives the video {header.end_s:.2f} s, the file holds {end_s:.2f} s "
                    f"in {frames} frame{'s' * (frames != 1)}")
    return None


def frame_seconds(stream: VideoStream) -> float | None:
    """Average frame duration of a PyAV video stream in seconds, None if it has no rate."""
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else None


class _Probe(NamedTuple):
    height: int
    width: int
    header: HeaderLength
    start_s: float  # the video stream's start time (decord's timestamps count from it)
    b_frames: bool  # the decoder reorders frames (B-frames): decode order may differ from display order


@functools.lru_cache(maxsize=65536)
def _probe_cached(path: str, mtime_ns: int, size: int) -> _Probe:
    import av

    try:
        with av.open(path) as container:
            stream = video_stream(container)
            if stream is None:
                raise VideoReadError(f"{path}: {no_video_stream(container)}", path=path)
            cc = stream.codec_context
            h, w = int(cc.height), int(cc.width)
            header = header_length(container, stream)
            start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
            b_frames = bool(cc.has_b_frames)
    except VideoReadError:
        raise
    except Exception as e:  # noqa: BLE001 - any container error means an unreadable file
        raise VideoReadError(f"{path}: cannot open ({type(e).__name__}: {e})", path=path) from e
    if h <= 0 or w <= 0:
        raise VideoReadError(f"{path}: invalid frame size {w}x{h}", path=path)
    return _Probe(h, w, header, start_s, b_frames)


def _probe(path: str | os.PathLike) -> _Probe:
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise VideoReadError(f"{path}: {e.strerror or e}", path=path) from e
    return _probe_cached(path, st.st_mtime_ns, st.st_size)


def keyframes_out_of_place(pts: np.ndarray, keys: np.ndarray) -> bool:
    """True when a keyframe's place in decode order differs from its place in display order.

    ``pts``: presentation times of the frames in decode order; ``keys``: the keyframes' places in it. An open GOP
    with B-frames (``I B B P ... I B B``, the B-frames before each I decoded after it) has such keyframes; a closed
    GOP, or no B-frames, has none.
    """
    pts, keys = np.asarray(pts).reshape(-1), np.asarray(keys, dtype=np.int64).reshape(-1)
    if pts.size == 0 or keys.size == 0:
        return False
    rank = np.empty(pts.size, dtype=np.int64)
    rank[np.argsort(pts, kind="stable")] = np.arange(pts.size)  # display place of each frame
    return bool((rank[keys] != keys).any())


def _mp4_box_header(head: bytes, remaining: int) -> tuple[bytes, int, int] | None:
    """(type, box size, header size) of the ISO-BMFF box whose first bytes (up to 16) are ``head``, with
    ``remaining`` bytes from its start to the end of its container (a size of 0: up to there); None if malformed."""
    if len(head) < 8:
        return None
    size, kind = struct.unpack_from(">I4s", head)
    n = 8
    if size == 1 and len(head) >= 16:
        size, n = struct.unpack_from(">Q", head, 8)[0], 16
    elif size == 0:
        size = remaining
    return None if size < n else (kind, size, n)


def _mp4_boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of the ISO-BMFF boxes in ``data[start:end]``."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        header = _mp4_box_header(data[pos:min(pos + 16, end)], end - pos)
        if header is None:
            return
        kind, size, n = header
        yield kind, pos + n, min(pos + size, end)
        pos += size


def _mp4_moov(path: str) -> bytes | None:
    """The payload of an mp4/mov file's ``moov`` box (its sample tables), found by box headers alone; None if none."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        file_end, pos = f.tell(), 0
        while pos + 8 <= file_end:
            f.seek(pos)
            header = _mp4_box_header(f.read(16), file_end - pos)
            if header is None:
                return None
            kind, size, n = header
            if kind == b"moov":
                if size > file_end - pos:  # cut short, or a damaged size (2**40): not read into memory
                    raise ValueError(f"moov box of {size} bytes in a file of {file_end}")
                f.seek(pos + n)
                return f.read(size - n)
            pos += size
    return None


def _mp4_track_reordered(data: bytes, start: int, end: int) -> bool:
    """:func:`keyframes_out_of_place` for the sample table (``stbl`` box payload) ``data[start:end]``."""
    tables = {kind: (a, b) for kind, a, b in _mp4_boxes(data, start, end) if kind in (b"stts", b"ctts", b"stss")}
    if b"ctts" not in tables or b"stts" not in tables:  # no composition offsets: display order is decode order
        return False

    def entries(kind: bytes, dtype: str) -> np.ndarray:
        a, b = tables[kind]
        count = struct.unpack_from(">I", data, a + 4)[0]
        width = 4 if kind == b"stss" else 8
        count = min(count, (b - a - 8) // width)
        return np.frombuffer(data, dtype=dtype, count=count * width // 4, offset=a + 8)

    stts = entries(b"stts", ">u4").reshape(-1, 2).astype(np.int64)
    dts = np.concatenate([[0], np.cumsum(np.repeat(stts[:, 1], stts[:, 0]))])[:-1]
    ctts = entries(b"ctts", ">i4").reshape(-1, 2).astype(np.int64)  # version 0 offsets are read signed, as FFmpeg does
    offsets = np.repeat(ctts[:, 1], np.maximum(ctts[:, 0], 0))[: dts.size]
    pts = dts + np.pad(offsets, (0, dts.size - offsets.size))
    keys = entries(b"stss", ">u4").astype(np.int64) - 1 if b"stss" in tables else np.arange(dts.size)
    return keyframes_out_of_place(pts, keys[(keys >= 0) & (keys < dts.size)])


def _mp4_find(data: bytes, box: tuple[int, int] | None, *kinds: bytes) -> tuple[int, int] | None:
    """(payload start, end) of the box reached from ``box`` through nested boxes of ``kinds``; None if missing."""
    for kind in kinds:
        if box is None:
            return None
        box = next(((a, b) for k, a, b in _mp4_boxes(data, *box) if k == kind), None)
    return box


def _mp4_reordered(path: str) -> bool | None:
    """True when a video track of an mp4/mov file has keyframes out of place (:func:`keyframes_out_of_place`), from its
    sample tables (``stts``/``ctts``/``stss``): no packet is read and no decoder opened. None for a fragmented mp4
    (an ``mvex`` box: its samples are listed in ``moof`` boxes, not in these tables): unknown from them."""
    moov = _mp4_moov(path)
    if moov is None:
        return False
    if any(kind == b"mvex" for kind, _, _ in _mp4_boxes(moov)):
        return None
    for kind, a, b in _mp4_boxes(moov):
        hdlr = _mp4_find(moov, (a, b), b"mdia", b"hdlr") if kind == b"trak" else None
        if hdlr is None or moov[hdlr[0] + 8:hdlr[0] + 12] != b"vide":  # handler type after version/flags, pre_defined
            continue
        stbl = _mp4_find(moov, (a, b), b"mdia", b"minf", b"stbl")
        if stbl is not None and _mp4_track_reordered(moov, *stbl):
            return True
    return False


@functools.lru_cache(maxsize=65536)
def _reordered_cached(path: str, mtime_ns: int, size: int, mp4: bool) -> bool:
    if mp4:
        try:
            known = _mp4_reordered(path)
        except (OSError, struct.error, ValueError, OverflowError, MemoryError):  # an odd box layout: unknown from it
            known = None
        if known is not None:
            return known
        # fragmented (DASH downloads, -movflags frag_keyframe) or tables not read: the packets' timestamps, as elsewhere
    try:
        if not _probe(path).b_frames:
            return False
    except VideoReadError:  # PyAV cannot probe what decord opened: nothing known
        return False
    import av

    pts: list[int] = []
    keys: list[int] = []
    try:
        with av.open(path) as container:
            stream = video_stream(container)
            for pkt in container.demux(stream):
                if pkt.size == 0:
                    continue
                if pkt.pts is None:  # no timestamps: decord's untimed path handles it
                    return False
                if pkt.is_keyframe:
                    keys.append(len(pts))
                pts.append(pkt.pts)
    except Exception:  # noqa: BLE001 - a damaged file: the readers' own errors name it
        return False
    return keyframes_out_of_place(np.asarray(pts), np.asarray(keys))


def keyframes_reordered(path: str | os.PathLike, *, head: bytes | None = None) -> bool:
    """True when decord would seek to wrong frames in ``path``: it places each keyframe by its position in decode
    order, so in an open GOP with B-frames (MPEG-4 part 2 ``I B B I``, x264 ``open-gop``) it decoded frames 19, 3, 27,
    10, 28 for 17, 3, 25, 8, 29.

    mp4/mov: read from the sample tables (well under a millisecond, no decoder); other containers: only when the
    cached header probe finds B-frames, a scan of the packets' timestamps. Cached per process by path, size and mtime.
    ``head``: the file's first 8 bytes, if already read.
    """
    path = str(path)
    st = os.stat(path)
    if head is None:
        with open(path, "rb") as f:
            head = f.read(8)
    mp4 = head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
    return _reordered_cached(path, st.st_mtime_ns, st.st_size, mp4)


def probe_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a video (the stream decord reads, :func:`video_stream`), read from the header with PyAV.

    Costs about 5 ms per file (the container probe), cached per process by path, size and mtime.
    """
    p = _probe(path)
    return p.height, p.width


def _plan(indices: Sequence[int], num_frames: int, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted unique indices to decode, and the gather order back to ``indices`` (None if identity)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"{path}: no frame indices requested")
    if idx.min() < 0 or idx.max() >= num_frames:
        bad = idx[(idx < 0) | (idx >= num_frames)]
        raise IndexError(f"{path}: frame indices {bad.tolist()[:8]} out of range for {num_frames} frame{'s' * (num_frames != 1)}")
    uniq, inv = np.unique(idx, return_inverse=True)
    if uniq.size == idx.size and np.array_equal(uniq, idx):
        return uniq, None
    return uniq, inv


def _check_file(path: Path) -> bytes:
    """Raise :class:`VideoReadError` saying why ``path`` cannot be read as a video file, before a
    decoder sees it (decord reports an unreadable file without the reason); return its first 12 bytes."""
    import stat

    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoReadError(f"{path}: no such file", path=path) from None
    except PermissionError:
        raise VideoReadError(f"{path}: permission denied (a folder on its path cannot be searched by this user)", path=path) from None
    except OSError as e:
        raise VideoReadError(f"{path}: cannot be read ({e.strerror or e})", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise VideoReadError(f"{path}: not a file", path=path)
    if st.st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)", path=path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except PermissionError:
        raise VideoReadError(f"{path}: permission denied (the file is not readable by this user)", path=path) from None
    except OSError as e:
        raise VideoReadError(f"{path}: cannot be opened ({e.strerror or e})", path=path) from None
    return head


def _length_only_in_header(head: bytes) -> bool:
    """True for Matroska/WebM (EBML) and AVI (RIFF) files, by their first bytes: decord reads a cut one up to
    where it stops without a word, so only the header tells. A cut mp4/mov fails to open (its sample table
    lists frames past the end of the file)."""
    return head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI")


def _pyav_diagnosis(path: Path, indices: Sequence[int] | None = None) -> str | None:
    """Why PyAV cannot open ``path`` (or decode its frames ``indices``) either, in plain words, for decord's
    terse errors ("av_read_frame failed with 1094995529"); None if PyAV can."""
    try:
        with PyAVReader(path=path) as reader:
            if indices is not None:
                reader.get_frames(indices)
    except VideoReadError as err:
        why = str(err).removeprefix(f"{path}: ")
        if why.startswith("PyAV cannot open it"):
            cause = err.__cause__
            detail = getattr(cause, "strerror", None) or (_first_line(cause) if cause is not None else why)
            return f"cannot open it as a video: not a video file, or truncated or corrupt ({detail})"
        return why
    except Exception:  # noqa: BLE001 - no better explanation
        return None
    return None


@functools.lru_cache(maxsize=None)
def _quiet_decord() -> None:
    import decord

    decord.logging.set_level(decord.logging.QUIET)


class DecordReader:
    """decord backend: one ``get_batch`` call on sorted unique indices (decord seeks internally).

    Open one reader per item and close it after use: long-lived decord readers are known to leak.
    ``num_threads=1`` suits DataLoader workers, which parallelise over videos instead. ``pyav_fallback=False``
    raises :class:`VideoReadError` for a width decord cannot decode instead of reading the file with PyAV.
    """

    def __init__(self, *, path: str | os.PathLike, short_side: int | None = None, num_threads: int = 1,
                 pyav_fallback: bool = True) -> None:
        import decord

        if not log.isEnabledFor(logging.DEBUG):  # FFmpeg's own lines ("moov atom not found"): our error names the file
            _quiet_decord()
        self.path = Path(path)
        head = _check_file(self.path)
        height = width = -1
        if short_side:
            height, width = resize_dims(*probe_size(self.path), short_side)
        self._size = (height, width) if short_side else None  # decord resizes at decode time
        self._resize_to: tuple[int, int] | None = None  # set when decord's resize failed: torch resizes
        self._short_side, self._num_threads, self._pyav_fallback = short_side, num_threads, pyav_fallback
        self._pyav: PyAVReader | None = None  # set when decord cannot decode this width at all
        try:
            self._vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads)
            total = len(self._vr)
            untimed = total > 0 and self._vr.get_frame_timestamp(0)[0] < -1e9  # FFmpeg's AV_NOPTS_VALUE, in seconds
            self._num_frames = total - (0 if untimed else self._discarded_leading_frames())
        except Exception as e:  # noqa: BLE001 - decord raises RuntimeError/DECORDError/AssertionError
            why = _pyav_diagnosis(self.path) or f"decord cannot open it ({type(e).__name__}: {_first_line(e)})"
            raise VideoReadError(f"{self.path}: {why}", path=self.path) from e
        if untimed:
            self._read_with_pyav(
                refused="decord indexes no timestamps for this file (AVI with H.264 or B-frames)",
                warned="decord indexes no timestamps for this file (AVI with H.264 or B-frames) and would seek to wrong "
                       "frames; reading such videos with PyAV, from the start (slower)")
            return
        if self._num_frames <= 0:  # PyAV says whether the header promised frames (an index cut short: truncated)
            raise VideoReadError(f"{self.path}: {_pyav_diagnosis(self.path) or 'video has no frames'}", path=self.path)
        if keyframes_reordered(self.path, head=head):
            why = "keyframes out of display order (an open GOP with B-frames, as MPEG-4 part 2/Xvid or x264 open-gop write)"
            self._read_with_pyav(refused=f"decord would seek to wrong frames in this file: {why}",
                                 warned=f"{why}; decord would seek to wrong frames in such videos, so they are read with PyAV (slower)")
            return
        if _length_only_in_header(head):
            self._check_complete(total)

    def _read_with_pyav(self, *, refused: str, warned: str) -> None:
        """Hand this file to PyAV, where decord would return other frames than asked: ``refused`` says why (the
        error without the PyAV fallback), ``warned`` what happens (logged once per process and reason).

        - No timestamps (H.264 in AVI, AVI with B-frames): decord counted every frame as cut (no frames) and
          its seeks returned frames 1, 3, 1 for 17, 3, 25; PyAV reads such a file from the start, counting.
        - Keyframes out of display order (:func:`keyframes_reordered`: an open GOP with B-frames): decord places
          keyframes by decode order and gave 19, 3, 27, 10, 28 for 17, 3, 25, 8, 29; PyAV seeks by timestamps.
        """
        if not self._pyav_fallback:
            raise VideoReadError(f"{self.path}: {refused}", path=self.path)
        if refused not in _pyav_handoffs_logged:
            _pyav_handoffs_logged.add(refused)
            log.warning("%s: %s. Re-encoding (mergevid data prepare) avoids it.", self.path, warned)
        self._vr = None
        self._pyav = PyAVReader(path=self.path, short_side=self._short_side, num_threads=self._num_threads)
        self._num_frames = self._pyav.num_frames

    def _check_complete(self, total: int) -> None:
        """Raise :class:`VideoReadError` when the file ends before its header says (a download cut short)."""
        probe = _probe(self.path)  # cached: the short-side probe of this file, if any, is this one
        if probe.header.frames <= 0 and probe.header.end_s is None:
            return
        fps = float(self._vr.get_avg_fps())
        frame_s = 1.0 / fps if fps > 0 else None
        end = float(self._vr.get_frame_timestamp(total - 1)[1])  # seconds from the stream's start
        if 0.0 <= end < 1e9:
            end += probe.start_s
        else:  # no timestamps in decord's index (B-frames in AVI): count frames
            end = total * frame_s if frame_s else None
        why = truncation(probe.header, frames=total, end_s=end, frame_s=frame_s)
        if why is not None:
            self._vr = None
            raise VideoReadError(f"{self.path}: truncated ({why})", path=self.path)

    def _discarded_leading_frames(self) -> int:
        """Frames an edit list cuts from the start (``ffmpeg -ss ... -c copy`` trims).

        decord counts them (at negative timestamps) but decodes only the frames after them,
        so its indices past the real count would repeat the last frame.
        """
        if len(self._vr) == 0 or self._vr.get_frame_timestamp(0)[0] >= 0:
            return 0
        starts = self._vr.get_frame_timestamp(np.arange(len(self._vr)))[:, 0]  # [N] seconds, from the index
        return int((starts < 0).sum())

    @property
    def num_frames(self) -> int:
        """Number of frames (decord's packet index)."""
        return self._num_frames

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode ``indices`` in one ``get_batch`` call; uint8 ``[T, H, W, 3]``."""
        if self._pyav is not None:
            return self._pyav.get_frames(indices)
        if self._vr is None:
            raise VideoReadError(f"{self.path}: reader is closed", path=self.path)
        uniq, inv = _plan(indices, self._num_frames, str(self.path))
        while True:
            try:
                frames = torch.from_numpy(self._vr.get_batch(uniq.tolist()).asnumpy())  # [N, H, W, 3]
                break
            except Exception as e:  # noqa: BLE001
                if "from_size == to_size" not in str(e):  # not decord's buffer-size bug: a bad file
                    # decord does not say which frame failed (its decoder thread reads ahead): PyAV tells
                    why = _pyav_diagnosis(self.path, uniq.tolist()) or f"decoding frames failed ({type(e).__name__}: {_first_line(e)})"
                    raise VideoReadError(f"{self.path}: {why}", path=self.path) from e
                if self._size is not None:
                    self._decode_at_full_size()
                    continue
                return self._fall_back_to_pyav(indices)
        if self._resize_to is not None:
            frames = _resize_hwc(frames, *self._resize_to)
        return frames if inv is None else frames[torch.from_numpy(inv)]

    def _decode_at_full_size(self) -> None:
        """decord's own resize fails for some sizes (a buffer of another width): decode at full size, resize in torch."""
        import decord

        self._vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=self._num_threads)
        self._resize_to, self._size = self._size, None

    def _fall_back_to_pyav(self, indices: Sequence[int]) -> torch.Tensor:
        """decord's frame buffers break for some widths (16 or 48 px: rows padded to 4 or 6 "channels",
        at full size too): PyAV reads this file instead."""
        global _pyav_fallback_logged
        if not self._pyav_fallback:
            width = probe_size(self.path)[1]
            raise VideoReadError(f"{self.path}: decord cannot decode frames {width} px wide (a decord bug for some widths)",
                                 path=self.path)
        if not _pyav_fallback_logged:
            _pyav_fallback_logged = True
            log.warning(
                "%s: decord cannot decode frames of this size (a decord bug for some widths); reading such videos "
                "with PyAV, which is slower. Re-encoding to another size (mergevid data prepare --short-side) avoids it.",
                self.path,
            )
        self._pyav = PyAVReader(path=self.path, short_side=self._short_side, num_threads=self._num_threads)
        self._vr = None
        counted, decoded = self._num_frames, self._pyav.num_frames
        if decoded != counted:  # the indices were sampled over decord's count: keep their places in time
            log.debug("%s: decord counts %d frames, PyAV decodes %d; indices rescaled", self.path, counted, decoded)
            indices = np.minimum(np.asarray(indices, dtype=np.int64) * decoded // counted, decoded - 1).tolist()
            self._num_frames = decoded
        return self._pyav.get_frames(indices)

    def close(self) -> None:
        """Free the decoder."""
        self._vr = None
        if self._pyav is not None:
            self._pyav.close()
            self._pyav = None

    def __enter__(self) -> DecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PyAVReader:
    """PyAV backend: indexes packet timestamps once, then seeks to the keyframe before each needed
    frame only when that skips decoding, and matches frames by timestamp.

    The fallback where decord has no wheel, and a cross-check of decord's frames.
    """

    def __init__(self, *, path: str | os.PathLike, short_side: int | None = None, num_threads: int = 1) -> None:
        import av

        self.path = Path(path)
        _check_file(self.path)
        try:
            self._container = av.open(str(self.path))
        except Exception as e:  # noqa: BLE001
            raise VideoReadError(f"{self.path}: PyAV cannot open it ({type(e).__name__}: {_first_line(e)})", path=self.path) from e
        try:
            self._index(num_threads)
        except Exception:
            self.close()
            raise
        self._size: tuple[int, int] | None = None
        if short_side:
            cc = self._stream.codec_context
            self._size = resize_dims(int(cc.height), int(cc.width), short_side)

    def _index(self, num_threads: int) -> None:
        stream = video_stream(self._container)
        if stream is None:
            raise VideoReadError(f"{self.path}: {no_video_stream(self._container)}", path=self.path)
        self._stream = stream
        self._stream.codec_context.thread_count = max(0, int(num_threads))
        pts: list[int | None] = []
        key_pts: list[int | None] = []  # keyframes, discarded ones included: seek targets
        packets = 0
        end: int | None = None  # latest packet end, in stream ticks
        try:
            for pkt in self._container.demux(self._stream):
                if pkt.size == 0:  # flush packet
                    continue
                packets += 1
                t = pkt.pts if pkt.pts is not None else pkt.dts
                if t is not None and (end is None or t + (pkt.duration or 0) > end):
                    end = t + (pkt.duration or 0)
                if pkt.is_keyframe:
                    key_pts.append(pkt.pts)
                if pkt.is_discard:  # cut by an edit list: decoded for reference, never output
                    continue
                pts.append(pkt.pts)
        except Exception as e:  # noqa: BLE001
            raise VideoReadError(f"{self.path}: corrupt container ({type(e).__name__}: {_first_line(e)})", path=self.path) from e
        frame_s = frame_seconds(self._stream)
        end_s = float(end * self._stream.time_base) if end is not None and self._stream.time_base else (packets * frame_s if frame_s else None)
        why = truncation(header_length(self._container, self._stream), frames=packets, end_s=end_s, frame_s=frame_s)
        if why is not None:  # before "no frames": an mp4 whose index lost its chunk table lists frames it cannot reach
            raise VideoReadError(f"{self.path}: truncated ({why})", path=self.path)
        if not pts:
            raise VideoReadError(f"{self.path}: video has no frames", path=self.path)
        self._num_frames = len(pts)
        # AVI stores no presentation times: with B-frames its packets' are decode-order guesses, which neither
        # match the decoded frames' nor serve as seek targets
        reordered_avi = "avi" in self._container.format.name.split(",") and bool(self._stream.codec_context.has_b_frames)
        if reordered_avi or any(p is None for p in pts):
            self._pts: list[int] | None = None  # no timestamps: decode from the start, counting
            self._key_pts: list[int] = []
        else:
            self._pts = sorted(pts)  # display order
            self._key_pts = sorted(p for p in key_pts if p is not None)

    @property
    def num_frames(self) -> int:
        """Number of video packets (one per frame)."""
        return self._num_frames

    def _to_array(self, frame) -> np.ndarray:
        if self._size is None:
            return frame.to_ndarray(format="rgb24")
        h, w = self._size
        return frame.to_ndarray(format="rgb24", width=w, height=h)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode ``indices`` in one forward pass with keyframe seeks; uint8 ``[T, H, W, 3]``."""
        if self._container is None:
            raise VideoReadError(f"{self.path}: reader is closed", path=self.path)
        uniq, inv = _plan(indices, self._num_frames, str(self.path))
        self._at = int(uniq[0])  # the frame being decoded, for an error
        try:
            arrays = self._decode_sequential(uniq) if self._pts is None else self._decode_seeking(uniq)
        except VideoReadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise VideoReadError(f"{self.path}: truncated or corrupt: decoding stopped at frame {self._at} "
                                 f"(of {self._num_frames})", path=self.path) from e
        frames = torch.from_numpy(np.stack(arrays))  # [N, H, W, 3]
        return frames if inv is None else frames[torch.from_numpy(inv)]

    def _decode_sequential(self, uniq: np.ndarray) -> list[np.ndarray]:
        wanted = set(uniq.tolist())
        last = int(uniq[-1])
        got: dict[int, np.ndarray] = {}
        self._container.seek(0)
        for i, frame in enumerate(self._container.decode(self._stream)):
            self._at = i + 1
            if i in wanted:
                got[i] = self._to_array(frame)
            if i >= last:
                break
        missing = wanted - got.keys()
        if missing:
            raise VideoReadError(f"{self.path}: frames {sorted(missing)[:8]} could not be decoded (truncated?)", path=self.path)
        return [got[i] for i in uniq.tolist()]

    def _decode_seeking(self, uniq: np.ndarray) -> list[np.ndarray]:
        assert self._pts is not None
        targets = [self._pts[i] for i in uniq.tolist()]
        wanted = set(targets)
        got: dict[int, np.ndarray] = {}
        frames_iter = None
        pos: int | None = None  # pts of the last frame decoded by frames_iter
        for n, target in enumerate(targets):
            if target in got:
                continue
            self._at = int(uniq[n])
            k = bisect.bisect_right(self._key_pts, target) - 1
            key = self._key_pts[k] if k >= 0 else self._pts[0]
            # Seek when nothing is open, when the target is behind us, or when a keyframe lies
            # between the current position and the target (seeking skips the frames in between).
            if frames_iter is None or pos is None or pos >= target or key > pos:
                self._container.seek(key, stream=self._stream, backward=True, any_frame=False)
                frames_iter = self._container.decode(self._stream)
                pos = None
            for frame in frames_iter:
                if frame.pts is None:
                    continue
                pos = int(frame.pts)
                if pos in wanted and pos not in got:
                    got[pos] = self._to_array(frame)
                if pos >= target:
                    break
            else:
                frames_iter = None
            if target not in got:
                idx = self._pts.index(target)
                raise VideoReadError(f"{self.path}: frame {idx} could not be decoded (truncated or corrupt)", path=self.path)
        return [got[t] for t in targets]

    def close(self) -> None:
        """Close the container."""
        c, self._container = getattr(self, "_container", None), None
        if c is not None:
            c.close()

    def __enter__(self) -> PyAVReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def template_pattern(image_template: str) -> re.Pattern[str]:
    """A regex matching the file names ``image_template`` (``img_{:05d}.jpg``) gives for any frame number."""
    import string

    parts = list(string.Formatter().parse(image_template))
    fields = [p for p in parts if p[1] is not None]
    if len(fields) != 1:
        raise ValueError(f"image_template must hold one number field such as {{:05d}}, got {image_template!r}")
    regex = ""
    for literal, field_name, _spec, _conv in parts:
        regex += re.escape(literal)
        if field_name is not None:
            regex += r"\d+"
    return re.compile(regex)


class FrameFolderReader:
    """Frame-folder backend: one JPEG (or PNG) per frame, ``img_{:05d}.jpg`` numbered from 1 (TSN).

    ``index_base`` is the number of the first frame's file (1, or 0 for folders numbered from 0).
    A folder that holds a file numbered ``index_base - 1`` is refused at open, naming the setting:
    read from 1, a folder numbered from 0 would come back one frame off without any error.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike,
        num_frames: int | None = None,
        short_side: int | None = None,
        image_template: str = DEFAULT_IMAGE_TEMPLATE,
        index_base: int = 1,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VideoReadError(f"{self.path}: frame folder not found", path=self.path)
        self.image_template = image_template
        self.index_base = index_base
        self.short_side = short_side
        if index_base > 0 and (self.path / image_template.format(index_base - 1)).exists():  # one stat per open
            raise VideoReadError(
                f"{self.path}: frame folders are read numbered from {index_base} ({image_template.format(index_base)} is "
                f"frame 0), but this one has {image_template.format(index_base - 1)}: set frame_index_base={index_base - 1} "
                f"(data.frame_index_base in a recipe, --frame-index-base {index_base - 1} for mergevid data prepare)", path=self.path)
        listed = num_frames is not None
        if num_frames is None:  # the files the template names (flow_x_/flow_y_ images may share the folder)
            pattern = template_pattern(image_template)
            num_frames = sum(1 for name in os.listdir(self.path) if pattern.fullmatch(name))
        if num_frames <= 0:
            what = f"the annotation list gives it {num_frames} frames" if listed else "frame folder holds no frames"
            raise VideoReadError(f"{self.path}: {what}", path=self.path)
        self._num_frames = int(num_frames)

    @property
    def num_frames(self) -> int:
        """Number of frames (from the annotation list, else counted in the folder)."""
        return self._num_frames

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode the needed images with PIL (JPEG draft mode shrinks at decode time); uint8 ``[T, H, W, 3]``."""
        from PIL import Image

        uniq, inv = _plan(indices, self._num_frames, str(self.path))
        images = []
        for i in uniq.tolist():
            f = self.path / self.image_template.format(i + self.index_base)
            try:
                with Image.open(f) as im:
                    if self.short_side:
                        h, w = resize_dims(im.height, im.width, self.short_side)
                        im.draft("RGB", (w, h))  # JPEG: decode at the smallest 1/2^k scale still >= (w, h)
                    images.append(np.asarray(im.convert("RGB")))  # [H, W, 3]
            except Exception as e:  # noqa: BLE001
                raise VideoReadError(f"{f}: cannot read frame ({type(e).__name__}: {_first_line(e)})", path=f) from e
        if len({im.shape for im in images}) > 1:
            raise VideoReadError(f"{self.path}: frames have different sizes", path=self.path)
        frames = torch.from_numpy(np.stack(images))  # [N, H, W, 3]
        if self.short_side:
            h, w = resize_dims(frames.shape[1], frames.shape[2], self.short_side)
            if (h, w) != tuple(frames.shape[1:3]):
                from torchvision.transforms.v2.functional import resize

                frames = resize(frames.permute(0, 3, 1, 2), [h, w], antialias=True).permute(0, 2, 3, 1)  # channels-last view
        return frames if inv is None else frames[torch.from_numpy(inv)]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> FrameFolderReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(
    path: str | os.PathLike,
    *,
    backend: str = "decord",
    short_side: int | None = None,
    num_frames: int | None = None,
    num_threads: int = 1,
    image_template: str = DEFAULT_IMAGE_TEMPLATE,
    frame_index_base: int = 1,
) -> VideoReader:
    """Open a video (or a frame folder) with the chosen backend.

    ``backend="auto"`` picks frames for a directory, else decord when installed, else PyAV.
    ``short_side`` resizes at decode time (aspect kept). ``num_frames`` is the frame count of a
    frame folder (from a ``folder num_frames label`` list); video backends ignore it, as they do
    ``image_template`` and ``frame_index_base`` (the number of a frame folder's first file).
    Raises :class:`VideoReadError` naming the file when it cannot be opened.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if backend == "auto":
        backend = "frames" if path.is_dir() else ("decord" if decord_available() else "pyav")
    if backend == "frames":
        return FrameFolderReader(path=path, num_frames=num_frames, short_side=short_side, image_template=image_template,
                                 index_base=frame_index_base)
    if backend == "decord":
        if not decord_available():
            raise ImportError("decord is not installed (no wheel for this platform); use backend='pyav' or 'auto'")
        return DecordReader(path=path, short_side=short_side, num_threads=num_threads)
    return PyAVReader(path=path, short_side=short_side, num_threads=num_threads)


def _resize_hwc(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` resized (antialiased bilinear) to ``[N, height, width, 3]``."""
    from torchvision.transforms.v2.functional import resize

    return resize(frames.permute(0, 3, 1, 2), [height, width], antialias=True).permute(0, 2, 3, 1).contiguous()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
