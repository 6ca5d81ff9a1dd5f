"""Batches: a resumable, DDP-sharding sampler, the collate function and ``build_loader``."""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from .failures import take_skipped


class VideoSampler(Sampler):
    """Yields ``(index, epoch)`` keys; the order depends only on ``(seed, epoch)``.

    Like ``DistributedSampler``: every rank computes the same permutation and takes the disjoint
    slice ``rank::num_replicas``; without ``drop_last`` the permutation is padded by wrapping round
    so all ranks get ``ceil(N / R)`` items (an evaluator can drop repeats by ``"index"``); with it
    the tail is dropped. ``set_start(k)`` resumes mid-epoch by skipping this rank's first ``k``
    keys without decoding them; it holds until ``set_epoch`` moves to another epoch.
    """

    def __init__(self, *, length: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = False) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.length, self.shuffle, self.seed = length, shuffle, int(seed)
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        if drop_last:
            self.num_samples = length // num_replicas
        else:
            self.num_samples = math.ceil(length / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles); moving to a different epoch clears ``set_start``."""
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, sample_offset: int) -> None:
        """Skip this rank's first ``sample_offset`` keys of the current epoch (resume)."""
        if not 0 <= sample_offset <= self.num_samples:
            raise ValueError(f"sample_offset must be in [0, {self.num_samples}], got {sample_offset}")
        self.start = int(sample_offset)

    def order(self) -> list[int]:
        """This rank's full index order for the current epoch (before ``set_start``)."""
        if self.shuffle:
            state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
            g = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
            indices = torch.randperm(self.length, generator=g).tolist()
        else:
            indices = list(range(self.length))
        if self.total_size > len(indices) and indices:
            reps = math.ceil((self.total_size - len(indices)) / len(indices))
            indices += (indices * reps)[: self.total_size - len(indices)]
        indices = indices[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(i, epoch) for i in self.order()[self.start :]])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _memory_order(t: torch.Tensor) -> list[int] | None:
    """Dimension order in which ``t`` is contiguous (e.g. channels-last), or None."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that keeps the items' memory order (channels-last items stack at memcpy speed into a
    channels-last batch); inside a DataLoader worker it writes straight into shared memory."""
    elem = tensors[0]
    shape = tuple(elem.shape)
    for t in tensors[1:]:
        if tuple(t.shape) != shape or t.dtype != elem.dtype:
            raise ValueError(f"cannot batch clips of shapes {shape} and {tuple(t.shape)} (or dtypes {elem.dtype}/{t.dtype})")
    order = _memory_order(elem)
    if order is None or any(t.stride() != elem.stride() for t in tensors[1:]):
        order = list(range(elem.dim()))
    items = [t.permute(order) for t in tensors]
    out = None
    if get_worker_info() is not None:
        storage = elem._typed_storage()._new_shared(len(tensors) * elem.numel(), device=elem.device)
        out = elem.new(storage).resize_(len(tensors), *items[0].shape)
    batch = torch.stack(items, out=out)  # [B, *permuted]
    inverse = [0] + [1 + order.index(d) for d in range(elem.dim())]
    return batch.permute(inverse)


