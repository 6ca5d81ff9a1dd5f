"""Merge strategies pinned on small hand-computed examples, and merge_state_dicts."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mergekit_video import merge_state_dicts
from mergekit_video.merging import (
    GeneralizedTaskArithmetic,
    is_output_space,
    linear_combination,
    merge_coefficients,
    merge_tensors,
    temperature_softmax_coefficients,
)
from mergekit_video.registry import MERGES


def T(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol)


# -- linear strategies ---------------------------------------------------------------------------


def test_mean_and_weighted_by_hand():
    a, b = T(0, 4), T(2, 0)
    assert close(MERGES.get("mean")([a, b]), [1, 2])
    # (1·[0, 4] + 3·[2, 0]) / (1 + 3) = [6, 4] / 4
    assert close(MERGES.get("weighted")([a, b], weights=[1, 3]), [1.5, 1.0])
    assert close(MERGES.get("weighted")([a, b], weights=[1, 3], normalize=False), [6.0, 4.0])
    with pytest.raises(ValueError, match=r"^weighted merge got 3 weights for 2 tensors$"):
        MERGES.get("weighted")([a, b], weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"^weighted merge weights sum to zero and cannot be normalised$"):
        MERGES.get("weighted")([a, b], weights=[1, -1])
    assert close(MERGES.get("weighted")([a, b], weights=[1e-13, 3e-13]), [1.5, 1.0])  # tiny weights of one sign: fine


def test_a_base_of_another_shape_or_dtype_is_refused_or_cast():
    """A base of other shape was ignored by linear strategies and, for a non-float key, returned as is."""
    ints = [{"n": torch.tensor(3)}, {"n": torch.tensor(5)}]
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'n': the base has shape \(3,\), but the tensors have shape \(\)$"):
        merge_state_dicts(ints, "task_arithmetic", base={"n": torch.tensor([0, 0, 0])})
    with pytest.warns(UserWarning, match=r"^non-float tensor 'n' differs between #0 and #1 and is not averaged; kept the base's value$"):
        kept = merge_state_dicts(ints, "task_arithmetic", base={"n": torch.tensor(0.0)})["n"]
    assert kept.dtype == torch.int64 and kept.item() == 0  # the base's value, in the tensors' dtype
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'w': the base has shape \(5,\), but the tensors have shape \(2,\)$"):
        merge_state_dicts([{"w": torch.ones(2)}, {"w": torch.ones(2)}], "mean", base={"w": torch.zeros(5)})


def test_temperature_softmax_weights():
    # τ = 1, N = 3: softmax([1, 2, 3]) = [e, e², e³] / (e + e² + e³)
    e = math.e
    z = e + e**2 + e**3
    assert torch.allclose(temperature_softmax_coefficients(3, 1.0), torch.tensor([e / z, e**2 / z, e**3 / z], dtype=torch.float64))
    # τ = −1 reverses the weights
    assert torch.allclose(temperature_softmax_coefficients(3, -1.0), torch.tensor([e**3 / z, e**2 / z, e / z], dtype=torch.float64))


@pytest.mark.parametrize("tau", [math.inf, -math.inf])
def test_temperature_softmax_infinite_tau_is_mean(tau):
    ts = [torch.randn(3, 4) for _ in range(4)]
    assert torch.equal(temperature_softmax_coefficients(4, tau), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.allclose(MERGES.get("temperature_softmax")(ts, tau=tau), MERGES.get("mean")(ts), atol=1e-7)
    # a very large finite τ is close to the mean as well
    assert torch.allclose(temperature_softmax_coefficients(4, 1e9), temperature_softmax_coefficients(4, math.inf), atol=1e-8)


@pytest.mark.parametrize("tau, pick", [(1e-3, -1), (1e-9, -1), (5e-324, -1), (0.0, -1), (-1e-3, 0), (-1e-9, 0), (-5e-324, 0), (-0.0, 0)])
def test_temperature_softmax_zero_limits(tau, pick):
    """τ → 0⁺ selects the last expert, τ → 0⁻ the first (also for exact ±0.0 and subnormal τ)."""
    ts = [torch.randn(5) for _ in range(3)]
    w = temperature_softmax_coefficients(3, tau)
    assert not torch.isnan(w).any()
    expected = torch.zeros(3, dtype=torch.float64)
    expected[pick] = 1.0
    assert torch.equal(w, expected)
    assert torch.equal(MERGES.get("temperature_softmax")(ts, tau=tau), ts[pick])


def test_temperature_softmax_nan_tau():
    with pytest.raises(ValueError, match=r"^temperature_softmax tau must not be NaN$"):
        temperature_softmax_coefficients(3, math.nan)


def test_merge_coefficients_only_for_linear_strategies():
    assert torch.equal(merge_coefficients("mean", 4), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.allclose(merge_coefficients("weighted", 2, weights=[1, 3]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.equal(merge_coefficients("temperature_softmax", 3, tau=0.0), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    for name in ("task_arithmetic", "ties", "dare", "slerp", "ensemble"):
        assert merge_coefficients(name, 3) is None


def test_linear_combination_dtype_and_gradient():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    out = linear_combination([a, b], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert out.dtype == torch.bfloat16 and close(out.float(), [2.5, 3.5])
    c = torch.tensor([0.5, 0.5], requires_grad=True)
    x, y = T(1, 2).requires_grad_(), T(3, 5).requires_grad_()
    linear_combination([x, y], c).sum().backward()
    assert close(c.grad, [3.0, 8.0])  # d/dc_i Σ_j (c·θ)_j = Σ_j θ_i[j]
    assert close(x.grad, [0.5, 0.5]) and close(y.grad, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"^merge needs at least one tensor$"):
        linear_combination([], torch.ones(0))
    with pytest.raises(ValueError, match=r"^cannot merge tensors of different shapes: #0 \(2,\) vs #1 \(3,\)$"):
        MERGES.get("mean")([T(1, 2), T(1, 2, 3)])


# -- task-arithmetic family ----------------------------------------------------------------------


def test_task_arithmetic_by_hand():
    base = T(1, 1, 1)
    a, b = T(2, 0, 1), T(1, 3, 1)  # task vectors [1, −1, 0] and [0, 2, 0]
    ta = MERGES.get("task_arithmetic")
    assert close(ta([a, b], base=base, lam=0.5), [1.5, 1.5, 1.0])  # 1 + 0.5·[1, 1, 0]
    assert close(ta([a, b], base=base), [2.0, 2.0, 1.0])  # λ = 1 by default
    assert close(ta([a, b], base=base, weights=[2, 1]), [3.0, 1.0, 1.0])  # 1 + 2·[1, −1, 0] + [0, 2, 0]


def test_task_arithmetic_keeps_float64_experts_exact_with_list_weights():
    """List weights went through float32 (torch.as_tensor of floats): 5.6e-8 off for float64 experts."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1000, dtype=torch.float64, generator=g) for _ in range(3)]
    base = torch.randn(1000, dtype=torch.float64, generator=g)
    w = [0.1, 0.7, 1 / 3]
    expected = base + sum(a * (t - base) for a, t in zip(w, ts))
    for name in ("task_arithmetic", "ties", "dare"):
        extra = {"density": 1.0} if name == "ties" else {"drop_rate": 0.0} if name == "dare" else {}
        got = MERGES.get(name)(ts, base=base, weights=w, **extra)
        assert got.dtype == torch.float64
        if name != "ties":  # dare with no drop and the linear combine is task arithmetic
            assert float((got - expected).abs().max()) < 1e-14, name


