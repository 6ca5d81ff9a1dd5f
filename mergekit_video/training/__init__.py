"""Training infrastructure: checkpoints, RNG state, schedules, optimizers, DDP, metrics, precision.

Importing this package is light; the names below are imported from their modules on first use
(``from mergekit_video.training import CheckpointManager``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_LAZY = {
    "CheckpointManager": "checkpoint",
    "CheckpointState": "checkpoint",
    "capture_rng_state": "rng",
    "restore_rng_state": "rng",
    "seed_everything": "rng",
    "cosine_with_warmup": "schedule",
    "build_param_groups": "optim",
    "build_optimizer": "optim",
    "DistInfo": "distributed",
    "init_distributed": "distributed",
    "is_main_process": "distributed",
    "barrier": "distributed",
    "all_reduce_mean": "distributed",
    "broadcast_object": "distributed",
    "cleanup": "distributed",
    "MetricsLogger": "metrics",
    "TrainProgress": "metrics",
    "summary_table": "metrics",
    "print_summary": "metrics",
    "autocast_context": "precision",
    "make_grad_scaler": "precision",
    "resolve_precision": "precision",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import CheckpointManager, CheckpointState
    from .distributed import (
        DistInfo,
        all_reduce_mean,
        barrier,
        broadcast_object,
        cleanup,
        init_distributed,
        is_main_process,
    )
    from .metrics import MetricsLogger, TrainProgress, print_summary, summary_table
    from .optim import build_optimizer, build_param_groups
    from .precision import autocast_context, make_grad_scaler, resolve_precision
    from .rng import capture_rng_state, restore_rng_state, seed_everything
    from .schedule import cosine_with_warmup


__getattr__, __dir__ = lazy_exports(__name__, {k: f".{m}" for k, m in _LAZY.items()}, globals())
