"""Time limit on blocking reads: run a call on a helper thread and stop waiting after ``timeout_s``.

decord is known to hang on some broken files. Its C calls go through ctypes, which releases the
GIL, so a waiting Python thread keeps running while the helper thread is stuck: after the time
limit the caller gets :class:`ReadTimeoutError` and carries on with a fresh helper thread. The
stuck thread is a daemon, abandoned (it cannot be killed), so it never blocks process exit; it
ends by itself if its read ever returns. Only reads still stuck count towards
``MAX_ABANDONED_THREADS``: slow reads that finish late cost nothing lasting.
The hand-off costs tens of microseconds per call (measured by ``mergevid bench data``).

The time limit counts the read's own time, not pauses of the whole process: time spent in
Python's garbage collector during the wait (in any thread, e.g. a collection that frees a
DataLoader iterator and joins its workers) is not counted (up to ``MAX_EXCUSED_PAUSE_S``), and a
result that is there when the wait ends is returned, so such a stall is never reported as a hung
decoder.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_ABANDONED_THREADS = 16  # past this many reads stuck at once, a process is too damaged to carry on

#: The time limit of one read, in seconds, unless set (``VideoDataset(read_timeout_s=...)``, ``mergevid data prepare --read-timeout``).
DEFAULT_READ_TIMEOUT_S = 60.0


MAX_EXCUSED_PAUSE_S = 300.0  # garbage-collector time not counted against one read, at most


class _GcClock:
    """Seconds this process has spent in the cyclic garbage collector (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.started: float | None = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.monotonic()
        elif self.started is not None:
            self.total += time.monotonic() - self.started
            self.started = None

    def seconds(self) -> float:
        """Total GC time so far, a collection still running included."""
        started = self.started
        return self.total + (time.monotonic() - started if started is not None else 0.0)


_gc_clock: _GcClock | None = None


def _gc_seconds() -> float:
    global _gc_clock
    if _gc_clock is None:
        _gc_clock = _GcClock()
    return _gc_clock.seconds()


class ReadTimeoutError(TimeoutError):
    """A read did not finish within its time limit; ``path`` names the file (optional, so the error
    is rebuilt as itself from its message alone: pickling, a DataLoader worker's error re-raised)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class _Helper:
    """One daemon thread that runs submitted calls in order."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="mergevid-read", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append((False, e))
            done.set()


_state = threading.local()
_abandoned: list[_Helper] = []  # helpers left behind a timed-out read, in this process
_pid = os.getpid()


def _helper() -> _Helper:
    # One helper per (process, calling thread); a forked DataLoader worker starts its own.
    global _pid
    if os.getpid() != _pid:
        _pid = os.getpid()
        _abandoned.clear()
        _state.__dict__.clear()
    h = getattr(_state, "helper", None)
    if h is None or not h.thread.is_alive() or getattr(_state, "pid", None) != _pid:
        h = _Helper()
        _state.helper, _state.pid = h, _pid
    return h


def _remaining(timeout_s: float, start: float, gc0: float) -> float:
    """Seconds left of a read's limit: wall time since ``start`` minus GC pauses since then (capped)."""
    paused = min(_gc_seconds() - gc0, MAX_EXCUSED_PAUSE_S)
    return timeout_s - (time.monotonic() - start - paused)


def run_with_timeout(fn: Callable[[], T], timeout_s: float | None, *, what: str = "read") -> T:
    """Return ``fn()``, or raise :class:`ReadTimeoutError` if it runs past ``timeout_s`` seconds.

    ``timeout_s=None`` (or <= 0) calls ``fn`` directly, with no thread. Exceptions raised by ``fn``
    propagate unchanged. ``what`` (usually the file path) is named in the timeout message.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn()
    gc0, start = _gc_seconds(), time.monotonic()
    helper = _helper()
    box: list[tuple[bool, Any]] = []
    done = threading.Event()
    helper.jobs.put((fn, box, done))
    while not done.wait(_remaining(timeout_s, start, gc0)):
        if _remaining(timeout_s, start, gc0) > 0:
            continue  # the garbage collector ran meanwhile: that time is not the read's
        if done.is_set():  # finished while this thread was held up after the wait
            break
        # Abandon the stuck thread (it exits once its read returns); the next call gets a fresh one.
        _state.helper = None
        helper.jobs.put(None)
        _abandoned[:] = [h for h in _abandoned if h.thread.is_alive()]
        _abandoned.append(helper)
        stuck = len(_abandoned)
        msg = f"{what}: no result after {timeout_s:g} s (decoder hung); {stuck} read(s) stuck in this process"
        if stuck > MAX_ABANDONED_THREADS:
            raise RuntimeError(msg + f"; more than {MAX_ABANDONED_THREADS}, giving up")
        raise ReadTimeoutError(msg, path=what)
    ok, value = box[0]
    if ok:
        return value
    raise value
