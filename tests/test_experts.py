"""ExpertContainer: structure checks, routed training, cached merged eval, merged_forward, plans, collapse."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergekit_video import ExpertContainer
from mergekit_video.experts import (
    ExpertEnsemble,
    checkpoint_routed,
    collect_aux_losses,
    find_containers,
    load_router_generator_states,
    router_generator_states,
    routing_plan,
    use_expert,
    use_merge,
    use_merge_weights,
)
from mergekit_video.registry import RegistryError
from mergekit_video.routers import FixedRouter, MultinomialRouter, RandomRouter, TopKRouter


class MLP(nn.Module):
    """Toy FFN expert: fc2(gelu(fc1(x)))."""

    def __init__(self, dim: int = 4, hidden: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def experts(n: int = 3, seed: int = 0, **kw) -> list[MLP]:
    torch.manual_seed(seed)
    return [MLP(**kw) for _ in range(n)]


def mean_sd(mods) -> dict[str, torch.Tensor]:
    sds = [m.state_dict() for m in mods]
    return {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- construction ------------------------------------------------------------------------------------


def test_structure_errors_name_the_tensor():
    m = MLP()
    cases = [
        ([], r"^ExpertContainer needs at least one expert$"),
        ([m, m], r"^expert 1 shares parameters with expert 0; pass independent copies \(copy.deepcopy\)$"),
        ([MLP(), nn.Linear(4, 4)], r"^expert 1 is a Linear but expert 0 is a MLP$"),
        ([MLP(hidden=8), MLP(hidden=6)], r"^tensor 'fc1.weight' differs: expert 0 has shape \(8, 4\), expert 1 has \(6, 4\)$"),
        ([MLP(), MLP().double()], r"^tensor 'fc1.weight' differs: expert 0 has dtype torch.float32, expert 1 has torch.float64$"),
        ([MLP(), MLP(bias=False)], r"^expert 1 has no tensor 'fc1.bias', which expert 0 has$"),
        ([MLP(bias=False), MLP()], r"^expert 1 has tensor 'fc1.bias', which expert 0 lacks$"),
    ]
    for mods, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ExpertContainer(mods, "fixed")
    shared = MLP()
    other = MLP()
    other.fc2 = shared.fc2  # one shared submodule is enough to refuse
    with pytest.raises(ValueError, match=r"^expert 1 shares parameters with expert 0"):
        ExpertContainer([shared, other], "fixed")


def test_structure_check_compares_submodules_without_tensors():
    # a parameter-free activation differs: eval and merged_forward would run expert 0's for every expert
    tanh = MLP()
    tanh.act = nn.Tanh()
    with pytest.raises(ValueError, match=r"^submodule 'act' differs: expert 0 has GELU\(approximate='none'\), expert 1 has Tanh\(\)$"):
        ExpertContainer([MLP(), tanh], "fixed")
    approx = MLP()
    approx.act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match=r"^submodule 'act' differs: .*GELU\(approximate='tanh'\)$"):
        ExpertContainer([MLP(), approx], "fixed")
    extra = MLP()
    extra.drop = nn.Dropout(0.1)
    with pytest.raises(ValueError, match=r"^expert 1 has submodule 'drop', which expert 0 lacks$"):
        ExpertContainer([MLP(), extra], "fixed")


def test_independently_parametrized_experts_share_one_structure():
    # torch.nn.utils.parametrize makes a new Parametrized<Class> per module: the original class is compared
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    c = ExpertContainer([nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.ReLU()) for _ in range(2)], "fixed").eval()
    x = torch.randn(3, 4)
    assert maxdiff(c(x), c.collapse()(x)) == 0.0
    with pytest.raises(ValueError, match=r"^expert 1 has no tensor '0.parametrizations.weight.original0', which expert 0 has$"):
        ExpertContainer([nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ReLU())], "fixed")


def test_set_merge_copies_list_arguments():
    # editing the caller's list afterwards changes neither the cached eval merge nor collapse()
    torch.manual_seed(0)
    c = ExpertContainer(experts(3), "random").eval()
    w = [1.0, 2.0, 3.0]
    c.set_merge("weighted", weights=w)
    x = torch.randn(2, 4)
    y = c(x)
    w[0] = 50.0
    assert list(c.merge_kwargs["weights"]) == [1.0, 2.0, 3.0]
    assert maxdiff(c(x), y) == 0.0 and maxdiff(c.collapse()(x), y) < 1e-6


def test_router_and_merge_argument_errors():
    with pytest.raises(ValueError, match=r"^router is built for 3 experts but the container has 2$"):
        ExpertContainer(experts(2), FixedRouter(num_experts=3))
    with pytest.raises(RegistryError, match=r"^unknown merge strategy 'meen'; did you mean 'mean'\?"):
        ExpertContainer(experts(2), "fixed", merge="meen")
    with pytest.raises(RegistryError, match=r"^unknown router 'topq'; did you mean 'topk'\?"):
        ExpertContainer(experts(2), "topq")
    c = ExpertContainer(experts(2), "multinomial", router_kwargs={"temperature": 2.0, "seed": 1})
    assert c.router.temperature == 2.0 and c.num_experts == 2
    assert repr(c).startswith("ExpertContainer(\n") and "num_experts=2, merge='mean'" in repr(c)
    with pytest.raises(RegistryError, match=r"^unknown merge strategy 'max'"):
        c.set_merge("max")
    # state-dict keys: experts.{i}.<expert keys>
    assert sorted(c.state_dict()) == sorted(f"experts.{i}.{k}" for i in range(2) for k in MLP().state_dict())


# -- eval: one cached merge ---------------------------------------------------------------------------


def test_eval_equals_dense_mean_and_merges_once():
    mods = experts(3)
    c = ExpertContainer(copy.deepcopy(mods), "multinomial").eval()
    dense = MLP()
    dense.load_state_dict(mean_sd(mods))  # MoTE Eq. 6 by hand
    x = torch.randn(5, 7, 4)
    outs = [c(x) for _ in range(4)]
    assert maxdiff(outs[0], dense(x)) <= 1e-6
    assert c.merge_count == 1  # four eval forwards, one merge
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert c.last_routing is None  # the router never ran
    assert all(not p.requires_grad for p in c.merged_module().parameters())


def test_merge_cache_invalidation():
    c = ExpertContainer(experts(3), "multinomial", router_kwargs={"seed": 0})
    x = torch.randn(6, 4)
    c.eval()
    c(x)
    assert c.merge_count == 1
    # an optimizer step changes the experts: the next eval forward merges again, with the new weights
    c.train()
    opt = torch.optim.SGD(c.parameters(), lr=0.5)
    c(x).pow(2).sum().backward()
    opt.step()
    c.eval()
    c(x)
    c(x)
    assert c.merge_count == 2
    dense = MLP()
    dense.load_state_dict(mean_sd(c.experts))
    assert maxdiff(c(x), dense(x)) <= 1e-6
    # load_state_dict writes in place: invalidated
    other = ExpertContainer(experts(3, seed=5), "multinomial")
    c.load_state_dict(other.state_dict())
    c(x)
    assert c.merge_count == 3
    dense.load_state_dict(mean_sd(other.experts))
    assert maxdiff(c(x), dense(x)) <= 1e-6
    # changing the strategy invalidates; a no-op does not
    c.set_merge("temperature_softmax", tau=0.0)
    assert maxdiff(c(x), c.experts[-1](x)) <= 1e-6
    assert c.merge_count == 4
    # writes through .data are invisible to version counters: invalidate_merge() is the escape hatch
    with torch.no_grad():
        c.experts[2].fc2.bias.data += 1.0
    c(x)
    assert c.merge_count == 4
    c.invalidate_merge()
    assert maxdiff(c(x), c.experts[-1](x)) <= 1e-6
    assert c.merge_count == 5
    # a dtype change (new tensors) is seen as well
    c.double()
    c(x.double())
    assert c.merge_count == 6 and c.merged_module().fc1.weight.dtype == torch.float64
    # a train() → eval() round trip always re-merges, even after writes no version counter saw
    with torch.no_grad():
        c.experts[2].fc2.bias.data -= 1.0
    c.train()
    c.eval()
    c(x.double())
    assert c.merge_count == 7
    assert maxdiff(c(x.double()), c.experts[-1](x.double())) <= 1e-9  # τ → 0⁺ merge = last expert


def test_merge_cache_survives_unrelated_modules_and_tracks_strategy_assignment():
    c = ExpertContainer(experts(3), "multinomial").eval()
    x = torch.randn(6, 4)
    c(x)
    MLP()  # registering modules elsewhere moves the structure epoch, not the experts
    c(x)
    assert c.merge_count == 1
    # replacing an expert tensor (a registration) is seen
    c.experts[1].fc1.bias = nn.Parameter(torch.zeros(8))
    c(x)
    assert c.merge_count == 2
    dense = MLP()
    dense.load_state_dict(mean_sd(c.experts))
    assert maxdiff(c(x), dense(x)) <= 1e-6
    # set_merge and assigning the strategy invalidate; the arguments are read-only outside set_merge
    c.set_merge("temperature_softmax", tau=0.0)
    assert maxdiff(c(x), c.experts[-1](x)) <= 1e-6 and c.merge_count == 3
    with pytest.raises(TypeError):
        c.merge_kwargs["tau"] = float("inf")
    c.merge = "mean"  # the strategy's own defaults
    assert dict(c.merge_kwargs) == {}
    assert maxdiff(c(x), dense(x)) <= 1e-6 and c.merge_count == 3  # the mean merged before is kept


def test_switching_merges_back_and_forth_merges_each_once():
    """An evaluation comparing merges sets each strategy for a batch, then the default again."""
    c = ExpertContainer(experts(3), "fixed").eval()
    x = torch.randn(6, 4)
    merges = [("temperature_softmax", {"tau": 0.6}), ("temperature_softmax", {"tau": -0.6}), ("ensemble", {}), ("weighted", {"weights": [1, 2, 3]})]
    outputs = {}
    for _ in range(3):  # three batches
        outputs["mean"] = c(x)
        for i, (name, kw) in enumerate(merges):
            with use_merge(c, name, **kw):
                outputs[i] = c(x)
    assert c.merge_count == 1 + len(merges)
    for i, (name, kw) in enumerate(merges):
        assert maxdiff(outputs[i], c.collapse(name, **kw)(x)) <= 1e-6
    # a changed expert is seen by every kept merge; invalidate_merge() drops them all
    with torch.no_grad():
        c.experts[0].fc1.weight.add_(1.0)
    with use_merge(c, "temperature_softmax", tau=0.6):
        assert maxdiff(c(x), c.collapse("temperature_softmax", tau=0.6)(x)) <= 1e-6
    assert c.merge_count == 1 + len(merges) + 1
    c.invalidate_merge()
    c(x)
    assert c.merge_count == 1 + len(merges) + 2
    # a kept merge is keyed by its arguments' tensors: a base module changed in place is another merge
    base = MLP()
    t = ExpertContainer(experts(2), "fixed", merge="task_arithmetic", merge_kwargs={"base": base}).eval()
    t(x)
    t.set_merge("mean")
    t(x)
    with torch.no_grad():
        base.fc1.weight.mul_(3.0)
    t.set_merge("task_arithmetic", base=base)
    assert maxdiff(t(x), t.collapse()(x)) <= 1e-6
    # a copy keys its merges by its own tensors
    w = torch.tensor([1.0, 3.0])
    t.set_merge("weighted", weights=w)
    clone = copy.deepcopy(t)
    assert clone._merge_key != t._merge_key and clone._merge_key[1] != t._merge_key[1]
    # the pool is bounded; 0 keeps none
    c.merge_pool_size = 0
    for name, kw in merges[:2] * 2:
        with use_merge(c, name, **kw):
            c(x)
    assert c.merge_count == 1 + len(merges) + 2 + 4  # each of the four forwards merges again
    assert len(c._merge_pool) == 0  # lowering the size let the kept merges go


def test_eval_merge_follows_tensors_swapped_in_by_functional_call():
    c = ExpertContainer(experts(3), "multinomial").eval()
    other = ExpertContainer(experts(3, seed=7), "multinomial")
    params = {k: v.detach() for k, v in other.named_parameters()}
    dense = MLP()
    dense.load_state_dict(mean_sd(other.experts))
    x = torch.randn(6, 4)
    y0 = c(x)  # no module is registered from here on
    y = torch.func.functional_call(c, params, (x,))  # swaps tensors into the slots, no registration
    assert maxdiff(y, dense(x)) <= 1e-6
    assert maxdiff(c(x), y0) <= 1e-6  # the original tensors are back: merged from them again
    assert c.merge_count == 3
    # tensors that carry a graph (e.g. params * 2 of a meta-learning step) merge as constants
    graph_params = {k: v * 2 for k, v in c.named_parameters()}
    y2 = torch.func.functional_call(c, graph_params, (x,))
    dense.load_state_dict(mean_sd(c.experts))
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(2)
    assert maxdiff(y2, dense(x)) <= 1e-6


def test_eval_containers_work_under_torch_func_transforms_before_and_after_the_merge_is_cached():
    """vmap / jacrev over the input use the cached merge (built outside the transforms); grad or vmap over the
    experts' tensors (functional_call, stack_module_state) merge them in the graph: mean → gradient 1/N each."""
    c = ExpertContainer(experts(3), "multinomial").eval()
    dense = MLP()
    dense.load_state_dict(mean_sd(c.experts))
    x = torch.randn(6, 4)
    with torch.no_grad():
        ref = dense(x)
    assert maxdiff(torch.func.vmap(c)(x), ref) <= 1e-6  # first forward: the merge is built under vmap
    assert c.merge_count == 1
    assert maxdiff(torch.func.jacrev(c)(x[0]), torch.func.jacrev(dense)(x[0])) <= 1e-6
    assert c.merge_count == 1  # cached: no merge per transformed call
    params = {k: v.detach() for k, v in c.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(c, p, (x,)).sum())(params)
    dense_grads = torch.func.grad(lambda p: torch.func.functional_call(dense, p, (x,)).sum())(dict(dense.named_parameters()))
    for k, g in grads.items():  # experts.i.fc1.weight: a third of the dense module's gradient
        assert maxdiff(g, dense_grads[k.split(".", 2)[2]] / 3) <= 1e-6, k
    models = [ExpertContainer(experts(3, seed=s), "multinomial").eval() for s in (1, 2)]
    stacked, buffers = torch.func.stack_module_state(models)
    shell = copy.deepcopy(models[0]).to("meta")
    outs = torch.func.vmap(lambda p, b: torch.func.functional_call(shell, (p, b), (x,)))(stacked, buffers)
    with torch.no_grad():
        assert all(maxdiff(outs[i], m(x)) <= 1e-6 for i, m in enumerate(models))
    slerp = ExpertContainer(experts(2), "multinomial", merge="slerp", merge_kwargs={"t": 0.3}).eval()
    assert torch.func.vmap(slerp)(x).shape == (6, 4)  # over the input: the cached merge, any strategy
    with pytest.raises(RuntimeError, match=r"under torch.func transforms over the experts' tensors, an eval-mode container merges "
                                           r"with a linear strategy only \(its merge is 'slerp'\)"):
        torch.func.grad(lambda p: torch.func.functional_call(slerp, p, (x,)).sum())({k: v.detach() for k, v in slerp.named_parameters()})


