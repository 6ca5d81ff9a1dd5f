"""``mergevid data prepare``: re-encode a dataset so that sparse sampling decodes little.

Raw downloads often have a keyframe every 250 frames: reaching 8 frames spread over a clip then
decodes nearly all of it. Re-encoding with a short GOP (a keyframe every ``gop`` frames, no
scene-cut keyframes), x264's ``fastdecode`` tuning and a smaller short side makes every later epoch
cheaper. The run is parallel with a progress bar, resumable (finished, verified outputs recorded
in ``prepare_manifest.json`` are skipped), checks that every output decodes, writes a new
annotation list, and lists every failure in ``prepare_report_<list>.json``: none is dropped silently,
whether two sources would share an output name, a source no longer encodes or its worker died.
Audio is not kept. Videos are never upscaled: a short side already at or below the target stays.
One prepare at a time writes an output folder (an advisory lock on ``.prepare.lock`` in it; the
kernel drops it when its holder dies), and each run removes the partial encodes (hidden
``.NAME.mp4.<pid>-<host>.XXXXXXXX.tmp`` files) that killed runs left there.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

from ..utils.io import TEMP_OWNER_PATTERN, atomic_write_json, remove_stale_atomic_temps
from .annotations import LIST_FORMATS, VideoRecord, read_annotation_list, write_annotation_list
from .encode import encode_video, keyframe_indices, video_info
from .watchdog import DEFAULT_READ_TIMEOUT_S, ReadTimeoutError, run_with_timeout

MANIFEST = "prepare_manifest.json"
REPORT = "prepare_report_{list}.json"  # one per list prepared into the folder (train and val share a folder)


def report_path(out_dir: Path, new_list: Path) -> Path:
    """Where the report of preparing ``new_list`` into ``out_dir`` goes (``prepare_report_train.json``)."""
    return out_dir / REPORT.format(list=new_list.stem)
#: The file a running prepare holds an advisory lock on, in its output folder.
LOCK_FILE = ".prepare.lock"


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare_dataset`; ``failures`` lists ``{"path", "error"}`` for every failed video."""

    out_dir: Path
    list_file: Path
    report_path: Path
    total: int
    encoded: int
    skipped: int
    failed: int
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    removed_temps: int = 0  # partial encodes of killed runs removed from the output folder

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = asdict(self)
        for k in ("out_dir", "list_file", "report_path"):
            d[k] = str(d[k])
        return d


