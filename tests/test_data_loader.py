"""VideoSampler (order, DDP shards, resume) and collate_videos."""

from __future__ import annotations

import glob
import os
import tempfile
import time

import pytest
import torch

from mergekit_video.data import VideoSampler, collate_videos
from mergekit_video.data.failures import report_skipped


def keys(s: VideoSampler) -> list[int]:
    out = list(s)
    assert all(e == s.epoch for _, e in out)
    return [i for i, _ in out]


def test_order_depends_only_on_seed_and_epoch():
    a = VideoSampler(length=50, shuffle=True, seed=3)
    b = VideoSampler(length=50, shuffle=True, seed=3)
    assert keys(a) == keys(b) and sorted(keys(a)) == list(range(50)) and keys(a) != list(range(50))
    a.set_epoch(1)
    assert keys(a) != keys(b)
    b.set_epoch(1)
    assert keys(a) == keys(b)
    assert keys(VideoSampler(length=5, shuffle=False, seed=0)) == [0, 1, 2, 3, 4]


def test_ddp_shards_are_disjoint_and_padded_like_distributed_sampler():
    shards = [VideoSampler(length=10, shuffle=True, seed=1, num_replicas=3, rank=r) for r in range(3)]
    got = [keys(s) for s in shards]
    assert all(len(g) == 4 for g in got) and all(len(s) == 4 for s in shards)  # ceil(10 / 3)
    flat = sorted(i for g in got for i in g)
    assert set(flat) == set(range(10)) and len(flat) == 12  # two videos repeated to pad
    # every rank sees the same permutation, sliced rank::3
    assert [got[r][k] for k in range(4) for r in range(3)][:10] == VideoSampler(length=10, shuffle=True, seed=1).order()
    dropped = [keys(VideoSampler(length=10, shuffle=True, seed=1, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert all(len(g) == 3 for g in dropped) and len({i for g in dropped for i in g}) == 9
    with pytest.raises(ValueError):
        VideoSampler(length=10, shuffle=False, seed=0, num_replicas=2, rank=2)


def test_set_start_skips_without_changing_the_order():
    s = VideoSampler(length=20, shuffle=True, seed=0, num_replicas=2, rank=1)
    s.set_epoch(4)
    full = keys(s)
    s.set_start(6)
    assert keys(s) == full[6:] and len(s) == 4
    s.set_epoch(4)  # same epoch: still resuming
    assert len(s) == 4
    s.set_epoch(5)  # next epoch starts from the top
    assert len(s) == 10
    with pytest.raises(ValueError):
        s.set_start(11)


def test_collate_stacks_and_reports_skipped_items():
    items = [{"frames": torch.full((2, 3, 4, 4), float(i)), "label": i, "index": 10 + i} for i in range(3)]
    report_skipped("/data/bad.mp4", index=7)
    batch = collate_videos([items[0], None, items[1], items[2]])
    assert batch["frames"].shape == (3, 2, 3, 4, 4) and batch["frames"][2, 0, 0, 0, 0] == 2.0
    assert batch["label"].tolist() == [0, 1, 2] and batch["index"].tolist() == [10, 11, 12]
    assert batch["failed"] == ["/data/bad.mp4"] and batch["failed_index"] == [7] and batch["label"].dtype == torch.long
    assert collate_videos(items)["failed"] == []  # the report was consumed
    with pytest.raises(ValueError, match="cannot batch"):
        collate_videos([items[0], {"frames": torch.zeros(3, 3, 4, 4), "label": 0, "index": 0}])


def test_collate_keeps_channels_last_uint8_batches_exact():
    frames = [torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8).permute(0, 3, 1, 2) for _ in range(3)]
    batch = collate_videos([{"frames": f, "label": 0, "index": i} for i, f in enumerate(frames)])["frames"]
    assert batch.shape == (3, 2, 3, 5, 6) and torch.equal(batch, torch.stack(frames))


_ERROR_MID_EPOCH = """
import sys, torch
from mergekit_video.data.loader import build_loader

class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        raise RuntimeError(f"unreadable item {i}")

loader = build_loader(Broken(), batch_size=2, num_workers=1, shuffle=False, seed=0, drop_last=False)
try:
    for _ in loader:
        pass
except RuntimeError as err:
    kept = err  # its traceback keeps the loader's iterator, hence the worker, alive until exit
sys.exit(3)
"""


def test_an_error_mid_epoch_does_not_hang_the_exit_on_workers_that_ignore_sigterm():
    import subprocess
    import sys

    # workers ignore SIGTERM (the trainer decides how to stop); multiprocessing's exit handler
    # would terminate-and-join them forever if the loader did not kill leftovers itself
    proc = subprocess.run([sys.executable, "-c", _ERROR_MID_EPOCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Exception ignored" not in proc.stderr


class _WorkerRandom(torch.utils.data.Dataset):
    """Items drawn from the worker's global RNGs (what user code in a dataset would use)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, key: object) -> dict:  # the VideoSampler yields (index, ...) keys
        import random

        import numpy as np

        draws = [torch.randint(10**9, ()).item(), random.randrange(10**9), int(np.random.randint(10**9))]
        return {"frames": torch.tensor(draws), "label": 0, "index": 0}  # the draws ride in "frames"


def test_workers_of_different_ranks_draw_different_streams_and_each_rank_repeats_itself():
    from mergekit_video.data.loader import build_loader

    def draws(rank: int) -> torch.Tensor:
        loader = build_loader(_WorkerRandom(), batch_size=2, num_workers=1, shuffle=False, seed=7, drop_last=False, num_replicas=2, rank=rank, persistent_workers=False, pin_memory=False)
        return torch.cat([b["frames"] for b in loader])

    r0, r1 = draws(0), draws(1)
    assert torch.equal(r0, draws(0))  # reproducible from the seed
    assert not torch.isin(r0, r1).any()  # no shared draw between ranks: torch, random and NumPy streams all differ



def _bad_then_good(tmp_path):
    from data_helpers import write_level_video

    from mergekit_video.data import VideoDataset

    data = write_level_video(tmp_path / "good.mp4", 12).read_bytes()
    (tmp_path / "bad.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "list.txt").write_text("bad.mp4 0\ngood.mp4 0\n")
    return VideoDataset(list_file=tmp_path / "list.txt", root=tmp_path, num_frames=4, train=False, input_size=16)  # on_error: raise


def test_an_orphaned_loader_freed_by_the_garbage_collector_stops_its_workers_at_once(tmp_path):
    """An error mid-epoch leaves the iterator in a reference cycle; when the cyclic GC frees it, the
    queues' finalizers stop their feeder threads before torch sends the workers their ``None``, and
    SIGTERM is ignored: the workers must leave on the loader's shutdown flag instead (was 10 s each)."""
    import gc

    from torch.utils.data import DataLoader
    from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

    from mergekit_video.data import build_loader

    ds = _bad_then_good(tmp_path)
    workers = []
    pymp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*")))

    def evaluate() -> None:
        loader = build_loader(ds, batch_size=1, num_workers=2, shuffle=False, seed=0, drop_last=False)
        it = DataLoader.__iter__(loader)  # torch's own iterator: the error leaves it to the GC
        workers.extend(it._workers)
        with pytest.raises(Exception, match="bad.mp4"):
            for _ in it:
                pass

    gc.disable()  # the collection happens below, not at a random allocation
    try:
        evaluate()
        assert [w.is_alive() for w in workers] == [True, True]  # kept by the cycle
        t0 = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - t0
    finally:
        gc.enable()
    assert [w.is_alive() for w in workers] == [False, False] and [w.exitcode for w in workers] == [0, 0]
    assert took < MP_STATUS_CHECK_INTERVAL  # no join ran into torch's 5 s timeout (was 20 s here)
    # a worker that leaves this way removes the pymp-* folder it made (multiprocessing's exit handler does not run)
    from multiprocessing import process

    ours = process.current_process()._config.get("tempdir")
    assert sorted(set(glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*"))) - pymp_before - {ours}) == []


def test_an_error_escaping_the_loader_stops_its_workers_before_any_garbage_collection(tmp_path):
    import gc

    from mergekit_video.data import build_loader

    loader = build_loader(_bad_then_good(tmp_path), batch_size=1, num_workers=2, shuffle=False, seed=0, drop_last=False)
    gc.disable()
    try:
        for attempt in range(2):  # persistent workers: the next iteration starts new ones
            it = iter(loader)
            workers = list(it._workers)
            with pytest.raises(Exception, match="bad.mp4") as info:
                for _ in it:
                    pass
            assert type(info.value).__name__ == "VideoReadError"
            assert [w.exitcode for w in workers] == [0, 0] and loader._iterator is None
            if attempt == 0:
                first = {w.pid for w in workers}
        assert first.isdisjoint(w.pid for w in workers)
    finally:
        gc.enable()


_QUICK_START_EXIT = """
import torch
from mergekit_video.data import build_loader

class Clips(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, key):
        return {"frames": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "label": 0, "index": int(key[0])}

loader = build_loader(Clips(), batch_size=4, num_workers=2, shuffle=True, seed=0, drop_last=True)
for batch in loader:  # a tensor from a worker passes by file descriptor: the worker makes a pymp-* folder
    break
print("done")
"""


def test_the_quick_start_loop_leaves_no_pymp_folders_at_interpreter_exit():
    """docs/data.md's loop with persistent workers, then exit: the workers must leave through their own
    cleanup (they were killed, leaving one pymp-*/listener-* per worker) and the exit must not hang."""
    import subprocess
    import sys

    import shutil
    from pathlib import Path

    # a short folder: the workers' sockets live in TMPDIR/pymp-*/listener-*, and AF_UNIX paths stop at 107
    # bytes (a deep --basetemp would make the workers fail to start, not this test's subject)
    short = Path(tempfile.mkdtemp(prefix="mvpm", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        env = dict(os.environ, TMPDIR=str(short))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _QUICK_START_EXIT], capture_output=True, text=True, timeout=120, env=env)
        took = time.perf_counter() - t0
        assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr
        assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert sorted(p.name for p in short.glob("pymp-*")) == []
        assert took < 60
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_a_ctrl_c_while_the_workers_start_is_held_and_delivered_not_swallowed():
    """A KeyboardInterrupt raised inside a hook Python runs for its side effects (logging's after-fork hook,
    simulated by a __del__) is printed as 'Exception ignored' and lost; held while the loader starts, it is raised after."""
    import os
    import signal

    from mergekit_video.data.loader import iterate_with_workers_started

    class Hook:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the Python handler runs here, inside __del__
                pass

    class Loader:
        started = 0

        def __iter__(self):
            Loader.started += 1
            Hook()  # collected at once: its __del__ runs now
            return iter([1, 2])

    with pytest.raises(KeyboardInterrupt):
        iterate_with_workers_started(Loader())
    assert Loader.started == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored signal stays ignored
    try:
        assert list(iterate_with_workers_started(Loader())) == [1, 2]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(iterate_with_workers_started([3])) == [3]  # no signal: the loader's own iterator