def test_use_merge_works_under_torch_func_transforms_as_plain_eval_mode_does():
    """Defect: the "merged" plan of use_merge called the cached merge directly, skipping the torch.func branch of plain
    eval mode: grad over functional_call failed ("Cannot access storage of TensorWrapper") and a first vmap under a
    ties merge failed in requires_grad_. Now: mean → each expert gets 1/3 of the dense gradient; vmap(ties) = ties dense."""
    base = MLP()
    c = ExpertContainer([copy.deepcopy(base) for _ in range(3)], "multinomial").eval()
    with torch.no_grad():
        for i, e in enumerate(c.experts):
            for p in e.parameters():
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    dense = MLP()
    dense.load_state_dict(mean_sd(c.experts))
    x = torch.randn(6, 4)
    model = nn.Sequential(c)  # use_merge slices base per container name: "0"
    params = {k: v.detach() for k, v in model.named_parameters()}
    with use_merge(model, "mean"):
        grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    dense_grads = torch.func.grad(lambda p: torch.func.functional_call(dense, p, (x,)).sum())(dict(dense.named_parameters()))
    for k, g in grads.items():  # 0.experts.i.fc1.weight
        assert maxdiff(g, dense_grads[k.split(".", 3)[3]] / 3) <= 1e-6, k
    ties_dense = c.collapse("ties", base=base, density=0.5).eval()
    with use_merge(model, "ties", base=nn.Sequential(base), density=0.5):
        y = torch.func.vmap(model)(x.unsqueeze(1))  # the first forward under this merge: built outside the transform
    with torch.no_grad():
        assert maxdiff(y.squeeze(1), ties_dense(x)) <= 1e-6


def test_merge_cached_under_inference_mode_still_supports_autograd():
    c = ExpertContainer(experts(2), "fixed").eval()
    with torch.inference_mode():
        y = c(torch.randn(3, 4))
    assert y.is_inference() and c.merge_count == 1
    x = torch.randn(3, 4, requires_grad=True)
    c(x).sum().backward()  # the cached dense module holds ordinary tensors
    assert x.grad is not None and c.merge_count == 1
    # a model built inside inference mode: inference tensors have no version counters, so changes
    # cannot be seen and the merge is not cached (recomputed per forward, with one warning)
    x = torch.randn(3, 4)
    with torch.inference_mode():
        d = ExpertContainer(experts(2), "fixed").eval()
        with pytest.warns(UserWarning, match="inference tensors .* recomputed in every forward") as caught:
            d(x)
            d.load_state_dict({k: torch.ones_like(v) for k, v in d.state_dict().items()})
            y = d(x)
    assert d.merge_count == 2 and len(caught) == 1
    assert maxdiff(y, (8 * F.gelu(x.sum(-1, keepdim=True) + 1) + 1).expand(3, 4)) <= 1e-5  # all-ones MLP(4, 8)


# -- merged_forward ----------------------------------------------------------------------------------


def test_merged_forward_matches_functional_forward_and_gradients():
    mods = experts(3)
    c = ExpertContainer(mods, "multinomial")
    ref = [{k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()} for m in mods]
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    x = torch.randn(5, 4)

    # hand-built functional forward with θ = Σ w_i θ_i
    def merged(name):
        return sum(w_ref[i] * ref[i][name] for i in range(3))

    h = F.gelu(F.linear(x, merged("fc1.weight"), merged("fc1.bias")))
    y_ref = F.linear(h, merged("fc2.weight"), merged("fc2.bias"))
    y = c.merged_forward(x, w)
    assert maxdiff(y, y_ref) <= 1e-6
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for i, m in enumerate(mods):
        for k, p in m.named_parameters():
            assert p.grad is not None and maxdiff(p.grad, ref[i][k].grad) <= 1e-6, (i, k)
    assert maxdiff(w.grad, w_ref.grad) <= 1e-5
    # the expert gradients are w_i times the gradient of the merged tensor
    assert maxdiff(mods[0].fc1.weight.grad / 0.2, mods[2].fc1.weight.grad / 0.5) <= 1e-5
    with pytest.raises(ValueError, match=r"^merged_forward needs weights of shape \[3\] \(one per expert\), got \[2\]$"):
        c.merged_forward(x, [0.5, 0.5])


def test_merged_forward_composes_with_torch_func_grad_and_vmap():
    class MergedWith(nn.Module):  # functional_call calls forward, so route it to merged_forward
        def __init__(self, container: ExpertContainer, w: torch.Tensor) -> None:
            super().__init__()
            self.container, self.w = container, w

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.container.merged_forward(x, self.w)

    c = ExpertContainer(experts(3), "multinomial")
    w = torch.tensor([0.2, 0.3, 0.5])
    wrapper = MergedWith(c, w)
    params = {k: v.detach() for k, v in wrapper.named_parameters()}
    x = torch.randn(5, 4)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)  # torch.func.grad over every expert parameter
    wrapper(x).square().sum().backward()
    assert grads.keys() == dict(wrapper.named_parameters()).keys()
    for k, p in wrapper.named_parameters():
        assert maxdiff(grads[k], p.grad) <= 1e-6, k
    with torch.no_grad():
        per_sample = torch.func.vmap(lambda row: c.merged_forward(row, w))(x)  # vmap over the batch
        assert maxdiff(per_sample, c.merged_forward(x, w)) <= 1e-6


