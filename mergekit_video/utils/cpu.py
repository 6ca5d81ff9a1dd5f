"""CPU process tuning for training steps, and the CPU's name for benchmark reports (:func:`cpu_model_name`).

glibc hands multi-megabyte buffers back to the kernel when they are freed (through ``munmap``
or by trimming the heap top), so every training step page-faults its activations and
gradients in again. On small VMs a page fault costs microseconds and a fresh 4 MB buffer costs
about a millisecond, more than the arithmetic it holds. PyTorch's CPU tuning guide fixes
this by preloading jemalloc or tcmalloc; with plain glibc the same effect comes from two
``mallopt`` settings: a fixed mmap threshold (buffers up to 32 MB come from the heap and are
reused) and a trim threshold high enough that freed heap memory stays with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Environment switch: ``MERGEKIT_VIDEO_MALLOC_TUNING=0`` leaves the allocator alone.
ENV_SWITCH = "MERGEKIT_VIDEO_MALLOC_TUNING"

_tuned = False


def tune_cpu_allocator(*, mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed tensor buffers in the process (glibc ``mallopt``); True when applied.

    A no-op (False) off Linux/glibc, when jemalloc or tcmalloc is preloaded, or when the
    environment sets ``MERGEKIT_VIDEO_MALLOC_TUNING=0``. Applied once per process.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # the order matters: setting the trim threshold alone would also freeze the mmap threshold
    # at its 128 KB default and send every tensor buffer through mmap
    ok = mallopt(M_MMAP_THRESHOLD, min(int(mmap_threshold), MAX_MMAP_THRESHOLD)) == 1
    ok = ok and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _tuned = ok
    if ok:
        log.debug("glibc malloc tuned: mmap threshold %d, trim threshold %d", mmap_threshold, trim_threshold)
    return ok


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name" on Linux), else the platform's processor or machine."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
