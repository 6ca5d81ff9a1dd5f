"""Regularizers for expert training.

- ``weight_merging``: MoTE's Weight Merging Regularization (Eq. 7–8). Each container
  is merged with softmax(i/τ) weights, τ drawn independently per container, and the
  forward runs with those merged weights; the caller applies its task loss to that output.
- ``feature_mse``: MoTE Eq. 9, the mean squared error between two feature tensors (mean over elements).
- ``load_balance``: the routers' auxiliary losses (Switch load balancing and z-loss) for ``topk``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .experts import collect_aux_losses, find_containers, routing_plan
from .merging import temperature_softmax_coefficients
from .registry import REGULARIZERS
from .routers import default_generator

TAU_SAMPLING = ("discrete", "point", "normal", "uniform")


@REGULARIZERS.register("weight_merging")
class WeightMergingRegularizer:
    """Weight Merging Regularization, WMR (MoTE Eq. 7–8).

    For every container, τ is drawn independently and the experts are merged as
    φ = Σ softmax(i/τ)ᵢ θᵢ (Eq. 7); the model then runs with φ (Eq. 8).

    Args:
        beta: β of the candidate set {±2ⁿ·β : n = 0..num_powers−1} ∪ {∞} (default 0.6).
        num_powers: how many powers of two (5 in the paper: n = 0..4).
        sampling: ``discrete`` (the paper), ``point`` (τ = ∞ only, Table 2e "Point"),
            ``normal`` (τ ~ N(0, 1), Table 7f) or ``uniform`` (τ ~ U(−2^(num_powers−1)·β, +…), Table 7f).
        generator / seed: source of the τ draws (checkpointed by the trainer).
    """

    def __init__(
        self,
        *,
        beta: float = 0.6,
        num_powers: int = 5,
        sampling: str = "discrete",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if sampling not in TAU_SAMPLING:
            raise ValueError(f"weight_merging sampling must be one of {TAU_SAMPLING}, got {sampling!r}")
        if not (0 < beta < math.inf):
            raise ValueError(f"weight_merging beta must be a positive finite number, got {beta}")
        if int(num_powers) != num_powers or num_powers < 1:
            raise ValueError(f"weight_merging num_powers must be an integer >= 1 (τ ∈ {{±2ⁿ·β : n < num_powers}} ∪ {{∞}}), "
                             f"got {num_powers}; sampling='point' gives τ = ∞ only")
        self.beta = float(beta)
        self.num_powers = int(num_powers)
        self.sampling = sampling
        self.generator = generator if generator is not None else default_generator(seed)

    def candidates(self) -> list[float]:
        """The discrete τ set {±2ⁿ·β}ₙ ∪ {∞}, in ascending order."""
        pos = [(2**n) * self.beta for n in range(self.num_powers)]
        return [-p for p in reversed(pos)] + pos + [math.inf]

    def sample_tau(self) -> float:
        """Draw one τ."""
        if self.sampling == "point":
            return math.inf
        if self.sampling == "discrete":
            cands = self.candidates()
            return cands[int(torch.randint(len(cands), (1,), generator=self.generator))]
        if self.sampling == "normal":
            return float(torch.randn((1,), generator=self.generator))
        bound = (2 ** (self.num_powers - 1)) * self.beta
        return float((torch.rand((1,), generator=self.generator) * 2 - 1) * bound)

    def sample_plan(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Independent τ per container → ``{container name: [N] merge weights}``."""
        plan = {}
        self.last_taus: dict[str, float] = {}
        for name, c in find_containers(model):
            tau = self.sample_tau()
            self.last_taus[name] = tau
            plan[name] = temperature_softmax_coefficients(c.num_experts, tau)  # float64: exact for float64 experts
        if not plan:
            raise ValueError("weight_merging: the model has no ExpertContainer")
        return plan

    @contextmanager
    def merged_region(self, model: nn.Module) -> Iterator[dict[str, float]]:
        """Context manager: forwards inside run every container with freshly sampled merged weights.

        Yields the sampled τ per container name.
        """
        with routing_plan(model, self.sample_plan(model)):
            yield dict(self.last_taus)

    def state_dict(self) -> dict[str, Any]:
        """The τ sampler's RNG state (for exact resume)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the RNG state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


@REGULARIZERS.register("feature_mse")
class FeatureMSE:
    """L_MSE of MoTE Eq. 9 as the official code computes it: the mean of (z_r − e)² over all elements, in fp32.

    Eq. 9 writes ‖z_r − e‖² of pooled video features; the official code (``nn.MSELoss()``), which
    η = 0.1 was tuned with, takes the element-wise mean over the per-frame features ``[B, T, D]``
    (not pooled over T), and so does this.
    """

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mean((prediction − target)²) over all elements, in fp32."""
        return F.mse_loss(prediction.float(), target.float())


@REGULARIZERS.register("load_balance")
class LoadBalanceLoss:
    """coef · Σ load_balance + z_coef · Σ z_loss over a model's ``topk`` routers (Switch / ST-MoE)."""

    def __init__(self, *, coef: float = 1e-2, z_coef: float = 1e-3) -> None:
        self.coef = float(coef)
        self.z_coef = float(z_coef)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        aux = collect_aux_losses(model)
        zero = next(model.parameters()).new_zeros(())
        return self.coef * aux.get("load_balance", zero) + self.z_coef * aux.get("z_loss", zero)