# -- train: routing -------------------------------------------------------------------------------------


def test_batch_routing_runs_the_chosen_expert():
    c = ExpertContainer(experts(4), "multinomial", router_kwargs={"seed": 3}).train()
    x = torch.randn(3, 4)
    seen = set()
    for _ in range(30):
        y = c(x)
        idx = int(c.last_routing.indices)
        seen.add(idx)
        assert torch.equal(y, c.experts[idx](x))
    assert len(seen) >= 3 and c.aux_losses == {}


def test_sample_routing_per_sample():
    c = ExpertContainer(experts(3), "random", router_kwargs={"granularity": "sample", "seed": 0}).train()
    x = torch.randn(16, 5, 4)  # [B, T, D]
    y = c(x)
    idx = c.last_routing.indices.view(-1)
    assert idx.shape == (16,) and len(set(idx.tolist())) == 3
    expected = torch.cat([c.experts[int(i)](x[b : b + 1]) for b, i in enumerate(idx)])
    assert y.shape == x.shape and maxdiff(y, expected) <= 1e-6
    with pytest.raises(ValueError, match=r"^expert container: per-sample routing splits the input among the experts, but the experts also get the tensor argument 1,"):
        c(x, torch.ones(1))


class MaskedAttention(nn.Module):
    """timm's Attention signature: ``forward(x, attn_mask=None)`` on ``[B, N, C]``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def test_sample_routing_passes_arguments_that_are_not_tensors_and_token_routing_names_a_mixing_expert():
    c = ExpertContainer([MaskedAttention() for _ in range(2)], "random", router_kwargs={"granularity": "sample", "seed": 0}).train()
    x = torch.randn(6, 5, 4)  # [B, N, C]
    y = c(x, attn_mask=None)  # as a timm Block calls its attention
    idx = c.last_routing.indices.view(-1)
    assert set(idx.tolist()) == {0, 1}
    expected = torch.cat([c.experts[int(i)](x[b : b + 1]) for b, i in enumerate(idx)])
    assert maxdiff(y, expected) <= 1e-6
    with pytest.raises(ValueError, match=r"tensor argument 'attn_mask', which it cannot split alike; route per batch"):
        c(x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    c.router = RandomRouter(num_experts=2, granularity="token", seed=0)
    with pytest.raises(RuntimeError, match=r"a \[tokens, 4\] matrix, and the expert \(MaskedAttention\) failed on it: a module that mixes positions"):
        c(x, attn_mask=None)


def test_sample_routing_onto_a_batchnorm_expert_that_gets_one_sample_is_named_and_explained():
    """Defect: a sample-routed expert holding a BatchNorm that got one sample re-raised torch's unlabelled "Expected more
    than 1 value per channel when training". Now the error names the container, the expert, its sub-batch and the fix."""
    from mergekit_video.routers import AssignedRouter

    model = nn.Sequential(ExpertContainer([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2)], "fixed")).train()
    model[0].target_name = "block.mlp"
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"^expert container 'block.mlp': per-sample routing runs each expert on the samples routed "
                                         r"to it, a sub-batch \(expert 1 got 1\), and a BatchNorm in the expert needs more than one "
                                         r"sample per expert in training; route it per batch \(granularity='batch'"):
        with routing_plan(model, AssignedRouter(num_experts=2, indices=[0, 0, 1])):
            model(x)
    with routing_plan(model, AssignedRouter(num_experts=2, indices=[0, 1, 1, 0])), torch.no_grad():
        assert model(torch.randn(4, 4)).shape == (4, 4)  # two samples per expert: fine


def test_topk_token_routing_combines_weighted_experts():
    torch.manual_seed(0)
    mods = [nn.Linear(4, 4) for _ in range(3)]
    router = TopKRouter(num_experts=3, dim=4, k=2)
    with torch.no_grad():
        router.gate.weight.normal_()
    c = ExpertContainer(mods, router).train()
    x = torch.randn(2, 5, 4)  # [B, T, D] → 10 tokens
    y = c(x)
    r = c.last_routing
    assert r.indices.shape == (10, 2) and y.shape == x.shape
    tokens = x.reshape(10, 4)
    expected = torch.stack(
        [sum(r.weights[t, j] * mods[int(r.indices[t, j])](tokens[t]) for j in range(2)) for t in range(10)]
    ).view(2, 5, 4)
    assert maxdiff(y, expected) <= 1e-6
    assert set(c.aux_losses) == {"load_balance", "z_loss"}
    # two containers: collect_aux_losses sums them
    model = nn.Sequential(c, ExpertContainer([nn.Linear(4, 4) for _ in range(3)], TopKRouter(num_experts=3, dim=4)))
    model.train()(x)
    total = collect_aux_losses(model)
    assert torch.allclose(total["load_balance"], model[0].aux_losses["load_balance"] + model[1].aux_losses["load_balance"])
    # and the gate learns from the task loss through the routing weights
    y.sum().backward()
    assert router.gate.weight.grad is not None


# -- routing plans --------------------------------------------------------------------------------------


def _two_layer():
    torch.manual_seed(1)
    return nn.Sequential(
        ExpertContainer([MLP() for _ in range(3)], "multinomial"),
        ExpertContainer([MLP() for _ in range(3)], "multinomial"),
    )


def test_routing_plans():
    model = _two_layer()
    x = torch.randn(5, 4)
    a, b = model[0], model[1]
    with use_expert(model, 1) as containers:
        assert [n for n, _ in containers] == ["0", "1"]
        assert torch.equal(model(x), b.experts[1](a.experts[1](x)))
    model.train()
    with routing_plan(model, "merged"):  # the eval behaviour in train mode
        assert maxdiff(model(x), b.merged_module()(a.merged_module()(x))) <= 1e-6
    model.eval()
    with routing_plan(model, "routed"):  # the train behaviour in eval mode
        model(x)
        assert a.last_routing is not None
    w = torch.tensor([0.1, 0.2, 0.7])
    with use_merge_weights(model, w):
        assert maxdiff(model(x), b.merged_forward(a.merged_forward(x, w), w)) <= 1e-6
    with use_merge_weights(model, {"0": [1.0, 0.0, 0.0], "1": [0.0, 0.0, 1.0]}):
        assert maxdiff(model(x), b.experts[2](a.experts[0](x))) <= 1e-6
    with routing_plan(model, lambda name, c: 0 if name == "0" else 2):
        assert torch.equal(model(x), b.experts[2](a.experts[0](x)))
    with routing_plan(model, "ensemble"):  # every expert on all inputs, outputs averaged, differentiable
        h = sum(e(x) for e in a.experts) / 3
        assert maxdiff(model(x), sum(e(h) for e in b.experts) / 3) <= 1e-6
    # segments: samples 0-1 through expert 0, samples 2-4 through the merge
    with routing_plan(model, [(2, 0), (3, "merged")]):
        y = model(x)
    assert torch.equal(y[:2], b.experts[0](a.experts[0](x[:2])))
    assert maxdiff(y[2:], b.merged_module()(a.merged_module()(x[2:]))) <= 1e-6
    # plans nest and are restored
    with use_expert(model, 0):
        with use_expert(model, 2):
            assert a._plan == 2
        assert a._plan == 0
    assert a._plan is None and b._plan is None
    with use_merge(model, "temperature_softmax", tau=-0.0):  # τ → 0⁻: the first expert
        assert maxdiff(model(x), b.experts[0](a.experts[0](x))) <= 1e-6
        assert a.merge == "temperature_softmax"
    assert a.merge == "mean" and a.merge_kwargs == {}


def test_routing_plan_errors():
    model = _two_layer()
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"^routing_plan: the model has no ExpertContainer \(did you call add_experts\?\)$"):
        with routing_plan(nn.Linear(2, 2), 0):
            pass
    with pytest.raises(KeyError, match=r"routing plan has no entry for container '1'"):
        with routing_plan(model, {"0": 1}):
            pass
    assert model[0]._plan is None  # restored after the failure
    with pytest.raises(ValueError, match=r"^unknown routing plan 'dense'; expected 'routed', 'merged', 'ensemble', an int, weights or a Router$"):
        with routing_plan(model, "dense"):
            model(x)
    with pytest.raises(ValueError, match=r"^plan segments cover 4 samples but the batch has 5$"):
        with routing_plan(model, [(2, 0), (2, 1)]):
            model(x)
    with pytest.raises(TypeError, match=r"^unsupported routing plan of type float$"):
        with routing_plan(model, 0.5):
            model(x)


def test_router_generator_states_round_trip():
    model = _two_layer().train()
    x = torch.randn(2, 4)
    states = router_generator_states(model)
    assert set(states) == {"0", "1"}

    def run():
        out = []
        for _ in range(20):
            model(x)
            out.append((int(model[0].last_routing.indices), int(model[1].last_routing.indices)))
        return out

    first = run()
    load_router_generator_states(model, states)
    assert run() == first
    with pytest.raises(KeyError, match=r"no saved router RNG state for container '1'"):
        load_router_generator_states(model, {"0": states["0"]})
    assert [n for n, _ in find_containers(model)] == ["0", "1"]


# -- collapse ---------------------------------------------------------------------------------------------


def test_collapsed_parameters_require_grad_if_any_expert_does():
    mods = experts(3)
    base = copy.deepcopy(mods[0])
    for m in mods:
        m.fc2.requires_grad_(False)  # frozen in every expert
    mods[0].fc1.weight.requires_grad_(False)  # frozen in expert 0 only
    mods[2].fc1.bias.requires_grad_(False)
    c = ExpertContainer(mods, "multinomial")
    for dense in (c.collapse("mean"), c.collapse("task_arithmetic", base=base)):
        flags = {n: p.requires_grad for n, p in dense.named_parameters()}
        assert flags == {"fc1.weight": True, "fc1.bias": True, "fc2.weight": False, "fc2.bias": False}
    assert not mods[0].fc1.weight.requires_grad  # the experts keep their own flags
    assert not any(p.requires_grad for p in c.eval().merged_module().parameters())  # the eval cache is a constant