def refuse_file_as_folder(path: str | os.PathLike, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` (a parameter or command-line option) when the folder
    ``path`` is to be written into but is an existing file, or lies under one (``mkdir`` would
    say only ``[Errno 17] File exists``)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            raise ValueError(f"{name} {path} is a file, not a folder" if p == path else f"{name} {path}: {p} is a file, not a folder")


def _even(x: int) -> int:
    return max(2, x - x % 2)


def target_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Output (height, width): short side scaled down to ``short_side`` (never up), both even, and a width decord
    decodes (:func:`~mergekit_video.data.readers.decord_decodes_width`): else the next such even width up to the
    source's width, else the next one down (48 px becomes 50, or 46 from a source 48 px wide)."""
    from .readers import decord_decodes_width, resize_dims

    source_width = width
    if min(height, width) > short_side:
        height, width = resize_dims(height, width, short_side)
    height, width = _even(height), _even(width)
    if not decord_decodes_width(width):
        up = [w for w in range(width + 2, source_width + 1, 2) if decord_decodes_width(w)]
        down = [w for w in range(width - 2, 1, -2) if decord_decodes_width(w)]
        width = up[0] if up else down[0] if down else width
    return height, width


def _video_frames(src: Path, size_box: dict, threads: int):
    """Yield None once the output size is known (in ``size_box``), then the source's frames at that size.

    Raises ``ValueError`` when decoding fails ("truncated or corrupt: decoding stopped at frame k") or when
    the source ends before its header says (a download cut short), as the readers do.
    """
    import av

    from .readers import _pyav_diagnosis, frame_seconds, header_length, no_video_stream, truncation, video_stream

    try:
        opened = av.open(str(src))
    except av.FFmpegError as e:  # the readers' words, not FFmpeg's ('[Errno 1094995529] Invalid data found ...')
        raise ValueError(f"cannot open it as a video: not a video file, or truncated or corrupt ({e.strerror})") from e
    with opened as container:
        stream = video_stream(container)
        if stream is None:
            raise ValueError(no_video_stream(container))
        stream.codec_context.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        cc = stream.codec_context
        h, w = target_size(int(cc.height), int(cc.width), size_box["short_side"])
        size_box.update(height=h, width=w, fps=rate)
        yield None  # size known: the caller can open the encoder
        packets, decoded, end = 0, 0, None  # end: latest packet end, in stream ticks
        packets_iter = container.demux(stream)
        while True:
            try:
                packet = next(packets_iter, None)
                if packet is None:
                    break
                if packet.size:  # not the flush packet (which still drains the decoder)
                    packets += 1
                    t = packet.pts if packet.pts is not None else packet.dts
                    if t is not None and (end is None or t + (packet.duration or 0) > end):
                        end = t + (packet.duration or 0)
                frames = packet.decode()
            except Exception as e:  # noqa: BLE001 - FFmpeg's own words ('avcodec_send_packet()') stay in the chain
                why = _pyav_diagnosis(src)  # a file cut short says so from its header, as the readers do
                if why is not None and why.startswith("truncated"):
                    raise ValueError(why) from e
                raise ValueError(f"truncated or corrupt: decoding stopped at frame {decoded}") from e
            for frame in frames:
                decoded += 1
                yield frame.reformat(width=w, height=h, format="yuv420p", interpolation="BICUBIC")
        frame_s = frame_seconds(stream)
        end_s = float(end * stream.time_base) if end is not None and stream.time_base else None
        why = truncation(header_length(container, stream), frames=packets, end_s=end_s, frame_s=frame_s)
        if why is not None:
            raise ValueError(f"truncated ({why})")


def _folder_frames(src: Path, num_frames: int | None, size_box: dict, index_base: int = 1):
    import av

    from .readers import FrameFolderReader

    reader = FrameFolderReader(path=src, num_frames=num_frames, index_base=index_base)
    first = reader.get_frames([0])[0]  # [H, W, 3]
    h, w = target_size(first.shape[0], first.shape[1], size_box["short_side"])
    size_box.update(height=h, width=w, fps=Fraction(size_box["folder_fps"]).limit_denominator(1001))
    yield None
    for start in range(0, reader.num_frames, 32):
        chunk = reader.get_frames(list(range(start, min(start + 32, reader.num_frames))))
        for img in chunk:
            yield av.VideoFrame.from_ndarray(img.contiguous().numpy(), format="rgb24").reformat(
                width=w, height=h, format="yuv420p", interpolation="BICUBIC")


def verify_output(path: str | os.PathLike, *, gop: int | None = None, height: int | None = None, width: int | None = None,
                  frames: int | None = None) -> dict:
    """Decode every frame of ``path`` and check its size, frame count and keyframe positions.

    Returns ``{"frames", "height", "width", "keyframes"}``; raises ``ValueError`` on any mismatch.
    """
    import av

    from .readers import video_stream

    keys, n = keyframe_indices(path)
    decoded = 0
    with av.open(str(path)) as container:
        stream = video_stream(container)
        h, w = int(stream.codec_context.height), int(stream.codec_context.width)
        for _ in container.decode(stream):
            decoded += 1
    if decoded == 0 or decoded != n:
        raise ValueError(f"{path}: decoded {decoded} of {n} frame{'s' * (n != 1)}")
    if frames is not None and decoded != frames:
        raise ValueError(f"{path}: holds {decoded} frame{'s' * (decoded != 1)}, {frames} {'was' if frames == 1 else 'were'} encoded")
    if (height is not None and h != height) or (width is not None and w != width):
        raise ValueError(f"{path}: size {w}x{h}, expected {width}x{height}")
    if gop is not None and keys != list(range(0, n, gop)):
        raise ValueError(f"{path}: keyframes at {keys[:6]}..., expected every {gop} frames")
    return {"frames": decoded, "height": h, "width": w, "keyframes": len(keys)}


def verify_default_reader(path: str | os.PathLike, *, frames: int) -> None:
    """Open ``path`` with the readers' default backend (decord where installed, without its PyAV fallback, else
    PyAV) and decode its first and last frames; raise ``ValueError`` naming the file if it cannot, or if it
    counts other than ``frames`` frames."""
    from .readers import DecordReader, PyAVReader, decord_available

    backend, reader_cls = ("decord", DecordReader) if decord_available() else ("pyav", PyAVReader)
    try:
        with reader_cls(path=path, **({"pyav_fallback": False} if backend == "decord" else {})) as reader:
            if reader.num_frames != frames:
                raise ValueError(f"{path}: the {backend} reader counts {reader.num_frames} frame{'s' * (reader.num_frames != 1)}, "
                                 f"{frames} {'was' if frames == 1 else 'were'} encoded")
            reader.get_frames([0, frames - 1])
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - VideoReadError names the file
        raise ValueError(f"the {backend} reader cannot read it: {e}") from e


#: Frames pulled from a source per timed read (one hand-off to the watchdog's helper thread each).
_READ_CHUNK = 16
_stuck_sources: list = []  # sources still running in an abandoned helper thread: never closed from here


def _timed(gen, timeout_s: float | None, what: str):
    """The items of the generator ``gen``, read :data:`_READ_CHUNK` at a time on the watchdog's helper thread.

    A read (opening the source, or decoding the next frames) that runs past ``timeout_s`` raises
    :class:`~mergekit_video.data.watchdog.ReadTimeoutError` naming ``what``; the stuck generator is left to its
    thread. The encoder's own time does not count, so a long video is never cut short.
    """
    from itertools import islice

    while True:
        try:
            chunk = run_with_timeout(lambda: list(islice(gen, _READ_CHUNK)), timeout_s, what=what)
        except ReadTimeoutError:
            _stuck_sources.append(gen)
            raise
        if not chunk:
            return
        yield from chunk


def _prepare_one(job: dict) -> dict:
    """Encode and verify one video; never raises (errors come back in the result)."""
    import av  # noqa: F401 - imported here, not in the timed read: a fresh worker's imports (torch: seconds)
    from . import readers  # noqa: F401   must not count against --read-timeout

    src, out = Path(job["src"]), Path(job["out"])
    box: dict[str, Any] = {"short_side": job["short_side"], "folder_fps": job["fps"]}
    try:
        if job["list_format"] == "frames":
            gen = _folder_frames(src, job["num_frames"], box, job.get("frame_index_base", 1))
        else:
            if src.is_dir():
                raise IsADirectoryError("a folder, not a file")
            if not src.is_file():
                raise FileNotFoundError("not a regular file" if src.exists() else "no such file")
            if src.stat().st_size == 0:
                raise ValueError("empty file (0 bytes)")
            gen = _video_frames(src, box, job["threads"])
        frames = _timed(gen, job["read_timeout"], str(src))
        next(frames)  # opens the input and fixes the output size
        n = encode_video(out, frames, width=box["width"], height=box["height"], fps=box["fps"], gop=job["gop"],
                         fastdecode=job["fastdecode"], preset=job["preset"], crf=job["crf"], threads=job["threads"])
        try:
            info = verify_output(out, gop=job["gop"], height=box["height"], width=box["width"], frames=n)
            verify_default_reader(out, frames=n)
        except Exception:
            out.unlink(missing_ok=True)  # a rerun must not mistake it for a finished file
            raise
        return {"ok": True, "src": job["rel"], "out": job["out_rel"], **info}
    except Exception as e:  # noqa: BLE001 - one bad video must not stop the run
        return {"ok": False, "src": job["rel"], "out": job["out_rel"], "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}


def output_relpath(path: str, root: Path, *, folder: bool) -> str:
    """Where a listed video goes under the output folder: its path relative to ``root``, suffix ``.mp4``.

    Absolute paths outside ``root`` lose their anchor; ``..`` is refused, so nothing lands outside
    the output folder (or on top of a source).
    """
    p = Path(path)
    if p.is_absolute():
        for base in (root, root.resolve()):
            try:
                p = p.relative_to(base)
                break
            except ValueError:
                continue
        else:
            p = Path(*p.parts[1:])
    if ".." in p.parts or not p.parts:
        raise ValueError(f"{path}: refusing a path that leaves the output folder")
    return str(p) + ".mp4" if folder else str(p.with_suffix(".mp4"))


def _source_stamp(src: Path) -> dict:
    try:
        if src.is_dir():
            names = os.listdir(src)
            return {"size": len(names), "mtime_ns": src.stat().st_mtime_ns}
        st = src.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"size": -1, "mtime_ns": -1}


def _failure(job: dict, error: str) -> dict:
    return {"ok": False, "src": job["rel"], "out": job["out_rel"], "error": error}


WORKER_DIED = ("the worker process died while preparing this file (a decoder crash or an out-of-memory kill); "
               "it is tried again on the next run")


def _run_jobs(jobs: list[dict], workers: int) -> Iterator[tuple[dict, dict]]:
    """Yield ``(job, result)`` for every job, each run by :func:`_prepare_one` in a worker process.

    At most ``workers`` jobs are in flight. A worker that dies (segfault, out-of-memory kill)
    breaks its pool: each job then in flight gets one more try alone in a fresh one-process pool,
    so the file that kills its worker again is the one reported (:data:`WORKER_DIED`), and the
    remaining jobs go on in a fresh pool.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def died(f: Future) -> bool:
        return isinstance(f.exception(), BrokenProcessPool)

    def result(f: Future, job: dict) -> dict:
        e = f.exception()
        return f.result() if e is None else _failure(job, f"{type(e).__name__}: {e}".splitlines()[0][:500])

    queue = deque(jobs)
    while queue:
        suspects: list[dict] = []
        pool = ProcessPoolExecutor(max_workers=min(workers, len(queue)))
        try:
            inflight: dict[Future, dict] = {}
            while (queue or inflight) and not suspects:
                broken = False
                while queue and len(inflight) < workers and not broken:
                    try:
                        inflight[pool.submit(_prepare_one, queue[0])] = queue[0]
                        queue.popleft()
                    except BrokenProcessPool:
                        broken = True
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                if broken or any(died(f) for f in finished):
                    finished = set(inflight)  # the pool is broken: every job in flight ends now
                    wait(finished)
                    if not inflight:
                        break  # an idle worker died: start a fresh pool
                for f in [f for f in inflight if f in finished]:
                    job = inflight.pop(f)
                    if died(f):
                        suspects.append(job)
                    else:
                        yield job, result(f, job)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for job in suspects:
            with ProcessPoolExecutor(max_workers=1) as alone:
                f = alone.submit(_prepare_one, job)
                wait([f])
            yield job, (_failure(job, WORKER_DIED) if died(f) else result(f, job))


def _expected_size(src: Path, *, list_format: str, num_frames: int | None, short_side: int, frame_index_base: int = 1) -> tuple[int, int]:
    """(height, width) that :func:`_prepare_one` gives the output of ``src``."""
    if list_format == "frames":
        from .readers import FrameFolderReader

        h, w = FrameFolderReader(path=src, num_frames=num_frames, index_base=frame_index_base).get_frames([0]).shape[1:3]  # [1, H, W, 3]
    else:
        info = video_info(src)
        h, w = info["height"], info["width"]
    return target_size(int(h), int(w), short_side)


def _refuse_outputs_onto_sources(by_out: dict[str, list[str]], sources: dict[str, VideoRecord], root: Path, out_dir: Path) -> None:
    """Raise ``ValueError`` when an output file would be a source video, or lie inside a source frame folder.

    ``out_dir`` differs from the root, yet a symbolic link in it (``out_dir/videos -> ../ds/videos``) or one
    at an output path can lead an output onto its own source: that source would be taken for a finished
    output, re-encoded in place, or removed when it failed. Paths are compared with symlinks resolved;
    nothing has been written when this raises.
    """
    dirs: dict[str, str] = {}

    def real(path: str) -> str:  # os.path.realpath, one lstat per file (the folders' are cached)
        head, name = os.path.split(os.path.abspath(path))
        if head not in dirs:
            dirs[head] = os.path.realpath(head)
        full = os.path.join(dirs[head], name)
        return os.path.realpath(full) if os.path.islink(full) else full

    source_at = {real(key): key for key in sources}
    for out_rel, keys in by_out.items():
        out = real(str(out_dir / out_rel))
        for at in (out, *map(str, Path(out).parents)):
            key = source_at.get(at)
            if key is None:
                continue
            where = "is" if at == out else "lies inside"
            if out == os.path.abspath(out_dir / out_rel):  # no symlink on the way: out_dir itself is inside a source
                why = f"{out_dir} lies inside the source {root / sources[key].path}, which would be overwritten"
            else:
                why = (f"symlinks resolved: {at}; a symbolic link on the way leads into the dataset, and the source "
                       "would be overwritten")
            raise ValueError(f"the output {out_dir / out_rel} {where} the source {root / sources[key].path} ({why}); "
                             "nothing was written: prepare into a folder whose paths do not lead onto the sources")


@contextmanager
def _lock_out_dir(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``out_dir`` (``fcntl.flock`` on :data:`LOCK_FILE`) while the block runs.

    The approach of :func:`mergekit_video.runners.common.lock_output_dir`: the kernel releases the lock
    when its holder dies, so a killed prepare never blocks a later one; the file holds the holder's pid
    for the refusal. Forked encoder workers share the lock: it lasts while any of them still writes.
    Where locks are unavailable (Windows, some NFS mounts) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = out_dir / LOCK_FILE
    try:
        fd, writable = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), True
    except PermissionError:  # another user's lock file in a shared folder: flock needs only read access
        fd, writable = os.open(lock, os.O_RDONLY | os.O_CLOEXEC), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise FileExistsError(f"{out_dir} is being written by another `mergevid data prepare` (pid {holder}); "
                                  "wait for it to end, or prepare into another folder") from None
        except OSError:  # a file system without locks (ENOLCK): run unlocked
            pass
        else:
            if writable:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


#: Temp names of atomic writes (``utils.io.atomic_temp_pattern``) of any file; group ``name``: the file written.
_ANY_TEMP = re.compile(rf"^\.(?P<name>.+?)\.(?P<owner>{TEMP_OWNER_PATTERN}\.)?[a-z0-9_]{{8}}\.tmp$")


def _remove_stale_temps(out_dir: Path, out_rels: list[str], own_files: tuple[str, ...]) -> int:
    """Remove the partial encodes and JSON/list writes that killed runs left in ``out_dir``; return how many.

    Searched: every folder under ``out_dir`` (symlinks not followed) and the folders of this run's
    outputs. Only names of this tool's atomic writes count (``.NAME.<pid>-<host>.XXXXXXXX.tmp``) whose
    ``NAME`` is an ``.mp4`` output, or one of ``own_files`` directly in ``out_dir`` (names without the
    ``<pid>-<host>`` part, from older writers, only for this run's outputs); and of those only the
    temps whose writer process is gone (:func:`~mergekit_video.utils.io.remove_stale_atomic_temps`).
    """
    folders: dict[str, Path] = {}
    for folder in [out_dir, *(Path(d) for d, _, _ in os.walk(out_dir)), *{(out_dir / rel).parent for rel in out_rels}]:
        folders.setdefault(os.path.realpath(folder), folder)
    top = os.path.realpath(out_dir)
    outputs = {os.path.realpath(out_dir / rel) for rel in out_rels}
    removed = 0
    for real, folder in folders.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        targets = set()
        for name in names:
            m = _ANY_TEMP.match(name)
            if not m or not (m["name"].endswith(".mp4") or (real == top and m["name"] in own_files)):
                continue
            # a name without the writer's pid and host (older writers) could be anyone's hidden file: only
            # beside this run's own outputs
            if m["owner"] or os.path.join(real, m["name"]) in outputs or (real == top and m["name"] in own_files):
                targets.add(m["name"])
        for name in sorted(targets):
            removed += len(remove_stale_atomic_temps(folder / name))
    return removed


# the settings in the manifest, as `mergevid data prepare` spells them (preset and crf are Python-only)
SETTING_FLAGS = {"short_side": "--short-side", "gop": "--gop", "fastdecode": "--fastdecode/--no-fastdecode",
                 "fps_for_frame_folders": "--fps"}


def _settings_change(old: Any, new: dict) -> str:
    """What differs between an earlier run's settings and this run's: ``short_side (--short-side) was 32, now 48; ...``."""
    if not isinstance(old, dict):
        return f"the manifest holds no settings ({old!r}), this run's are {new}"
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            flag = f" ({SETTING_FLAGS[key]})" if key in SETTING_FLAGS else ""
            changes.append(f"{key}{flag} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}")
    return "; ".join(changes)


def prepare_dataset(
    *,
    list_file: str | os.PathLike,
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    short_side: int = 256,
    gop: int = 16,
    fastdecode: bool = True,
    workers: int | None = None,
    list_format: str = "video",
    fps: float = 30.0,
    preset: str | None = None,
    crf: int | None = None,
    progress: bool = True,
    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
    frame_index_base: int = 1,
) -> PrepareReport:
    """Re-encode every video of ``list_file`` (paths relative to ``root``) into ``out_dir``.

    Outputs keep their relative paths (suffix ``.mp4``; frame folders become ``folder.mp4`` at
    ``fps``), with the short side scaled to ``short_side`` and a keyframe every ``gop`` frames. A
    new list ``out_dir/<list name>`` names the outputs; failures are left out of it and listed in
    ``out_dir/prepare_report_<list stem>.json``. Sources whose outputs would share a name (``x.avi`` and
    ``x.mp4``) all fail, and nothing is encoded for them. A failed source loses the output an
    earlier run made of it, so every rerun tries it again and reports it until it encodes; so does
    a source whose worker process died. Re-running skips outputs recorded as finished and verified.
    An ``out_dir`` prepared with other settings is refused rather than overwritten, and so is
    one where the new list or the report would replace a file this command did not write.
    A source whose read (opening it, or decoding its next frames) takes longer than ``read_timeout_s``
    seconds fails as hung, and the run goes on (None: no limit). ``frame_index_base``: the number of a
    frame folder's first image (1: ``img_00001.jpg``, or 0).
    """
    t0 = time.perf_counter()
    list_file, root, out_dir = Path(list_file), Path(root), Path(out_dir)
    # messages name the argument and its `mergevid data prepare` option
    if short_side <= 0:
        raise ValueError(f"short_side (--short-side) must be positive, got {short_side}")
    if gop <= 0:
        raise ValueError(f"gop (--gop) must be positive, got {gop}")
    if frame_index_base not in (0, 1):
        raise ValueError(f"frame_index_base (--frame-index-base) must be 0 or 1, got {frame_index_base}")
    if list_format not in LIST_FORMATS:
        raise ValueError(f"list_format (--list-format) must be one of {', '.join(LIST_FORMATS)}, got {list_format!r}")
    if list_format == "frames" and not fps > 0:
        raise ValueError(f"fps (--fps) must be positive for frame-folder lists, got {fps}")
    if read_timeout_s is not None and not read_timeout_s > 0:
        raise ValueError(f"read_timeout_s (--read-timeout) must be positive, got {read_timeout_s}")
    refuse_file_as_folder(out_dir, "out_dir")
    records = read_annotation_list(list_file, list_format)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if out_dir.resolve() == root.resolve():
        raise ValueError(f"out_dir must differ from the dataset root ({root}); sources would be overwritten")
    new_list = out_dir / list_file.name
    if new_list.resolve() == list_file.resolve():
        new_list = out_dir / (list_file.stem + ".prepared" + list_file.suffix)
    if not (out_dir / MANIFEST).is_file():  # a folder no earlier run of this command wrote into
        for mine in (new_list, report_path(out_dir, new_list)):
            if mine.exists():
                raise FileExistsError(f"{mine} exists and was not written by `mergevid data prepare`; "
                                      "prepare into another folder so that it is not overwritten")
    # One source per file: a video listed twice (say by a relative and an absolute path) is encoded once.
    key_of = {r.path: os.path.abspath(os.path.join(root, r.path)) for r in records}
    sources: dict[str, VideoRecord] = {}
    for r in records:
        sources.setdefault(key_of[r.path], r)

    early_failures: list[dict] = []
    by_out: dict[str, list[str]] = {}  # output path -> the sources that map to it
    for key, r in sources.items():
        try:
            by_out.setdefault(output_relpath(r.path.rstrip("/"), root, folder=list_format == "frames"), []).append(key)
        except ValueError as e:
            early_failures.append({"ok": False, "src": r.path, "out": None, "error": f"ValueError: {e}"})

    _refuse_outputs_onto_sources(by_out, sources, root, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock_out_dir(out_dir):  # one prepare per output folder at a time
        return _prepare_locked(
            list_file=list_file, root=root, out_dir=out_dir, new_list=new_list, records=records, key_of=key_of, sources=sources,
            by_out=by_out, early_failures=early_failures, short_side=short_side, gop=gop, fastdecode=fastdecode, workers=workers,
            list_format=list_format, fps=fps, preset=preset, crf=crf, progress=progress, read_timeout_s=read_timeout_s, t0=t0,
            frame_index_base=frame_index_base)


def _prepare_locked(*, list_file: Path, root: Path, out_dir: Path, new_list: Path, records: list[VideoRecord], key_of: dict[str, str],
                    sources: dict[str, VideoRecord], by_out: dict[str, list[str]], early_failures: list[dict], short_side: int,
                    gop: int, fastdecode: bool, workers: int | None, list_format: str, fps: float, preset: str | None,
                    crf: int | None, progress: bool, read_timeout_s: float | None, t0: float,
                    frame_index_base: int = 1) -> PrepareReport:
    """The rest of :func:`prepare_dataset`, run while this process holds ``out_dir``'s lock."""
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    settings = {"short_side": short_side, "gop": gop, "fastdecode": fastdecode, "preset": preset, "crf": crf,
                "fps_for_frame_folders": fps if list_format == "frames" else None}
    if list_format == "frames" and frame_index_base != 1:  # (absent at 1: folders prepared before the option stay valid)
        settings["frame_index_base"] = frame_index_base

    manifest_path = out_dir / MANIFEST
    manifest: dict[str, Any] = {"settings": settings, "files": {}}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("settings") != settings:
            raise ValueError(f"{out_dir} was prepared with other settings ({_settings_change(old.get('settings'), settings)}); "
                             f"prepare into another output folder, or delete the folder {out_dir} to prepare it again "
                             "with these settings")
        manifest["files"] = old.get("files", {})
    removed_temps = _remove_stale_temps(out_dir, list(by_out), (MANIFEST, report_path(out_dir, new_list).name, new_list.name))

    jobs: list[dict] = []
    done: dict[str, dict] = {}  # source key -> result
    alias: dict[str, str] = {}  # source key -> key of the same file under another name (through a symlink)
    for out_rel, keys in by_out.items():
        out = out_dir / out_rel
        if len(keys) > 1 and len({os.path.realpath(k) for k in keys}) == 1:
            alias.update((k, keys[0]) for k in keys[1:])
            keys = keys[:1]
        if len(keys) > 1:  # x.avi and x.mp4 would both become x.mp4: none of them is encoded
            paths = [sources[k].path for k in keys]
            names = ", ".join(paths[:-1]) + " and " + paths[-1]
            for k in keys:
                early_failures.append({"ok": False, "src": sources[k].path, "out": out_rel,
                                       "error": f"output name collision: {names} would be written to the same file {out}; "
                                                "none was encoded: rename all but one of them"})
            continue
        key, r = keys[0], sources[keys[0]]
        src = root / r.path
        stamp = _source_stamp(src)
        entry = manifest["files"].get(out_rel)
        if entry and out.is_file() and entry.get("source") == r.path and entry.get("source_stamp") == stamp \
                and entry.get("out_size") == out.stat().st_size:
            done[key] = {"ok": True, "skipped": True, "src": r.path, "out": out_rel}
            continue
        if out.exists() and not entry:
            # Finished before a crash kept the manifest from recording it (outputs are written
            # atomically, so a file here is complete; the manifest, written before any encoding,
            # holds the settings it was made with): verify it and keep it. Anything else in the
            # way is not ours, and is never overwritten.
            try:
                height, width = run_with_timeout(
                    partial(_expected_size, src, list_format=list_format, num_frames=r.num_frames, short_side=short_side,
                            frame_index_base=frame_index_base),
                    read_timeout_s, what=str(src))
            except Exception as e:  # noqa: BLE001
                early_failures.append({"ok": False, "src": r.path, "out": out_rel,
                                       "error": f"{out} exists and its source cannot be read to check it: "
                                                f"{type(e).__name__}: {e}".splitlines()[0][:500]})
                continue
            try:
                info = verify_output(out, gop=gop, height=height, width=width)
                verify_default_reader(out, frames=info["frames"])
            except Exception as e:  # noqa: BLE001
                early_failures.append({"ok": False, "src": r.path, "out": out_rel,
                                       "error": f"{out} exists and is not a finished output of these settings ({e}); remove it"})
                continue
            done[key] = {"ok": True, "skipped": True, "src": r.path, "out": out_rel, **info}
            manifest["files"][out_rel] = {"source": r.path, "source_stamp": stamp, "out_size": out.stat().st_size, **info}
            continue
        jobs.append({"src": str(src), "out": str(out), "rel": r.path, "key": key, "out_rel": out_rel, "short_side": short_side,
                     "gop": gop, "fastdecode": fastdecode, "preset": preset, "crf": crf, "threads": 1 if workers > 1 else 0,
                     "list_format": list_format, "num_frames": r.num_frames, "fps": fps, "stamp": stamp,
                     "read_timeout": read_timeout_s, "frame_index_base": frame_index_base})

    results: list[dict] = list(early_failures)

    def record(res: dict, job: dict) -> None:
        results.append(res)
        done[job["key"]] = res
        out = Path(job["out"])
        if res["ok"]:
            manifest["files"][job["out_rel"]] = {"source": job["rel"], "source_stamp": job["stamp"], "out_size": out.stat().st_size,
                                                 **{k: res[k] for k in ("frames", "height", "width", "keyframes")}}
        else:
            if res.get("error") == WORKER_DIED:
                remove_stale_atomic_temps(out)  # its partial encode (other failures remove their own)
            if manifest["files"].pop(job["out_rel"], None) is not None and out.is_file():
                out.unlink()  # an earlier run's output of a source that no longer encodes: never reused as finished

    atomic_write_json(manifest_path, manifest)  # before any encoding: the settings of every file to come
    if jobs:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("failed: {task.fields[failed]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        last_save = time.monotonic()
        try:
            # no refresh thread: worker pools may be forked mid-run (after a worker died)
            with Progress(*columns, disable=not progress, transient=False, auto_refresh=False) as bar:
                task = bar.add_task("prepare", total=len(jobs), failed=0)
                bar.refresh()
                failed_jobs = 0  # of the bar's jobs (the failures found before encoding are not among them)
                with closing(_run_jobs(jobs, workers)) as stream:  # closing: the pool shuts down on an error too
                    for job, res in stream:
                        record(res, job)
                        failed_jobs += not res["ok"]
                        bar.update(task, advance=1, failed=failed_jobs, refresh=True)
                        if time.monotonic() - last_save > 5.0:
                            atomic_write_json(manifest_path, manifest)
                            last_save = time.monotonic()
        finally:
            atomic_write_json(manifest_path, manifest)

    failures = [{"path": str(root / r["src"]), "error": r["error"]} for r in results if not r["ok"]]
    key_of = {path: alias.get(key, key) for path, key in key_of.items()}
    new_records = [VideoRecord(path=done[key_of[r.path]]["out"], label=r.label) for r in records
                   if done.get(key_of[r.path], {}).get("ok")]
    write_annotation_list(new_list, new_records)  # even when empty: an earlier run's list must not outlive its files
    report = PrepareReport(out_dir=out_dir, list_file=new_list, report_path=report_path(out_dir, new_list), total=len(sources) - len(alias),
                           encoded=sum(r["ok"] for r in results), skipped=sum(1 for d in done.values() if d.get("skipped")),
                           failed=len(failures), failures=failures, seconds=round(time.perf_counter() - t0, 3), settings=settings,
                           removed_temps=removed_temps)
    atomic_write_json(report.report_path, {**report.to_dict(), "source_list": str(list_file), "root": str(root)})
    return report
