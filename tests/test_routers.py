"""Routers: routing statistics, shapes per granularity, reproducibility, topk auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergekit_video.registry import ROUTERS
from mergekit_video.routers import (
    FixedRouter,
    MultinomialRouter,
    RouterOutput,
    TopKRouter,
    build_router,
    default_generator,
    multinomial_probs,
    num_groups,
)

DRAWS = 20_000


def _freqs(indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1), minlength=n).double() / indices.numel()


def test_multinomial_probs_by_hand():
    # softmax([1, 2, 3]) = e^i / (e + e² + e³)
    e = math.e
    z = e + e**2 + e**3
    assert torch.allclose(multinomial_probs(3), torch.tensor([e / z, e**2 / z, e**3 / z], dtype=torch.float64))
    # temperature 2: softmax([0.5, 1, 1.5]); temperature -1 reverses the order
    assert torch.allclose(multinomial_probs(3, 2.0), torch.softmax(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64), 0))
    assert torch.allclose(multinomial_probs(3, -1.0), multinomial_probs(3).flip(0))


def test_multinomial_probs_tiny_temperatures_are_one_hot_not_nan():
    for t, hot in ((1e-308, 2), (5e-324, 2), (-1e-308, 0), (-5e-324, 0)):
        assert torch.equal(multinomial_probs(3, t), torch.eye(3, dtype=torch.float64)[hot])
    assert torch.allclose(multinomial_probs(3, math.inf), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_multinomial_batch_frequencies():
    """MoTE Eq. 5 at batch granularity: one draw per forward, 20k forwards."""
    router = ROUTERS.build("multinomial", num_experts=4, seed=1234)
    x = torch.zeros(8, 5)
    idx = torch.cat([router(x).indices for _ in range(DRAWS)])  # [DRAWS, 1]
    expected = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), 0)
    assert (_freqs(idx, 4) - expected).abs().max() <= 0.01


@pytest.mark.parametrize("n, temperature", [(4, 2.0), (3, 0.5), (4, -1.0)])
def test_multinomial_frequencies_other_temperatures(n, temperature):
    router = ROUTERS.build("multinomial", num_experts=n, temperature=temperature, granularity="sample", seed=99)
    idx = router(torch.zeros(DRAWS, 2)).indices
    expected = torch.softmax(torch.arange(1, n + 1, dtype=torch.float64) / temperature, 0)
    assert (_freqs(idx, n) - expected).abs().max() <= 0.01


@pytest.mark.parametrize("granularity, shape, groups", [("sample", (DRAWS, 3, 4), DRAWS), ("token", (40, DRAWS // 40, 4), DRAWS)])
def test_multinomial_sample_and_token_frequencies(granularity, shape, groups):
    router = MultinomialRouter(num_experts=5, temperature=1.0, granularity=granularity, seed=7)
    out = router(torch.zeros(shape))
    assert out.indices.shape == (groups, 1) and out.indices.dtype == torch.long
    assert torch.equal(out.weights, torch.ones(groups, 1))
    assert out.granularity == granularity and out.aux_losses == {}
    assert (_freqs(out.indices, 5) - multinomial_probs(5)).abs().max() <= 0.01


def test_random_router_is_uniform():
    out = ROUTERS.build("random", num_experts=4, granularity="sample", seed=3)(torch.zeros(DRAWS, 2))
    assert (_freqs(out.indices, 4) - 0.25).abs().max() <= 0.01


@pytest.mark.parametrize("granularity, groups", [("batch", 1), ("sample", 2), ("token", 6)])
@pytest.mark.parametrize("name", ["multinomial", "random", "fixed"])
def test_shapes_per_granularity(name, granularity, groups):
    x = torch.zeros(2, 3, 4)  # [B, T, D]
    assert num_groups(x, granularity) == groups
    out = ROUTERS.build(name, num_experts=3, granularity=granularity)(x)
    assert isinstance(out, RouterOutput)
    assert out.indices.shape == (groups, 1) and out.weights.shape == (groups, 1)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 3


@pytest.mark.parametrize("name", ["multinomial", "random", "fixed"])
def test_batch_decisions_stay_on_cpu(name):
    """A batch-level decision is read with int() by the container: kept on the CPU, it needs no device sync."""
    x = torch.empty(2, 4, device="meta")  # any non-CPU device
    out = ROUTERS.build(name, num_experts=3)(x)
    assert out.indices.device.type == "cpu" and out.weights.device.type == "cpu"
    out = ROUTERS.build(name, num_experts=3, granularity="sample")(x)
    assert out.indices.device.type == "meta"  # per-sample decisions go to the input's device


def test_seeded_reproducibility_and_generator_state():
    x = torch.zeros(4, 2)

    def seq(router, k=50):
        return [int(router(x).indices) for _ in range(k)]

    a, b = MultinomialRouter(num_experts=4, seed=5), MultinomialRouter(num_experts=4, seed=5)
    assert seq(a) == seq(b)
    assert seq(MultinomialRouter(num_experts=4, seed=6)) != seq(MultinomialRouter(num_experts=4, seed=5))
    # an explicit generator is used as is
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert seq(ROUTERS.build("random", num_experts=4, generator=g1)) == seq(ROUTERS.build("random", num_experts=4, generator=g2))
    # without a seed, the generator is seeded from the global RNG: torch.manual_seed reproduces
    torch.manual_seed(0)
    r1 = MultinomialRouter(num_experts=4)
    torch.manual_seed(0)
    r2 = MultinomialRouter(num_experts=4)
    assert seq(r1) == seq(r2)
    # saving and restoring the generator state replays the same decisions
    state = r1.generator.get_state()
    first = seq(r1)
    r1.generator.set_state(state)
    assert seq(r1) == first
    assert default_generator(3).initial_seed() == 3


def test_fixed_router():
    r = FixedRouter(num_experts=4, expert=2, granularity="token")
    assert torch.equal(r(torch.zeros(2, 3, 5)).indices, torch.full((6, 1), 2))
    assert int(FixedRouter(num_experts=4, expert=-1)(torch.zeros(1, 1)).indices) == 3
    assert FixedRouter.stochastic is False and MultinomialRouter.stochastic is True
    with pytest.raises(ValueError, match=r"^fixed router expert=4 is out of range for 4 experts$"):
        FixedRouter(num_experts=4, expert=4)


def test_router_argument_errors():
    with pytest.raises(ValueError, match=r"^num_experts must be >= 1, got 0$"):
        MultinomialRouter(num_experts=0)
    with pytest.raises(ValueError, match=r"router granularity must be one of \('batch', 'sample', 'token'\), got 'frame'"):
        MultinomialRouter(num_experts=2, granularity="frame")
    for temperature in (0, float("nan")):
        with pytest.raises(ValueError, match=rf"^multinomial router temperature must be non-zero and not NaN, got {temperature}$"):
            MultinomialRouter(num_experts=2, temperature=temperature)
    with pytest.raises(ValueError, match=r"^topk router works at 'token' or 'sample' granularity, not 'batch'$"):
        TopKRouter(num_experts=2, dim=3, granularity="batch")
    with pytest.raises(ValueError, match=r"^topk router k=3 must be in \[1, 2\]$"):
        TopKRouter(num_experts=2, dim=3, k=3)


def test_build_router_passes_modules_through():
    r = FixedRouter(num_experts=2)
    assert build_router(r) is r
    assert isinstance(build_router("fixed", num_experts=2, expert=1), FixedRouter)


# -- topk: auxiliary losses pinned by hand ----------------------------------------------------
#
# Gate W = I (3×3), so the logits are the tokens themselves:
#   t1 = [ln 3, ln 2, 0] → e^logits = [3, 2, 1], Σ = 6 → p1 = [1/2, 1/3, 1/6],  logsumexp = ln 6
#   t2 = [0, ln 4, ln 3] → e^logits = [1, 4, 3], Σ = 8 → p2 = [1/8, 1/2, 3/8],  logsumexp = ln 8
# mean gate probability P = [(1/2+1/8)/2, (1/3+1/2)/2, (1/6+3/8)/2] = [5/16, 5/12, 13/48]
# z_loss = (ln²6 + ln²8) / 2 for any k.
#   k = 1: top-1 = [0, 1], f = [1/2, 1/2, 0]
#          load_balance = 3·(1/2·5/16 + 1/2·5/12) = 3·35/96 = 105/96
#   k = 2: top-2 = {0, 1} and {1, 2}; slots per expert [1, 2, 1] / (G·k = 4) → f = [1/4, 1/2, 1/4]
#          load_balance = 3·(1/4·5/16 + 1/2·5/12 + 1/4·13/48) = 3·68/192 = 204/192
#          weights: t1 [1/2, 1/3] / (5/6) = [3/5, 2/5];  t2 [1/2, 3/8] / (7/8) = [4/7, 3/7]
TOKENS = torch.tensor([[math.log(3), math.log(2), 0.0], [0.0, math.log(4), math.log(3)]])
Z_LOSS = (math.log(6) ** 2 + math.log(8) ** 2) / 2


def _identity_gate(router: TopKRouter) -> TopKRouter:
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(3))
    return router


def test_topk_k1_aux_losses_pinned():
    r = _identity_gate(ROUTERS.build("topk", num_experts=3, dim=3, k=1))
    out = r(TOKENS)
    assert torch.equal(out.indices, torch.tensor([[0], [1]]))
    assert torch.allclose(out.weights, torch.tensor([[1 / 2], [1 / 2]]), atol=1e-6)  # Switch: p, not p / p = 1
    assert out.aux_losses["load_balance"].item() == pytest.approx(105 / 96, abs=1e-6)
    assert out.aux_losses["z_loss"].item() == pytest.approx(Z_LOSS, abs=1e-5)


def test_topk_renormalize_flag():
    r = _identity_gate(TopKRouter(num_experts=3, dim=3, k=1, renormalize=True))
    assert torch.allclose(r(TOKENS).weights, torch.ones(2, 1))
    r = _identity_gate(TopKRouter(num_experts=3, dim=3, k=2, renormalize=False))
    assert torch.allclose(r(TOKENS).weights, torch.tensor([[1 / 2, 1 / 3], [1 / 2, 3 / 8]]), atol=1e-6)
    assert "renormalize=False" in repr(r)


def test_topk_k1_gate_learns_from_the_task_loss():
    from torch import nn

    from mergekit_video.experts import ExpertContainer

    norms = {}
    for renormalize in (None, True):
        torch.manual_seed(0)
        router = TopKRouter(num_experts=3, dim=4, k=1, renormalize=renormalize)
        c = ExpertContainer([nn.Linear(4, 4) for _ in range(3)], router).train()
        c(torch.randn(2, 5, 4)).pow(2).sum().backward()  # the task loss alone, no aux losses
        norms[renormalize] = router.gate.weight.grad.norm().item()
    assert norms[None] > 0.1  # the weight p carries the task gradient to the gate
    assert norms[True] < 1e-5  # p / p = 1: only rounding noise reaches the gate


def test_topk_k2_aux_losses_and_weights_pinned():
    r = _identity_gate(TopKRouter(num_experts=3, dim=3, k=2))
    out = r(TOKENS.view(1, 2, 3))  # [B, T, D]: token granularity flattens B·T
    assert torch.equal(out.indices, torch.tensor([[0, 1], [1, 2]]))
    assert torch.allclose(out.weights, torch.tensor([[3 / 5, 2 / 5], [4 / 7, 3 / 7]]), atol=1e-6)
    assert out.aux_losses["load_balance"].item() == pytest.approx(204 / 192, abs=1e-6)
    assert out.aux_losses["z_loss"].item() == pytest.approx(Z_LOSS, abs=1e-5)
    # the auxiliary losses are differentiable in the gate
    (out.aux_losses["load_balance"] + out.aux_losses["z_loss"]).backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0


def test_topk_sample_granularity_routes_the_mean_token():
    r = _identity_gate(TopKRouter(num_experts=3, dim=3, k=1, granularity="sample"))
    # sample b = two tokens whose mean is TOKENS[b]
    d = torch.tensor([0.3, -0.2, 0.1])
    x = torch.stack([torch.stack([t + d, t - d]) for t in TOKENS])  # [2, 2, 3]
    out = r(x)
    assert torch.equal(out.indices, torch.tensor([[0], [1]]))
    assert out.aux_losses["load_balance"].item() == pytest.approx(105 / 96, abs=1e-6)
    assert out.aux_losses["z_loss"].item() == pytest.approx(Z_LOSS, abs=1e-5)


def test_topk_gate_init_and_bf16_input():
    torch.manual_seed(0)
    r = TopKRouter(num_experts=8, dim=256, k=2)
    assert r.gate.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert "k=2" in repr(r)
    out = r(torch.randn(4, 256, dtype=torch.bfloat16))  # a bf16 model with an fp32 gate
    assert out.weights.dtype == torch.bfloat16 and out.indices.shape == (4, 2)


def test_topk_router_names_a_width_that_does_not_fit_its_dim():
    import re

    from torch import nn

    import mergekit_video as mv

    fix = "pass dim=8 (add_experts(..., dim=8), ExpertContainer(..., router_kwargs={'dim': 8}) or TopKRouter(dim=8))"
    r = TopKRouter(num_experts=2, dim=16)
    assert r.dim == 16 and r.dim_source is None  # given, not inferred
    for router, x in ((r, torch.randn(3, 8)), (TopKRouter(num_experts=2, dim=16, granularity="sample"), torch.randn(2, 5, 8))):
        with pytest.raises(ValueError, match="^" + re.escape(f"topk router: its input has width 8 (the last dim of x) but the router's dim is 16; {fix}") + "$"):
            router(x)

    class Rev(nn.Module):  # registers its output Linear first: the inferred dim is that Linear's in_features
        def __init__(self):
            super().__init__()
            self.out, self.inp = nn.Linear(16, 8), nn.Linear(8, 16)

        def forward(self, x):
            return self.out(torch.relu(self.inp(x)))

    model = nn.Sequential(Rev())
    mv.add_experts(model, "0", 2, router="topk")
    source = "inferred from the in_features of 'out', the first nn.Linear of the expert in registration order"
    with pytest.raises(ValueError, match="^" + re.escape(f"expert container '0': topk router: its input has width 8 (the last dim of x) but the router's dim is 16 ({source}); {fix}") + "$"):
        model.train()(torch.randn(3, 8))  # the error names the container by the module it replaced
    fixed = nn.Sequential(Rev())
    mv.add_experts(fixed, "0", 2, router="topk", dim=8)
    assert fixed.train()(torch.randn(3, 8)).shape == (3, 8)
    assert build_router("topk", num_experts=2, module=nn.Linear(5, 3)).dim_source == "inferred from the in_features of the expert, an nn.Linear"


def test_topk_sample_routing_of_a_convolution_reads_channels_not_width():
    """[B, C, H, W] input: a sample is its mean over positions [B, C] (it was the mean over C and H, read as width W)."""
    conv = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
    router = build_router("topk", num_experts=3, module=conv, granularity="sample", seed=0)
    assert (router.channels_first, router.dim) == (True, 6)
    assert router.dim_source == "inferred from the in_channels of '0', the first nn.Conv2d of the expert in registration order"
    x = torch.randn(4, 6, 5, 7)  # W = 7 ≠ C = 6
    out = router(x)
    logits = router.gate(x.mean(dim=(2, 3)))  # [B, C] → [B, E]
    assert torch.equal(out.indices[:, 0], logits.argmax(-1))
    with pytest.raises(ValueError, match=r"its input has width 5 \(dim 1 of x, channels first\) but the router's dim is 6"):
        router(torch.randn(4, 5, 6, 6))
    with pytest.raises(ValueError, match="channels_first inputs .* are routed per sample"):
        build_router("topk", num_experts=3, module=conv, granularity="token", channels_first=True)


def test_topk_keeps_fp64_and_checks_gradients_exactly():
    """The gate's logits are at least fp32: an fp64 model's routing stays fp64 (gradcheck passes)."""
    torch.manual_seed(0)
    r = TopKRouter(num_experts=3, dim=4, k=2).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = r(x)
    assert out.weights.dtype == torch.float64 and out.aux_losses["z_loss"].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: r(x).weights, (x,))
    assert torch.autograd.gradcheck(lambda x: r(x).aux_losses["z_loss"], (x,))


def test_topk_width_error_of_a_channels_first_input_suggests_channels_first():
    """A [B, C, H, W] input whose C is the router's dim: 'pass dim=W' would route on the image width."""
    from mergekit_video import ExpertContainer

    c = ExpertContainer([nn.Conv2d(3, 4, 3) for _ in range(2)], TopKRouter(num_experts=2, dim=3, granularity="sample"))
    with pytest.raises(ValueError, match=r"its input has width 32 \(the last dim of x\) but the router's dim is 3, which is dim 1 of x: "
                                         r"for channels-first inputs \(convolutions\) pass channels_first=True"):
        c.train()(torch.randn(2, 3, 32, 32))
    c = ExpertContainer([nn.Conv2d(3, 4, 3) for _ in range(2)],
                        TopKRouter(num_experts=2, dim=3, granularity="sample", channels_first=True))
    assert c.train()(torch.randn(2, 3, 32, 32)).shape == (2, 4, 30, 30)


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_topk_routes_an_empty_batch_with_zero_aux_losses(granularity):
    """An empty batch (the last shard of a DDP evaluation, a filtered batch): no reshape error, and aux
    losses of 0 that keep the graph (a mean over no token would be NaN and poison the total loss)."""
    from torch import nn

    from mergekit_video import ExpertContainer

    c = ExpertContainer([nn.Linear(4, 4) for _ in range(3)], router="topk", router_kwargs={"granularity": granularity, "k": 2})
    y = c(torch.randn(0, 5, 4))
    assert y.shape == (0, 5, 4)
    assert {k: v.item() for k, v in c.aux_losses.items()} == {"load_balance": 0.0, "z_loss": 0.0}
    sum(c.aux_losses.values()).backward()
    assert c.router.gate.weight.grad is not None and torch.equal(c.router.gate.weight.grad, torch.zeros(3, 4))


