"""Merge strategies: functions that combine N same-shaped tensors into one.

Every strategy is registered in :data:`~mergekit_video.registry.MERGES` and has the
signature ``fn(tensors, *, base=None, **kwargs) -> Tensor``. :func:`merge_state_dicts`
applies a strategy key by key. Strategies that are a fixed linear combination
(``mean``, ``weighted``, ``temperature_softmax``) also expose ``fn.coefficients(n, **kw)``
so that callers can merge whole modules with one weighted sum and differentiate through it.

The task-arithmetic family (task arithmetic, TIES, DARE) is one configurable class,
:class:`GeneralizedTaskArithmetic`, as in mergekit. It follows the papers where mergekit differs:
TIES keeps round(density·n) entries (mergekit truncates), an exact sign tie elects no sign
(mergekit counts it as +), and ``dare(combine="ties")`` takes TIES's disjoint mean (mergekit's
``dare_ties`` sums the agreeing deltas).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .registry import MERGES
from .utils.warn import warn_user

NON_FLOAT_POLICIES = ("first", "error")

Tensor = torch.Tensor
MergeFn = Callable[..., Tensor]


def _check_same_shape(tensors: Sequence[Tensor]) -> None:
    if len(tensors) == 0:
        raise ValueError("merge needs at least one tensor")
    shape, device = tensors[0].shape, tensors[0].device
    for i, t in enumerate(tensors[1:], 1):
        if t.shape != shape:
            raise ValueError(f"cannot merge tensors of different shapes: #0 {tuple(shape)} vs #{i} {tuple(t.shape)}")
        if t.device != device:  # torch's multi-tensor ops skip a meta tensor silently
            raise ValueError(f"cannot merge tensors on different devices: #0 on {device}, #{i} on {t.device}")


class _WeightedSums(torch.autograd.Function):
    """Σ_i c_i · θ_i for K groups of N tensors at once, with constant coefficients.

    Forward allocates each result once and accumulates in place with multi-tensor
    (``torch._foreach_*``) ops: N kernel launches for all K groups, not N·K. Backward hands
    θ_i the gradients c_i·g, again one multi-tensor op per i (differentiable, so double
    backward works). The out-of-place chain ``c0·θ0 + c1·θ1 + ...`` would allocate a fresh
    tensor per term; on a CPU every fresh multi-megabyte buffer is page-faulted in, which
    costs more than the arithmetic.
    """

    @staticmethod
    def forward(ctx: Any, coeff: tuple[float, ...], num_groups: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        # tensors: expert-major, tensors[i * num_groups + k] is θ_i of group k
        n = len(coeff)
        ctx.coeff, ctx.num_groups = coeff, num_groups
        ctx.dtypes = [t.dtype for t in tensors]
        per_expert = [list(tensors[i * num_groups:(i + 1) * num_groups]) for i in range(n)]
        out = torch._foreach_mul([t.to(torch.promote_types(t.dtype, torch.float32)) for t in per_expert[0]], coeff[0])
        for c, ts in zip(coeff[1:], per_expert[1:]):
            torch._foreach_add_(out, ts, alpha=c)
        return tuple(o if o.dtype == t.dtype else o.to(t.dtype) for o, t in zip(out, per_expert[0]))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        k = ctx.num_groups
        out: list[Tensor | None] = []
        for i, c in enumerate(ctx.coeff):
            needs = ctx.needs_input_grad[2 + i * k:2 + (i + 1) * k]
            if not any(needs):
                out.extend([None] * k)
                continue
            scaled = torch._foreach_mul(list(grads), c)
            dtypes = ctx.dtypes[i * k:(i + 1) * k]
            out.extend(None if not need else g if g.dtype == d else g.to(d) for g, d, need in zip(scaled, dtypes, needs))
        return (None, None, *out)


def linear_combinations(groups: Sequence[Sequence[Tensor]], coefficients: Tensor) -> list[Tensor]:
    """Σ_i c_i · θ_i for each group of N tensors (one group per parameter of a module).

    With constant coefficients, all groups are combined by one autograd node with
    multi-tensor kernels (see :class:`_WeightedSums`); this is how an expert container
    merges its experts in every WMR forward. Accumulates in at least float32 and casts back
    to each group's dtype. Differentiable in the tensors and, when ``coefficients``
    requires grad, in the coefficients; composes with ``torch.func`` transforms.
    """
    if not groups:
        return []
    n = len(groups[0])
    if n == 0:
        raise ValueError("merge needs at least one tensor")
    if coefficients.requires_grad or torch._C._are_functorch_transforms_active():
        # learned coefficients, or under torch.func (grad, vmap, jacrev): plain differentiable ops
        return [_stacked_combination(g, coefficients) for g in groups]
    coeff = tuple(coefficients.detach().to("cpu", torch.float64).tolist())
    if len(coeff) != n:
        raise ValueError(f"{len(coeff)} coefficients for {n} tensors")
    flat = [g[i] for i in range(n) for g in groups]  # expert-major
    return list(_WeightedSums.apply(coeff, len(groups), *flat))


def _stacked_combination(tensors: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    dtype = tensors[0].dtype
    acc = torch.promote_types(dtype, torch.float32)
    coeff = coefficients.to(device=tensors[0].device, dtype=acc)
    stacked = torch.stack([t.to(acc) for t in tensors])  # [N, ...]
    return torch.tensordot(coeff, stacked, dims=1).to(dtype)


def linear_combination(tensors: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    """Σ_i c_i · θ_i, accumulated in at least float32 and cast back to the input dtype.

    Differentiable in both the tensors and the coefficients.
    """
    _check_same_shape(tensors)
    return linear_combinations([tensors], coefficients)[0]


def _linear_strategy(coefficients_fn: Callable[..., Tensor]) -> Callable[[Callable], MergeFn]:
    def wrap(doc_fn: Callable) -> MergeFn:
        def merge(tensors: Sequence[Tensor], *, base: Tensor | None = None, **kw: Any) -> Tensor:
            return linear_combination(tensors, coefficients_fn(len(tensors), **kw))

        functools.update_wrapper(merge, doc_fn)  # name, doc and the declared signature (``inspect.signature``)
        merge.coefficients = coefficients_fn  # type: ignore[attr-defined]
        return merge

    return wrap


# -- linear strategies -----------------------------------------------------------------


def mean_coefficients(n: int) -> Tensor:
    """``[n]`` uniform weights 1/n."""
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def weighted_coefficients(n: int, weights: Sequence[float] | Tensor, normalize: bool = True) -> Tensor:
    """``[n]`` user weights, divided by their sum when ``normalize``."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"weighted merge got {w.numel()} weights for {n} tensors")
    if normalize:
        total = w.sum()
        if total.abs() <= 1e-12 * w.abs().sum():  # relative: tiny weights of one sign normalise fine
            raise ValueError("weighted merge weights sum to zero and cannot be normalised")
        w = w / total
    return w