def test_unseeded_dare_eval_merge_is_the_exported_collapse():
    mods = experts(3)
    base = copy.deepcopy(mods[0])
    c = ExpertContainer(mods, "multinomial", merge="dare", merge_kwargs={"base": base, "drop_rate": 0.5}).eval()
    rng = torch.get_rng_state()
    evaluated = c.merged_module().state_dict()
    exported = c.collapse().state_dict()
    assert all(torch.equal(evaluated[k], exported[k]) for k in exported)
    assert torch.equal(torch.get_rng_state(), rng)


def test_dare_with_a_generator_merges_the_same_masks_each_time():
    """Defect: a container given merge_kwargs generator=g re-drew DARE masks at every re-merge (a train()/eval() toggle,
    an optimizer step) and in collapse(), so evaluated and exported weights differed. The container now draws one seed
    from g when the merge is set; two containers given the same g in turn draw different seeds."""
    mods = experts(3)
    base = copy.deepcopy(mods[0])
    g = torch.Generator().manual_seed(7)
    c = ExpertContainer(copy.deepcopy(mods), "multinomial", merge="dare",
                        merge_kwargs={"base": base, "drop_rate": 0.5, "generator": g}).eval()
    assert "generator" not in c.merge_kwargs and isinstance(c.merge_kwargs["seed"], int)
    x = torch.randn(4, 4)
    with torch.no_grad():
        y = c(x)
        c.train()
        c.eval()
        assert torch.equal(c(x), y) and c.merge_count == 2  # merged again, the same masks
        assert torch.equal(c.collapse()(x), y) and torch.equal(c.collapse()(x), y)
    other = ExpertContainer(copy.deepcopy(mods), "multinomial", merge="dare",
                            merge_kwargs={"base": base, "drop_rate": 0.5, "generator": g})
    assert other.merge_kwargs["seed"] != c.merge_kwargs["seed"]
    again = torch.Generator().manual_seed(7)
    same = ExpertContainer(copy.deepcopy(mods), "multinomial", merge="dare",
                           merge_kwargs={"base": base, "drop_rate": 0.5, "generator": again}).eval()
    assert same.merge_kwargs["seed"] == c.merge_kwargs["seed"]  # reproducible from the generator's seed
    with torch.no_grad():
        assert torch.equal(same(x), y)


def test_collapse_mean_weighted_and_task_arithmetic():
    mods = experts(3)
    c = ExpertContainer(copy.deepcopy(mods), "multinomial").eval()
    x = torch.randn(4, 4)
    dense = c.collapse()
    assert type(dense) is MLP and dense.state_dict().keys() == mods[0].state_dict().keys()
    assert not dense.training
    ref = MLP()
    ref.load_state_dict(mean_sd(mods))
    assert maxdiff(dense(x), ref(x)) <= 1e-6
    assert dense.fc1.weight.requires_grad and dense.fc1.weight.data_ptr() != c.experts[0].fc1.weight.data_ptr()
    w = c.collapse("weighted", weights=[0.0, 0.0, 1.0])
    assert maxdiff(w(x), mods[2](x)) <= 1e-6
    # task arithmetic against a base module: θ = base + Σ(θ_i − base)
    base = MLP()
    ta = c.collapse("task_arithmetic", base=base)
    sds = [m.state_dict() for m in mods]
    for k, v in base.state_dict().items():
        assert maxdiff(ta.state_dict()[k], v + sum(sd[k] - v for sd in sds)) <= 1e-5
    # the same with the base given as a state dict
    assert maxdiff(c.collapse("task_arithmetic", base=base.state_dict())(x), ta(x)) <= 1e-6
    with pytest.raises(ValueError, match=r"^merge strategy 'ties' needs base= \(the weights the experts were tuned from"):
        c.collapse("ties")


def test_ensemble_collapse_and_eval():
    mods = experts(3)
    x = torch.randn(4, 4)
    mean_out = sum(m(x) for m in mods) / 3
    c = ExpertContainer(copy.deepcopy(mods), "multinomial")
    ens = c.collapse("ensemble")
    assert isinstance(ens, ExpertEnsemble) and len(ens.experts) == 3
    assert maxdiff(ens(x), mean_out) <= 1e-6
    weighted = c.collapse("ensemble", weights=[1.0, 0.0, 3.0])  # normalised to [1/4, 0, 3/4]
    assert maxdiff(weighted(x), 0.25 * mods[0](x) + 0.75 * mods[2](x)) <= 1e-6
    # a container whose eval merge is the ensemble: N forwards, cached like any merge
    c2 = ExpertContainer(copy.deepcopy(mods), "multinomial", merge="ensemble").eval()
    assert maxdiff(c2(x), mean_out) <= 1e-6
    c2(x)
    assert c2.merge_count == 1
    assert not c2.collapse().training  # the container's mode, as weight merges keep it
    assert c.collapse("ensemble").training