def test_router_arguments_of_the_wrong_type_are_refused_naming_them():
    """k=2.5 ran with k=2 (config.json said 2.5), expert=1.5 routed to 1, renormalize='false' became True via bool(),
    and generator=1 failed in the first forward with torch's randn signature dump."""
    from mergekit_video.routers import RouterArgumentError, build_router

    expert = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    cases = [
        ("topk", {"k": 2.5}, "k", "topk router k must be an int (experts per group), got float (2.5)"),
        ("topk", {"k": True}, "k", "topk router k must be an int (experts per group), got bool (True)"),
        ("fixed", {"expert": 1.5}, "expert", "fixed router expert must be an int (an expert index), got float (1.5)"),
        ("fixed", {"expert": True}, "expert", "fixed router expert must be an int (an expert index), got bool (True)"),
        ("topk", {"k": 2, "renormalize": "false"}, "renormalize",
         "topk router renormalize must be true, false or null (only when k > 1), got str ('false')"),
        ("multinomial", {"generator": 1}, "generator", "router generator must be a torch.Generator (set seed for a seeded one), got int (1)"),
    ]
    for name, kwargs, argument, said in cases:
        with pytest.raises(RouterArgumentError) as e:
            build_router(name, num_experts=4, module=expert, **kwargs)
        assert str(e.value) == said and e.value.argument == argument and isinstance(e.value, TypeError)
    assert build_router("topk", num_experts=4, module=expert, k=2, renormalize=False).renormalize is False
    assert build_router("fixed", num_experts=4, module=expert, expert=-1).expert == 3
    import numpy as np  # integral types other than int are ints

    fixed = build_router("fixed", num_experts=4, module=expert, expert=np.int64(2))
    assert fixed.expert == 2 and type(fixed.expert) is int
    assert build_router("topk", num_experts=4, module=expert, k=np.int32(2)).k == 2


def test_a_recipe_names_the_router_argument_of_the_wrong_type():
    from mergekit_video.cli.commands import _load_validated
    from mergekit_video.config import ValidationError

    from pathlib import Path

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    with pytest.raises(ValidationError) as e:
        _load_validated(quickstart, ["model.router=topk", "model.router_kwargs.k=2.5"])
    assert {p.path: p.message for p in e.value.problems} == {
        "model.router_kwargs.k": "'topk' with {'k': 2.5} for 4 experts: topk router k must be an int (experts per group), got float (2.5)"}