def temperature_softmax_coefficients(n: int, tau: float) -> Tensor:
    """w_i = softmax(i/τ), i = 1..n (MoTE Eq. 7).

    τ = ±∞ gives the mean; τ → 0⁺ puts all weight on the last expert and τ → 0⁻ on the
    first (``tau=0.0`` and ``tau=-0.0`` select those limits exactly).
    """
    tau = float(tau)
    if math.isinf(tau):
        return mean_coefficients(n)
    if tau == 0.0:
        w = torch.zeros(n, dtype=torch.float64)
        w[-1 if math.copysign(1.0, tau) > 0 else 0] = 1.0
        return w
    if math.isnan(tau):
        raise ValueError("temperature_softmax tau must not be NaN")
    i = torch.arange(1, n + 1, dtype=torch.float64)
    # subtract the largest logit before dividing: (i − i*)/τ ≤ 0 never overflows to ±inf/NaN,
    # even for subnormal τ (i* = n for τ > 0, 1 for τ < 0)
    top = float(n) if tau > 0 else 1.0
    return torch.softmax((i - top) / tau, dim=0)


@MERGES.register("mean")
@_linear_strategy(mean_coefficients)
def mean(tensors: Sequence[Tensor], *, base: Tensor | None = None) -> Tensor:
    """Uniform average θ = (1/N) Σ θ_i (MoTE Eq. 6; model soups, Wortsman et al. 2022)."""


@MERGES.register("weighted")
@_linear_strategy(weighted_coefficients)
def weighted(tensors: Sequence[Tensor], *, base: Tensor | None = None, weights: Sequence[float] | Tensor, normalize: bool = True) -> Tensor:
    """Linear merge θ = Σ w_i θ_i / Σ w_i with user weights (``weights=[...]``); θ = Σ w_i θ_i with ``normalize=False``."""


@MERGES.register("temperature_softmax")
@_linear_strategy(temperature_softmax_coefficients)
def temperature_softmax(tensors: Sequence[Tensor], *, base: Tensor | None = None, tau: float) -> Tensor:
    """θ = Σ softmax(i/τ)_i θ_i over expert index i = 1..N (MoTE Eq. 7)."""


