"""Regularizers: WMR τ sampling and merged region (MoTE Eq. 7–8), feature MSE (Eq. 9), load balance."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from mergekit_video import REGULARIZERS, ExpertContainer, add_experts
from mergekit_video.merging import temperature_softmax_coefficients
from mergekit_video.regularizers import FeatureMSE, LoadBalanceLoss, WeightMergingRegularizer
from mergekit_video.routers import TopKRouter

CANDIDATES = [-9.6, -4.8, -2.4, -1.2, -0.6, 0.6, 1.2, 2.4, 4.8, 9.6, math.inf]


class Block(nn.Module):
    """A model whose code knows nothing about experts: norm → mlp → residual, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.mlp1 = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        self.mlp2 = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp1(self.norm(x))
        return x + self.mlp2(x)


@pytest.fixture()
def model() -> Block:
    torch.manual_seed(0)
    m = Block()
    add_experts(m, ["mlp1", "mlp2"], num_experts=4, seed=0)
    return m


def test_candidate_set_and_frequencies():
    wmr = REGULARIZERS.build("weight_merging", seed=0)
    assert wmr.candidates() == pytest.approx(CANDIDATES)  # {±2ⁿ·0.6 : n = 0..4} ∪ {∞}
    assert WeightMergingRegularizer(beta=1.0, num_powers=2).candidates() == [-2.0, -1.0, 1.0, 2.0, math.inf]
    draws = Counter(wmr.sample_tau() for _ in range(22_000))
    assert len(draws) == 11
    for tau in CANDIDATES:
        tau = next(t for t in draws if t == pytest.approx(tau))
        assert draws[tau] / 22_000 == pytest.approx(1 / 11, abs=0.01)


def test_merged_region_samples_independent_tau_per_container(model):
    wmr = WeightMergingRegularizer(seed=1)
    per_container: dict[str, Counter] = {"mlp1": Counter(), "mlp2": Counter()}
    same = 0
    rounds = 5500
    for _ in range(rounds):
        with wmr.merged_region(model) as taus:
            for name, tau in taus.items():
                per_container[name][tau] += 1
            same += taus["mlp1"] == taus["mlp2"]
    for counts in per_container.values():
        assert len(counts) == 11
        assert max(abs(c / rounds - 1 / 11) for c in counts.values()) <= 0.015
    # independent draws agree with probability 1/11, not always
    assert same / rounds == pytest.approx(1 / 11, abs=0.015)


def test_merged_region_forward_uses_softmax_tau_weights_and_trains_experts(model):
    wmr = WeightMergingRegularizer(seed=2)
    x = torch.randn(3, 5, 4)
    model.train()
    with wmr.merged_region(model) as taus:
        y = model(x)
    assert model.mlp1.last_routing is None  # the routers did not run
    # the same forward by hand: each container merged with softmax(i/τ) of its own τ (Eq. 7)
    w1 = temperature_softmax_coefficients(4, taus["mlp1"]).float()
    w2 = temperature_softmax_coefficients(4, taus["mlp2"]).float()
    h = x + model.mlp1.merged_forward(model.norm(x), w1)
    expected = h + model.mlp2.merged_forward(h, w2)
    assert (y - expected).abs().max().item() <= 1e-6
    y.pow(2).mean().backward()  # the caller's task loss on the merged output (Eq. 8)
    for c in (model.mlp1, model.mlp2):
        grads = [e[0].weight.grad for e in c.experts]
        assert all(g is not None for g in grads)
    # outside the region the model routes again
    model(x)
    assert model.mlp1.last_routing is not None


def test_point_sampling_is_infinity_only_and_equals_the_mean(model):
    wmr = WeightMergingRegularizer(sampling="point")
    assert {wmr.sample_tau() for _ in range(200)} == {math.inf}
    x = torch.randn(2, 4)
    with wmr.merged_region(model) as taus:
        y = model(x)
    assert set(taus.values()) == {math.inf}
    model.eval()
    assert (y - model(x)).abs().max().item() <= 1e-6  # τ = ∞ → mean merge, the eval model


def test_continuous_samplings():
    normal = WeightMergingRegularizer(sampling="normal", seed=0)
    t = torch.tensor([normal.sample_tau() for _ in range(20_000)])
    assert t.mean().item() == pytest.approx(0.0, abs=0.03) and t.std().item() == pytest.approx(1.0, abs=0.03)
    uniform = WeightMergingRegularizer(sampling="uniform", seed=0)
    u = torch.tensor([uniform.sample_tau() for _ in range(20_000)])
    bound = 16 * 0.6  # 2^(5−1)·β
    assert u.abs().max().item() <= bound
    assert u.mean().item() == pytest.approx(0.0, abs=0.15)
    assert u.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # Var U(−a, a) = a²/3


def test_state_dict_replays_tau_draws():
    wmr = WeightMergingRegularizer(seed=3)
    state = wmr.state_dict()
    first = [wmr.sample_tau() for _ in range(30)]
    other = WeightMergingRegularizer(seed=99)
    other.load_state_dict(state)
    assert [other.sample_tau() for _ in range(30)] == first


def test_weight_merging_errors():
    with pytest.raises(ValueError, match=r"^weight_merging sampling must be one of \('discrete', 'point', 'normal', 'uniform'\), got 'gaussian'$"):
        WeightMergingRegularizer(sampling="gaussian")
    for beta in (0, -0.6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^weight_merging beta must be a positive finite number, got {beta}$"):
            WeightMergingRegularizer(beta=beta)
    for num_powers in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"^weight_merging num_powers must be an integer >= 1 .*got {num_powers}; sampling='point'"):
            WeightMergingRegularizer(num_powers=num_powers)
    with pytest.raises(ValueError, match=r"^weight_merging: the model has no ExpertContainer$"):
        with WeightMergingRegularizer().merged_region(nn.Linear(2, 2)):
            pass


def test_feature_mse_by_hand():
    mse = REGULARIZERS.build("feature_mse")
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    # (1² + 2² + 3² + 4²) / 4 = 30 / 4
    out = mse(pred, torch.zeros(2, 2))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(7.5)
    assert isinstance(mse, FeatureMSE)


def test_load_balance_pinned_by_hand():
    # identity gate on the tokens of test_routers: load_balance = 105/96, z_loss = (ln²6 + ln²8)/2 per container
    tokens = torch.tensor([[math.log(3), math.log(2), 0.0], [0.0, math.log(4), math.log(3)]])
    containers = []
    for _ in range(2):
        r = TopKRouter(num_experts=3, dim=3, k=1, renormalize=True)  # weight 1: identity experts pass the tokens on
        with torch.no_grad():
            r.gate.weight.copy_(torch.eye(3))
        containers.append(ExpertContainer([nn.Linear(3, 3) for _ in range(3)], r))
    model = nn.Sequential(*containers).train()
    with torch.no_grad():
        for c in containers:  # identity experts so that the second container sees the same tokens
            for e in c.experts:
                e.weight.copy_(torch.eye(3))
                e.bias.zero_()
    model(tokens)
    loss = REGULARIZERS.build("load_balance", coef=0.5, z_coef=0.1)(model)
    z = (math.log(6) ** 2 + math.log(8) ** 2) / 2
    assert loss.item() == pytest.approx(0.5 * 2 * 105 / 96 + 0.1 * 2 * z, abs=1e-5)
    # no topk router: zero
    plain = nn.Sequential(ExpertContainer([nn.Linear(3, 3) for _ in range(2)], "multinomial")).train()
    plain(tokens)
    assert LoadBalanceLoss()(plain).item() == 0.0
