"""Routers decide which expert(s) process an input.

Every router is an ``nn.Module`` whose forward returns a :class:`RouterOutput` holding
the chosen expert indices, their combination weights and the router's auxiliary losses
(empty for the stochastic routers). Stochastic routers draw from their own
``torch.Generator`` so that routing can be reproduced and checkpointed.

Granularity says what one routing decision covers:

- ``"batch"``: the whole batch goes to one expert (MoTE, Eq. 5). indices ``[1, k]``.
- ``"sample"``: one decision per sample. indices ``[B, k]``.
- ``"token"``: one decision per token (all leading dims flattened). indices ``[N, k]``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ROUTERS

GRANULARITIES = ("batch", "sample", "token")


@dataclass
class RouterOutput:
    """Routing decision for one forward.

    Attributes:
        indices: ``[G, k]`` long expert indices, G = 1 / B / tokens by granularity
            (on the input's device; on the CPU for the stochastic routers' batch decisions).
        weights: ``[G, k]`` combination weights (sum to 1 over k, except for a ``topk`` router
            that does not renormalise: there the gate probabilities).
        aux_losses: auxiliary losses to add to the task loss (unweighted).
        granularity: one of ``batch``, ``sample``, ``token``.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    granularity: str
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"router granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def num_groups(x: torch.Tensor, granularity: str) -> int:
    """How many routing decisions ``x`` needs at ``granularity``.

    ``x`` is batch first, ``[B, ...]``: an :class:`~mergekit_video.experts.ExpertContainer` with another
    ``batch_dim`` (a sequence-first module, ``[S, B, ...]``) moves that axis to the front before routing.
    """
    if granularity == "batch":
        return 1
    if granularity == "sample":
        return x.shape[0]
    return math.prod(x.shape[:-1])


class RouterArgumentError(TypeError):
    """A router argument of the wrong type; ``argument`` names it (a recipe's check names ``model.router_kwargs.<argument>``)."""

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


def _check_type(owner: str, argument: str, value: Any, kind: type, what: str) -> None:
    """Raise :class:`RouterArgumentError` unless ``value`` is a ``kind`` (never a bool where an int is asked for)."""
    accepted = numbers.Integral if kind is int else kind  # numpy and other integer types are ints
    if not isinstance(value, accepted) or (kind is int and isinstance(value, bool)):
        raise RouterArgumentError(f"{owner} {argument} must be {what}, got {type(value).__name__} ({value!r})",
                                  argument=argument)


def default_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded from ``seed``, or from the global torch RNG when None.

    Drawing the seed from the global RNG means ``torch.manual_seed`` before model
    construction makes routing reproducible without any extra argument.
    """
    g = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g.manual_seed(seed)
    return g


class Router(nn.Module):
    """Base class: holds ``num_experts``, ``granularity`` and a CPU ``generator``.

    Subclasses implement :meth:`route`. The generator is part of the checkpointed RNG
    state (see :func:`mergekit_video.experts.router_generator_states`).
    """

    stochastic: bool = True

    def __init__(
        self,
        *,
        num_experts: int,
        granularity: str = "batch",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if generator is not None:
            _check_type("router", "generator", generator, torch.Generator, "a torch.Generator (set seed for a seeded one)")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = int(num_experts)
        self.granularity = _check_granularity(granularity)
        self.generator = generator if generator is not None else default_generator(seed)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` (see :meth:`route`)."""
        return self.route(x)

    def route(self, x: torch.Tensor) -> RouterOutput:  # pragma: no cover - abstract
        """Decide where ``x`` (``[B, ...]`` or ``[B, S, D]``) goes: indices, weights and auxiliary losses."""
        raise NotImplementedError

    def _single_choice(self, idx: torch.Tensor, device: torch.device) -> RouterOutput:
        # idx: [G] long on CPU. A batch-level decision stays on the CPU: the container reads it
        # with int(), which would otherwise force a device sync in every routed forward.
        if self.granularity == "batch":
            device = torch.device("cpu")
        indices = idx.view(-1, 1).to(device)
        weights = torch.ones(indices.shape, device=device)
        return RouterOutput(indices=indices, weights=weights, granularity=self.granularity)

    def extra_repr(self) -> str:
        """The module repr's summary: expert count and granularity."""
        return f"num_experts={self.num_experts}, granularity={self.granularity!r}"


def multinomial_probs(num_experts: int, temperature: float = 1.0) -> torch.Tensor:
    """P(i) = exp(i/T) / Σ_j exp(j/T) for i = 1..N (MoTE Eq. 5), as a ``[N]`` float64 tensor."""
    i = torch.arange(1, num_experts + 1, dtype=torch.float64)
    # shifted by the largest logit: (i − i*)/T ≤ 0 stays finite for tiny T (i* = N for T > 0, 1 for T < 0)
    top = float(num_experts) if temperature > 0 else 1.0
    return torch.softmax((i - top) / temperature, dim=0)