def buffer_coefficients(strategy: str | MergeFn, n: int, **kwargs: Any) -> Tensor:
    """``[n]`` convex weights for the floating buffers (BatchNorm running statistics) of a merge that is not a
    fixed linear combination: ``slerp``'s lerp weights (1 − t, t), so that t = 0 / 1 give an expert exactly; the
    mean for the task-arithmetic family, whose base + Σ(bᵢ − base) can make a running variance negative."""
    fn = MERGES.get(strategy) if isinstance(strategy, str) else strategy
    if fn is slerp:
        t = float(kwargs.get("t", 0.5))
        return torch.tensor([1.0 - t, t], dtype=torch.float64)
    return mean_coefficients(n)


def convex_buffer_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights for floating buffers (running statistics): ``weights`` normalised to sum 1 when none is negative,
    else the mean. Negative or unnormalised weights (``weighted`` with ``normalize=False``) would make a running
    variance negative or scale it. Tensor ops only: no host read of weights on a GPU."""
    total = weights.sum()
    usable = (weights >= 0).all() & (total > 0)
    rescale = usable & ((total - 1.0).abs() > 1e-9)  # weights summing to 1 stay as they are (bit-exact)
    normalised = torch.where(rescale, weights / torch.where(usable, total, torch.ones_like(total)), weights)
    return torch.where(usable, normalised, torch.full_like(weights, 1.0 / weights.numel()))


def buffer_merge(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ wᵢ·bᵢ of floating buffers (``weights`` convex, see :func:`buffer_coefficients`), except where every
    tensor holds the same value: there tensor 0's (a -inf mask stays -inf, an untrained statistic bit-exact)."""
    same = torch.ones_like(tensors[0], dtype=torch.bool)
    for t in tensors[1:]:
        same = same & (t == tensors[0])  # out of place: works on torch.func batched tensors
    return torch.where(same, tensors[0], linear_combinations([list(tensors)], weights)[0])


def merge_coefficients(strategy: str | MergeFn, n: int, **kwargs: Any) -> Tensor | None:
    """``[n]`` weights if ``strategy`` is a fixed linear combination, else None."""
    fn = MERGES.get(strategy) if isinstance(strategy, str) else strategy
    coeff_fn = getattr(fn, "coefficients", None)
    return None if coeff_fn is None else coeff_fn(n, **kwargs)


# -- notices ----------------------------------------------------------------------------

_notices = threading.local()  # .stack: the open non_float_notices blocks' labels; .items: what was kept, in order


class non_float_notices:  # noqa: N801 - used as a context manager, like contextlib's
    """Collect the differing non-float tensors that the merges inside keep unaveraged (:func:`merge_tensors`) and say
    them in one ``UserWarning`` when the outermost block ends (not one per key). ``where`` names what the tensors inside
    belong to (``"expert container 'layer1.0'"``); the innermost label counts. Nothing is said when the block raises.
    (A class, not a generator: the warning points at the user's line, not into contextlib.)"""

    def __init__(self, *, where: str | None = None) -> None:
        self.where = where

    def __enter__(self) -> None:
        if not hasattr(_notices, "stack"):
            _notices.stack, _notices.items = [], []
        _notices.stack.append(self.where)

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        _notices.stack.pop()
        if not _notices.stack:
            items, _notices.items = _notices.items, []
            if exc_type is None and items:
                warn_user(_non_float_message(items))


def _non_float_message(items: Sequence[tuple[str | None, str | None, int, str]]) -> str:
    """One notice for ``items``, each ``(name, where, differing index, source kept)``."""
    name, where, differ, _ = items[0]
    sources = sorted({source for *_, source in items})
    kept = f"kept {sources[0]}'s value" if len(sources) == 1 else "kept the base's value where given, else #0's"
    first = f"{name!r}" if name else "a tensor"
    first += f" in {where}" if where else ""
    if len(items) == 1:
        return f"non-float tensor {first} differs between #0 and #{differ} and is not averaged; {kept}"
    return f"{len(items)} non-float tensors differ between the merged tensors and are not averaged; {kept} (first: {first}, #0 vs #{differ})"


# -- argument ranges ---------------------------------------------------------------------


