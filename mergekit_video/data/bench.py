"""``mergevid bench data``: how close the pipeline gets to the cost of decoding alone.

On each file set (raw long-GOP files, and the same files after ``mergevid data prepare``) and
with the same DataLoader harness (same videos, order, workers and batch size), it measures clips/s of:

- ``floor_*``: decode the sampled frames with one decord ``get_batch`` call and nothing else
  (uint8 frames copied into one flat batch buffer: the copy stacking costs, for clips of any size);
- ``ours_*``: :class:`VideoDataset` + :func:`collate_videos` as the runners use them, up to the
  uint8 batch the loader hands over (train; test: 1 clip x 1 centre crop). Training on a GPU
  normalises that batch on the GPU, so this is the whole CPU cost there; a CPU-only run also
  normalises it in the main process, which is not timed here: ``ours_*_float`` (``normalize=True``,
  normalised in the workers) shows that cost;
- ``naive_*``: the common approach: one decord call per frame, PIL conversion, PIL resize / crop /
  flip / grayscale per frame, per-frame ``to_tensor``, then normalise.

Train pipelines draw the same frame indices for the same video (same per-item generator), so the
floor decodes exactly the frames the others decode. A round runs every pipeline, back to back, on
the same chunk of ``batch_size x workers`` videos (one batch per worker; order alternating between
rounds); ``repeats`` sweeps over
all chunks follow a warm-up sweep. Costs are CPU seconds (the worker's own clock, all threads, plus
the main process), so other load on a shared machine inflates them far less than wall time; ratios
are medians of per-round ratios, pairing passes that ran seconds apart. Wall-clock figures are
reported too. The harness measures the cost per core: with W workers, throughput scales up to
W times until the cores are saturated.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..utils.io import atomic_write_json
from .annotations import VideoRecord, read_annotation_list, write_annotation_list
from .datasets import VideoDataset, item_generator
from .loader import _stack, collate_videos
from .sampling import segment_indices
from .transforms import CLIP_MEAN, CLIP_STD

# 10 s 340x256 at 30 fps. Panning texture plus per-frame grain (sigma 6) give ~380 kbps with x264 defaults, a
# Kinetics-like bitrate, and a long-GOP sparse decode of ~90 ms per clip on one core (the issue measured ~85 ms).
RAW_CLIP = {"frames": 300, "size": (256, 340), "fps": 30.0, "texture": 0.6, "noise": 6.0}
GOALS = {"fraction_of_decode_floor": 0.9, "prepared_speedup_vs_naive_raw": 2.5}


class _ListDataset(Dataset):
    """Shared plumbing of the baseline pipelines: records, root, sampling."""

    def __init__(self, *, records: list[VideoRecord], root: Path, num_frames: int, train: bool, seed: int) -> None:
        self.records, self.root, self.num_frames, self.train, self.seed = records, root, num_frames, train, seed

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, index: int):
        import decord

        vr = decord.VideoReader(str(self.root / self.records[index].path), ctx=decord.cpu(0), num_threads=1)
        g = item_generator(self.seed, 0, index, 0)  # same draws as VideoDataset's first attempt
        return vr, segment_indices(len(vr), self.num_frames, train=self.train, generator=g), g


class DecodeFloor(_ListDataset):
    """Decode the sampled frames with one ``get_batch`` call; nothing else."""

    def __getitem__(self, index: int) -> torch.Tensor:
        vr, idx, _ = self._open(index)
        return torch.from_numpy(vr.get_batch(idx).asnumpy())  # [T, H, W, 3] uint8


class NaivePipeline(_ListDataset):
    """Per-frame decord calls and per-frame PIL transforms, as common video-CLIP code does (e.g. MoTE/Text4Vis)."""

    def __init__(self, *, input_size: int = 224, scale_size: int = 256, **kw: Any) -> None:
        super().__init__(**kw)
        self.input_size, self.scale_size = input_size, scale_size

    def __getitem__(self, index: int) -> torch.Tensor:
        import torchvision.transforms.functional as F
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        vr, idx, _ = self._open(index)
        images = [Image.fromarray(vr[i].asnumpy()).convert("RGB") for i in idx]  # one decord call per frame
        s = self.input_size
        if self.train:
            images = [F.resize(im, self.scale_size) for im in images]  # GroupScale(256)
            top, left, h, w = RandomResizedCrop.get_params(images[0], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            images = [F.resized_crop(im, top, left, h, w, [s, s]) for im in images]
            if torch.rand(1).item() < 0.5:
                images = [F.hflip(im) for im in images]
            if torch.rand(1).item() < 0.2:
                images = [F.to_grayscale(im, num_output_channels=3) for im in images]
        else:
            images = [F.center_crop(F.resize(im, s), s) for im in images]
        x = torch.stack([F.to_tensor(im) for im in images])  # [T, 3, s, s]
        return F.normalize(x, CLIP_MEAN, CLIP_STD)


def _stack_collate(batch: list[torch.Tensor]) -> torch.Tensor:
    return _stack(batch)


def _floor_collate(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the decoded clips into one flat uint8 buffer: the single copy stacking costs, but for clips of
    different sizes (raw datasets mix frame sizes; the floor does not resize). In a worker it writes straight
    into shared memory, as :func:`_stack` does.

    Returns ``{"frames": [sum of T*H*W*3] uint8, "shapes": [B, 4] (T, H, W, 3) per clip}``.
    """
    total = sum(t.numel() for t in batch)
    out = None
    if get_worker_info() is not None:
        out = batch[0].new(batch[0]._typed_storage()._new_shared(total, device=batch[0].device))
    frames = torch.cat([t.reshape(-1) for t in batch], out=out)  # [sum T*H*W*3]
    return {"frames": frames, "shapes": torch.tensor([list(t.shape) for t in batch], dtype=torch.long)}


