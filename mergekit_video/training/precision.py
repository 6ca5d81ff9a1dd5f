"""Mixed precision: bf16 autocast on CUDA (or fp16 with a GradScaler), fp32 on the CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast_context", "make_grad_scaler", "resolve_precision"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """Concrete precision (``bf16``/``fp16``/``fp32``) for ``device``.

    ``auto`` is bf16 on a CUDA device that supports it and fp32 otherwise. ``fp16`` needs CUDA;
    ``bf16`` on the CPU is allowed when asked for explicitly.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = _device(device)
    if precision == "auto":
        return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, got {dev}; use 'fp32' or 'bf16'")
    return precision


def autocast_context(device: torch.device | str, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32 (see :func:`resolve_precision`)."""
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(device).type, dtype=_DTYPES[resolved])


def make_grad_scaler(device: torch.device | str, precision: str = "auto") -> torch.amp.GradScaler | None:
    """A ``GradScaler`` when the resolved precision is fp16 (loss scaling), else ``None``."""
    if resolve_precision(device, precision) != "fp16":
        return None
    return torch.amp.GradScaler(_device(device).type)