def test_ties_by_hand():
    # base = 0.5 everywhere; task vectors τ_i = θ_i − base
    #   τ1 = [ 3, −1,   0.5, −2  ]  top-2 by |·| (density 0.5 of 4) → [ 3, 0,  0, −2  ]
    #   τ2 = [−4,  2,   1,   −0.2]                                  → [−4, 2,  0,  0  ]
    #   τ3 = [ 1,  0.1, −3,  −1.5]                                  → [ 0, 0, −3, −1.5]
    # elected sign = sign(Σ) = sign([−1, 2, −3, −3.5]) = [−, +, −, −]
    # disjoint mean of the agreeing non-zero entries: [−4, 2, −3, (−2 − 1.5)/2 = −1.75]
    # θ = 0.5 + [−4, 2, −3, −1.75] = [−3.5, 2.5, −2.5, −1.25]
    base = torch.full((4,), 0.5)
    taus = [T(3, -1, 0.5, -2), T(-4, 2, 1, -0.2), T(1, 0.1, -3, -1.5)]
    thetas = [base + t for t in taus]
    ties = MERGES.get("ties")
    assert close(ties(thetas, base=base, density=0.5), [-3.5, 2.5, -2.5, -1.25])
    # λ scales the merged task vector: 0.5 + 0.5·[−4, 2, −3, −1.75]
    assert close(ties(thetas, base=base, density=0.5, lam=0.5), [-1.5, 1.5, -1.0, -0.375])
    # density 1 (no trim): Σ = [0, 1.1, −1.5, −3.7] → signs [0, +, −, −]
    #   e0: elected 0 → 0;  e1: mean(2, 0.1) = 1.05;  e2: −3;  e3: mean(−2, −0.2, −1.5) = −3.7/3
    assert close(ties(thetas, base=base, density=1.0), [0.5, 0.5 + 1.05, 0.5 - 3.0, 0.5 - 3.7 / 3])


def test_ties_trim_keeps_exactly_density_of_tied_entries():
    # all-equal magnitudes (a sign-SGD step): a threshold test would keep all 10; the top-k keeps 2
    ties = MERGES.get("ties")
    b = torch.zeros(10)
    out = ties([torch.ones(10), torch.ones(10)], base=b, density=0.2)
    assert int((out != 0).sum()) == 2 and close(out[out != 0], [1.0, 1.0])
    # k = round(density · n), half up, at least one: n = 1 and density 0.5 keeps the entry
    assert close(ties([T(1.0), T(-3.0)], base=T(0.0), density=0.5), [-3.0])
    assert int((ties([torch.arange(1.0, 6.0)] * 2, base=torch.zeros(5), density=0.5) != 0).sum()) == 3