def _batch_size(batch: Any) -> int:
    """Clips in a batch: a tensor's first dimension, or the clips counted in a collated dict."""
    if isinstance(batch, dict):
        return int(batch["shapes" if "shapes" in batch else "label"].shape[0])
    return int(batch.shape[0])


def watchdog_overhead_us(calls: int = 2000) -> float:
    """Extra microseconds per read that the time-limit thread hand-off costs."""
    from .watchdog import run_with_timeout

    def noop() -> int:
        return 0

    run_with_timeout(noop, 60.0)
    t0 = time.perf_counter()
    for _ in range(calls):
        noop()
    direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        run_with_timeout(noop, 60.0)
    guarded = time.perf_counter() - t0
    return round((guarded - direct) / calls * 1e6, 2)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU, cores, memory, library versions."""
    from ..utils.cpu import cpu_model_name

    cpu = cpu_model_name()
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for mod in ("decord", "av", "torchvision", "PIL"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def _raw_synthetic_set(work_dir: Path, num_videos: int, log: Callable[[str], None]) -> tuple[list[VideoRecord], Path]:
    from .synthetic import write_synthetic_dataset

    root = work_dir / "raw"
    config = {**RAW_CLIP, "size": list(RAW_CLIP["size"]), "videos": num_videos, "gop": None, "preset": None, "version": 2}
    marker = root / "bench_config.json"
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return read_annotation_list(root / "train.txt")[:num_videos], root
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{root} exists and was not written by the benchmark; choose another --work-dir")
    log(f"writing {num_videos} raw clips (10 s, 340x256, x264 defaults: keyframe every 250 frames) to {root} ...")
    classes = 6
    write_synthetic_dataset(root, num_classes=classes, videos_per_class=math.ceil(num_videos / classes), val_per_class=0,
                            num_novel_classes=0, frames=RAW_CLIP["frames"], size=RAW_CLIP["size"], fps=RAW_CLIP["fps"], gop=None,
                            texture=RAW_CLIP["texture"], noise=RAW_CLIP["noise"], preset=None, crf=None, workers=os.cpu_count() or 1, overwrite=True)
    atomic_write_json(marker, config)
    return read_annotation_list(root / "train.txt")[:num_videos], root


def _pipelines(records: list[VideoRecord], root: Path, *, num_frames: int, input_size: int, seed: int) -> dict[str, tuple[Dataset, Callable]]:
    kw = {"records": records, "root": root, "num_frames": num_frames, "seed": seed}

    def ours(train: bool, normalize: bool) -> VideoDataset:
        return VideoDataset(list_file=root / "<bench>", root=root, records=records, num_frames=num_frames, train=train,
                            input_size=input_size, normalize=normalize, on_error="raise", seed=seed, backend="decord")

    return {
        "floor_train": (DecodeFloor(train=True, **kw), _floor_collate),
        "ours_train": (ours(True, False), collate_videos),  # what the runners use: uint8, normalised by the consumer
        "ours_train_float": (ours(True, True), collate_videos),
        "naive_train": (NaivePipeline(train=True, input_size=input_size, **kw), _stack_collate),
        "floor_test": (DecodeFloor(train=False, **kw), _floor_collate),
        "ours_test": (ours(False, False), collate_videos),
        "ours_test_float": (ours(False, True), collate_videos),
        "naive_test": (NaivePipeline(train=False, input_size=input_size, **kw), _stack_collate),
    }


class _ChunkSampler(torch.utils.data.Sampler):
    """Yields the indices currently set; lets one persistent loader run pass after pass over chosen videos."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


