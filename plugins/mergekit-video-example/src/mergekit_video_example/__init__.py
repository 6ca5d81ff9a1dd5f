"""Example mergekit_video plugin: a ``cyclic`` router and a ``median`` merge strategy.

Importing this module registers both parts. mergekit_video imports it automatically
when the package is installed (entry-point group ``mergekit_video.plugins``, see
``pyproject.toml``), or when a recipe lists it under ``plugins:``.

    ROUTERS.build("cyclic", num_experts=4)
    MERGES.get("median")(tensors)
    add_experts(model, "blocks.*.mlp", 4, router="cyclic", merge="median")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_video.registry import MERGES, ROUTERS
from mergekit_video.routers import Router, RouterOutput, num_groups

__all__ = ["CyclicRouter", "median"]


@ROUTERS.register("cyclic")
class CyclicRouter(Router):
    """Round-robin routing: decision t goes to expert (offset + t) mod N; every expert gets an equal share.

    Deterministic counterpart of ``random`` routing: over any N consecutive decisions
    each expert is chosen exactly once, so the experts receive the same number of
    updates with no routing variance. At ``sample`` / ``token`` granularity the
    decisions of one forward are consecutive (sample b of a batch starting at step t
    goes to (offset + t + b) mod N).

    The step counter is the router's extra state: it is saved in the container's state
    dict (``router._extra_state``), so a resumed run continues the cycle, and
    :func:`mergekit_video.experts.checkpoint_routed` replays it, so a checkpointed forward
    recomputes with the experts it used (keep routing state there, not in other attributes).

    Args:
        num_experts: N.
        offset: expert of the first decision.
        granularity: ``batch`` (default), ``sample`` or ``token``.
    """

    stochastic = False

    def __init__(self, *, num_experts: int, offset: int = 0, **kw: Any) -> None:
        super().__init__(num_experts=num_experts, **kw)
        self.offset = int(offset) % self.num_experts
        self.step = 0  # decisions taken so far (python int: no device sync)

    def route(self, x: torch.Tensor) -> RouterOutput:
        g = num_groups(x, self.granularity)
        idx = (self.offset + self.step + torch.arange(g)) % self.num_experts  # [G] on CPU
        self.step += g
        return self._single_choice(idx, x.device)

    def get_extra_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", offset={self.offset}, step={self.step}"


@MERGES.register("median")
def median(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise median θ[j] = median_i θ_i[j], robust to outlier experts (Yin et al. 2018).

    For an even N the two middle values are averaged. The median commutes with a
    shift, so base + median(θ_i − base) = median(θ_i) and ``base`` is not needed
    (it is accepted so the strategy drops in wherever task-arithmetic merges are used).
    Computed in float32 (at least) and cast back to the input dtype.
    """
    if len(tensors) == 0:
        raise ValueError("median merge needs at least one tensor")
    shape = tensors[0].shape
    for i, t in enumerate(tensors[1:], 1):
        if t.shape != shape:
            raise ValueError(f"cannot merge tensors of different shapes: #0 {tuple(shape)} vs #{i} {tuple(t.shape)}")
    acc = torch.promote_types(tensors[0].dtype, torch.float32)
    stacked = torch.stack([t.to(acc) for t in tensors]).sort(dim=0).values  # [N, ...]
    n = len(tensors)
    mid = stacked[(n - 1) // 2] if n % 2 else 0.5 * (stacked[n // 2 - 1] + stacked[n // 2])
    return mid.to(tensors[0].dtype)