@ROUTERS.register("multinomial")
class MultinomialRouter(Router):
    """Stochastic routing with P(i) ∝ exp(i / temperature), i = 1..N (MoTE Eq. 5)."""

    def __init__(self, *, num_experts: int, temperature: float = 1.0, **kw: Any) -> None:
        super().__init__(num_experts=num_experts, **kw)
        if temperature == 0 or math.isnan(temperature):
            raise ValueError(f"multinomial router temperature must be non-zero and not NaN, got {temperature}")
        self.temperature = float(temperature)

    def route(self, x: torch.Tensor) -> RouterOutput:
        """One expert per group (batch, sample or token) drawn with P(i) ∝ exp(i / temperature) (Eq. 5)."""
        g = num_groups(x, self.granularity)
        probs = multinomial_probs(self.num_experts, self.temperature)  # CPU: no device sync
        idx = torch.multinomial(probs.expand(g, -1), 1, replacement=True, generator=self.generator)
        return self._single_choice(idx.view(-1), x.device)


@ROUTERS.register("random")
class RandomRouter(Router):
    """Uniform stochastic routing: every expert is equally likely (THOR, Zuo et al. 2021)."""

    def route(self, x: torch.Tensor) -> RouterOutput:
        """One expert per group drawn uniformly."""
        g = num_groups(x, self.granularity)
        idx = torch.randint(0, self.num_experts, (g,), generator=self.generator)
        return self._single_choice(idx, x.device)


class AssignedRouter(Router):
    """Routes sample j to expert ``indices[j]``, given ahead of the forward (not registered: the
    assignment belongs to one batch). Evaluation uses it to route each video by its own seeded draw,
    whatever the batch it lands in (MoTE Table 2c "Random routing")."""

    stochastic = False

    def __init__(self, *, num_experts: int, indices: torch.Tensor | list[int]) -> None:
        super().__init__(num_experts=num_experts, granularity="sample", seed=0)
        self.indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()  # [B]
        if self.indices.numel() and not 0 <= int(self.indices.min()) <= int(self.indices.max()) < num_experts:
            raise ValueError(f"assigned experts {self.indices.tolist()} are out of range for {num_experts} experts")

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Sample j goes to ``indices[j]``."""
        if x.shape[0] != self.indices.numel():
            raise ValueError(f"assigned routing holds {self.indices.numel()} samples' experts but the input has {x.shape[0]} samples")
        return self._single_choice(self.indices, x.device)


@ROUTERS.register("fixed")
class FixedRouter(Router):
    """Always routes to expert ``expert`` (MoTE Table 2d "Fixed")."""

    stochastic = False

    def __init__(self, *, num_experts: int, expert: int = 0, **kw: Any) -> None:
        _check_type("fixed router", "expert", expert, int, "an int (an expert index)")
        super().__init__(num_experts=num_experts, **kw)
        if not -num_experts <= expert < num_experts:
            raise ValueError(f"fixed router expert={expert} is out of range for {num_experts} experts")
        self.expert = int(expert) % num_experts

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Every group goes to the configured expert."""
        g = num_groups(x, self.granularity)
        return self._single_choice(torch.full((g,), self.expert, dtype=torch.long), x.device)


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Learned linear gate with top-k selection; weights are the gate's softmax probabilities.

    Auxiliary losses (Switch Transformer, Fedus et al. 2022; ST-MoE, Zoph et al. 2022):

    - ``load_balance`` = N · Σ_i f_i · P_i, with f_i the fraction of routing slots sent
      to expert i and P_i the mean gate probability of expert i;
    - ``z_loss`` = mean over groups of logsumexp(gate logits)².

    Args:
        dim: input feature size (last dim of x; dim 1 with ``channels_first``).
        k: experts per group.
        granularity: ``token`` or ``sample`` (a sample is represented by its mean token).
        channels_first: the input is ``[B, C, ...]`` (convolutions): a sample is represented by
            its mean over the positions, ``[B, C]``; sample granularity only. :func:`build_router`
            sets it for an expert whose first layer is a convolution.
        renormalize: divide the k selected probabilities by their sum. ``None`` (default):
            only when k > 1. With k = 1 renormalising would make every weight 1 and cut the
            gate off from the task loss, so the weight is the softmax probability itself, as in
            the Switch Transformer (Fedus et al. 2021).
    """

    stochastic = False
    #: Where an inferred ``dim`` came from (set by :func:`build_router`); None when it was given.
    dim_source: str | None = None

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        k: int = 1,
        granularity: str = "token",
        renormalize: bool | None = None,
        channels_first: bool = False,
        **kw: Any,
    ) -> None:
        if granularity == "batch":
            raise ValueError("topk router works at 'token' or 'sample' granularity, not 'batch'")
        if channels_first and granularity != "sample":
            raise ValueError("topk router: channels_first inputs ([B, C, H, W], convolutions) are routed per sample: pass granularity='sample'")
        _check_type("topk router", "k", k, int, "an int (experts per group)")
        if renormalize is not None:
            _check_type("topk router", "renormalize", renormalize, bool, "true, false or null (only when k > 1)")
        self.channels_first = bool(channels_first)
        super().__init__(num_experts=num_experts, granularity=granularity, **kw)
        if not 1 <= k <= num_experts:
            raise ValueError(f"topk router k={k} must be in [1, {num_experts}]")
        self.k = int(k)
        self.renormalize = self.k > 1 if renormalize is None else bool(renormalize)
        self.dim = int(dim)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Top-k of the gate's softmax per token or sample (renormalised if so configured); aux: load-balance and z-loss."""
        if self.channels_first:
            if x.dim() < 2 or x.shape[1] != self.dim:
                self._raise_width_mismatch(x.shape[1] if x.dim() >= 2 else x.shape[-1])
            feats = x.flatten(2).mean(dim=-1) if x.dim() > 2 else x  # [B, C, ...] → [B, C]
        elif x.shape[-1] != self.dim:
            self._raise_width_mismatch(x.shape[-1], channels=x.shape[1] if x.dim() > 2 else None)
        elif self.granularity == "sample":
            feats = x.flatten(1, -2).mean(dim=1) if x.dim() > 2 else x  # [B, ..., D] → [B, D]
        else:
            feats = x.reshape(-1, x.shape[-1])  # [N, D]
        # [G, E]; model may be bf16, gate fp32: at least fp32 (fp64 stays fp64)
        logits = self.gate(feats.to(self.gate.weight.dtype))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)  # [G, k]
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.renormalize else top_p  # [G, k]
        if logits.shape[0] == 0:  # no token (an empty batch): nothing to balance; a mean over none would be NaN
            load_balance = z_loss = logits.sum()  # 0, in the graph
        else:
            # Switch load balancing over all k slots
            dispatch = F.one_hot(top_i, self.num_experts).to(probs.dtype).sum(dim=1)  # [G, E]
            frac = dispatch.mean(dim=0) / self.k
            mean_prob = probs.mean(dim=0)
            load_balance = self.num_experts * (frac * mean_prob).sum()
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return RouterOutput(
            indices=top_i,
            weights=weights.to(x.dtype),
            granularity=self.granularity,
            aux_losses={"load_balance": load_balance, "z_loss": z_loss},
        )

    def _raise_width_mismatch(self, width: int, *, channels: int | None = None) -> None:
        source = f" ({self.dim_source})" if self.dim_source else ""
        axis = "dim 1 of x, channels first" if self.channels_first else "the last dim of x"
        if channels == self.dim:  # [B, C, H, W] with C = dim: a channels-first input (convolutions)
            raise ValueError(
                f"topk router: its input has width {width} (the last dim of x) but the router's dim is {self.dim}{source}, "
                f"which is dim 1 of x: for channels-first inputs (convolutions) pass channels_first=True "
                f"(ExpertContainer(..., router_kwargs={{'channels_first': True}}) or TopKRouter(..., channels_first=True))"
            )
        raise ValueError(
            f"topk router: its input has width {width} ({axis}) but the router's dim is "
            f"{self.dim}{source}; pass dim={width} (add_experts(..., dim={width}), "
            f"ExpertContainer(..., router_kwargs={{'dim': {width}}}) or TopKRouter(dim={width}))"
        )

    def extra_repr(self) -> str:
        """The base summary plus ``k`` and ``renormalize``."""
        return super().extra_repr() + f", k={self.k}, renormalize={self.renormalize}"