class _TimedCollate:
    """Wraps a collate function; also returns the worker's CPU seconds (all threads) when the batch is ready."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, batch: list) -> tuple[Any, float, int]:
        return self.collate(batch), time.process_time(), os.getpid()


def _measure_set(pipelines: dict[str, tuple[Dataset, Callable]], *, num_videos: int, workers: int, batch_size: int, repeats: int,
                 log: Callable[[str], None]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """clips per wall second and clips per CPU second, per pass.

    A round runs every pipeline on the same chunk of ``batch_size x workers`` videos (a batch for every
    worker), back to back, in an order
    that alternates between rounds; ``repeats`` sweeps over all chunks. CPU time is the worker's own
    clock (all its threads, read at the end of each collate) plus the main process's.
    """
    loaders, samplers = {}, {}
    for name, (ds, collate) in pipelines.items():
        samplers[name] = _ChunkSampler()
        kwargs = {"persistent_workers": True} if workers > 0 else {}
        loaders[name] = DataLoader(ds, batch_size=batch_size, sampler=samplers[name], num_workers=workers,
                                   collate_fn=_TimedCollate(collate), **kwargs)
    wall: dict[str, list[float]] = {name: [] for name in loaders}
    cpu: dict[str, list[float]] = {name: [] for name in loaders}
    last_cpu: dict[tuple[str, int], float] = {}
    names = list(loaders)
    chunk_size = batch_size * max(1, workers)  # one batch per worker: a persistent loader starts each pass at worker 0
    chunks = [list(range(i, min(i + chunk_size, num_videos))) for i in range(0, num_videos, chunk_size)]
    rounds = [(0, c) for c in chunks] + [(r, c) for r in range(1, repeats + 1) for c in chunks]  # sweep 0 warms up
    threads = torch.get_num_threads()
    if workers == 0:  # in-process: torch's ops get one core, as the decode floor's decoder and each DataLoader worker have
        torch.set_num_threads(1)
    try:
        for k, (rep, chunk) in enumerate(rounds):
            order = names if k % 2 == 0 else names[::-1]
            for name in order:
                samplers[name].indices = chunk
                m0, t0, n, used = time.process_time(), time.perf_counter(), 0, 0.0
                for batch, worker_cpu, pid in loaders[name]:
                    n += _batch_size(batch)
                    key = (name, pid)
                    if workers == 0:
                        pass
                    elif key in last_cpu:
                        used += worker_cpu - last_cpu[key]
                    else:
                        used = float("nan")  # first batch of a worker: no baseline yet
                    last_cpu[key] = worker_cpu
                t1, m1 = time.perf_counter(), time.process_time()
                if rep > 0:
                    wall[name].append(n / (t1 - t0))
                    total = used + (m1 - m0)
                    if total == total and total > 0:  # not NaN
                        cpu[name].append(n / total)
        for name in names:
            log(f"  {name:18s} clips/s wall {statistics.median(wall[name]):7.2f}   per CPU-s "
                f"{statistics.median(cpu[name]) if cpu[name] else float('nan'):7.2f}   ({len(wall[name])} passes)")
    finally:
        torch.set_num_threads(threads)
        for loader in loaders.values():
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
    return wall, cpu


def _paired(rates: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of rate[a] / rate[b]: each ratio pairs passes run back to back."""
    return statistics.median(x / y for x, y in zip(rates[a], rates[b]))


def _summarise(rates: dict[str, list[float]], workers: int) -> dict:
    med = {k: round(statistics.median(v), 3) for k, v in rates.items()}
    by_pipe = {k: _paired(rates, f"ours_{k}", f"floor_{k.split('_')[0]}") for k in ("train", "test", "train_float", "test_float") if f"ours_{k}" in rates}
    return {
        "clips_per_s": med,
        "clips_per_s_all_rounds": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "ms_per_clip": {k: round(1000.0 / v, 2) for k, v in med.items()},
        # headline: the pipelines the runners use (uint8 out of the workers); float paths are listed too
        "fraction_of_decode_floor": round(min(by_pipe["train"], by_pipe["test"]), 4),
        "fraction_of_decode_floor_by_pipeline": {k: round(v, 4) for k, v in by_pipe.items()},
        "speedup_vs_naive": {"train": round(_paired(rates, "ours_train", "naive_train"), 3),
                             "test": round(_paired(rates, "ours_test", "naive_test"), 3)},
    }


