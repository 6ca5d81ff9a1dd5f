"""``VideoDataset``: annotation list -> sampled, decoded, transformed clips, with a bad-data policy.

Data flows one way: record -> frame indices (``sampling``) -> decode (``readers``, under a time
limit) -> transform (``transforms``) -> item dict. All randomness of an item comes from a
generator seeded by ``(seed, epoch, index, attempt)``, so items are the same whatever the worker
count, and resuming mid-epoch reproduces them.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torch.utils.data import get_worker_info

from .annotations import LIST_FORMATS, VideoRecord, read_annotation_list, read_class_names
from .failures import ON_ERROR_POLICIES, FailureRecord, report_skipped
from .readers import BACKENDS, DEFAULT_IMAGE_TEMPLATE, VideoReadError, open_video
from .sampling import TEST_OFFSETS, dense_indices, multi_clip_indices, segment_indices
from .transforms import TestTransform, TrainTransform, to_tchw
from .watchdog import DEFAULT_READ_TIMEOUT_S, ReadTimeoutError, run_with_timeout

log = logging.getLogger("mergekit_video.data")

SAMPLING_MODES = ("segment", "dense")
MAX_RESAMPLE_ATTEMPTS = 20


class LabelError(ValueError):
    """A label outside ``0..C-1`` for the given class names; ``path`` names the video.

    Built from the message alone (``path=None``) it survives pickling and torch's re-raise of a
    DataLoader worker's error (``type(e)(message)``) as itself, not as a RuntimeError.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


BAD_DATA_ERRORS = (VideoReadError, ReadTimeoutError, LabelError)

# Files whose read ran past its time limit in this process (path -> that error). A stuck read
# cannot be stopped (its thread is abandoned, see ``watchdog``), so such a file is not read again
# in this process: every later use fails at once. DataLoader workers inherit the list at fork.
_TIMED_OUT: dict[str, str] = {}


