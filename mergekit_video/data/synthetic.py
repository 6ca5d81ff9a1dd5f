"""A small real video dataset written on the CPU in seconds: moving coloured shapes in H.264 mp4.

A class is a colour, a shape and a motion, named in plain words ("red circle moving left") so
text encoders can read it. Classes come in pairs that differ only in their motion (left/right,
up/down, growing/shrinking), so motion matters. The novel split (zero-shot) uses classes disjoint
from the training ones. Layout under ``root``::

    videos/{train,val,novel}/<class_slug>/<class_slug>_0000.mp4
    train.txt val.txt novel.txt          # "videos/train/.../x.mp4 label"
    classes.csv novel_classes.csv        # "id,name"
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .annotations import VideoRecord, write_annotation_list, write_class_names
from .encode import encode_video

COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (40, 100, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 70, 200),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
MOTION_PAIRS = (("moving left", "moving right"), ("moving up", "moving down"), ("growing", "shrinking"))


def class_catalogue() -> list[tuple[str, str, str]]:
    """All (colour, shape, motion) classes in a fixed order: first one motion pair per colour/shape."""
    colours = list(COLOURS)
    pairs = [(colours[g % 6], SHAPES[(g + g // 6) % 4]) for g in range(24)]  # all 24 colour/shape pairs
    first = [(c, s, m) for g, (c, s) in enumerate(pairs) for m in MOTION_PAIRS[g % 3]]
    rest = [(c, s, m) for g, (c, s) in enumerate(pairs) for j in (1, 2) for m in MOTION_PAIRS[(g + j) % 3]]
    return first + rest


def class_name(cls: tuple[str, str, str]) -> str:
    """Readable class name, e.g. ``"red circle moving left"``."""
    return " ".join(cls)


#: Written last into every synthetic dataset: the arguments that made it (what a rerun compares).
SETTINGS_FILE = "synthetic.json"


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths and class names of a dataset written by :func:`write_synthetic_dataset`."""

    root: Path
    train_list: Path
    val_list: Path | None
    class_csv: Path
    novel_list: Path | None
    novel_class_csv: Path | None
    class_names: list[str]
    novel_class_names: list[str]


def synthetic_layout(root: str | os.PathLike) -> SyntheticDataset:
    """The :class:`SyntheticDataset` of a dataset already written under ``root`` (nothing is written)."""
    from .annotations import read_class_names

    root = Path(root)
    train_list, class_csv = root / "train.txt", root / "classes.csv"
    if not train_list.is_file() or not class_csv.is_file():
        raise FileNotFoundError(f"{root} holds no synthetic dataset (train.txt and classes.csv missing)")
    val_list, novel_list, novel_csv = root / "val.txt", root / "novel.txt", root / "novel_classes.csv"
    has_novel = novel_list.is_file() and novel_csv.is_file()
    return SyntheticDataset(root=root, train_list=train_list, val_list=val_list if val_list.is_file() else None, class_csv=class_csv,
                            novel_list=novel_list if has_novel else None, novel_class_csv=novel_csv if has_novel else None,
                            class_names=read_class_names(class_csv), novel_class_names=read_class_names(novel_csv) if has_novel else [])


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (dx <= r) & (dy <= r)
    if shape == "triangle":  # apex up, base 2r wide
        rel = yy - (cy - r)
        return (rel >= 0) & (rel <= 2 * r) & (dx <= rel / 2)
    if shape == "cross":
        arm = r / 3
        return ((dx <= arm) & (dy <= r)) | ((dy <= arm) & (dx <= r))
    raise ValueError(f"unknown shape {shape!r}")


MAX_NOISE = 64.0  # grain standard deviation, in pixel levels (0-255): beyond this the picture is lost in it


