"""Learning-rate schedules, stepped once per optimizer iteration.

The paper trains with a cosine schedule after a linear warm-up (MoTE §4.1: 5 warm-up epochs);
recipes give epochs, the runner converts them to iterations (``epochs * steps_per_epoch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["CosineWithWarmup", "cosine_with_warmup", "schedule_differences"]


class CosineWithWarmup:
    """The lr multiplier of :func:`cosine_with_warmup` as a picklable callable.

    ``LambdaLR.state_dict`` stores a callable object's ``__dict__``, so the schedule's
    parameters travel with the scheduler state.
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up then half-period cosine decay, as a ``LambdaLR`` stepped every iteration.

    The multiplier of each group's base lr at iteration ``s`` (0-based, the value used by the
    ``s``-th optimizer step) is

    - ``(s + 1) / (warmup_steps + 1)`` for ``s < warmup_steps`` (from ~0, never exactly 0);
    - ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``p = (s - warmup_steps) / (total_steps -
      warmup_steps)`` clipped to 1 and ``r = min_lr_ratio`` afterwards: 1 at the end of warm-up,
      ``(1 + r) / 2`` half way, ``r`` at ``total_steps`` and beyond.
    """
    return LambdaLR(optimizer, CosineWithWarmup(warmup_steps=warmup_steps, total_steps=total_steps,
                                                min_lr_ratio=min_lr_ratio))


#: What each parameter of a :class:`CosineWithWarmup` is called in a message, and the recipe keys behind it.
_SCHEDULE_PARAMS = {
    "total_steps": "length (schedule.epochs x steps per epoch, capped by train.max_steps)",
    "warmup_steps": "warm-up (schedule.warmup_epochs)",
    "min_lr_ratio": "final lr ratio (schedule.min_lr_ratio)",
}


def schedule_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How a scheduler state saved in a checkpoint differs from the one built now, in words.

    ``LambdaLR.load_state_dict`` takes the saved lr multipliers (their ``total_steps``, ...) and
    base lrs over the new ones, so a resume with a changed schedule silently follows the old one
    (an lr of 0 once its length is past). Compares each group's :class:`CosineWithWarmup`
    parameters and base lr; an empty list means the same schedule.
    """
    problems = []
    old_fns, new_fns = saved.get("lr_lambdas") or [], current.get("lr_lambdas") or []
    for old, new in zip(old_fns[:1], new_fns[:1]):  # every group shares one schedule
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            for key, what in _SCHEDULE_PARAMS.items():
                if key in old and key in new and old[key] != new[key]:
                    unit = " steps" if key.endswith("steps") else ""
                    problems.append(f"{what}: {old[key]}{unit} in the checkpoint, {new[key]}{unit} now")
    old_lrs, new_lrs = list(saved.get("base_lrs") or []), list(current.get("base_lrs") or [])
    if old_lrs and new_lrs and (len(old_lrs) != len(new_lrs) or any(not math.isclose(a, b, rel_tol=1e-12) for a, b in zip(old_lrs, new_lrs))):
        problems.append(f"base lr per parameter group (optimizer.lr, optimizer.clip_lr): {old_lrs} in the checkpoint, {new_lrs} now")
    return problems