def item_generator(seed: int, epoch: int, index: int, attempt: int = 0) -> torch.Generator:
    """A CPU generator for one item, seeded from ``(seed, epoch, index, attempt)`` by SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), int(attempt)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


#: Something-Something v2 classes that a horizontal flip turns into each other ("... from left to right"
#: and "... from right to left"; ids of the official label list), as TSM and MoTE swap them.
SSV2_FLIP_LABEL_PAIRS = ((86, 87), (93, 94), (166, 167))


def flip_label_pair_errors(pairs: Sequence[Any] | None, num_classes: int | None = None) -> list[tuple[int, str, Any]]:
    """What is wrong with ``flip_label_pairs``, as ``(pair index, kind, detail)``, in pair order.

    Kinds: ``"shape"`` (not two int ids; detail: the pair), ``"negative"`` and ``"same"`` (detail: the
    pair), ``"repeat"`` (an id already in an earlier pair; detail: ``(id, earlier index)``), and with
    ``num_classes``, ``"beyond"`` (detail: the id, not below ``num_classes``). The callers word them: the
    dataset raises on the first, recipe validation names each key.
    """
    errors: list[tuple[int, str, Any]] = []
    seen: dict[int, int] = {}  # class id -> index of its first pair
    for i, pair in enumerate(pairs or ()):
        if isinstance(pair, (str, bytes)) or len(pair) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in pair):
            errors.append((i, "shape", pair))
            continue
        if min(pair) < 0:
            errors.append((i, "negative", list(pair)))
        elif pair[0] == pair[1]:
            errors.append((i, "same", list(pair)))
        for c in dict.fromkeys(pair):
            if c in seen:
                errors.append((i, "repeat", (c, seen[c])))
            seen.setdefault(c, i)
            if num_classes is not None and c >= num_classes:
                errors.append((i, "beyond", c))
    return errors


def flip_label_map(pairs: Sequence[Sequence[int]] | None) -> dict[int, int]:
    """``{a: b, b: a}`` for every pair ``(a, b)`` of class ids that a horizontal flip swaps.

    Raises ValueError for a pair that is not two distinct non-negative ids, or an id in two pairs
    (the first of :func:`flip_label_pair_errors`).
    """
    for i, kind, detail in flip_label_pair_errors(pairs):
        if kind == "shape":
            raise ValueError(f"flip_label_pairs[{i}] must be two class ids [a, b], got {detail!r}")
        if kind in ("negative", "same"):
            raise ValueError(f"flip_label_pairs[{i}] must be two distinct non-negative class ids, got {detail}")
        raise ValueError(f"flip_label_pairs: class id {detail[0]} is in two pairs")
    mapping: dict[int, int] = {}
    for a, b in pairs or ():
        mapping[a], mapping[b] = b, a
    return mapping


def label_range_problem(records: Sequence[VideoRecord], num_classes: int, *, list_file: str | os.PathLike,
                        source: str | os.PathLike | None = None, on_error: str = "raise",
                        stray_fraction: float = 0.01) -> str | None:
    """Why the labels of ``records`` (the list ``list_file``) do not fit ``num_classes`` class names (those of the
    class CSV ``source``), or None: none lies past them, or, under ``skip``/``resample``, at most ``stray_fraction``
    of the list does (stray lines, bad items under the policy)."""
    outside = [r for r in records if r.label >= num_classes]
    n, total = len(outside), len(records)
    if not outside or (on_error in ("skip", "resample") and n <= stray_fraction * total):
        return None
    where = f", from the class CSV {source}" if source is not None else ""
    first, name = outside[0], Path(list_file).name
    policy = (f" More than {stray_fraction:.0%} of the list is refused under on_error={on_error} too."
              if on_error in ("skip", "resample") else "")
    return (
        f"{list_file}: labels go up to {max(r.label for r in outside)}, but there {'is' if num_classes == 1 else 'are'} only "
        f"{num_classes} class name{'s' * (num_classes != 1)} (ids 0..{num_classes - 1}{where}); {n} of {total} video{'s' * (total != 1)} "
        f"{'has' if n == 1 else 'have'} a label >= {num_classes} (first: {first.path!r} with label {first.label}). "
        f"Wrong class CSV for this list? Give the class CSV that belongs to {name}.{policy}"
    )


class VideoDataset(torch.utils.data.Dataset):
    """Video clips from an annotation list, for training (random views) or testing (fixed views).

    Train item: ``{"frames": [T,3,H,W], "label": int, "index": int}``; test item:
    ``{"frames": [V,T,3,H,W], ...}``; an item that replaced bad videos also has ``"resampled"``
    (their paths) and, in DataLoader workers, ``"errors"`` (path -> reason) with ``V = num_clips * num_crops`` in clip-major order; test
    frames sit at the segment centres or, ``test_offsets="start"``, where the official MoTE test
    code takes them (:func:`~mergekit_video.data.sampling.multi_clip_indices`).
    ``frames`` are CLIP-normalised float, or uint8 with ``normalize=False`` (normalise on the GPU
    with :func:`normalize_frames`). Keys may be an int or an ``(index, epoch)`` pair from
    :class:`VideoSampler`. ``flip_label_pairs`` (training with ``flip``): class ids that a horizontal
    flip turns into each other, swapped in the label of a flipped clip (SSv2's left/right classes,
    :data:`SSV2_FLIP_LABEL_PAIRS`). Frame folders (``list_format="frames"``) hold ``image_template``
    files numbered from ``frame_index_base`` (1, as TSN writes them, or 0).

    A list whose labels go past the given class names is refused at construction (ValueError: the
    list and the class CSV do not belong together). Bad data (unreadable, empty, truncated or missing file, a read past
    ``read_timeout_s``, a label outside the class names in records given later by :meth:`with_records`) follows ``on_error``: ``"raise"`` (default at test; the error names
    the file), ``"skip"`` (the item is ``None``; :func:`collate_videos` drops it and lists its path
    in the batch's ``"failed"``), or ``"resample"`` (training only; the default there; logged once per file, then
    another index is drawn with the item's generator). ``failures`` / ``error_count`` keep this
    process's records. A file whose read timed out is not read again in this process (its stuck
    read leaves a thread behind): each later use, a resample draw included, fails at once, is
    counted and follows ``on_error`` like the first (logged once). Resampling skips it without
    reading it, so the replacement is the one an uninformed process would pick: items do not
    depend on which worker met the file first.
    """

    def __init__(
        self,
        *,
        list_file: str | os.PathLike,
        root: str | os.PathLike,
        num_frames: int = 8,
        train: bool,
        class_names: list[str] | str | os.PathLike | None = None,
        list_format: str = "video",
        backend: str = "decord",
        sampling: str = "segment",
        clip_len: int | None = None,
        stride: int = 8,
        num_clips: int = 1,
        num_crops: int = 1,
        test_offsets: str = "centre",
        input_size: int = 224,
        short_side: int | None = None,
        decode_short_side: int | None = None,
        flip: bool = True,
        flip_label_pairs: Sequence[Sequence[int]] | None = None,
        grayscale_p: float = 0.2,
        scale: tuple[float, float] = (0.08, 1.0),
        normalize: bool = True,
        on_error: str | None = None,
        read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
        seed: int = 0,
        image_template: str = DEFAULT_IMAGE_TEMPLATE,
        frame_index_base: int = 1,
        num_threads: int = 1,
        records: Sequence[VideoRecord] | None = None,
    ) -> None:
        if list_format not in LIST_FORMATS:
            raise ValueError(f"list_format must be one of {LIST_FORMATS}, got {list_format!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if list_format == "frames" and backend not in ("frames", "auto"):
            backend = "frames"
        if list_format == "video" and backend == "frames":
            raise ValueError("backend='frames' needs list_format='frames' (folder num_frames label)")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if test_offsets not in TEST_OFFSETS:
            raise ValueError(f"test_offsets must be one of {TEST_OFFSETS}, got {test_offsets!r}")
        on_error = on_error or ("resample" if train else "raise")
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        if not train and on_error == "resample":
            raise ValueError("on_error='resample' is for training only: at test time it would score another video in place of "
                             "a bad one; use on_error='skip' (the bad video is left out and listed) or 'raise'")
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        if num_clips <= 0:
            raise ValueError(f"num_clips must be positive, got {num_clips}")
        if train and (num_clips != 1 or num_crops != 1):
            raise ValueError("training takes one random view per item; num_clips and num_crops must be 1 when train=True")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.flip_label_map = flip_label_map(flip_label_pairs)
        if self.flip_label_map and not (train and flip):
            raise ValueError("flip_label_pairs swap the labels of flipped training clips; they need train=True and flip=True")
        self.list_file = Path(list_file)
        self.root = Path(root)
        self.records: list[VideoRecord] = list(records) if records is not None else read_annotation_list(self.list_file, list_format)
        if isinstance(class_names, (str, os.PathLike)):
            class_names = read_class_names(class_names)
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None:
            self._check_labels(getattr(class_names, "source", None), on_error)
            beyond = sorted(c for _, kind, c in flip_label_pair_errors(flip_label_pairs, len(self.class_names)) if kind == "beyond")
            if beyond:
                raise ValueError(f"flip_label_pairs name class id {beyond[0]}, but there are only {len(self.class_names)} classes")
        self.num_frames, self.train, self.list_format, self.backend = num_frames, train, list_format, backend
        self.sampling, self.clip_len, self.stride = sampling, clip_len or num_frames, stride
        self.num_clips, self.num_crops, self.input_size, self.test_offsets = num_clips, num_crops, input_size, test_offsets
        self.decode_short_side, self.normalize, self.on_error = decode_short_side, normalize, on_error
        self.read_timeout_s, self.seed, self.image_template, self.num_threads = read_timeout_s, seed, image_template, num_threads
        if frame_index_base not in (0, 1):
            raise ValueError(f"frame_index_base must be 0 or 1 (the number of a frame folder's first image), got {frame_index_base!r}")
        self.frame_index_base = frame_index_base
        if train:
            self.transform: Any = TrainTransform(size=input_size, scale=scale, flip_p=0.5 if flip else 0.0, grayscale_p=grayscale_p, normalize=normalize)
        else:
            self.transform = TestTransform(short_side=short_side or input_size, crop=input_size, num_crops=num_crops, normalize=normalize)
        self._reset_failures()

    #: Under ``skip``/``resample``, up to this fraction of a list's labels may lie past the class names
    #: (stray lines, bad items under the policy); more means the list and class CSV do not belong together.
    stray_label_fraction = 0.01

    def _check_labels(self, source: Path | None, on_error: str = "raise") -> None:
        """Refuse a list whose labels go past the class names: that list and class CSV do not belong together.

        Under ``skip``/``resample`` a few such lines (at most :attr:`stray_label_fraction` of the
        list: one in a list of 100) are bad items instead: logged here, then skipped or resampled
        like an unreadable video when drawn (:func:`label_range_problem`).
        """
        num_classes = len(self.class_names)
        problem = label_range_problem(self.records, num_classes, list_file=self.list_file, source=source,
                                      on_error=on_error, stray_fraction=self.stray_label_fraction)
        if problem is not None:
            raise ValueError(problem)
        outside = [r for r in self.records if r.label >= num_classes]
        if outside:  # a few stray lines, tolerated under the policy
            where = f", from the class CSV {source}" if source is not None else ""
            first, n, total = outside[0], len(outside), len(self.records)
            log.warning("%s: %d of %d video%s %s a label >= %d, the class count%s (first: %r with label %d): bad items under on_error=%s",
                        self.list_file, n, total, "s" * (total != 1), "has" if n == 1 else "have", num_classes, where,
                        first.path, first.label, on_error)

    # ----------------------------------------------------------------- bookkeeping
    def _reset_failures(self) -> None:
        self.failures: list[FailureRecord] = []
        self._logged: set[str] = set()  # failures met in this process, logged once each

    def mark_reported(self, paths: Iterable[str]) -> None:
        """Treat ``paths`` as bad files already logged (a resumed run logged them before its checkpoint)."""
        self._logged.update(paths)

    @property
    def error_count(self) -> int:
        """Bad items met by this process (each failed attempt counts once)."""
        return len(self.failures)

    @property
    def labels(self) -> list[int]:
        """Class id of every record, in list order."""
        return [r.label for r in self.records]

    @property
    def num_views(self) -> int:
        """Views per test item (``num_clips * num_crops``); 1 in training."""
        return self.num_clips * self.num_crops

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of ``item["frames"]``: ``(T, 3, S, S)`` in training, ``(V, T, 3, S, S)`` at test."""
        t = self.clip_len if self.sampling == "dense" else self.num_frames
        clip = (t, 3, self.input_size, self.input_size)
        return clip if self.train else (self.num_views, *clip)

    def with_records(self, records: Sequence[VideoRecord]) -> VideoDataset:
        """A copy of this dataset over other records (same sampling and transforms)."""
        new = copy.copy(self)
        new.records = list(records)
        new._reset_failures()
        return new

    def __len__(self) -> int:
        return len(self.records)

    def path_of(self, index: int) -> Path:
        """Absolute path of a record's video (or frame folder)."""
        return self.root / self.records[index].path

    # ----------------------------------------------------------------- loading
    def _indices(self, n: int, generator: torch.Generator) -> list[list[int]]:
        if self.sampling == "segment":
            if self.train:
                return [segment_indices(n, self.num_frames, train=True, generator=generator)]
            return multi_clip_indices(n, self.num_frames, self.num_clips, offsets=self.test_offsets)
        if self.train:
            return [dense_indices(n, self.clip_len, self.stride, train=True, generator=generator)]
        return [dense_indices(n, self.clip_len, self.stride, train=False, clip_index=k, num_clips=self.num_clips) for k in range(self.num_clips)]

    def _decode(self, record: VideoRecord, generator: torch.Generator) -> torch.Tensor:
        path = self.root / record.path
        reader = open_video(path, backend=self.backend, short_side=self.decode_short_side, num_frames=record.num_frames,
                            num_threads=self.num_threads, image_template=self.image_template,
                            frame_index_base=self.frame_index_base)
        try:
            views = self._indices(reader.num_frames, generator)
            return reader.get_frames([i for v in views for i in v])  # [K*T, H, W, 3]
        finally:
            reader.close()

    def load(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """Decode and transform record ``index`` (no error policy): ``[T,3,S,S]`` or ``[V,T,3,S,S]``."""
        return self._load(index, generator)[0]

    def _load(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """:meth:`load`'s frames and the item's label (swapped by ``flip_label_pairs`` for a flipped clip)."""
        record = self.records[index]
        path = self.root / record.path
        if self.class_names is not None and not 0 <= record.label < len(self.class_names):
            raise LabelError(f"{path}: label {record.label} out of range for {len(self.class_names)} class{'es' * (len(self.class_names) != 1)}", path=str(path))
        earlier = _TIMED_OUT.get(str(path))
        if earlier is not None:
            raise ReadTimeoutError(f"{path}: not read again, its read timed out earlier in this process ({earlier})", path=str(path))
        try:
            frames = run_with_timeout(lambda: self._decode(record, generator), self.read_timeout_s, what=str(path))
        except ReadTimeoutError as e:
            _TIMED_OUT[str(path)] = str(e)
            raise
        if self.train:
            x = to_tchw(frames)
            params = self.transform.params(x.shape[-2], x.shape[-1], generator)
            label = self.flip_label_map.get(record.label, record.label) if params["flip"] else record.label
            return self.transform.apply(x, params), label  # [T, 3, S, S]
        k, t = self.num_clips, frames.shape[0] // self.num_clips
        views = self.transform(frames)  # [C, K*T, 3, S, S]
        views = views.unflatten(1, (k, t)).transpose(0, 1)  # [K, C, T, 3, S, S], clip-major
        return views.reshape(k * self.num_crops, t, *views.shape[-3:]).contiguous(), record.label

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        if isinstance(key, (tuple, list)):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), 0
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} video{'s' * (len(self.records) != 1)} in {self.list_file}")
        current = index
        resampled: list[str] = []  # bad videos this item replaced, carried in the item
        errors: dict[str, str] = {}  # their reasons, in workers (the main process logs them once)
        for attempt in range(MAX_RESAMPLE_ATTEMPTS):
            g = item_generator(self.seed, epoch, index, attempt)
            try:
                frames, label = self._load(current, g)
            except BAD_DATA_ERRORS as e:
                path = str(self.path_of(current))
                self.failures.append(FailureRecord(path=path, index=current, epoch=epoch, error=str(e), action=self.on_error))
                if self.on_error == "raise":
                    raise
                in_worker = get_worker_info() is not None
                if not in_worker and path not in self._logged:
                    self._logged.add(path)
                    log.warning("bad video (%s): %s", self.on_error, e)
                if self.on_error == "skip":
                    report_skipped(path, index=current, reason=str(e) if in_worker else None, shape=self.item_shape,
                                   dtype=torch.float32 if self.normalize else torch.uint8)
                    return None
                resampled.append(path)
                if in_worker:
                    errors[path] = str(e)
                # A fresh generator with the item's seed: the choice does not depend on where the
                # failure happened, and never races a timed-out read still holding ``g``.
                choose = item_generator(self.seed, epoch, index, attempt)
                current = int(torch.randint(len(self.records), (1,), generator=choose).item())
                continue
            item = {"frames": frames, "label": label, "index": current}
            if resampled:
                item["resampled"] = resampled
                if errors:
                    item["errors"] = errors
            return item
        raise RuntimeError(f"{MAX_RESAMPLE_ATTEMPTS} bad videos in a row while resampling item {index} of {self.list_file}; "
                           f"last: {self.failures[-1].path}: {self.failures[-1].error}")

    def __repr__(self) -> str:
        return (f"VideoDataset({self.list_file}, {len(self)} videos, T={self.num_frames}, train={self.train}, "
                f"sampling={self.sampling}, views={self.num_clips}x{self.num_crops}, backend={self.backend}, on_error={self.on_error})")