def test_ties_with_negative_weights_votes_with_the_weighted_signs():
    # deltas [5], [1], [1] with weights [1, −1, −1]: weighted [5, −1, −1], elected sign +, only the
    # first agrees; disjoint mean 5 / 1 = 5 (mergekit's answer); the divisor is not clamped to 1e-12
    ties = MERGES.get("ties")
    assert close(ties([T(5.0), T(1.0), T(1.0)], base=T(0.0), density=1.0, weights=[1.0, -1.0, -1.0]), [5.0])
    # w = [1, −0.5] on deltas [2, 1]: weighted [2, −0.5] → only the first is kept: 2 / 1
    assert close(ties([T(2.0), T(1.0)], base=T(0.0), density=1.0, weights=[1.0, -0.5]), [2.0])
    # signed weights that cancel over the agreeing entries (Σw = 0): divided by 1 there, as mergekit does
    #   deltas [1, 1, 1] and [−2, −2, 2], w = [1, −1]: weighted [1, 1, 1] and [2, 2, −2] → entries 0, 1 agree (+),
    #   sum 3, Σw = 0 → 3; entry 2: sum −1 → elected −, only the second agrees: −2 / −1 = 2
    assert close(ties([T(1.0, 1.0, 1.0), T(-2.0, -2.0, 2.0)], base=torch.zeros(3), density=1.0, weights=[1.0, -1.0]), [3.0, 3.0, 2.0])


# DARE hand example. base = 1; task vectors d1 = [2, 0, 1, −1], d2 = [3, 4, −2, 1].
# The drop mask comes from the seeded generator, drawn tensor after tensor:
#   torch.rand(4) → u1 = [0.4963, 0.7682, 0.0885, 0.1320], then u2 = [0.3074, 0.6341, 0.4901, 0.8964];
#   an entry is dropped iff u < p. With p = 0.1: d1 loses entry 2 (0.0885), d2 keeps all;
#   survivors are rescaled by 1/(1 − p) = 1/0.9:
#   d1' = [2, 0, 0, −1]/0.9,  d2' = [3, 4, −2, 1]/0.9
DARE_BASE = torch.ones(4)
DARE_THETAS = [DARE_BASE + T(2, 0, 1, -1), DARE_BASE + T(3, 4, -2, 1)]
DARE_U = [0.4963, 0.7682, 0.0885, 0.1320, 0.3074, 0.6341, 0.4901, 0.8964]


def test_dare_rng_stream_is_the_documented_one():
    assert torch.allclose(torch.rand(8, generator=torch.Generator().manual_seed(0)), torch.tensor(DARE_U), atol=1e-4)


def test_dare_linear_by_hand():
    # linear: 1 + (d1' + d2') = 1 + [5, 4, −2, 0]/0.9
    out = MERGES.get("dare")(DARE_THETAS, base=DARE_BASE, drop_rate=0.1, seed=0)
    assert close(out, [1 + 5 / 0.9, 1 + 4 / 0.9, 1 - 2 / 0.9, 1.0], atol=1e-5)
    # the same with an explicit generator
    out_g = MERGES.get("dare")(DARE_THETAS, base=DARE_BASE, drop_rate=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out_g)


def test_dare_ties_by_hand():
    # sign(d1' + d2') = sign([5, 4, −2, 0]) = [+, +, −, 0]
    # e0: mean(2, 3)/0.9 = 2.5/0.9;  e1: only d2' is non-zero → 4/0.9;  e2: only d2' (d1' dropped) → −2/0.9;
    # e3: elected sign 0 → 0
    out = MERGES.get("dare")(DARE_THETAS, base=DARE_BASE, drop_rate=0.1, combine="ties", seed=0)
    assert close(out, [1 + 2.5 / 0.9, 1 + 4 / 0.9, 1 - 2 / 0.9, 1.0], atol=1e-5)