def collate_videos(batch: Sequence[dict | None]) -> dict:
    """Stack dataset items into ``{"frames": [B,...], "label": [B], "index": [B], "failed": [...], "failed_index": [...], "resampled": [...], "errors": {...}}``.

    Float frames come out contiguous; uint8 frames keep the items' channels-last memory order
    (``normalize_frames`` on the GPU returns contiguous float).

    ``None`` items (skipped bad videos) are dropped and their paths listed in ``"failed"``, their
    dataset (list) indices in ``"failed_index"`` (same order, ints): count distinct failed videos
    by index, as a list may name one file on several lines (and DDP padding repeats indices);
    ``"resampled"`` lists bad videos the dataset replaced (carried by the items that replaced
    them); ``"errors"`` maps each bad path met in a DataLoader worker to what went wrong. Only
    this batch's items count: nothing left by a direct ``ds[i]`` call reaches it. An all-failed batch has B = 0 (frames
    ``[0, ...]`` with the item's shape when the dataset reported it): skip it.
    """
    items = [b for b in batch if b is not None]
    skipped = take_skipped(len(batch) - len(items))  # this batch's own None items, in order
    failed = [r.path for r in skipped]
    failed_index = [r.index for r in skipped]
    resampled = [p for it in items for p in it.get("resampled", ())]
    errors = {r.path: r.reason for r in skipped if r.reason is not None}
    for it in items:
        errors.update(it.get("errors", {}))
    if not items:
        like = skipped[-1] if skipped and skipped[-1].shape is not None else None
        frames = torch.empty((0, *like.shape), dtype=like.dtype) if like else torch.empty(0)  # [0, ...item shape]
        return {"frames": frames, "label": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long),
                "failed": failed, "failed_index": failed_index, "resampled": resampled, "errors": errors}
    return {
        "frames": _stack([it["frames"] for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        "failed": failed,
        "failed_index": failed_index,
        "resampled": resampled,
        "errors": errors,
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: distinct, reproducible ``random``/NumPy seeds per worker.

    torch is already seeded per worker by the loader (base seed from its seeded generator + id).
    Dataset items do not depend on these seeds (they use per-item generators); user code might.
    Workers also ignore SIGINT and SIGTERM: Ctrl-C or a scheduler's SIGTERM reaches the whole
    process group, and the main process decides how to stop (the trainer finishes its step and
    saves a checkpoint); torch already ends workers whose parent died, and the main process stops
    the ones still alive when it exits (:func:`_reap_workers_at_exit`). Since ``terminate()`` does
    not stop them, each worker leaves by itself once its loader shuts down (:func:`_exit_on_shutdown`).
    """
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _exit_on_shutdown()
    info = get_worker_info()
    seed = info.seed if info is not None else torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


SHUTDOWN_POLL_S = 0.05  # how often a worker looks at its loader's shutdown flag


def _loader_done_event():
    """The worker's ``done_event`` (set when its loader shuts the workers down), read from torch's
    ``_worker_loop`` frame that called the ``worker_init_fn``; None if not found (other torch)."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_worker_loop" and "done_event" in frame.f_locals:
            return frame.f_locals["done_event"]
        frame = frame.f_back
    return None


def _exit_on_shutdown() -> None:
    """In a DataLoader worker: a daemon thread that ends the process as soon as the loader shuts its workers down.

    torch tells a worker to stop with a ``None`` on its index queue, then joins it for 5 s, then
    ``terminate()`` after that. When the iterator is freed by Python's cyclic garbage collector (an error
    raised mid-epoch leaves it in a reference cycle with the traceback), the collector runs the
    queues' finalizers first: their feeder threads stop before the ``None`` is sent, so the worker
    never hears of the shutdown, and ``terminate()`` (SIGTERM) is ignored (:func:`seed_worker`).
    Each worker then cost 10 s of the collection, wherever it ran (inside a timed read, too). The
    loader's shared ``done_event`` is set before any ``None`` is sent; after it, torch discards the
    worker's output, so ending the process then loses nothing. The flag is read without taking
    its lock (a worker killed meanwhile cannot block the main process's ``set()``).
    """
    import os
    import shutil
    import sys
    import threading
    import time

    from multiprocessing import process

    done = _loader_done_event()
    if done is None:
        return
    flag = getattr(done, "_flag", None)  # multiprocessing.Event's semaphore: its value is 1 once set
    inherited_tempdir = process.current_process()._config.get("tempdir")  # the parent's, if it had one at fork

    def is_set() -> bool:
        try:
            return flag.get_value() > 0
        except (AttributeError, NotImplementedError):  # no sem_getvalue (macOS): the locked read
            return done.is_set()

    def watch() -> None:
        while not is_set():
            time.sleep(SHUTDOWN_POLL_S)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream
                pass
        # os._exit skips multiprocessing's exit handlers: remove the pymp-* folder this worker made
        # (a tensor passed by file descriptor opens a listener socket there), not one it inherited
        tempdir = process.current_process()._config.get("tempdir")
        if tempdir and tempdir != inherited_tempdir:
            shutil.rmtree(tempdir, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=watch, name="mergevid-worker-exit", daemon=True).start()


_reaper_registered = False
WORKER_SEED_RANK_STRIDE = 1_000_003  # a prime: rank r's loader generator starts from seed + r * stride


EXIT_JOIN_TIMEOUT_S = 2.0  # at interpreter exit, how long workers get to leave by themselves before they are killed

# Iterators of :class:`VideoLoader` objects that started worker processes (their ``_workers_done_event``
# lets :func:`_reap_workers_at_exit` stop the workers the graceful way); weak, so nothing is kept alive.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _reap_workers_at_exit() -> None:
    """At interpreter exit: stop the daemonic children still alive (DataLoader workers), never waiting long.

    multiprocessing's own exit handler sends SIGTERM to daemonic children and then joins them;
    workers ignore SIGTERM (see :func:`seed_worker`), so a loader whose iterator was never shut
    down (persistent workers; an error raised mid-epoch keeps it referenced by the traceback)
    would hang the exit. Registered after multiprocessing's handler, this one runs first: it sets
    the shutdown flag of every live :class:`VideoLoader` iterator, so their workers leave through
    their own cleanup (:func:`_exit_on_shutdown` removes the ``pymp-*`` folder each made), waits
    up to :data:`EXIT_JOIN_TIMEOUT_S` in all, and kills the workers still alive after it.
    """
    import multiprocessing
    import signal
    import time

    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the exits as worker failures
    for it in list(_LIVE_ITERATORS):
        done = getattr(it, "_workers_done_event", None)
        if done is None:
            continue
        try:
            done.set()
        except Exception:  # noqa: BLE001 - a half-torn-down iterator: its workers are killed below
            pass
    deadline = time.monotonic() + EXIT_JOIN_TIMEOUT_S
    for p in workers:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in workers:
        if p.is_alive():
            p.kill()
    for p in workers:
        p.join(timeout=5)


def _register_worker_reaper() -> None:
    global _reaper_registered
    if not _reaper_registered:
        import atexit

        atexit.register(_reap_workers_at_exit)
        _reaper_registered = True


class _StopWorkersOnError:
    """Iterator over a multi-worker DataLoader that shuts the workers down as soon as an error escapes it.

    An error raised mid-epoch (a bad video under ``on_error="raise"``) otherwise leaves torch's
    iterator in a reference cycle with the traceback, for the cyclic garbage collector to shut
    down later, at a random allocation anywhere in the program; shut down here, the workers get
    torch's normal stop message while its queues still work. The next ``iter(loader)`` starts
    fresh workers. Attributes are torch's iterator's.
    """

    def __init__(self, loader: DataLoader, it: Iterator) -> None:
        self._loader, self._it = loader, it

    def __iter__(self) -> _StopWorkersOnError:
        return self

    def __next__(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException:
            self._it._shutdown_workers()
            if getattr(self._loader, "_iterator", None) is self._it:
                self._loader._iterator = None  # persistent workers: the next epoch starts new ones
            raise

    def __len__(self) -> int:
        return len(self._it)

    def __getattr__(self, name: str):
        return getattr(self._it, name)


class VideoLoader(DataLoader):
    """The DataLoader :func:`build_loader` returns: a torch ``DataLoader`` whose worker processes stop
    as soon as an error escapes an iteration (:class:`_StopWorkersOnError`)."""

    def __iter__(self):
        it = super().__iter__()
        if not hasattr(it, "_shutdown_workers"):
            return it
        _LIVE_ITERATORS.add(it)  # its workers are stopped the graceful way at interpreter exit
        return _StopWorkersOnError(self, it)


def build_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    num_replicas: int = 1,
    rank: int = 0,
    persistent_workers: bool = True,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` with a :class:`VideoSampler` (``loader.sampler``) and :func:`collate_videos`.

    Workers stop at once when an error escapes an iteration (:class:`VideoLoader`), and whenever
    the loader shuts them down, even from the garbage collector (:func:`_exit_on_shutdown`).

    Call ``loader.sampler.set_epoch(e)`` each epoch (and ``set_start`` to resume). ``pin_memory``
    defaults to on when CUDA is available; workers persist across epochs when ``num_workers > 0``.
    Worker seeds depend on ``seed`` and ``rank``: every worker of every DDP rank is distinct.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = VideoSampler(length=len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs = {}
    if num_workers > 0:
        _register_worker_reaper()
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return VideoLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_videos,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(int(seed) + WORKER_SEED_RANK_STRIDE * int(rank)),  # draws the workers' base seed
        **kwargs,
    )


def iterate_with_workers_started(loader: Any) -> Iterator[Any]:
    """``iter(loader)`` with SIGINT and SIGTERM held while its worker processes start, then delivered.

    A signal whose Python handler runs inside an after-fork hook (logging's, at each worker's fork) has its
    ``KeyboardInterrupt`` printed as "Exception ignored" and dropped: a Ctrl-C at that moment was lost and
    the evaluation ran on to the end. Held here, it is raised again (with the handlers of before) once
    ``iter`` returned, the workers shut down first.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if any(handler is None for handler in previous.values()):  # installed outside Python: not ours to swap
        return iter(loader)
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        iterator = iter(loader)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        try:
            signal.raise_signal(held[0])  # the handler of before decides: KeyboardInterrupt, the default action, nothing
        except BaseException:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            raise
    return iterator
