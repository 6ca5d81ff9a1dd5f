"""Device selection shared by runners and benchmarks, and a region with autocast off."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def select_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else CPU; explicit specs are checked."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} was requested but CUDA is not available (set device=auto or cpu)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={spec!r} was requested but MPS (Apple GPUs) is not available (set device=auto or cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A region where ops run in their inputs' dtype even inside ``torch.autocast`` (fp32 math in a bf16 step)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