def _keyframe_summary(paths: list[Path]) -> dict:
    from .encode import keyframe_indices, video_info

    keys, n = keyframe_indices(paths[0])
    info = video_info(paths[0])
    return {"frames": n, "width": info["width"], "height": info["height"], "fps": round(info["fps"], 3),
            "keyframes": keys[:8] + (["..."] if len(keys) > 8 else []), "keyframe_count": len(keys)}


def _decord_readable(records: list[VideoRecord], root: Path, limit: int) -> tuple[list[VideoRecord], list[tuple[str, str]]]:
    """The first ``limit`` records whose video decord reads itself (the floor and naive pipelines call it directly),
    and ``(path, why)`` of those passed over: a width decord cannot decode, keyframes out of display order, no
    timestamps (the readers hand such files to PyAV, where decord would fail or return other frames), or unreadable."""
    from .readers import DecordReader, VideoReadError

    kept: list[VideoRecord] = []
    left_out: list[tuple[str, str]] = []
    for record in records:
        if len(kept) == limit:
            break
        try:
            with DecordReader(path=root / record.path, pyav_fallback=False) as reader:
                reader.get_frames([0, reader.num_frames - 1])
        except VideoReadError as e:
            left_out.append((record.path, str(e).removeprefix(f"{root / record.path}: ")))
            continue
        kept.append(record)
    return kept, left_out