def _check_ranges(fn: MergeFn, name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the strategy and argument when a value lies outside ``fn.argument_ranges``.

    ``argument_ranges`` maps an argument to ``(low, high, low_open, high_open)``.
    """
    for arg, (lo, hi, lo_open, hi_open) in getattr(fn, "argument_ranges", {}).items():
        if arg not in kwargs or kwargs[arg] is None:
            continue
        v = float(kwargs[arg])
        below = v <= lo if lo_open else v < lo
        above = v >= hi if hi_open else v > hi
        if below or above or math.isnan(v):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise ValueError(f"merge strategy {name!r}: {arg} must be in {interval}, got {kwargs[arg]!r}")


# -- task-arithmetic family -------------------------------------------------------------


def _magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the top ``density`` fraction of entries of ``delta`` by magnitude (TIES "trim").

    Exactly k = round(density · n) entries are kept (rounding half up, at least one; mergekit
    truncates, int(density · n), and refuses k = 0), picked with ``topk`` as mergekit does: entries
    tied at the threshold (a sign-SGD step, all-equal deltas) do not all survive, so ``density``
    holds whatever the values.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = max(1, math.floor(density * n + 0.5))
    if k >= n:
        return delta
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[delta.abs().flatten().topk(k, sorted=False).indices] = True
    return delta * keep.view(delta.shape)


def _bernoulli_drop(delta: Tensor, drop_rate: float, generator: torch.Generator | None) -> Tensor:
    """DARE: drop entries with probability p, rescale survivors by 1/(1-p)."""
    if drop_rate <= 0.0:
        return delta
    if drop_rate >= 1.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return delta * keep.to(delta.device) / (1.0 - drop_rate)


@dataclass(frozen=True)
class GeneralizedTaskArithmetic:
    """Task arithmetic, TIES and DARE as one configurable merge (after mergekit).

    θ = base + λ · combine({ w_i · sparsify(θ_i − base) })

    Args:
        sparsification: ``None``, ``"magnitude"`` (TIES trim to ``density``) or
            ``"bernoulli"`` (DARE drop with rate ``drop_rate``, rescale 1/(1−p)).
        sign_consensus: elect a per-entry sign, sgn(Σ w_i δ_i), and keep only agreeing entries
            (TIES, Yadav et al. 2023); an exact tie (Σ = 0) elects no sign and keeps nothing there
            (mergekit's "sum" method counts a tie as +).
        disjoint_mean: divide by the summed weights of the entries that contributed
            (TIES "disjoint merge") instead of summing.
    """

    sparsification: str | None = None
    sign_consensus: bool = False
    disjoint_mean: bool = False

    def __call__(
        self,
        tensors: Sequence[Tensor],
        *,
        base: Tensor | None = None,
        weights: Sequence[float] | None = None,
        lam: float = 1.0,
        density: float = 1.0,
        drop_rate: float = 0.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> Tensor:
        _check_same_shape(tensors)
        if base is None:
            raise ValueError(
                "task-arithmetic merges need base= (the weights the experts were tuned from); "
                "for experts upcycled with add_experts(init='copy'), pass the original module's weights"
            )
        if base.shape != tensors[0].shape:
            raise ValueError(f"base shape {tuple(base.shape)} differs from tensor shape {tuple(tensors[0].shape)}")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        dtype = tensors[0].dtype
        acc = torch.promote_types(dtype, torch.float32)  # float64 experts stay exact
        b = base.to(tensors[0].device, acc)  # a base kept on the CPU (a saved state dict) for CUDA experts
        w = torch.ones(len(tensors), dtype=acc) if weights is None else torch.as_tensor(weights, dtype=torch.float64).to(acc)  # list weights: not via float32
        if w.numel() != len(tensors):
            raise ValueError(f"got {w.numel()} weights for {len(tensors)} tensors")
        deltas = []
        for t in tensors:
            d = t.to(acc) - b
            if self.sparsification == "magnitude":
                d = _magnitude_trim(d, density)
            elif self.sparsification == "bernoulli":
                d = _bernoulli_drop(d, drop_rate, generator)
            elif self.sparsification is not None:
                raise ValueError(f"unknown sparsification {self.sparsification!r}")
            deltas.append(d)
        stacked = torch.stack(deltas)  # [N, ...]
        wv = w.to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
        weighted_deltas = stacked * wv
        if self.sign_consensus:
            # signs of the weighted deltas, as mergekit: a negative weight flips what an entry votes for
            elected = torch.sign(weighted_deltas.sum(dim=0))
            mask = (torch.sign(weighted_deltas) == elected) & (weighted_deltas != 0)
        else:
            mask = torch.ones_like(stacked, dtype=torch.bool)
        merged = (weighted_deltas * mask).sum(dim=0)
        if self.disjoint_mean:
            divisor = (wv * mask).sum(dim=0)
            # signed weights can cancel (Σw = 0 over agreeing entries): divided by 1 there, as mergekit does
            merged = merged / torch.where(divisor.abs() > 1e-12, divisor, torch.ones_like(divisor))
        return (b + lam * merged).to(dtype)


_task_arithmetic = GeneralizedTaskArithmetic()
_ties = GeneralizedTaskArithmetic(sparsification="magnitude", sign_consensus=True, disjoint_mean=True)
_dare_linear = GeneralizedTaskArithmetic(sparsification="bernoulli")
_dare_ties = GeneralizedTaskArithmetic(sparsification="bernoulli", sign_consensus=True, disjoint_mean=True)


@MERGES.register("task_arithmetic")
def task_arithmetic(tensors: Sequence[Tensor], *, base: Tensor | None = None, lam: float = 1.0, weights: Sequence[float] | None = None) -> Tensor:
    """θ = base + λ · Σ w_i (θ_i − base) (Ilharco et al. 2023, "Editing models with task arithmetic")."""
    return _task_arithmetic(tensors, base=base, lam=lam, weights=weights)


@MERGES.register("ties")
def ties(tensors: Sequence[Tensor], *, base: Tensor | None = None, density: float = 0.2, lam: float = 1.0, weights: Sequence[float] | None = None) -> Tensor:
    """TIES (Yadav et al. 2023): θ = base + λ · Σ_{i agrees} w_i δ̂_i / Σ_{i agrees} w_i, with δ̂_i the task vector
    θ_i − base trimmed to its top ``density`` ∈ (0, 1] by magnitude and "agrees" meaning sgn(w_i δ̂_i) equals the
    elected sign sgn(Σ_j w_j δ̂_j), entry by entry (the disjoint mean; divided by 1 where the agreeing weights
    cancel)."""
    _check_ranges(ties, "ties", {"density": density})
    return _ties(tensors, base=base, density=density, lam=lam, weights=weights)


@MERGES.register("dare")
def dare(
    tensors: Sequence[Tensor],
    *,
    base: Tensor | None = None,
    drop_rate: float = 0.9,
    combine: str = "linear",
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE (Yu et al. 2024): δ̃_i = m_i ⊙ (θ_i − base) / (1 − p), m_i ~ Bernoulli(1 − p) with p = ``drop_rate`` ∈ [0, 1), then
    ``combine="linear"``: θ = base + λ · Σ w_i δ̃_i (task arithmetic), or ``combine="ties"``: TIES's sign election and
    disjoint mean over the δ̃_i, θ = base + λ · Σ_{agrees} w_i δ̃_i / Σ_{agrees} w_i (mergekit's ``dare_ties`` sums them
    instead).

    Seeded: the drop masks come from ``generator`` or else from a generator seeded with ``seed``
    (0 when not given or None), never from torch's global RNG. The same ``seed`` draws the same
    masks; a ``generator`` advances, as torch's generators do. An expert container given a
    ``generator`` draws one seed from it when the merge is set, so that merging again (an eval
    re-merge, the exported collapse) draws the same masks.
    """
    if combine not in ("linear", "ties"):
        raise ValueError(f"dare combine must be 'linear' or 'ties', got {combine!r}")
    _check_ranges(dare, "dare", {"drop_rate": drop_rate})
    if generator is None and seed is None:
        seed = 0
    impl = _dare_linear if combine == "linear" else _dare_ties
    return impl(tensors, base=base, drop_rate=drop_rate, lam=lam, weights=weights, seed=seed, generator=generator)


@MERGES.register("slerp")
def slerp(tensors: Sequence[Tensor], *, base: Tensor | None = None, t: float = 0.5, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between two tensors: sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁ (Shoemake 1985).

    Ω is the angle between the flattened tensors, t ∈ [0, 1]; nearly colinear tensors fall back to lerp.
    """
    if len(tensors) != slerp.num_tensors:
        raise ValueError(f"slerp merges exactly two tensors, got {len(tensors)}")
    _check_ranges(slerp, "slerp", {"t": t})
    _check_same_shape(tensors)
    acc = torch.promote_types(tensors[0].dtype, torch.float32)  # float64 tensors stay exact
    v0, v1 = tensors[0].to(acc), tensors[1].to(acc)
    n0, n1 = v0.flatten().norm(), v1.flatten().norm()
    if n0 < eps or n1 < eps:
        return ((1 - t) * v0 + t * v1).to(tensors[0].dtype)
    dot = torch.clamp((v0.flatten() / n0) @ (v1.flatten() / n1), -1.0, 1.0)
    if dot.abs() > 1 - 1e-6:
        out = (1 - t) * v0 + t * v1
    else:
        omega = torch.arccos(dot)
        so = torch.sin(omega)
        out = torch.sin((1 - t) * omega) / so * v0 + torch.sin(t * omega) / so * v1
    return out.to(tensors[0].dtype)


@MERGES.register("ensemble")
def ensemble(tensors: Sequence[Tensor], *, base: Tensor | None = None, weights: Sequence[float] | None = None) -> Tensor:
    """Not a weight merge: keep all N experts and average their outputs (N forwards).

    ``weights`` (renormalised) weight the outputs, as :class:`~mergekit_video.experts.ExpertEnsemble`.
    """
    raise TypeError(
        "'ensemble' averages expert outputs and has no merged weights; "
        "use ExpertContainer.collapse('ensemble') or set merge='ensemble' on the container"
    )


ensemble.output_space = True  # type: ignore[attr-defined]
slerp.num_tensors = 2  # type: ignore[attr-defined]
ties.argument_ranges = {"density": (0.0, 1.0, True, False)}  # type: ignore[attr-defined]
dare.argument_ranges = {"drop_rate": (0.0, 1.0, False, True)}  # type: ignore[attr-defined]
slerp.argument_ranges = {"t": (0.0, 1.0, False, False)}  # type: ignore[attr-defined]
for _fn in (task_arithmetic, ties, dare):
    _fn.requires_base = True  # type: ignore[attr-defined]


def requires_base(strategy: str | MergeFn) -> bool:
    """Whether ``strategy`` merges relative to a base (``base=``: the weights the experts were tuned from)."""
    fn = MERGES.get(strategy) if isinstance(strategy, str) else strategy
    return bool(getattr(fn, "requires_base", False))


def is_output_space(strategy: str | MergeFn) -> bool:
    """True for strategies such as ``ensemble`` that combine outputs, not weights."""
    fn = MERGES.get(strategy) if isinstance(strategy, str) else strategy
    return bool(getattr(fn, "output_space", False))


def resolve_strategy(strategy: str | MergeFn) -> MergeFn:
    """Registry lookup for names; callables pass through."""
    return MERGES.get(strategy) if isinstance(strategy, str) else strategy


def default_seed(strategy: str | MergeFn) -> int | None:
    """The seed a stochastic strategy (one taking ``seed`` and ``generator``, such as DARE) draws
    with when given neither; None for deterministic strategies."""
    params = inspect.signature(resolve_strategy(strategy)).parameters
    if "generator" not in params or "seed" not in params:
        return None
    default = params["seed"].default
    return None if default is inspect.Parameter.empty or default is None else int(default)


def check_merge_arguments(strategy: str | MergeFn, kwargs: Mapping[str, Any], *, num_experts: int | None = None,
                          hidden: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the strategy when ``kwargs`` cannot merge ``num_experts`` experts.

    Checks the keywords against the strategy's signature (unknown ones first, with the closest
    accepted name, then missing ones), ``base=`` for
    task-arithmetic strategies, and, with ``num_experts``, the length of ``weights`` and the
    expert count of strategies that merge a fixed number (``slerp``: two), and the ranges of
    arguments such as ``ties``'s ``density`` ∈ (0, 1], ``dare``'s ``drop_rate`` ∈ [0, 1) and
    ``slerp``'s ``t`` ∈ [0, 1]. ``hidden`` names arguments the caller does not offer (such as
    ``base`` where there is no base model): they are left out of the accepted list.
    """
    fn = resolve_strategy(strategy)
    name = strategy if isinstance(strategy, str) else getattr(fn, "__name__", "merge")
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        # unknown names first: a typo ('weight') would otherwise be reported as the argument it misses
        accepted = [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in hidden]
        unknown = next((k for k in kwargs if k not in accepted), None)
        if unknown is not None:
            close = difflib.get_close_matches(str(unknown), accepted, n=1)
            hint = f"did you mean {close[0]!r}?; " if close else ""
            raise ValueError(
                f"merge strategy {name!r}: got an unexpected argument {unknown!r} "
                f"({hint}accepted: {', '.join(accepted) or 'none'})"
            )
    try:
        signature.bind([], **kwargs)
    except TypeError as exc:
        raise ValueError(f"merge strategy {name!r}: {exc}") from None
    _check_ranges(fn, name, kwargs)
    if requires_base(fn) and kwargs.get("base") is None:
        raise ValueError(
            f"merge strategy {name!r} needs base= (the weights the experts were tuned from, such as the "
            "model before add_experts)"
        )
    if num_experts is None:
        return
    fixed = getattr(fn, "num_tensors", None)
    if fixed is not None and fixed != num_experts:
        raise ValueError(f"merge strategy {name!r} merges exactly {fixed} experts, not {num_experts}")
    weights = kwargs.get("weights")
    if weights is not None and torch.as_tensor(weights).numel() != num_experts:
        raise ValueError(f"merge strategy {name!r}: {torch.as_tensor(weights).numel()} weights for {num_experts} experts")


def merge_tensors(
    tensors: Sequence[Tensor],
    strategy: str | MergeFn = "mean",
    *,
    base: Tensor | None = None,
    non_float: str = "first",
    name: str | None = None,
    **kwargs: Any,
) -> Tensor:
    """Merge one list of tensors with ``strategy``.

    Non-float tensors (counters such as BatchNorm's ``num_batches_tracked``, index or mask
    buffers) are not weights and are never averaged: identical ones are copied; differing ones
    are taken from ``base`` when given, else from tensor #0, with a warning
    (``non_float="first"``), or raise (``non_float="error"``).

    Float entries that hold the same ±inf in every tensor (and in ``base``, when given), such as
    a causal mask's −inf, keep that value (a weight of 0 or a task vector −inf − (−inf) would
    make them NaN): the strategy merges the tensors with 0 there (a zero task vector, no part
    of slerp's angle or of TIES's magnitude ranking), and every other entry is its result.
    """
    fn = resolve_strategy(strategy)
    if is_output_space(fn):
        fn(tensors)  # raises the explanatory TypeError
    odd = next((i for i, t in enumerate(tensors) if not isinstance(t, Tensor)), None)
    if odd is not None:
        raise ValueError(f"#{odd} is a {type(tensors[odd]).__name__}, not a tensor (only tensors can be merged)")
    _check_same_shape(tensors)  # non-float tensors too
    if base is not None and (not isinstance(base, Tensor) or base.shape != tensors[0].shape):
        got = f"has shape {tuple(base.shape)}" if isinstance(base, Tensor) else f"is a {type(base).__name__}"
        raise ValueError(f"the base {got}, but the tensors have shape {tuple(tensors[0].shape)}")
    for i, t in enumerate(tensors[1:], 1):
        if t.is_floating_point() != tensors[0].is_floating_point():
            raise ValueError(f"dtype {t.dtype} of #{i} and {tensors[0].dtype} of #0: a float and a non-float tensor")
    if not tensors[0].is_floating_point():
        if non_float not in NON_FLOAT_POLICIES:
            raise ValueError(f"non_float must be one of {NON_FLOAT_POLICIES}, got {non_float!r}")
        differ = next((i for i, t in enumerate(tensors[1:], 1) if not torch.equal(t, tensors[0])), None)
        if differ is None:
            return tensors[0].clone()
        if non_float == "error":
            raise ValueError(f"non-float tensors differ between #0 and #{differ} and cannot be merged")
        source = "the base" if base is not None else "#0"
        with non_float_notices():  # alone: warned now; inside a block (merge_state_dicts, collapse): once at its end
            stack = _notices.stack
            _notices.items.append((name, next((w for w in reversed(stack) if w), None), differ, source))
        return (base.to(tensors[0].dtype) if base is not None else tensors[0]).clone()
    shared = _shared_infinities(tensors, base)
    if shared is None:
        return _checked_result(fn, fn(tensors, base=base, **kwargs), tensors[0])
    # the strategy sees 0 there in every tensor (a zero task vector, nothing in slerp's angle or
    # TIES's magnitude ranking), and the result gets the shared value back
    zeroed = [t.masked_fill(shared.to(t.device), 0.0) for t in tensors]
    zeroed_base = None if base is None else base.masked_fill(shared.to(base.device), 0.0)
    out = _checked_result(fn, fn(zeroed, base=zeroed_base, **kwargs), tensors[0])
    return torch.where(shared.to(out.device), tensors[0].to(out.device, out.dtype), out)


def _checked_result(fn: MergeFn, out: Any, like: Tensor) -> Tensor:
    """A strategy's result, checked to be one tensor of the inputs' shape and given their dtype (a plugin's
    merge that reduced too far failed later, inside ``load_state_dict``, without naming the strategy)."""
    label = f"merge strategy {getattr(fn, '__name__', fn)!r}"
    if not isinstance(out, Tensor):
        raise ValueError(f"{label} returned a {type(out).__name__}, not a tensor")
    if out.shape != like.shape:
        raise ValueError(f"{label} returned shape {tuple(out.shape)} for inputs of shape {tuple(like.shape)}; "
                         "a merge returns one tensor of the inputs' shape")
    return out if out.dtype == like.dtype else out.to(like.dtype)


def _shared_infinities(tensors: Sequence[Tensor], base: Tensor | None) -> Tensor | None:
    """Bool mask of the entries that are the same ±inf in every tensor and in ``base``; None when there are none."""
    ref = tensors[0]
    if ref.device.type == "meta":  # no values to compare (a model built on the meta device)
        return None
    shared = torch.isinf(ref)
    if not bool(shared.any()):  # the common case: one pass over tensor #0, nothing else
        return None
    for t in (*tensors[1:], *(() if base is None else (base,))):
        shared &= t.to(ref.device) == ref
    return shared if bool(shared.any()) else None


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]],
    strategy: str | MergeFn = "mean",
    base: Mapping[str, Tensor] | torch.nn.Module | None = None,
    non_float: str = "first",
    buffers: Iterable[str] | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Apply ``strategy`` key by key over ``state_dicts``.

    The strategy's arguments are checked first (:func:`check_merge_arguments`). All state dicts
    must have the same keys and shapes; ``base`` (when given: a state dict, or a module whose
    ``state_dict()`` it is) too. Non-float tensors follow
    ``non_float``, and entries that are the same ±inf everywhere keep it (see :func:`merge_tensors`).
    A ``seed`` keyword (else the strategy's default seed) seeds one generator consumed in
    key order, so stochastic strategies (DARE) are reproducible. Keys tied in every state dict
    (one tensor under two names, as ``state_dict()`` of tied weights gives) are merged once and
    stay tied.

    ``buffers`` names the keys that are floating buffers (BatchNorm running statistics); a module
    ``base`` names its own. They are a convex combination, as :meth:`ExpertContainer.collapse`
    merges them: under a fixed linear combination its weights normalised, or the mean when one is
    negative (:func:`convex_buffer_weights`), else :func:`buffer_coefficients` (a task vector of a
    running variance can make it negative). Without them such keys are merged as parameters, with
    a warning for keys named like BatchNorm statistics under a strategy that is not linear.
    """
    if not state_dicts:
        raise ValueError("merge_state_dicts needs at least one state dict")
    if isinstance(base, torch.nn.Module):  # as collapse and use_merge take it
        if buffers is None:
            buffers = [name for name, _ in base.named_buffers()]
        base = base.state_dict()
    check_merge_arguments(strategy, {**kwargs, "base": base}, num_experts=len(state_dicts))
    keys = list(state_dicts[0].keys())
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))
            raise ValueError(f"state dict #{i} has different keys from #0; first difference: {diff[0]!r}")
    if base is not None:
        missing = [k for k in keys if k not in base]
        if missing:
            raise ValueError(f"base state dict is missing {missing[0]!r}")
    fn = resolve_strategy(strategy)
    params = inspect.signature(fn).parameters
    if "generator" in params and "seed" in params and kwargs.get("generator") is None:
        seed = kwargs.get("seed")
        if seed is None:  # the strategy's default seed (DARE: 0)
            seed = default_seed(fn)
        if seed is not None:
            kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
            kwargs["generator"] = torch.Generator().manual_seed(int(seed))
    linear = getattr(fn, "coefficients", None) is not None  # a fixed linear combination
    buffer_keys = set(buffers or ())
    if linear:  # its weights made convex (negative or unnormalised ones would make a variance negative or scale it)
        buffer_weights = convex_buffer_weights(fn.coefficients(len(state_dicts), **kwargs))
    else:
        buffer_weights = buffer_coefficients(fn, len(state_dicts), **kwargs)
        unnamed = [k for k in keys if k not in buffer_keys and k.rpartition(".")[2] in ("running_mean", "running_var")
                   and state_dicts[0][k].is_floating_point()]
        if unnamed:
            warn_user(f"merge_state_dicts: {unnamed[0]!r} (and {len(unnamed) - 1} more) look like BatchNorm statistics but are "
                      f"merged by {getattr(fn, '__name__', strategy)!r} as parameters (a variance can turn negative); pass "
                      "buffers=[...] or base as the module")
    out: dict[str, Tensor] = {}
    tied: dict[tuple, str] = {}  # the storages of a key in every state dict → the first key holding them
    with non_float_notices():  # differing non-float tensors (counters): one warning for the call
        for k in keys:
            ident = _tensor_identity([sd[k] for sd in state_dicts] + ([] if base is None else [base[k]]))
            if ident is not None and ident in tied:
                out[k] = out[tied[ident]]  # tied weights: one merge (one DARE mask), still one tensor
                continue
            tensors = [sd[k] for sd in state_dicts]
            try:
                if k in buffer_keys and tensors[0].is_floating_point():
                    _check_same_shape(tensors)
                    out[k] = buffer_merge(tensors, buffer_weights.to(tensors[0].device))
                else:
                    out[k] = merge_tensors(tensors, fn, base=None if base is None else base[k], non_float=non_float, name=k, **kwargs)
            except ValueError as exc:  # name the offending tensor
                raise ValueError(f"cannot merge tensor {k!r}: {exc}") from exc
            if ident is not None:
                tied[ident] = k
    return out


def _tensor_identity(tensors: Sequence[Any]) -> tuple | None:
    """Where ``tensors`` live (storage address, offset, shape, strides of each), or None where that says nothing
    (meta tensors, tensors without storage)."""
    ident = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # functorch wrappers, sparse tensors
            return None
        if ptr == 0:
            return None
        ident.append((ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype))
    return tuple(ident)