class WithBuffers(nn.Module):
    """Expert with a BatchNorm (persistent buffers) and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("scale", torch.ones(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * self.scale


def test_collapse_merges_buffers_including_non_persistent():
    torch.manual_seed(0)
    mods = [WithBuffers() for _ in range(2)]
    for i, m in enumerate(mods):
        m.scale.fill_(float(i + 1))  # 1 and 2 → merged 1.5
        m.bn.running_mean.fill_(float(2 * i))  # 0 and 2 → merged 1
    c = ExpertContainer(copy.deepcopy(mods), "fixed").eval()
    dense = c.collapse()
    assert torch.equal(dense.scale, torch.full((3,), 1.5))
    assert torch.equal(dense.bn.running_mean, torch.ones(3))
    assert int(dense.bn.num_batches_tracked) == 0
    x = torch.randn(4, 3)
    assert maxdiff(c(x), dense(x)) <= 1e-6
    assert dense.state_dict().keys() == mods[0].state_dict().keys()


class CausalAttention(nn.Module):
    """Single-head attention with a causal mask of -inf (a non-persistent buffer) and a persistent copy."""

    def __init__(self, t: int = 4, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("mask", torch.full((t, t), float("-inf")).triu(1), persistent=False)
        self.register_buffer("saved_mask", self.mask.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)  # [B, T, D] each
        return ((q @ k.transpose(-1, -2) / 8**0.5 + self.mask + self.saved_mask).softmax(-1)) @ v


def test_batchnorm_experts_train_merge_and_collapse_with_their_own_statistics():
    torch.manual_seed(0)
    c = ExpertContainer([WithBuffers() for _ in range(2)], "fixed", router_kwargs={"expert": 1})
    x = torch.randn(8, 3) + 3
    c.eval()(x)  # a merge before training
    c.train()
    for _ in range(5):
        c(x)  # expert 1 updates its running statistics (BatchNorm does not bump version counters)
    e0, e1 = c.experts[0].bn, c.experts[1].bn
    assert torch.equal(e0.running_mean, torch.zeros(3)) and int(e0.num_batches_tracked) == 0
    # a merged training forward (WMR) runs with merged constant statistics and leaves expert 0's alone
    w = torch.tensor([0.5, 0.5], requires_grad=True)
    c.merged_forward(x, w).sum().backward()
    assert w.grad is not None and c.experts[0].fc.weight.grad is not None
    assert torch.equal(e0.running_mean, torch.zeros(3)) and int(e0.num_batches_tracked) == 0
    # the eval merge and the collapse average the statistics; the counters differ: expert 0's, with a warning
    c.eval()
    expected = 0.5 * (e0.running_mean + e1.running_mean)
    c.target_name = "block"
    with pytest.warns(UserWarning, match=r"^non-float tensor 'bn.num_batches_tracked' in expert container 'block' differs between "
                                         r"#0 and #1 and is not averaged; kept #0's value$") as caught:
        assert maxdiff(c.merged_module().bn.running_mean, expected) <= 1e-7
    assert caught[0].filename == __file__  # the user's line, not a frame of torch, contextlib or this package
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = c.collapse()  # said once per container and tensor
    assert maxdiff(dense.bn.running_mean, expected) <= 1e-7 and int(dense.bn.num_batches_tracked) == 0
    assert maxdiff(c(x), dense(x)) <= 1e-6
    with pytest.raises(ValueError, match=r"must give one weight per expert \(2\) and not sum to zero"):
        c.collapse("ensemble", weights=[1.0, -1.0])


def test_an_optimizer_that_does_not_bump_versions_still_refreshes_the_eval_merge():
    torch.manual_seed(0)
    c = ExpertContainer(experts(2), "fixed").eval()
    x = torch.randn(4, 4)
    for opt in (torch.optim.AdamW(c.parameters(), lr=0.1, fused=True), torch.optim.SGD(c.parameters(), lr=0.1)):
        before = c(x)
        with use_merge_weights(c, torch.tensor([0.5, 0.5])):
            c(x).pow(2).sum().backward()
        opt.step()  # fused AdamW writes without bumping versions; SGD bumps them
        after = c(x)
        c.invalidate_merge()
        assert maxdiff(after, c(x)) == 0.0 and maxdiff(after, before) > 1e-3
    # steps of an optimizer that holds none of the experts leave their merge cached
    student = nn.Linear(4, 4)
    c(x)
    merges = c.merge_count
    for fused in (True, False):
        opt = torch.optim.AdamW(student.parameters(), lr=0.1, fused=fused)
        for _ in range(3):
            with torch.no_grad():
                target = c(x)
            (student(x) - target).pow(2).sum().backward()
            opt.step()
    assert c.merge_count == merges


def test_merge_arguments_are_checked_against_the_container():
    c = ExpertContainer(experts(3), "fixed")
    with pytest.raises(ValueError, match=r"^merge strategy 'slerp' merges exactly 2 experts, not 3$"):
        c.set_merge("slerp")
    with pytest.raises(ValueError, match=r"^merge strategy 'weighted': 2 weights for 3 experts$"):
        c.collapse("weighted", weights=[1, 2])
    with pytest.raises(ValueError, match=r"^merge strategy 'mean': got an unexpected argument 'tau' \(accepted: base\)$"):
        c.collapse("mean", tau=2.0)
    with pytest.raises(ValueError, match=r"^merge strategy 'dare' needs base="):
        c.set_merge("dare", drop_rate=0.5)
    with pytest.raises(ValueError, match=r"^merge strategy 'ties': density must be in \(0, 1\], got 0$"):
        c.set_merge("ties", base=experts(1)[0], density=0)
    assert c.merge == "mean"  # a rejected merge leaves the current one
    # a gated router infers its width from the experts, as add_experts does
    assert ExpertContainer(experts(2), "topk", router_kwargs={"k": 1}).router.gate.in_features == 4
    # a weighted ensemble is evaluated as it is exported
    x = torch.randn(2, 4)
    c.eval().set_merge("ensemble", weights=[1.0, 0.0, 3.0])
    expected = 0.25 * c.experts[0](x) + 0.75 * c.experts[2](x)
    assert maxdiff(c(x), expected) <= 1e-6
    assert maxdiff(c.collapse()(x), expected) <= 1e-6


def test_buffers_equal_in_every_expert_are_kept_not_combined():
    torch.manual_seed(0)
    c = ExpertContainer([CausalAttention() for _ in range(3)], "fixed")
    x = torch.randn(2, 4, 8)
    last = c.experts[2](x)
    dense = c.collapse("temperature_softmax", tau=0.0)  # coefficients [0, 0, 1]: 0 · -inf would be NaN
    assert torch.equal(dense.mask, c.experts[0].mask) and maxdiff(dense(x), last) <= 1e-6
    assert maxdiff(c.merged_forward(x, torch.tensor([0.0, 0.0, 1.0])), last) <= 1e-6
    base = CausalAttention().state_dict()  # task arithmetic on the persistent mask: -inf − -inf would be NaN
    ta = c.collapse("task_arithmetic", base=base, lam=0.5)
    assert torch.equal(ta.saved_mask, c.experts[0].saved_mask)
    expected = base["qkv.weight"] + 0.5 * sum(e.qkv.weight - base["qkv.weight"] for e in c.experts)
    assert maxdiff(ta.qkv.weight, expected) <= 1e-6
    # the verdict follows in-place changes (version counters): differing buffers are combined again
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    s = ExpertContainer([Scale() for _ in range(3)], "fixed")
    w, ones = torch.tensor([0.5, 0.5, 0.0]), torch.ones(2)
    assert torch.equal(s.merged_forward(ones, w), ones)  # equal: expert 0's, exactly
    s.experts[1].scale.fill_(3.0)
    assert torch.equal(s.merged_forward(ones, w), 2 * ones)  # differing: 0.5·1 + 0.5·3
    s.experts[1].scale.fill_(1.0)
    assert torch.equal(s.merged_forward(ones, w), ones)
    # a dtype or device move lets the buffers from before the move go (the verdicts held them)
    before = weakref.ref(s.experts[1].scale)
    s.double()
    gc.collect()
    assert before() is None
    assert torch.equal(s.merged_forward(ones.double(), w), ones.double())


def test_merged_forward_swaps_every_alias_of_a_tied_parameter():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.down.weight = self.up.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    c = ExpertContainer([Tied() for _ in range(3)], "fixed")
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    x = torch.randn(2, 4)
    y = c.merged_forward(x, w)
    merged_w = sum(wi * e.up.weight for wi, e in zip(w, c.experts))
    y_ref = F.linear(torch.relu(F.linear(x, merged_w)), merged_w)
    assert maxdiff(y, y_ref) <= 1e-6
    assert maxdiff(torch.autograd.grad(y.sum(), w)[0], torch.autograd.grad(y_ref.sum(), w)[0]) <= 1e-5
    e0 = c.experts[0]
    assert e0.down.weight is e0.up.weight and isinstance(e0.up.weight, nn.Parameter)  # put back under both names
    dense = c.collapse("weighted", weights=[0.2, 0.3, 0.5])  # collapse already followed the tie
    assert dense.down.weight is dense.up.weight and maxdiff(dense(x), y_ref) <= 1e-6


def test_attribute_reads_fall_back_to_expert_zero():
    """Backbone code that inspects its module (open_clip reads ``mlp.c_fc.weight.dtype``) keeps working."""
    c = ExpertContainer(experts(2), "fixed")
    assert c.fc1 is c.experts[0].fc1 and c.fc1.weight.dtype == torch.float32
    assert c.router.num_experts == 2  # the container's own attributes win
    with pytest.raises(AttributeError, match=r"'ExpertContainer' object has no attribute 'nope'"):
        c.nope


def test_container_deepcopy_and_train_flag():
    c = ExpertContainer(experts(2), MultinomialRouter(num_experts=2, seed=0))
    d = copy.deepcopy(c)
    x = torch.randn(2, 4)
    d.train()(x)
    c.train()(x)
    assert torch.equal(c.last_routing.indices, d.last_routing.indices)  # the generator state is copied
    assert c.collapse().training and not c.eval().collapse().training


def test_a_copy_made_inside_a_routing_plan_routes_again():
    """A plan lives only inside its with-block: a snapshot (deepcopy, pickle) taken inside one ran expert 1 forever."""
    import pickle

    c = ExpertContainer(experts(3), MultinomialRouter(num_experts=3, seed=0))
    with use_expert(c, 1):
        copies = [copy.deepcopy(c), pickle.loads(pickle.dumps(c))]
        assert c._plan == 1
    for d in copies:
        assert d._plan is None
        d.train()(torch.randn(2, 4))
        assert d.last_routing is not None  # routed by its router, not pinned to expert 1


def test_combining_tuple_outputs_is_refused_naming_the_container():
    """nn.MultiheadAttention returns (output, weights): averaging or scattering those crashed with
    "can't multiply sequence by non-int of type 'float'"."""
    from mergekit_video import add_experts

    q = torch.randn(2, 5, 8)
    attn = ExpertContainer([nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2)], merge="ensemble").eval()
    with pytest.raises(TypeError, match=r"^ensemble merge: averaging expert outputs needs each expert to return one tensor, "
                                        r"but it returned a tuple"):
        attn(q, q, q)
    model = nn.Sequential(nn.GRU(8, 8, batch_first=True))
    add_experts(model, "0", 2, router="random", granularity="sample")
    with pytest.raises(TypeError, match=r"^expert container '0': per-sample routing \(weighting and scattering expert outputs\) "
                                        r"needs each expert to return one tensor, but it returned a tuple"):
        model.train()(q)
    with routing_plan(model, "ensemble"), pytest.raises(TypeError, match=r"^expert container '0': the ensemble plan"):
        model(q)
    batch = nn.Sequential(nn.GRU(8, 8, batch_first=True))
    add_experts(batch, "0", 2, router="random")
    y, h = batch.train()[0](q)  # per-batch routing passes the tuple through
    assert y.shape == (2, 5, 8) and h.shape == (1, 2, 8)


def test_running_statistics_stay_a_convex_combination_under_any_linear_weights():
    """weighted with a negative weight made BatchNorm's running variance negative (NaN outputs); normalize=False doubled it."""
    def bn(var):
        m = nn.BatchNorm1d(2)
        m.running_var.fill_(var)
        m.running_mean.fill_(var)
        return m

    c = ExpertContainer([bn(1.0), bn(3.0)], router="fixed")
    for kwargs, var in (({"weights": [2, -1]}, 2.0), ({"weights": [1, 1], "normalize": False}, 2.0), ({"weights": [3, 1]}, 1.5)):
        dense = c.collapse("weighted", **kwargs).eval()
        assert torch.allclose(dense.running_var, torch.full((2,), var)) and torch.allclose(dense.running_mean, torch.full((2,), var)), kwargs
        assert torch.isfinite(dense(torch.ones(4, 2))).all()
    neg = c.collapse("weighted", weights=[2, -1])
    assert torch.allclose(neg.weight, 2 * c.experts[0].weight - c.experts[1].weight)  # the parameters keep the weights as given


def test_collapse_batchnorm_experts_with_differing_step_counters():
    # experts with BatchNorm that saw different numbers of batches: weights and running
    # statistics merge, the integer step counter is expert 0's
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    experts = [copy.deepcopy(base) for _ in range(2)]
    for steps, e in zip((2, 3), experts):
        e.train()
        for _ in range(steps):
            e(torch.randn(8, 4))
        with torch.no_grad():
            e[0].weight.add_(torch.randn(4, 4))
    container = ExpertContainer(experts, router="fixed")
    with pytest.warns(UserWarning, match=r"^non-float tensor '1.num_batches_tracked' in expert container differs"):
        mean = container.collapse("mean")
    assert torch.allclose(mean[1].running_mean, (experts[0][1].running_mean + experts[1][1].running_mean) / 2)
    assert mean[1].num_batches_tracked.item() == 2
    ties = container.collapse("ties", base=base, density=1.0)
    assert ties[1].num_batches_tracked.item() == 2  # expert 0's, as in a linear merge
    assert set(ties.state_dict()) == set(base.state_dict())
    # running statistics are averaged under TIES too: they are statistics of data, not task vectors
    assert torch.allclose(ties[1].running_var, mean[1].running_var) and torch.allclose(ties[1].running_mean, mean[1].running_mean)


def test_copies_leave_out_the_last_routing_and_mode_switches_forget_it():
    import pickle

    torch.manual_seed(0)
    container = ExpertContainer([nn.Linear(4, 4) for _ in range(3)], router="topk", router_kwargs={"k": 2, "dim": 4})
    container.train()
    container(torch.randn(2, 5, 4)).sum().backward()
    assert set(container.aux_losses) == {"load_balance", "z_loss"} and container.aux_losses["z_loss"].grad_fn is not None
    for clone in (copy.deepcopy(container), pickle.loads(pickle.dumps(container))):  # graph tensors are not copied
        assert clone.aux_losses == {} and clone.last_routing is None
        assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), container.state_dict().values()))
    assert set(container.aux_losses) == {"load_balance", "z_loss"}  # the original keeps them for its loss
    container.eval()
    assert container.aux_losses == {} and container.last_routing is None