def render_clip(cls: tuple[str, str, str], *, frames: int, size: tuple[int, int], rng: np.random.Generator, texture: float = 0.0,
                noise: float = 0.0) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` uint8 of one video of class ``cls`` with random placement and speed.

    ``texture`` (0..1) adds a slowly panning noise background, which makes decoding cost like
    real footage (flat backgrounds compress to almost nothing); ``noise`` is the standard deviation,
    in pixel levels of the 0-255 scale (0..``MAX_NOISE``), of per-frame sensor-like grain
    (unpredictable, so it raises the bitrate like camera footage).
    """
    colour, shape, motion = cls
    h, w = size
    m = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = rng.integers(15, 70, size=3).astype(np.float32)
    fg = np.clip(np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-15, 15, size=3), 0, 255)
    r0 = m * rng.uniform(0.12, 0.18)
    a, b = rng.uniform(0.15, 0.3), rng.uniform(0.7, 0.85)  # start and end along the path, as fractions
    cross = rng.uniform(0.35, 0.65)
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    if motion in ("moving left", "moving right"):
        path = b + (a - b) * t if motion == "moving left" else a + (b - a) * t
        cx, cy, r = path * w, np.full(frames, cross * h), np.full(frames, r0)
    elif motion in ("moving up", "moving down"):
        path = b + (a - b) * t if motion == "moving up" else a + (b - a) * t
        cx, cy, r = np.full(frames, cross * w), path * h, np.full(frames, r0)
    else:
        small, big = m * rng.uniform(0.06, 0.1), m * rng.uniform(0.3, 0.4)
        r = small + (big - small) * t if motion == "growing" else big + (small - big) * t
        cx, cy = np.full(frames, rng.uniform(0.4, 0.6) * w), np.full(frames, rng.uniform(0.4, 0.6) * h)
    if texture > 0:
        cells = rng.uniform(-1, 1, size=(h // 8 + 2, (w + frames) // 8 + 2)).astype(np.float32)
        coarse = np.kron(cells, np.ones((8, 8), dtype=np.float32))
        grain = rng.uniform(-1, 1, size=(h, w + frames)).astype(np.float32)
        tex = 40.0 * texture * (coarse[:h, : w + frames] + 0.5 * grain)
    out = np.empty((frames, h, w, 3), dtype=np.uint8)
    for i in range(frames):
        img = np.broadcast_to(bg, (h, w, 3)).copy()
        if texture > 0:
            img += tex[:, i : i + w, None]  # pans one pixel per frame
        img[_mask(shape, xx, yy, cx[i], cy[i], r[i])] = fg
        if noise > 0:
            img += noise * rng.standard_normal((h, w, 3), dtype=np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def _write_one(job: tuple) -> None:
    path, cls, frames, size, fps, gop, texture, noise, preset, crf, seed_key = job
    rng = np.random.default_rng(seed_key)
    clip = render_clip(cls, frames=frames, size=size, rng=rng, texture=texture, noise=noise)
    encode_video(path, clip, width=size[1], height=size[0], fps=fps, gop=gop, preset=preset, crf=crf)


def write_synthetic_dataset(
    root: str | os.PathLike,
    *,
    num_classes: int = 6,
    videos_per_class: int = 8,
    val_per_class: int = 4,
    num_novel_classes: int = 4,
    novel_per_class: int | None = None,
    frames: int = 32,
    size: tuple[int, int] = (64, 64),
    fps: float = 15.0,
    gop: int | None = None,
    texture: float = 0.0,
    noise: float = 0.0,
    preset: str | None = "veryfast",
    crf: int | None = 0,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write train/val/novel H.264 mp4 sets, annotation lists and class CSVs under ``root``.

    ``size`` is (height, width), both even. ``texture``/``noise`` make the pictures cost like real
    footage to decode (see :func:`render_clip`). ``gop=None`` keeps x264's default keyframe interval
    (250), like raw downloads; ``preset=None`` keeps x264's default preset (medium) too.

    The same ``seed`` gives the same pictures, and with ``crf=0`` (lossless, the default) the
    same decoded frames in every process: x264's lossy choices are not always identical across
    processes, a lossless stream decodes to exactly the rendered frames whatever they were.
    ``crf=None`` keeps x264's default quality (lossy, about 40% smaller). An existing non-empty
    ``root`` is refused unless ``overwrite=True`` (which replaces the files named above).

    The dataset is written into a hidden staging folder beside ``root`` and moved into place when
    complete, so an interrupted write leaves no half dataset in ``root`` (the next call clears the
    staging folder). ``root/synthetic.json`` records the arguments (see :func:`synthetic_settings`).
    """
    root = Path(root)
    catalogue = class_catalogue()
    # messages name the argument and its `mergevid data synth` option
    for value, name, least in ((num_classes, "num_classes (--classes)", 1), (num_novel_classes, "num_novel_classes (--novel-classes)", 0),
                               (videos_per_class, "videos_per_class (--videos-per-class)", 1),
                               (val_per_class, "val_per_class (--val-per-class)", 0), (frames, "frames (--frames)", 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if num_classes + num_novel_classes > len(catalogue):
        raise ValueError(f"num_classes + num_novel_classes (--classes + --novel-classes) must be <= {len(catalogue)} "
                         f"(the classes the synthetic catalogue has), got {num_classes} + {num_novel_classes}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if gop is not None and not (isinstance(gop, int) and not isinstance(gop, bool) and gop >= 1):
        raise ValueError(f"gop must be an integer >= 1 (frames between keyframes), got {gop}")
    if not 0 <= texture <= 1:
        raise ValueError(f"texture must be in [0, 1] (background strength), got {texture}")
    if not 0 <= noise <= MAX_NOISE:
        raise ValueError(f"noise must be in [0, {MAX_NOISE:g}] pixel levels (the grain's standard deviation on the 0-255 scale), got {noise}")
    h, w = size
    if h % 2 or w % 2 or h < 16 or w < 16:
        raise ValueError(f"size must be even and at least 16x16 (H, W), got {size}")
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to write into it: that REPLACES its "
                              f"{', '.join(GENERATED_ENTRIES[:-1])} and {GENERATED_ENTRIES[-1]} (other files stay)")
    novel_per_class = val_per_class if novel_per_class is None else novel_per_class
    settings = {"num_classes": num_classes, "videos_per_class": videos_per_class, "val_per_class": val_per_class,
                "num_novel_classes": num_novel_classes, "novel_per_class": novel_per_class, "frames": frames, "size": [h, w],
                "fps": fps, "gop": gop, "texture": texture, "noise": noise, "preset": preset, "crf": crf, "seed": seed}
    staging = root.parent / f".{root.name}.partial"
    if staging.exists():  # left by an interrupted write
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        train_cls, novel_cls = catalogue[:num_classes], catalogue[num_classes : num_classes + num_novel_classes]

        jobs, lists = [], {"train": [], "val": [], "novel": []}
        splits = [("train", train_cls, videos_per_class), ("val", train_cls, val_per_class), ("novel", novel_cls, novel_per_class)]
        for split_id, (split, classes, per_class) in enumerate(splits):
            for label, cls in enumerate(classes):
                slug = _slug(class_name(cls))
                for i in range(per_class):
                    rel = f"videos/{split}/{slug}/{slug}_{i:04d}.mp4"
                    jobs.append((staging / rel, cls, frames, (h, w), fps, gop, texture, noise, preset, crf, [seed, split_id, label, i]))
                    lists[split].append(VideoRecord(path=rel, label=label))
        if workers > 1 and len(jobs) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
        else:
            for job in jobs:
                _write_one(job)

        names, novel_names = [class_name(c) for c in train_cls], [class_name(c) for c in novel_cls]
        write_annotation_list(staging / "train.txt", lists["train"])
        if lists["val"]:
            write_annotation_list(staging / "val.txt", lists["val"])
        write_class_names(staging / "classes.csv", names)
        if novel_cls and lists["novel"]:
            write_annotation_list(staging / "novel.txt", lists["novel"])
            write_class_names(staging / "novel_classes.csv", novel_names)
        (staging / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        _publish(staging, root)
    except BaseException:  # a failure or Ctrl-C: no half-written staging folder left beside the dataset
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return synthetic_layout(root)


#: What a synthetic dataset consists of under its root (other files there are the user's).
GENERATED_ENTRIES = ("train.txt", "val.txt", "classes.csv", "novel.txt", "novel_classes.csv", "videos", SETTINGS_FILE)


def _publish(staging: Path, root: Path) -> None:
    """Move a finished dataset from ``staging`` into ``root``, replacing the entries it names and
    removing those of an earlier dataset it does not write (a val or novel list of videos now gone)."""
    if not root.exists() or not any(root.iterdir()):
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
        return
    written = {entry.name for entry in staging.iterdir()}
    for name in sorted(set(GENERATED_ENTRIES) - written):
        _remove(root / name)
    for entry in staging.iterdir():
        target = root / entry.name
        _remove(target)
        os.replace(entry, target)
    staging.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def synthetic_settings(root: str | os.PathLike) -> dict | None:
    """The arguments a synthetic dataset under ``root`` was written with (None if there is none)."""
    path = Path(root) / SETTINGS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