def run_data_benchmark(
    *,
    list_file: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    workers: int = 1,
    num_videos: int = 24,
    num_frames: int = 8,
    batch_size: int = 8,
    input_size: int = 224,
    repeats: int = 3,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    short_side: int = 256,
    gop: int = 16,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the data benchmark on a raw file set and its prepared copy; returns (and writes) the results dict.

    Without ``list_file`` the raw set is ``num_videos`` synthetic 10 s 340x256 H.264 clips with
    x264's default long GOP; with it, the first ``num_videos`` of that list (paths under ``root``).
    The prepared set is the raw set after :func:`prepare_dataset` (``short_side``, ``gop``,
    fastdecode), kept in ``work_dir`` and reused by later runs.
    """
    from .prepare import prepare_dataset, refuse_file_as_folder

    if workers < 0 or num_videos <= 0 or repeats <= 0:
        raise ValueError("need workers >= 0, videos > 0 and repeats > 0")
    work = Path(work_dir) if work_dir else Path(os.environ.get("MERGEKIT_VIDEO_CACHE") or Path.home() / ".cache" / "mergekit_video") / "bench_data"
    refuse_file_as_folder(work, "work_dir")
    work.mkdir(parents=True, exist_ok=True)
    if list_file is None:
        raw_records, raw_root = _raw_synthetic_set(work, num_videos, log)
        raw_desc = "synthetic 10 s 340x256 30 fps H.264 clips, x264 default preset and GOP (keyframe every 250 frames)"
    else:
        list_file = Path(list_file)
        raw_root = Path(root) if root else list_file.parent
        raw_records, left_out = _decord_readable(read_annotation_list(list_file), raw_root, num_videos)
        for path, why in left_out:
            log(f"left out {path}: {why}")
        if not raw_records:
            raise ValueError(f"none of the videos of {list_file} is read by decord itself, which the decode floor and the naive "
                             "pipeline time; `mergevid data prepare` writes files it reads")
        raw_desc = f"first {len(raw_records)} videos of {list_file} that decord reads itself" + (
            f" ({len(left_out)} left out: the readers hand them to PyAV)" if left_out else "")
    subset_list = work / "raw_subset.txt"
    write_annotation_list(subset_list, raw_records)
    log(f"preparing the same files (short side {short_side}, keyframe every {gop}, fastdecode) ...")
    prep = prepare_dataset(list_file=subset_list, root=raw_root, out_dir=work / "prepared", short_side=short_side, gop=gop,
                           fastdecode=True, workers=max(1, workers), progress=False)
    if prep.failed:
        first = prep.failures[0]
        raise ValueError(f"{prep.failed} video{'s' * (prep.failed != 1)} failed to prepare (first: {first['path']}: {first['error']}); "
                         f"all are listed in {prep.report_path}")
    prep_records = read_annotation_list(prep.list_file)
    sets = {
        "raw": (raw_records, raw_root, raw_desc),
        "prepared": (prep_records, prep.out_dir, f"the raw set after `mergevid data prepare --short-side {short_side} --gop {gop} --fastdecode`"),
    }
    results: dict[str, Any] = {
        "benchmark": "data",
        "command": " ".join(["mergevid", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mergevid" else None,
        "machine": machine_info(),
        "config": {"workers": workers, "videos": len(raw_records), "num_frames": num_frames, "batch_size": batch_size,
                   "input_size": input_size, "repeats": repeats, "seed": seed, "decord_threads": 1,
                   "pipelines": ["floor_train", "ours_train", "ours_train_float", "naive_train", "floor_test", "ours_test", "ours_test_float", "naive_test"]},
        "watchdog_overhead_us_per_read": watchdog_overhead_us(),
        "file_sets": {},
    }
    for name, (records, root_dir, desc) in sets.items():
        log(f"measuring {name}: {desc}")
        pipes = _pipelines(records, root_dir, num_frames=num_frames, input_size=input_size, seed=seed)
        load_before = _loadavg()
        wall, cpu = _measure_set(pipes, num_videos=len(records), workers=workers, batch_size=batch_size, repeats=repeats, log=log)
        entry = {"description": desc, "encoding": _keyframe_summary([root_dir / records[0].path]),
                 "load_average_before_after": [load_before, _loadavg()]}
        if all(len(v) == len(wall[k]) for k, v in cpu.items()):
            entry.update(_summarise(cpu, workers))
            entry["basis"] = "clips per CPU second (workers + main process), robust to other load on the machine"
            entry["wall_clock"] = _summarise(wall, workers)
        else:
            entry.update(_summarise(wall, workers))
            entry["basis"] = "clips per wall-clock second"
        results["file_sets"][name] = entry
    raw, prepd = results["file_sets"]["raw"], results["file_sets"]["prepared"]
    speed = {k: round(prepd["clips_per_s"][f"ours_{k}"] / raw["clips_per_s"][f"naive_{k}"], 3) for k in ("train", "test")}
    prepd["prepared_speedup_vs_naive_raw"] = speed["train"]
    prepd["prepared_speedup_vs_naive_raw_by_pipeline"] = speed
    results["prepared_speedup_vs_naive_raw"] = speed["train"]
    if "wall_clock" in raw and "wall_clock" in prepd:
        results["prepared_speedup_vs_naive_raw_wall_clock"] = round(prepd["wall_clock"]["clips_per_s"]["ours_train"]
                                                                    / raw["wall_clock"]["clips_per_s"]["naive_train"], 3)
    results["goals"] = {
        "fraction_of_decode_floor>=0.9": {k: v["fraction_of_decode_floor"] >= GOALS["fraction_of_decode_floor"] for k, v in results["file_sets"].items()},
        "prepared_speedup_vs_naive_raw>=2.5": speed["train"] >= GOALS["prepared_speedup_vs_naive_raw"],
    }
    if output is not None:
        atomic_write_json(output, results, overwrite=overwrite)
    return results


def format_table(results: dict) -> str:
    """A plain-text table of clips/s per pipeline and file set, with the goal ratios."""
    sets = results["file_sets"]
    names = list(next(iter(sets.values()))["clips_per_s"])
    lines = [f"basis: {next(iter(sets.values()))['basis']}",
             f"{'pipeline':18s}" + "".join(f"{s + ' clips/s':>18s}{'ms/clip':>10s}" for s in sets)]
    for n in names:
        lines.append(f"{n:18s}" + "".join(f"{sets[s]['clips_per_s'][n]:18.2f}{sets[s]['ms_per_clip'][n]:10.1f}" for s in sets))
    for s, v in sets.items():
        fr = ", ".join(f"{k} {x:.3f}" for k, x in v["fraction_of_decode_floor_by_pipeline"].items())
        met = "met" if v["fraction_of_decode_floor"] >= GOALS["fraction_of_decode_floor"] else "NOT met"
        lines.append(f"{s}: fraction_of_decode_floor {v['fraction_of_decode_floor']:.3f} (goal >= {GOALS['fraction_of_decode_floor']}: {met}; "
                     f"{fr}); speedup vs naive train {v['speedup_vs_naive']['train']:.2f}x")
    speed = results["prepared_speedup_vs_naive_raw"]
    met = "met" if speed >= GOALS["prepared_speedup_vs_naive_raw"] else "NOT met"
    lines.append(f"prepared_speedup_vs_naive_raw {speed:.2f}x (goal >= {GOALS['prepared_speedup_vs_naive_raw']}: {met})")
    lines.append(f"watchdog overhead {results['watchdog_overhead_us_per_read']:.1f} us per read")
    return "\n".join(lines)