@pytest.mark.filterwarnings("ignore:container '0' has no auxiliary losses")  # read after each plan forward on purpose
def test_a_forward_that_does_not_route_forgets_the_last_aux_losses():
    torch.manual_seed(0)
    model = nn.Sequential(ExpertContainer([nn.Linear(4, 4) for _ in range(3)], router="topk", router_kwargs={"k": 2, "dim": 4}))
    c, x = model[0], torch.randn(2, 5, 4, requires_grad=True)  # the merged plan's output needs grad too
    model.train()
    (model(x).sum() + collect_aux_losses(model)["load_balance"]).backward()
    plans = (0, "merged", "ensemble", torch.tensor([0.2, 0.3, 0.5]), [(1, 0), (1, "merged")])
    for plan in plans:
        model(x)  # routed: records aux losses
        with routing_plan(model, plan):
            (model(x).sum() + sum(collect_aux_losses(model).values(), torch.zeros(()))).backward()  # no second backward
        assert c.aux_losses == {} and c.last_routing is None, plan
    # a segment that routes keeps its own record
    with routing_plan(model, [(1, "routed"), (1, 0)]):
        model(x)
    assert c.last_routing.indices.shape == (5, 2) and set(c.aux_losses) == {"load_balance", "z_loss"}
    with routing_plan(model, "routed"):  # eval forward after a routed one
        model.train(False)
        model(x)
    assert c.last_routing is not None
    model(x)  # eval fast path
    assert c.aux_losses == {} and c.last_routing is None


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_checkpoint_routed_recomputes_with_the_original_routing(granularity):
    # per-sample random routing: a plain checkpoint would redraw the experts in backward
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), ExpertContainer(experts(4), router="random", router_kwargs={"seed": 3, "granularity": granularity}))

    x = torch.randn(6, 4)
    direct, ckpt = build(), build()
    direct(x).pow(2).sum().backward()
    out = checkpoint_routed(ckpt, ckpt, x)
    before = ckpt[1].router.generator.get_state()
    routing = ckpt[1].last_routing
    out.pow(2).sum().backward()
    assert torch.equal(ckpt[1].router.generator.get_state(), before) and ckpt[1].last_routing is routing
    for (name, a), b in zip(direct.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert sum(p.grad is not None for p in ckpt[1].experts.parameters()) >= 2  # several experts were used


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_plain_checkpoint_recomputing_a_stochastic_router_fails_instead_of_wrong_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    def build(router: str, **kw) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), ExpertContainer(experts(4), router=router, router_kwargs=kw))

    x = torch.randn(6, 4, requires_grad=True)
    model = build("multinomial", seed=3)
    out = checkpoint(model, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match=r"^an ExpertContainer with a MultinomialRouter is being recomputed in backward by a plain "
                                           r"gradient checkpoint .*mergekit_video.experts.checkpoint_routed"):
        out.pow(2).sum().backward()
    # a deterministic router recomputes the same choice: the gradients equal an uncheckpointed backward
    direct, ckpt = build("fixed", expert=2), build("fixed", expert=2)
    direct(x).pow(2).sum().backward()
    checkpoint(ckpt, x, use_reentrant=reentrant).pow(2).sum().backward()
    for a, b in zip(direct.parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6))


def test_merged_forward_keeps_float64_coefficients_exact():
    torch.manual_seed(0)
    ex = [nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)).double() for _ in range(3)]
    c = ExpertContainer(ex, "multinomial")
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: c.merged_forward(h, w), (h, w))  # failed on w (rounded to float32)
    merged = {k: sum(wi * e.state_dict()[k] for wi, e in zip([0.2, 0.3, 0.5], ex)) for k in ex[0].state_dict()}
    ref = torch.func.functional_call(ex[0], merged, (h,))
    assert (c.merged_forward(h, [0.2, 0.3, 0.5]) - ref).abs().max() < 1e-15  # Python floats: float64 (was 4e-9)


def test_merged_forward_swaps_tensors_only_for_the_call():
    c = ExpertContainer(experts(3), "multinomial")
    first = c.experts[0]
    before = {n: p for n, p in first.named_parameters()}
    x = torch.randn(5, 4)
    w = torch.tensor([0.2, 0.3, 0.5])
    dense = MLP()
    dense.load_state_dict({k: sum(wi * sd[k] for wi, sd in zip(w, (e.state_dict() for e in c.experts))) for k in before})
    assert maxdiff(c.merged_forward(x, w), dense(x)) <= 1e-6
    assert all(p is before[n] for n, p in first.named_parameters())  # expert 0 keeps its own parameters
    with pytest.raises(RuntimeError):
        c.merged_forward(torch.randn(5, 3), w)  # wrong width: the forward raises inside the swap
    assert all(p is before[n] for n, p in first.named_parameters())
    assert all(isinstance(p, nn.Parameter) for p in first.parameters())


def test_structure_changes_refresh_the_cached_lookups():
    model = nn.Sequential(MLP(), MLP())
    assert find_containers(model) == []
    from mergekit_video import add_experts, collapse_experts

    add_experts(model, "0", 2)
    assert [n for n, _ in find_containers(model)] == ["0"]  # a registration after the first lookup is seen
    c = model[0].eval()
    x = torch.randn(3, 4)
    c(x)
    # replace a submodule of one expert: the merge uses the new weights
    c.experts[1].fc1 = nn.Linear(4, 8)
    dense = MLP()
    dense.load_state_dict(mean_sd(c.experts))
    assert maxdiff(c(x), dense(x)) <= 1e-6
    # replace a parameter object: the merge follows too
    with torch.no_grad():
        c.experts[0].fc2.weight = nn.Parameter(torch.randn(4, 8))
    dense.load_state_dict(mean_sd(c.experts))
    assert maxdiff(c(x), dense(x)) <= 1e-6
    collapse_experts(model)
    assert find_containers(model) == []


def test_deleting_or_renumbering_modules_refreshes_the_cached_containers():
    from mergekit_video import add_experts, collapse_experts

    model = nn.Sequential(MLP(), nn.Sequential(MLP()), nn.ModuleList([MLP(), MLP()]))
    add_experts(model, ["0", "1.0", "2.0", "2.1"], 2)
    assert [n for n, _ in find_containers(model)] == ["0", "1.0", "2.0", "2.1"]
    del model[1][0]  # torch reports deletions to no hook
    assert [n for n, _ in find_containers(model)] == ["0", "2.0", "2.1"]
    del model[2][0]  # ModuleList renumbers: the former "2.1" is "2.0" now
    assert [n for n, _ in find_containers(model)] == ["0", "2.0"]
    kept = model[2][0]
    del model[2]  # an ancestor of a container
    assert [n for n, _ in find_containers(model)] == ["0"]
    assert [n for n, _ in find_containers(kept)] == [""]
    collapse_experts(model)  # once raised KeyError on the stale entry
    assert find_containers(model) == [] and isinstance(model[0], MLP)


def test_a_routing_plan_under_plain_checkpointing_warns_once_it_would_be_lost_in_backward():
    import warnings

    from mergekit_video import add_experts

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grad_checkpointing = False
            self.blocks = nn.ModuleList([MLP(), MLP()])

    model = Backbone()
    add_experts(model, "blocks.*", 2, router="fixed")  # deterministic: routed recomputation is exact
    model.grad_checkpointing = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with routing_plan(model, "routed"):
            pass
        with torch.no_grad(), use_expert(model, 1):  # no backward, nothing recomputed
            pass
        model.grad_checkpointing = False
        with use_expert(model, 1):
            pass
        model.grad_checkpointing = True
    with pytest.warns(UserWarning, match=r"^Backbone has gradient checkpointing on .* without this routing plan"):
        with use_expert(model, 1):
            pass
    outer = nn.Sequential(model)
    with pytest.warns(UserWarning, match=r"^0 has gradient checkpointing on .*checkpoint_routed"):
        with use_merge_weights(outer, torch.tensor([0.5, 0.5])):
            pass


def test_eval_fast_path_still_runs_hooks_of_the_merged_module():
    c = ExpertContainer(experts(2), "multinomial")
    seen = []
    c.experts[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # copied into the merged module
    c.eval()
    c(torch.randn(3, 4))
    assert seen == [torch.Size([3, 4])]
    outer = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: outer.append(type(m).__name__))
    try:
        c(torch.randn(3, 4))
    finally:
        handle.remove()
    assert outer.count("MLP") == 1 and outer.count("ExpertContainer") == 1  # global hooks see the merged module too


def test_eval_with_grad_warns_once_that_the_experts_get_no_gradient():
    c = ExpertContainer(experts(2), "multinomial").eval()
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="gradients reach the input but not the experts"):
        c(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in c.experts.parameters())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c(x)  # once per container
        with torch.no_grad():
            c(x)


def test_use_merge_with_a_base_module_reuses_its_merge_and_does_not_keep_the_base():
    from mergekit_video import add_experts, collapse_experts
    from mergekit_video.experts import use_merge

    orig = nn.Sequential(MLP())
    m = copy.deepcopy(orig)
    add_experts(m, "0", 3, init="copy_noise", noise_std=0.1)
    m.eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        for _ in range(3):  # base.state_dict() gives new detached views each time: the same tensors
            with use_merge(m, "ties", base=orig):
                m(x)
            m(x)
    assert m[0].merge_count == 2  # the mean once, ties once
    with torch.no_grad():
        orig[0].fc1.weight.add_(1.0)  # the base changed in place: merged again
        with use_merge(m, "ties", base=orig):
            m(x)
    assert m[0].merge_count == 3
    # the base was for the block only: re-initialised-style containers still have none afterwards
    fresh = nn.Sequential(MLP())
    add_experts(fresh, "0", 2, init="normal")
    fresh.eval()
    with torch.no_grad(), use_merge(fresh, "ties", base=orig):
        fresh(x)
    with pytest.raises(Exception, match=r"needs base="):
        collapse_experts(copy.deepcopy(fresh), "ties")


def test_an_in_place_write_to_a_merge_weight_tensor_merges_again():
    c = ExpertContainer(experts(2), "multinomial")
    w = torch.tensor([1.0, 0.0])
    c.set_merge("weighted", weights=w)
    c.eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert maxdiff(c(x), c.experts[0](x)) <= 1e-6
        w.copy_(torch.tensor([0.0, 1.0]))
        assert maxdiff(c(x), c.experts[1](x)) <= 1e-6
        assert c.merge_count == 2
        c(x)
    assert c.merge_count == 2  # unchanged arguments: the cached merge


