"""Time limit on blocking reads: run a call on a helper thread and stop waiting after ``timeout_s``.

decord is known to hang on some broken files. Its C calls go through ctypes, which releases the
GIL, so a waiting Python thread keeps running while the helper thread is stuck: after the time
limit the caller gets :class:`ReadTimeoutError` and carries on with a fresh helper thread. The
stuck thread is a daemon, abandoned (it cannot be killed), so it never blocks process exit; it
ends by itself if its read ever returns. Only reads still stuck count towards
``MAX_ABANDONED_THREADS``: slow reads that finish late cost nothing lasting.
The hand-off costs tens of microseconds per call (measured by ``mergevid bench data``).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_ABANDONED_THREADS = 16  # past this many reads stuck at once, a process is too damaged to carry on


class ReadTimeoutError(TimeoutError):
    """A read did not finish within its time limit; ``path`` names the file."""

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


def run_with_timeout(fn: Callable[[], T], timeout_s: float | None, *, what: str = "read") -> T:
    """Return ``fn()``, or raise :class:`ReadTimeoutError` if it runs past ``timeout_s`` seconds.

    ``timeout_s=None`` (or <= 0) calls ``fn`` directly, with no thread. Exceptions raised by ``fn``
    propagate unchanged. ``what`` (usually the file path) is named in the timeout message.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn()
    helper = _helper()
    box: list[tuple[bool, Any]] = []
    done = threading.Event()
    helper.jobs.put((fn, box, done))
    if not done.wait(timeout_s):
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