def test_dare_limits_statistics_and_seeds():
    dare = MERGES.get("dare")
    ta = MERGES.get("task_arithmetic")
    assert torch.equal(dare(DARE_THETAS, base=DARE_BASE, drop_rate=0.0), ta(DARE_THETAS, base=DARE_BASE))
    assert torch.equal(dare(DARE_THETAS, base=DARE_BASE, drop_rate=0.999999), DARE_BASE)  # ~everything dropped (1e-6 keep)
    # the rescale keeps the task vector unbiased: E[drop(d)] = d
    base, theta = torch.zeros(100_000), torch.ones(100_000)
    out = dare([theta], base=base, drop_rate=0.9, seed=1)
    assert (out != 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert out.mean().item() == pytest.approx(1.0, abs=0.04)
    assert torch.equal(dare([theta], base=base, drop_rate=0.9, seed=1), out)
    assert not torch.equal(dare([theta], base=base, drop_rate=0.9, seed=2), out)
    with pytest.raises(ValueError, match=r"^dare combine must be 'linear' or 'ties', got 'mean'$"):
        dare(DARE_THETAS, base=DARE_BASE, combine="mean")


def test_unseeded_dare_is_deterministic_and_leaves_the_global_rng_alone():
    dare = MERGES.get("dare")
    rng = torch.get_rng_state()
    out = dare(DARE_THETAS, base=DARE_BASE, drop_rate=0.5)
    assert torch.equal(out, dare(DARE_THETAS, base=DARE_BASE, drop_rate=0.5))
    assert torch.equal(out, dare(DARE_THETAS, base=DARE_BASE, drop_rate=0.5, seed=None))
    assert torch.equal(out, dare(DARE_THETAS, base=DARE_BASE, drop_rate=0.5, seed=0))  # the default seed
    # a state dict merge without a seed: one generator seeded 0, consumed in key order
    sds = [{"a": t, "b": t + 1} for t in DARE_THETAS]
    base = {"a": DARE_BASE, "b": DARE_BASE + 1}
    merged = merge_state_dicts(sds, "dare", base=base, drop_rate=0.5)
    assert all(torch.equal(merged[k], v) for k, v in merge_state_dicts(sds, "dare", base=base, drop_rate=0.5, seed=0).items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "strategy,arg,bad,good,interval",
    [
        ("ties", "density", [0.0, 1.5, -0.1], [1e-3, 1.0], r"\(0, 1\]"),
        ("dare", "drop_rate", [1.0, -0.1, 2.0], [0.0, 0.99], r"\[0, 1\)"),
        ("slerp", "t", [-0.1, 1.1, float("nan")], [0.0, 1.0], r"\[0, 1\]"),
    ],
)
def test_argument_ranges_name_the_argument(strategy, arg, bad, good, interval):
    from mergekit_video.merging import check_merge_arguments

    fn = MERGES.get(strategy)
    thetas, base = [T(1, 2), T(3, 5)], T(0, 1)
    for v in bad:
        with pytest.raises(ValueError, match=rf"^merge strategy '{strategy}': {arg} must be in {interval}, got "):
            fn(thetas, base=base, **{arg: v})
        with pytest.raises(ValueError, match=rf"^merge strategy '{strategy}': {arg} must be in {interval}, got "):
            check_merge_arguments(strategy, {"base": base, arg: v}, num_experts=2)
    for v in good:
        check_merge_arguments(strategy, {"base": base, arg: v}, num_experts=2)
        assert torch.isfinite(fn(thetas, base=base, **{arg: v})).all()


def test_task_arithmetic_family_errors():
    ta = MERGES.get("task_arithmetic")
    with pytest.raises(ValueError, match=r"^task-arithmetic merges need base= \(the weights the experts were tuned from\)"):
        ta(DARE_THETAS)
    with pytest.raises(ValueError, match=r"^base shape \(3,\) differs from tensor shape \(4,\)$"):
        ta(DARE_THETAS, base=torch.ones(3))
    with pytest.raises(ValueError, match=r"^got 3 weights for 2 tensors$"):
        ta(DARE_THETAS, base=DARE_BASE, weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"^unknown sparsification 'random'$"):
        GeneralizedTaskArithmetic(sparsification="random")(DARE_THETAS, base=DARE_BASE)


def test_task_arithmetic_family_moves_the_base_to_the_tensors_device():
    # a base kept on the CPU (a saved state dict) for experts elsewhere: meta stands in for CUDA
    thetas = [t.to("meta") for t in DARE_THETAS]
    for name, kw in (("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare", {"drop_rate": 0.1, "seed": 0})):
        out = MERGES.get(name)(thetas, base=DARE_BASE, **kw)
        assert (out.device.type, out.shape, out.dtype) == ("meta", DARE_BASE.shape, torch.float32), name
    # a float64 base is computed against in float32, as before: the numbers of a float32 base
    ta = MERGES.get("task_arithmetic")
    assert torch.equal(ta(DARE_THETAS, base=DARE_BASE.double(), lam=0.5), ta(DARE_THETAS, base=DARE_BASE, lam=0.5))


@pytest.mark.gpu
def test_task_arithmetic_family_with_cuda_experts_and_a_cpu_base():
    ties = MERGES.get("ties")
    out = ties([t.cuda() for t in DARE_THETAS], base=DARE_BASE, density=0.5)
    assert out.is_cuda and torch.allclose(out.cpu(), ties(DARE_THETAS, base=DARE_BASE, density=0.5))


# -- slerp, ensemble ----------------------------------------------------------------------------


def test_slerp():
    slerp = MERGES.get("slerp")
    v0, v1 = T(1, 0), T(0, 1)  # orthogonal: Ω = π/2
    assert close(slerp([v0, v1], t=0.0), v0)
    assert close(slerp([v0, v1], t=1.0), v1)
    # t = 1/2: sin(π/4)/sin(π/2)·(v0 + v1) = [1/√2, 1/√2] (stays on the unit circle; lerp would give norm 1/√2)
    assert close(slerp([v0, v1]), [1 / math.sqrt(2), 1 / math.sqrt(2)])
    # t = 1/3: the point at angle π/6 = [cos π/6, sin π/6]
    assert close(slerp([v0, v1], t=1 / 3), [math.sqrt(3) / 2, 0.5])
    assert close(slerp([T(2, 0), T(0, 2)]), [math.sqrt(2), math.sqrt(2)])
    # colinear and zero tensors fall back to lerp
    assert close(slerp([T(1, 1), T(2, 2)], t=0.5), [1.5, 1.5])
    assert close(slerp([T(0, 0), T(2, 4)], t=0.25), [0.5, 1.0])
    assert slerp([v0.half(), v1.half()]).dtype == torch.float16
    with pytest.raises(ValueError, match=r"^slerp merges exactly two tensors, got 3$"):
        slerp([v0, v1, v0])


def test_ensemble_is_not_a_weight_merge():
    assert is_output_space("ensemble") and not is_output_space("mean")
    msg = r"^'ensemble' averages expert outputs and has no merged weights; use ExpertContainer.collapse\('ensemble'\)"
    with pytest.raises(TypeError, match=msg):
        MERGES.get("ensemble")([T(1), T(2)])
    with pytest.raises(TypeError, match=msg):
        merge_state_dicts([{"w": T(1)}, {"w": T(2)}], "ensemble")


# -- merge_state_dicts -----------------------------------------------------------------------------


def test_merge_state_dicts_key_by_key():
    sds = [{"w": T(1, 2), "b": T(0), "n": torch.tensor(3)}, {"w": T(3, 6), "b": T(1), "n": torch.tensor(3)}]
    out = merge_state_dicts(sds)  # mean by default
    assert list(out) == ["w", "b", "n"]
    assert close(out["w"], [2, 4]) and close(out["b"], [0.5])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3  # equal integer tensors are copied
    base = {"w": T(1, 1), "b": T(0), "n": torch.tensor(3)}
    ta = merge_state_dicts(sds, "task_arithmetic", base=base, lam=0.5)
    assert close(ta["w"], [1 + 0.5 * (0 + 2), 1 + 0.5 * (1 + 5)])  # 1 + 0.5·([0, 1] + [2, 5])
    # a callable strategy is accepted too
    assert close(merge_state_dicts(sds, lambda ts, base=None: ts[1])["w"], [3, 6])


def test_merge_state_dicts_seed_is_consumed_in_key_order():
    a = [torch.randn(50) for _ in range(2)]
    b = [torch.randn(50) for _ in range(2)]
    base = {"a": torch.zeros(50), "b": torch.zeros(50)}
    out = merge_state_dicts([{"a": a[0], "b": b[0]}, {"a": a[1], "b": b[1]}], "dare", base=base, drop_rate=0.5, seed=3)
    g = torch.Generator().manual_seed(3)
    dare = MERGES.get("dare")
    assert torch.equal(out["a"], dare(a, base=base["a"], drop_rate=0.5, generator=g))
    assert torch.equal(out["b"], dare(b, base=base["b"], drop_rate=0.5, generator=g))


def test_merge_state_dicts_errors():
    with pytest.raises(ValueError, match=r"^merge_state_dicts needs at least one state dict$"):
        merge_state_dicts([])
    with pytest.raises(ValueError, match=r"^state dict #1 has different keys from #0; first difference: 'c'$"):
        merge_state_dicts([{"w": T(1)}, {"w": T(1), "c": T(2)}])
    with pytest.raises(ValueError, match=r"^base state dict is missing 'w'$"):
        merge_state_dicts([{"w": T(1)}, {"w": T(2)}], "task_arithmetic", base={"v": T(0)})
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'w': cannot merge tensors of different shapes: #0 \(1,\) vs #1 \(2,\)$"):
        merge_state_dicts([{"w": T(1)}, {"w": T(1, 2)}])
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'w': the base has shape \(2,\), but the tensors have shape \(1,\)$"):
        merge_state_dicts([{"w": T(1)}, {"w": T(2)}], "ties", base={"w": T(0, 0)})
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'n': non-float tensors differ between #0 and #1 and cannot be merged$"):
        merge_state_dicts([{"n": torch.tensor(1)}, {"n": torch.tensor(2)}], non_float="error")
    with pytest.raises(ValueError, match=r"^non-float tensors differ between #0 and #1"):
        merge_tensors([torch.tensor(1), torch.tensor(2)], non_float="error")
    with pytest.raises(ValueError, match=r"^non_float must be one of \('first', 'error'\), got 'max'$"):
        merge_tensors([torch.tensor(1), torch.tensor(2)], non_float="max")


@pytest.mark.parametrize("strategy,kw", [("mean", {}), ("ties", {"density": 0.5}), ("dare", {"drop_rate": 0.5, "seed": 0}), ("task_arithmetic", {})])
def test_non_float_buffers_are_copied_not_merged(strategy, kw):
    # BatchNorm experts trained apart: their step counters differ, their weights merge
    sds = [{"w": T(1.0, -2.0), "num_batches_tracked": torch.tensor(n)} for n in (5, 7)]
    base = {"w": T(0.0, 0.0), "num_batches_tracked": torch.tensor(3)}
    needs_base = strategy != "mean"
    source = "the base" if needs_base else "#0"
    with pytest.warns(UserWarning, match=rf"^non-float tensor 'num_batches_tracked' differs between #0 and #1 and is not averaged; kept {source}'s value$"):
        out = merge_state_dicts(sds, strategy, base=base if needs_base else None, **kw)
    assert out["num_batches_tracked"].dtype == torch.int64
    assert out["num_batches_tracked"].item() == (3 if needs_base else 5)  # the base's, else #0's
    same = merge_state_dicts([{"idx": torch.tensor([1, 2])}] * 2, strategy, base={"idx": torch.tensor([0, 0])} if needs_base else None, **kw)
    assert torch.equal(same["idx"], torch.tensor([1, 2]))  # identical non-float tensors are copied as they are


def test_linear_combination_constant_coefficients_gradients_and_double_backward():
    torch.manual_seed(0)
    xs = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    coeff = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    out = linear_combination(xs, coeff)
    ref = sum(c * x for c, x in zip(coeff.tolist(), xs))
    assert torch.allclose(out, ref, atol=0, rtol=1e-15)
    g = torch.randn(5, 3, dtype=torch.float64)
    out.backward(g)
    for c, x in zip(coeff.tolist(), xs):
        assert torch.equal(x.grad, g * c)  # each tensor gets its own scaled gradient
    inputs = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    coeff = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *ts: linear_combination(list(ts), coeff), inputs)
    assert torch.autograd.gradgradcheck(lambda *ts: linear_combination(list(ts), coeff), inputs)
    # a frozen tensor gets no gradient; a mismatched coefficient count is an error
    frozen = torch.ones(3, dtype=torch.float64)
    linear_combination([inputs[0], frozen], torch.tensor([0.5, 0.5])).sum().backward()
    assert frozen.grad is None
    with pytest.raises(ValueError, match=r"^3 coefficients for 2 tensors$"):
        linear_combination(inputs[:2], torch.ones(3))