def test_plans_that_do_not_fit_a_container_are_named():
    m = nn.Sequential(ExpertContainer(experts(2), "multinomial"))
    with pytest.raises(IndexError, match=r"^expert 5 does not exist in container '0', which has 2 experts \(0 to 1\)$"):
        with use_expert(m, 5):
            pass
    with pytest.raises(ValueError, match=r"^merge weights for container '0' need shape \[2\] \(one per expert\), got \[2, 1\]$"):
        with use_merge_weights(m, torch.ones(2, 1) / 2):
            pass
    assert m[0]._plan is None  # restored after the refusal
    with pytest.raises(ValueError, match=r"^merged_forward needs weights of shape \[2\] \(one per expert\), got \[2, 1\]$"):
        m[0].merged_forward(torch.randn(1, 4), torch.ones(2, 1) / 2)


def test_merged_forwards_under_torch_compile_do_not_recompile_per_weight():
    """Traced, the merge guarded on the module-structure counter (bumped by compiling) and on every
    coefficient: the weight-merging regularizer recompiled each step until dynamo's limit."""
    from torch._dynamo.utils import counters

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.mlp = MLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    m = nn.Sequential(Block(), Block())
    from mergekit_video import add_experts

    add_experts(m, "*.mlp", 3, seed=0)
    m.train()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    x = torch.randn(2, 5, 4)
    graphs = []
    for step in range(6):
        w = torch.softmax(torch.randn(3), dim=0)  # new coefficients every step, as Eq. 7's τ samples give
        with use_merge_weights(m, w):
            y = compiled(x)
            y.square().sum().backward()
            assert maxdiff(y, m(x)) <= 1e-6
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 5, graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("strategy, kw", [("task_arithmetic", {}), ("dare", {"drop_rate": 0.5}), ("ties", {"density": 0.5})])
def test_task_arithmetic_merges_average_batchnorm_statistics(strategy, kw):
    # base + Σ(varᵢ − base) turned small running variances negative (NaN outputs): buffers are the mean
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    bn_experts = [copy.deepcopy(base) for _ in range(3)]
    for e in bn_experts:
        e.train()
        for _ in range(50):
            e(0.1 * torch.randn(16, 4))  # running_var → about 0.006, below the base's 1
    c = ExpertContainer(bn_experts, router="fixed").eval()
    c.set_merge(strategy, base=base, **kw)
    with torch.no_grad():
        y = c(torch.randn(3, 4))
    merged_bn = c.merged_module()[1]
    expected_var = sum(e[1].running_var for e in bn_experts) / 3
    assert torch.allclose(merged_bn.running_var, expected_var) and merged_bn.running_var.min() > 0
    assert torch.allclose(merged_bn.running_mean, sum(e[1].running_mean for e in bn_experts) / 3)
    assert torch.isfinite(y).all()


def test_float64_experts_collapse_exactly():
    torch.manual_seed(0)
    c = ExpertContainer([nn.Linear(50, 50).double() for _ in range(3)], router="fixed")
    exact = sum(e.weight for e in c.experts) / 3
    # coefficients stay float64 (1/3 rounded to float32 was off by about 4e-9)
    assert (c.collapse("mean").weight - exact).abs().max().item() < 1e-15
    with torch.no_grad():
        c.eval()(torch.randn(2, 50, dtype=torch.float64))
    assert (c.merged_module().weight - exact).abs().max().item() < 1e-15


def test_replacing_an_expert_tensors_data_merges_again():
    # `.data =` and vector_to_parameters bump no version counter: the new data address shows it
    c = ExpertContainer(experts(3), router="fixed").eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        c(x)
        c.experts[0].fc1.weight.data = torch.zeros(8, 4)
        assert torch.allclose(c(x), c.collapse("mean")(x), atol=1e-6) and c.merge_count == 2
        vec = nn.utils.parameters_to_vector(c.experts[1].parameters())
        nn.utils.vector_to_parameters(torch.ones_like(vec), c.experts[1].parameters())
        assert torch.allclose(c(x), c.collapse("mean")(x), atol=1e-6) and c.merge_count == 3
        c(x)
    assert c.merge_count == 3  # unchanged experts: the cache holds


def _base_and_two_moved_copies() -> tuple[nn.Linear, list[nn.Linear]]:
    """A base Linear and two experts that are the base plus a random weight shift (task vectors)."""
    torch.manual_seed(0)
    base = nn.Linear(3, 3)
    lin = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for e in lin:
            e.weight.add_(torch.randn(3, 3))
    return base, lin


@pytest.mark.parametrize("as_state_dict", [False, True])
def test_an_in_place_edit_of_the_base_merges_again(as_state_dict):
    base, lin = _base_and_two_moved_copies()
    base_arg = {k: v.clone() for k, v in base.state_dict().items()} if as_state_dict else base
    c = ExpertContainer(lin, router="fixed", merge="task_arithmetic", merge_kwargs={"base": base_arg}).eval()
    x = torch.randn(2, 3)
    with torch.no_grad():
        c(x)
        (base_arg["weight"] if as_state_dict else base.weight).add_(1.0)
        assert torch.allclose(c(x), c.collapse("task_arithmetic", base=base_arg)(x), atol=1e-6)
        assert c.merge_count == 2
        c(x)
    assert c.merge_count == 2


@pytest.mark.parametrize("replace", ["new_parameter", "assign", "data"])
def test_a_replaced_tensor_of_a_base_module_merges_again(replace):
    """A base module's tensor replaced (not written in place) kept the old merge in eval while
    collapse() read the new one: eval and the exported model differed."""
    base, lin = _base_and_two_moved_copies()
    c = ExpertContainer(lin, router="fixed", merge="task_arithmetic", merge_kwargs={"base": base}).eval()
    x = torch.randn(2, 3)
    with torch.no_grad():
        before = c(x)
        if replace == "new_parameter":
            base.weight = nn.Parameter(torch.zeros(3, 3))
        elif replace == "assign":
            base.load_state_dict({k: v + 1.0 for k, v in base.state_dict().items()}, assign=True)
        else:
            base.weight.data = base.weight.data + 1.0
        after = c(x)
        assert c.merge_count == 2 and not torch.allclose(after, before, atol=1e-3)
        assert torch.equal(after, c.collapse()(x))
        expected = nn.Linear(3, 3)
        expected.load_state_dict({k: base.state_dict()[k] + sum(e.state_dict()[k] - base.state_dict()[k] for e in lin)
                                  for k in ("weight", "bias")})
        assert torch.allclose(after, expected(x), atol=1e-6)
        c(x)
        c(x)
    assert c.merge_count == 2  # unchanged since: the cache holds


def test_slerp_takes_its_buffers_at_t_so_the_ends_are_the_experts():
    # the buffers of a slerp merge are lerped with (1 − t, t): t = 0 / 1 give expert 0 / 1 exactly, BatchNorm included
    torch.manual_seed(0)
    bn_experts = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)) for _ in range(2)]
    for scale, e in zip((0.1, 3.0), bn_experts):
        e.train()
        for _ in range(20):
            e(scale * torch.randn(16, 4))
    c = ExpertContainer(bn_experts, router="fixed")
    for t, expert in ((0.0, bn_experts[0]), (1.0, bn_experts[1])):
        merged = c.collapse("slerp", t=t)[1]
        assert torch.equal(merged.running_var, expert[1].running_var) and torch.equal(merged.running_mean, expert[1].running_mean)
    half = c.collapse("slerp", t=0.25)[1]
    assert torch.allclose(half.running_var, 0.75 * bn_experts[0][1].running_var + 0.25 * bn_experts[1][1].running_var)


def test_a_data_address_given_back_by_the_allocator_still_merges_again():
    # two `.data =` between eval forwards could bring the first address back: the cache keeps that memory alive
    c = ExpertContainer(experts(2, dim=64, hidden=64), router="fixed").eval()
    x = torch.randn(3, 64)
    p = c.experts[1].fc1.weight
    with torch.no_grad():
        for _ in range(8):  # whether an address comes back is the allocator's choice: try several times
            before = c(x)
            p.data = p.data + 1.0
            p.data = p.data + 1.0
            after = c(x)
            assert not torch.equal(before, after) and torch.allclose(after, c.collapse("mean")(x), atol=1e-5)


def test_use_router_routes_each_sample_with_a_router_of_its_own_in_eval_mode():
    """use_router(model, "random"): per sample, one uniformly drawn expert (seeded), in eval mode too;
    the routers are the plan's, the containers' own are untouched. A router plan is checked for its expert count."""
    from mergekit_video import add_experts
    from mergekit_video.experts import use_router
    from mergekit_video.routers import AssignedRouter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    add_experts(model, ["0", "1"], 3)
    model.eval()
    x = torch.randn(64, 4)
    own = [model[i].router.generator.get_state() for i in range(2)]

    def routed_by_hand(x):
        y = x
        for i in range(2):
            chosen = model[i].last_routing.indices[:, 0]
            y = torch.stack([model[i].experts[int(k)](row) for k, row in zip(chosen, y)])
        return y

    with torch.no_grad(), use_router(model, "random", seed=3):
        y = model(x)
        assert all(model[i].last_routing.granularity == "sample" for i in range(2))
        assert torch.allclose(y, routed_by_hand(x), atol=1e-6)
        counts = torch.bincount(model[0].last_routing.indices[:, 0], minlength=3)
    assert (counts > 10).all()  # every expert drawn (64 samples, uniform)
    with torch.no_grad(), use_router(model, "random", seed=3):
        assert torch.equal(model(x), y)  # seeded
    assert all(torch.equal(model[i].router.generator.get_state(), own[i]) for i in range(2))
    assert model[0]._plan is None
    with pytest.raises(ValueError, match=r"a router for 2 experts cannot route container '0', which has 3"):
        with routing_plan(model, {"0": AssignedRouter(num_experts=2, indices=[0]), "1": 0}):
            pass
    with routing_plan(model, {"0": AssignedRouter(num_experts=3, indices=[2, 0]), "1": 1}), torch.no_grad():
        two = x[:2]
        assert torch.allclose(model(two), model[1].experts[1](torch.stack([model[0].experts[2](two[0]), model[0].experts[0](two[1])])))
        with pytest.raises(ValueError, match="assigned routing holds 2 samples' experts but the input has 3 samples"):
            model(x[:3])
    # a router inside a segment list is checked too (rows routed past the last expert came out as zeros)
    with pytest.raises(ValueError, match=r"a router for 4 experts cannot route container '0', which has 3"):
        with routing_plan(model, {"0": [(2, AssignedRouter(num_experts=4, indices=[1, 3])), (2, 0)], "1": 0}):
            pass