def build_router(router: str | Router, *, module: nn.Module | None = None, **kwargs: Any) -> Router:
    """Return ``router`` if it is already a Router, else build it from the registry.

    A gated router's ``dim`` (its input width), when not given, is the ``in_features`` of the
    first ``nn.Linear`` of ``module`` (the expert it routes for) in registration order, which
    need not be the first one its forward applies; the router's ``dim_source`` says which
    Linear it was, and a router whose width does not match its input names it.
    """
    if isinstance(router, nn.Module):
        return router
    source = None
    params = inspect.signature(ROUTERS.get(router)).parameters
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    found = next(((n, m) for n, m in module.named_modules() if isinstance(m, layers)), None) if module is not None else None
    conv = found is not None and not isinstance(found[1], nn.Linear)
    if "channels_first" in params and "channels_first" not in kwargs and conv and kwargs.get("granularity") == "sample":
        kwargs["channels_first"] = True  # a convolution reads [B, C, ...] (per-token routing of one is refused by surgery)
    if "dim" not in kwargs and "dim" in params:
        if found is None:
            raise ValueError(
                f"router {router!r} needs dim= (the width of its input); it could not be inferred "
                f"({'no nn.Linear or convolution in the expert' if module is not None else 'no expert module given'}): pass dim"
            )
        lname, layer = found
        what = "in_features" if isinstance(layer, nn.Linear) else "in_channels"
        kwargs["dim"] = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        source = (
            f"inferred from the {what} of {lname!r}, the first nn.{type(layer).__name__} of the expert in registration order"
            if lname else f"inferred from the {what} of the expert, an nn.{type(layer).__name__}"
        )
    built = ROUTERS.build(router, **kwargs)
    if source is not None:
        built.dim_source = source
    return built