def test_requires_base_marks_the_task_arithmetic_family():
    from mergekit_video.merging import requires_base

    assert [n for n in MERGES.names() if requires_base(n)] == ["dare", "task_arithmetic", "ties"]


def test_merge_state_dicts_names_keys_that_are_not_mergeable():
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'router._extra_state': #0 is a dict, not a tensor"):
        merge_state_dicts([{"w": T(1), "router._extra_state": {"step": 1}}, {"w": T(2), "router._extra_state": {"step": 2}}])
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'n': cannot merge tensors of different shapes"):
        merge_state_dicts([{"n": torch.tensor([1])}, {"n": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'w': dtype torch.int64 of #1 and torch.float32 of #0"):
        merge_state_dicts([{"w": T(1)}, {"w": torch.tensor([1])}])


# -- shared infinities, argument checks ------------------------------------------------------------

INF = float("inf")


def test_entries_that_are_the_same_inf_everywhere_keep_it():
    mask = torch.triu(torch.full((3, 3), -INF), 1)  # a causal mask: 0 on and below the diagonal
    sds = [{"mask": mask.clone()} for _ in range(2)]
    assert torch.equal(merge_state_dicts(sds, "weighted", weights=[1, 0])["mask"], mask)  # 0 · −inf was NaN
    assert torch.equal(merge_state_dicts(sds, "task_arithmetic", base={"mask": mask})["mask"], mask)  # −inf − (−inf)
    assert torch.equal(merge_state_dicts(sds, "mean")["mask"], mask)
    # finite entries stay the strategy's, equal inputs included: 2·x + 3·x
    x = T(1, -INF, INF, 2)
    assert torch.equal(merge_tensors([x, x.clone()], "weighted", weights=[2, 3], normalize=False), T(5, -INF, INF, 10))
    # base + λ Σ (θᵢ − base) with λ = 0.5: [1 + 0.5·(1 + 1)] and [0 + 0.5·(1 + 3)]; −inf in the base too
    out = merge_tensors([T(-INF, 1, 2), T(-INF, 3, 2)], "task_arithmetic", base=T(-INF, 0, 1), lam=0.5)
    assert torch.equal(out, T(-INF, 2, 2))
    # infinities not shared by every input (or by the base) are the strategy's result
    assert torch.equal(merge_tensors([T(-INF, 1), T(0, 3)], "mean"), T(-INF, 2))
    assert merge_tensors([T(-INF, 1), T(INF, 3)], "mean")[0].isnan()
    assert merge_tensors([T(-INF, 1), T(-INF, 3)], "task_arithmetic", base=T(0, 0))[0] == -INF  # 0 + (−inf) + (−inf)


def test_shared_infinities_are_zero_task_vectors_for_ties_dare_and_slerp():
    base = T(-INF, 0, 0, 0)
    a, b = T(-INF, 1, -2, 3), T(-INF, 3, 1, 3)
    # TIES, density 0.5 of 4 entries: keep 2 per task vector by magnitude, the −inf entry's being 0:
    # a → [0, 0, −2, 3], b → [0, 3, 0, 3]; elected signs [0, +, −, +]; disjoint means [0, 3, −2, 3]
    assert torch.equal(merge_tensors([a, b], "ties", base=base, density=0.5), T(-INF, 3, -2, 3))
    # DARE (seeded): the same draws and result as experts that equal the base there
    for combine in ("linear", "ties"):
        got = merge_state_dicts([{"w": a}, {"w": b}], "dare", base={"w": base}, drop_rate=0.5, combine=combine, seed=3)["w"]
        zero = [{"w": torch.where(a.isinf(), 0.0, t)} for t in (a, b)]
        want = merge_state_dicts(zero, "dare", base={"w": torch.zeros(4)}, drop_rate=0.5, combine=combine, seed=3)["w"]
        assert got[0] == -INF and torch.equal(got[1:], want[1:]) and torch.isfinite(want).all()
    # slerp: the angle is taken over the finite entries, two orthogonal unit vectors at t = 0.5
    r = math.sqrt(0.5)
    assert torch.allclose(merge_tensors([T(-INF, 1, 0), T(-INF, 0, 1)], "slerp"), T(-INF, r, r), atol=1e-6)
    assert torch.equal(merge_tensors([a, a.clone()], "slerp", t=0.3), a)  # identical tensors: themselves


def test_merge_state_dicts_checks_the_strategy_arguments():
    sds = [{"w": T(1, 2)}, {"w": T(3, 4)}, {"w": T(5, 6)}]
    for strategy, kw, message in (
        ("mean", {"weights": [1, 2, 3]}, "merge strategy 'mean': got an unexpected argument 'weights' (accepted: base)"),
        ("weighted", {}, "merge strategy 'weighted': missing a required argument: 'weights'"),
        ("weighted", {"weights": [1, 2]}, "merge strategy 'weighted': 2 weights for 3 experts"),
        ("slerp", {}, "merge strategy 'slerp' merges exactly 2 experts, not 3"),
        ("ties", {}, "merge strategy 'ties' needs base= (the weights the experts were tuned from, such as the model before add_experts)"),
        ("mean", {"seed": 0}, "merge strategy 'mean': got an unexpected argument 'seed' (accepted: base)"),
    ):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            merge_state_dicts(sds, strategy, **kw)
    with pytest.raises(ValueError, match=r"^state dict #1 has different keys from #0; first difference: 'v'$"):
        merge_state_dicts([{"w": T(1)}, {"v": T(1)}], "weighted", weights=[1, 1])


def test_check_merge_arguments_reports_an_unknown_name_before_a_missing_one():
    from mergekit_video.merging import check_merge_arguments

    for strategy, kw, message in (
        ("weighted", {"weight": [1, 2]},
         "merge strategy 'weighted': got an unexpected argument 'weight' (did you mean 'weights'?; accepted: base, weights, normalize)"),
        ("temperature_softmax", {"t": 1}, "merge strategy 'temperature_softmax': got an unexpected argument 't' (accepted: base, tau)"),
        ("dare", {"base": T(0), "drop": 0.5},
         "merge strategy 'dare': got an unexpected argument 'drop' (did you mean 'drop_rate'?; "
         "accepted: base, drop_rate, combine, lam, weights, seed, generator)"),
        ("weighted", {}, "merge strategy 'weighted': missing a required argument: 'weights'"),
    ):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            check_merge_arguments(strategy, kw, num_experts=2)

    def open_ended(tensors, *, base=None, **kw):  # a plugin taking any keyword: nothing is unknown
        return tensors[0]

    check_merge_arguments(open_ended, {"anything": 1}, num_experts=2)


@pytest.mark.parametrize("name, kw", [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare", {"drop_rate": 0.5}), ("slerp", {"t": 0.3})])
def test_float64_tensors_merge_in_float64(name, kw):
    # experts equal to the base (or to each other for slerp) give the base back exactly; in float32 arithmetic they were off by ~1e-7
    torch.manual_seed(0)
    b = torch.randn(1000, dtype=torch.float64)
    base = None if name == "slerp" else b
    out = MERGES.get(name)([b.clone(), b.clone()], base=base, **kw)
    assert out.dtype == torch.float64
    assert (out - b).abs().max().item() < 1e-15
    # tiny task vectors survive: float32 rounding of the base swamped 1e-9 deltas
    if base is not None and name != "dare":
        delta = torch.full_like(b, 1e-9)
        out = MERGES.get(name)([b + delta, b + delta], base=b, **({**kw, "density": 1.0} if name == "ties" else kw))
        expected = b + (2 * delta if name == "task_arithmetic" else delta)
        assert torch.allclose(out, expected, rtol=0, atol=1e-14)  # float64 rounding of b (|b| < 5), far below the 1e-9 delta


def test_merge_state_dicts_takes_a_module_as_base():
    """As collapse, collapse_experts and use_merge do: the module's state_dict() is the base."""
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3)
    sds = [{k: v + torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(2)]
    by_module = merge_state_dicts(sds, "task_arithmetic", base=base, lam=0.5)
    by_dict = merge_state_dicts(sds, "task_arithmetic", base=base.state_dict(), lam=0.5)
    assert by_module.keys() == by_dict.keys() and all(torch.equal(by_module[k], by_dict[k]) for k in by_dict)
    expected = base.weight + 0.5 * ((sds[0]["weight"] - base.weight) + (sds[1]["weight"] - base.weight))
    assert torch.allclose(by_module["weight"], expected, atol=1e-6)


def test_merge_state_dicts_merges_batchnorm_statistics_convexly_and_keeps_tied_keys_tied():
    """A task vector of a running variance can make it negative: buffers named (or a module base's) are the
    mean under the task-arithmetic family; keys tied in every state dict are merged once (one DARE mask)."""
    torch.manual_seed(0)

    def net() -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
        m[2].weight = m[0].weight  # tied
        return m

    base, experts = net(), [net() for _ in range(2)]
    with torch.no_grad():
        base[1].running_var.fill_(1.0)
        experts[0][1].running_var.fill_(0.1)
        experts[1][1].running_var.fill_(0.2)
    sds = [e.state_dict() for e in experts]
    out = merge_state_dicts(sds, "task_arithmetic", base=base, lam=1.0)  # module base: its buffers are named
    assert torch.allclose(out["1.running_var"], torch.full((4,), 0.15))  # mean, not 1 + (-0.9) + (-0.8) = -0.7
    assert torch.equal(out["1.num_batches_tracked"], sds[0]["1.num_batches_tracked"])
    assert torch.allclose(out["0.weight"], base[0].weight + sum(e[0].weight - base[0].weight for e in experts))
    with pytest.warns(UserWarning, match=r"^merge_state_dicts: '1.running_mean' \(and 1 more\) look like BatchNorm statistics"):
        plain = merge_state_dicts(sds, "task_arithmetic", base=base.state_dict(), lam=1.0)  # ... a UserWarning
    assert torch.allclose(plain["1.running_var"], torch.full((4,), -0.7))  # as parameters when not named ...
    named = merge_state_dicts(sds, "task_arithmetic", base=base.state_dict(), lam=1.0, buffers=["1.running_var", "1.running_mean"])
    assert torch.equal(named["1.running_var"], out["1.running_var"])
    dare = merge_state_dicts(sds, "dare", base=base, drop_rate=0.5, seed=3)
    assert torch.equal(dare["0.weight"], dare["2.weight"]) and dare["0.weight"] is dare["2.weight"]
    assert not torch.equal(dare["0.weight"], out["0.weight"])  # a mask was drawn


def test_differing_non_float_tensors_are_one_user_warning_per_call_naming_the_first_and_the_container():
    """Defect: each differing non-float tensor (BatchNorm counters) was a log.warning of its own, one per key, invisible
    to warnings filters, and a collapse did not name the container. Now: one UserWarning per merge_state_dicts,
    collapse or collapse_experts call, counting them and naming the first (and its container)."""
    import copy
    import warnings

    from torch import nn

    import mergekit_video as mv

    def block() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))

    sds = [{f"{i}.num_batches_tracked": torch.tensor(n + i) for i in range(3)} for n in (5, 7)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_state_dicts(sds, "mean")
    assert [str(w.message) for w in caught] == [
        "3 non-float tensors differ between the merged tensors and are not averaged; kept #0's value (first: '0.num_batches_tracked', #0 vs #1)"]
    model = nn.Sequential(block(), block())
    mv.add_experts(model, "*", 2, init="copy", router="fixed", expert=1)
    model.train()(torch.randn(4, 3))  # expert 1 of each container counts a batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mv.collapse_experts(copy.deepcopy(model))
        model[1].collapse()
    assert [str(w.message) for w in caught] == [
        "4 non-float tensors differ between the merged tensors and are not averaged; kept #0's value (first: '1.num_batches_tracked' "
        "in expert container '0', #0 vs #1)",
        "2 non-float tensors differ between the merged tensors and are not averaged; kept #0's value (first: '1.num_batches_tracked' "
        "in expert container '1', #0 vs #1)",
    ]
    assert all(w.category is UserWarning for w in caught)


def test_named_buffers_stay_convex_under_linear_weights_as_collapse_keeps_them():
    """Defect: merge_state_dicts combined named BatchNorm statistics with a linear strategy's raw weights: weights
    [1, -2, 3] gave a negative running variance (NaN outputs) and normalize=False three times the variance, where
    ExpertContainer.collapse takes them normalised, or the mean when a weight is negative. Both paths agree now."""
    from torch import nn

    from mergekit_video import ExpertContainer

    torch.manual_seed(0)
    mods = []
    for i in range(3):
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train()
        m(torch.randn(32, 4) * (i + 1))
        mods.append(m)
    with torch.no_grad():
        mods[1][1].running_var.mul_(50)
    sds = [m.state_dict() for m in mods]
    var = [m[1].running_var for m in mods]
    c = ExpertContainer(mods, "multinomial")
    for kw, want in (({"weights": [1.0, -2.0, 3.0]}, sum(var) / 3),  # a negative weight: the mean
                     ({"weights": [1.0, 1.0, 1.0], "normalize": False}, sum(var) / 3),  # normalised
                     ({"weights": [1.0, 0.0, 3.0]}, 0.25 * var[0] + 0.75 * var[2])):
        merged = merge_state_dicts(sds, "weighted", base=mods[0], **kw)
        assert torch.allclose(merged["1.running_var"], want, rtol=1e-6)
        assert torch.allclose(merged["1.running_var"], c.collapse("weighted", **kw)[1].running_var, rtol=1e-6)
    weights = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)  # the parameters still take the raw weights
    merged = merge_state_dicts(sds, "weighted", base=mods[0], weights=[1.0, -2.0, 3.0], normalize=False)
    want = sum(w * sd["0.weight"].double() for w, sd in zip(weights, sds)).float()
    assert torch.allclose(merged["0.weight"], want, atol=1e-6)


def test_state_dicts_and_collapse_on_the_meta_device():
    """Defect: merge_state_dicts read values of meta tensors (the shared-infinity check) and failed with 'Tensor.item()
    cannot be called on meta tensors', so collapse('ties') of a model built on the meta device failed too."""
    from torch import nn

    from mergekit_video import ExpertContainer

    sds = [nn.Linear(4, 3, device="meta").state_dict() for _ in range(2)]
    merged = merge_state_dicts(sds, "mean")
    assert merged["weight"].device.type == "meta" and merged["weight"].shape == (3, 4)
    c = ExpertContainer([nn.Linear(4, 3, device="meta") for _ in range(3)], "multinomial")
    dense = c.collapse("ties", base=nn.Linear(4, 3, device="meta"), density=0.5)
    assert dense.weight.device.type == "meta" and dense.weight.shape == (3, 4)