def _grads_with_and_without_checkpoint(make_plan):
    """Gradients of a 2-layer, 3-expert model under the routing plan ``make_plan()`` (made anew for each pass),
    through checkpoint_routed and without it."""
    from mergekit_video import add_experts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    add_experts(model, ["0", "1"], 3)
    model.train()
    x = torch.randn(6, 4)

    def grads(checkpointed):
        model.zero_grad()
        with routing_plan(model, make_plan()):
            y = checkpoint_routed(model, model, x) if checkpointed else model(x)
        y.pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    return grads(True), grads(False)


def test_checkpoint_routed_replays_the_extra_state_of_a_plan_router():
    """A round-robin router set by a routing plan advanced again in the recomputation: wrong gradients, silently."""
    from mergekit_video.routers import Router, RouterOutput

    class RoundRobin(Router):
        stochastic = False

        def __init__(self, **kw):
            super().__init__(**kw)
            self.step = 0

        def route(self, x):
            i, self.step = self.step % self.num_experts, self.step + 1
            return RouterOutput(indices=torch.tensor([[i]]), weights=torch.ones(1, 1), granularity="batch")

        def get_extra_state(self):
            return {"step": self.step}

        def set_extra_state(self, state):
            self.step = state["step"]

    checkpointed, plain = _grads_with_and_without_checkpoint(lambda: lambda name, c: RoundRobin(num_experts=c.num_experts))
    assert torch.allclose(checkpointed, plain, atol=1e-6)


def test_a_plugin_routers_wrong_decision_is_named():
    """A router returning too few rows, an expert out of range or flat indices gave zeros, expert 0 or a cryptic error."""
    from mergekit_video.routers import Router, RouterOutput

    class Bad(Router):
        def __init__(self, *, mode, **kw):
            super().__init__(**kw)
            self.mode = mode

        def route(self, x):
            g = x.shape[0]
            return {
                "few": RouterOutput(indices=torch.zeros(1, 1, dtype=torch.long), weights=torch.ones(1, 1), granularity="sample"),
                "out": RouterOutput(indices=torch.full((g, 1), 7), weights=torch.ones(g, 1), granularity="sample"),
                "flat": RouterOutput(indices=torch.zeros(g, dtype=torch.long), weights=torch.ones(g), granularity="sample"),
                "weights": RouterOutput(indices=torch.zeros(g, 1, dtype=torch.long), weights=torch.ones(g), granularity="sample"),
                "tensor": torch.zeros(g, 1),
            }[self.mode]

    said = {
        "few": (ValueError, r"^expert container: Bad returned indices \(1, 1\) torch.int64; per-sample routing of this input needs an integer tensor \[5, k\]"),
        "out": (ValueError, r"^expert container: Bad chose expert 7, but the container has experts 0 to 2$"),
        "flat": (ValueError, r"returned indices \(5,\) torch.int64"),
        "weights": (ValueError, r"returned weights \(5,\) for indices \(5, 1\); they need the same shape$"),
        "tensor": (TypeError, r"^expert container: Bad returned a Tensor, not a RouterOutput$"),
    }
    for mode, (kind, message) in said.items():
        c = ExpertContainer([nn.Linear(4, 4) for _ in range(3)], Bad(mode=mode, num_experts=3, granularity="sample")).train()
        with pytest.raises(kind, match=message):
            c(torch.randn(5, 4))


def test_checkpoint_routed_replays_a_router_inside_a_segment_plan():
    """The recomputation drew other experts from a segment's RandomRouter (CheckpointError: other shapes)."""
    from mergekit_video.routers import RandomRouter

    checkpointed, plain = _grads_with_and_without_checkpoint(
        lambda: [(3, RandomRouter(num_experts=3, granularity="sample", seed=9)), (3, "merged")])
    assert torch.allclose(checkpointed, plain, atol=1e-6)


def test_experts_on_different_devices_are_refused_naming_the_tensor():
    """torch's multi-tensor ops skip a meta tensor silently: a mixed container merged 0.5 · expert 0."""
    with pytest.raises(ValueError, match=r"tensor 'weight' differs: expert 0 has it on cpu, expert 1 on meta"):
        ExpertContainer([nn.Linear(4, 4), nn.Linear(4, 4, device="meta")])
    from mergekit_video.merging import merge_tensors

    with pytest.raises(ValueError, match=r"cannot merge tensors on different devices: #0 on cpu, #1 on meta"):
        merge_tensors([torch.ones(2), torch.ones(2, device="meta")], "mean")


def test_aux_losses_without_gradient_from_a_reentrant_checkpoint_are_warned_about_once():
    """A reentrant checkpoint runs its forward with gradients off: a topk gate would silently not be trained."""
    from torch.utils.checkpoint import checkpoint

    from mergekit_video import add_experts
    from mergekit_video.experts import collect_aux_losses

    block = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)))
    add_experts(block, "0", 2, router="topk", granularity="token")
    x = torch.randn(2, 5, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collect_aux_losses(block)["load_balance"].requires_grad
    checkpoint(block, x, use_reentrant=True)
    with pytest.warns(UserWarning, match=r"the auxiliary losses of container '0' carry no gradient: .*use_reentrant=True"):
        assert not collect_aux_losses(block)["load_balance"].requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_aux_losses(block)  # once per container


def test_reading_aux_losses_after_a_plan_forward_dropped_them_is_warned_about_once():
    """A hand-written WMR loop: the routed forward's topk losses are gone after the merged forward;
    reading them then (the load_balance regularizer gives 0) is said, once per container."""
    from mergekit_video import REGULARIZERS
    from mergekit_video.experts import collect_aux_losses

    torch.manual_seed(0)
    model = nn.Sequential(ExpertContainer([nn.Linear(4, 4) for _ in range(3)], router="topk", router_kwargs={"k": 2, "dim": 4}))
    model.train()
    x, wmr, balance = torch.randn(2, 5, 4), REGULARIZERS.build("weight_merging"), REGULARIZERS.build("load_balance")
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert balance(model).detach().item() > 0  # read right after the routed forward: no warning
    with wmr.merged_region(model):
        model(x)
    with pytest.warns(UserWarning, match=r"container '0' has no auxiliary losses: its last forward ran a routing plan \(a weight merge"):
        assert float(balance(model)) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balance(model)  # once per container
        model(x)  # a routed forward again: nothing to say
        assert balance(model).detach().item() > 0
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        assert collect_aux_losses(model) == {}  # the eval fast path dropped them, which is no plan: nothing said


def test_a_fused_plan_with_a_routed_segment_then_an_eval_forward_says_nothing_about_aux_losses():
    from mergekit_video.experts import collect_aux_losses

    torch.manual_seed(0)
    model = nn.Sequential(ExpertContainer([nn.Linear(4, 4) for _ in range(3)], router="topk", router_kwargs={"k": 2, "dim": 4}))
    model.train()
    x = torch.randn(2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
        with routing_plan(model, [(1, "routed"), (1, torch.tensor([0.2, 0.3, 0.5]))]):
            model(x)
        assert set(collect_aux_losses(model)) == {"load_balance", "z_loss"}
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        assert collect_aux_losses(model) == {}


def test_a_data_parallel_replica_refuses_merged_forwards_and_routes_as_the_model(monkeypatch):
    """``nn.DataParallel`` copies each replica's parameters as plain tensors (``replicate``), which the
    container does not see: its eval merge and merged forwards would silently be expert 0's. They are
    refused, naming the way out; routed training forwards equal the model's. (``replicate``'s own module
    code, with the CUDA broadcast swapped for CPU copies.)"""
    import importlib

    from mergekit_video import add_experts, collapse_experts

    replicate_module = importlib.import_module("torch.nn.parallel.replicate")  # the module (the package exports the function)

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape",
                        lambda ts, devs, detach=False: [[(t.detach() if detach else t).clone() for t in ts] for _ in devs])
    monkeypatch.setattr(replicate_module, "_get_device_index", lambda x, optional=False: x)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    add_experts(model, ["0", "2"], 3, init="normal", router="fixed", expert=2)
    x = torch.randn(5, 4)
    replica = replicate_module.replicate(model, [0, 1])[1]
    assert torch.equal(replica(x), model(x))  # routed: each expert module runs on the replica's own tensors
    with pytest.raises(RuntimeError, match=r"expert container '0': an nn.DataParallel replica cannot merge .*DistributedDataParallel"):
        with use_merge_weights(replica, torch.tensor([0.2, 0.3, 0.5])):
            replica(x)
    model.eval()
    with torch.no_grad():
        replica = replicate_module.replicate(model, [0, 1], detach=True)[1]
        with pytest.raises(RuntimeError, match="DataParallel replica cannot merge"):
            replica(x)
        dense = collapse_experts(copy.deepcopy(model))  # the way out: a collapsed model replicates as any other
        assert torch.allclose(replicate_module.replicate(dense, [0, 1], detach=True)[1](x), model(x), atol=1e-6)


def test_use_router_infers_a_gated_routers_width_per_container():
    """use_router(model, "topk") on containers of widths 4 and 8: each plan router's dim is its
    container's (a single dim= fits one of them only), and the routed output is the chosen experts'."""
    from mergekit_video import add_experts
    from mergekit_video.experts import use_router

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    add_experts(model, ["0", "2"], 3)
    x = torch.randn(6, 4)
    with torch.no_grad(), use_router(model, "topk", seed=1, renormalize=True):
        y = model(x)
        routers = [model[i]._plan for i in (0, 2)]
        assert [r.gate.in_features for r in routers] == [4, 8]
        hidden = torch.stack([model[0].experts[int(k)](row) for k, row in zip(model[0].last_routing.indices[:, 0], x)])
        hidden = F.gelu(hidden)
        ref = torch.stack([model[2].experts[int(k)](row) for k, row in zip(model[2].last_routing.indices[:, 0], hidden)])
    assert torch.allclose(y, ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"expert container '2': topk router: its input has width 8 .* router's dim is 4"):
        with use_router(model, "topk", dim=4):
            model(x)
