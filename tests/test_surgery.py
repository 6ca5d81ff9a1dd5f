"""Surgery: add_experts / collapse_experts on a toy model, an open_clip CLIP and a timm ViT."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mergekit_video as mv
from mergekit_video.experts import ExpertContainer, find_containers, use_merge
from mergekit_video.registry import RegistryError
from mergekit_video.routers import MultinomialRouter, TopKRouter, build_router
from mergekit_video.surgery import SurgeryError, match_modules, nearest_names, reinit_normal_

ROOT = Path(__file__).resolve().parents[1]


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Toy(nn.Module):
    """embed → 2 residual MLP blocks → head; a plain nn.Module backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.blocks = nn.ModuleList([ToyBlock() for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- toy model ----------------------------------------------------------------------------------------


def test_add_experts_replaces_matches_and_returns_names():
    m = toy()
    names = mv.add_experts(m, "blocks.*.mlp", num_experts=3)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert [n for n, _ in find_containers(m)] == names
    c = m.blocks[0].mlp
    assert isinstance(c, ExpertContainer) and c.num_experts == 3 and c.merge == "mean"
    assert isinstance(c.router, MultinomialRouter) and c.training
    assert type(c.experts[0]) is nn.Sequential
    assert m(torch.randn(2, 4)).shape == (2, 3)
    # the eval module is built with the container's strategy and kwargs
    m2 = toy()
    mv.add_experts(m2.eval(), ["blocks.0.mlp"], 2, merge="temperature_softmax", merge_kwargs={"tau": 0.0})
    c2 = m2.blocks[0].mlp
    assert not c2.training
    x = torch.randn(3, 16)
    assert maxdiff(c2(x), c2.experts[1](x)) <= 1e-6


def test_init_normal_matches_mote():
    m = toy()
    original = copy.deepcopy(m.blocks[0].mlp)
    mv.add_experts(m, "blocks.*.mlp", 4, init="normal")
    experts = m.blocks[0].mlp.experts
    w = torch.cat([torch.cat([e[0].weight.flatten(), e[3].weight.flatten()]) for e in experts])  # 4 × 2048 draws
    assert w.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert w.std().item() == pytest.approx(0.02, rel=0.03)
    for e in experts:
        assert torch.equal(e[0].bias, torch.zeros(64)) and torch.equal(e[3].bias, torch.zeros(16))
        assert torch.equal(e[1].weight, torch.ones(64)) and torch.equal(e[1].bias, torch.zeros(64))  # norms: 1 / 0
        assert not torch.equal(e[0].weight, original[0].weight)
    assert all(not torch.equal(experts[i][0].weight, experts[j][0].weight) for i in range(4) for j in range(i + 1, 4))
    # init_std and the generator
    a, b = toy(), toy()
    mv.add_experts(a, "blocks.0.mlp", 2, init_std=0.1, generator=torch.Generator().manual_seed(5))
    mv.add_experts(b, "blocks.0.mlp", 2, init_std=0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.blocks[0].mlp.experts[1][0].weight, b.blocks[0].mlp.experts[1][0].weight)
    assert a.blocks[0].mlp.experts[0][0].weight.std().item() == pytest.approx(0.1, rel=0.1)


def test_reinit_normal_other_parameters():
    class P(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4000))
            self.attn_bias = nn.Parameter(torch.ones(3))

    p = reinit_normal_(P(), std=0.05, generator=torch.Generator().manual_seed(0))
    assert p.gamma.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(p.attn_bias, torch.zeros(3))  # "*_bias" is zeroed like "bias"


def test_init_copy_and_copy_noise():
    m = toy()
    ref = copy.deepcopy(m)
    mv.add_experts(m, "blocks.*.mlp", 3, init="copy")
    for i in range(2):
        for e in m.blocks[i].mlp.experts:
            assert all(torch.equal(v, ref.blocks[i].mlp.state_dict()[k]) for k, v in e.state_dict().items())
    x = torch.randn(5, 4)
    # upcycled experts: the merge is the original model, bit for bit (N = 3 would round the mean by an ulp)
    assert torch.equal(m.eval()(x), ref.eval()(x))
    collapsed = mv.collapse_experts(copy.deepcopy(m))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in collapsed.state_dict().items())
    tsm = mv.collapse_experts(copy.deepcopy(m), "temperature_softmax", tau=0.6)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in tsm.state_dict().items())
    n = toy()
    mv.add_experts(n, "blocks.0.mlp", 3, init="copy_noise", noise_std=0.05, generator=torch.Generator().manual_seed(0))
    experts = n.blocks[0].mlp.experts
    d = torch.cat([(e[0].weight - ref.blocks[0].mlp[0].weight).flatten() for e in experts])
    assert d.std().item() == pytest.approx(0.05, rel=0.05) and d.mean().item() == pytest.approx(0.0, abs=2e-3)
    assert not torch.equal(experts[0][0].weight, experts[1][0].weight)


def test_multiple_and_nested_patterns():
    m = toy()
    assert match_modules(m, ["blocks.*", "blocks.*.mlp"]) == ["blocks.0", "blocks.1"]  # outermost wins
    assert match_modules(m, ["head", "embed", "head"]) == ["head", "embed"]
    names = mv.add_experts(m, ["embed", "blocks.1.mlp"], 2, router="fixed", expert=1)
    assert names == ["embed", "blocks.1.mlp"]
    assert m.embed.router.expert == 1
    # modules inside a container are not matched again: containers do not nest
    with pytest.raises(SurgeryError, match=r"^'blocks.1.mlp.experts.0' \(matched by 'blocks.1.mlp.experts.\*'\) lies inside the ExpertContainer 'blocks.1.mlp'"):
        mv.add_experts(m, "blocks.1.mlp.experts.*", 2)
    assert match_modules(m, "*.0") == ["blocks.0"]  # a broad glob skips the insides of containers (blocks.1.mlp.experts.0)


def test_surgery_errors():
    m = toy()
    with pytest.raises(SurgeryError) as err:
        mv.add_experts(m, "block.*.mlp", 2)
    msg = str(err.value)
    assert msg.startswith("target pattern 'block.*.mlp' matches no module; nearest module names: 'blocks.0.mlp'")
    assert isinstance(err.value, ValueError)
    assert nearest_names("zzz", ["a", "b"], n=1) == "'a'"  # nothing close: the first names
    with pytest.raises(SurgeryError, match=r"^init must be one of \('normal', 'copy', 'copy_noise'\), got 'zeros'$"):
        mv.add_experts(m, "head", 2, init="zeros")
    for bad in (0, 2.5, "2", True):
        with pytest.raises(SurgeryError, match=rf"^num_experts must be an integer >= 1, got {re.escape(repr(bad))}$"):
            mv.add_experts(m, "head", bad)
    with pytest.raises(SurgeryError, match=r"^target must be a glob or a list of globs over module names .*, got None$"):
        mv.add_experts(m, None, 2)
    with pytest.raises(SurgeryError, match=r"^model must be an nn.Module, got dict$"):
        mv.add_experts({}, "head", 2)
    with pytest.raises(SurgeryError, match=r"^target pattern 'head.weight' matches the parameter 'head.weight', not a module: experts replace modules; target 'head'$"):
        mv.add_experts(m, "head.weight", 2)
    from mergekit_video.routers import build_router

    with pytest.raises(SurgeryError, match=r"^experts for 'head': router is built for 3 experts but the container has 4$"):
        mv.add_experts(m, "head", 4, router=build_router("multinomial", num_experts=3))
    with pytest.raises(SurgeryError, match=r"^router 'topk' needs dim= \(the width of its input\); it could not be inferred \(no nn.Linear or convolution in the expert\): pass dim$"):
        mv.add_experts(m, "blocks.0.norm", 2, router="topk")
    with pytest.raises(SurgeryError, match=r"^target is empty: give a glob or a list of globs"):
        mv.add_experts(m, [], 2)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MultiheadAttention(4, 1))
    for name, cls in (("0", "Conv2d"), ("1", "MultiheadAttention")):
        for router, kw in (("random", {"granularity": "token"}), ("topk", {"dim": 4})):  # topk routes per token by default
            with pytest.raises(SurgeryError, match=rf"^'{name}' is a {cls}, which mixes positions: per-token routing"):
                mv.add_experts(stem, name, 2, router=router, **kw)
    mv.add_experts(stem, "0", 2, router="random", granularity="sample")  # per sample is fine
    with pytest.raises(RegistryError, match=r"^unknown router 'multinomail'; did you mean 'multinomial'"):
        mv.add_experts(m, "head", 2, router="multinomail")
    with pytest.raises(SurgeryError, match=r"^collapse_experts: the model has no ExpertContainer$"):
        mv.collapse_experts(m)
    assert isinstance(m.head, nn.Linear)  # failed calls changed nothing
    mv.add_experts(m, "blocks.*.mlp", 2)
    with pytest.raises(SurgeryError, match=r"^base has no tensors under 'blocks.0.mlp'$"):
        mv.collapse_experts(m, "task_arithmetic", base={"head.weight": torch.zeros(3, 16)})


def test_collapse_loads_into_the_unmodified_backbone():
    m = toy()
    plain = toy(seed=1)  # a fresh, unmodified backbone
    mv.add_experts(m, "blocks.*.mlp", 3)
    x = torch.randn(6, 4)
    m.train()(x)  # one routed step
    m.eval()
    y_eval = m(x)
    assert mv.collapse_experts(m) is m
    assert not find_containers(m) and type(m.blocks[0].mlp) is nn.Sequential
    assert shapes(m) == shapes(plain)  # same keys (in order) and shapes
    assert list(m.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(m.state_dict(), strict=True)
    assert maxdiff(plain.eval()(x), y_eval) <= 1e-6


def test_collapse_task_arithmetic_and_ties_with_base():
    base = toy()
    m = copy.deepcopy(base)
    mv.add_experts(m, "blocks.*.mlp", 2, init="copy_noise", noise_std=0.1)
    thetas = [e.state_dict() for e in m.blocks[0].mlp.experts]
    b = base.blocks[0].mlp.state_dict()
    ta = mv.collapse_experts(copy.deepcopy(m), "task_arithmetic", base=base, lam=0.5)
    k = "0.weight"
    expected = b[k] + 0.5 * ((thetas[0][k] - b[k]) + (thetas[1][k] - b[k]))
    assert maxdiff(ta.blocks[0].mlp.state_dict()[k], expected) <= 1e-6
    ties = mv.collapse_experts(copy.deepcopy(m), "ties", base=base.state_dict(), density=0.5)
    delta = ties.blocks[0].mlp.state_dict()[k] - b[k]
    # with two experts every entry in the union of their top-50% sets survives the sign election
    # (the elected sign is that of the larger entry), and nothing else does
    top = []
    for th in thetas:
        d = (th[k] - b[k]).abs().flatten()
        top.append(d >= d.sort(descending=True).values[d.numel() // 2 - 1])
    assert torch.equal((delta != 0).flatten(), top[0] | top[1])
    assert shapes(ties) == shapes(base)


def test_routers_are_independent_per_container():
    def sequences(model, k=30):
        x = torch.randn(2, 4)
        out = {n: [] for n, _ in find_containers(model)}
        for _ in range(k):
            model.train()(x)
            for n, c in find_containers(model):
                out[n].append(int(c.last_routing.indices))
        return list(out.values())

    a, b = toy(), toy()
    mv.add_experts(a, "blocks.*.mlp", 4, seed=0)
    mv.add_experts(b, "blocks.*.mlp", 4, seed=0)
    sa = sequences(a)
    assert sa == sequences(b)  # reproducible from the seed
    assert sa[0] != sa[1]  # but the two layers do not route in lockstep
    assert [c.router.generator.initial_seed() for _, c in find_containers(a)] == [0, 1]
    # a second call with the same seed continues after the existing containers
    c2 = toy()
    mv.add_experts(c2, "blocks.0.mlp", 4, seed=0)
    mv.add_experts(c2, "blocks.1.mlp", 4, seed=0)
    assert [c.router.generator.initial_seed() for _, c in find_containers(c2)] == [0, 1]
    # a Router instance as template: each container gets its own generator
    t = toy()
    template = MultinomialRouter(num_experts=4, seed=0)
    mv.add_experts(t, "blocks.*.mlp", 4, router=template)
    s0, s1 = sequences(t)
    assert s0 != s1
    assert all(c.router is not template for _, c in find_containers(t))


def test_topk_router_infers_dim_and_runs_in_bf16():
    m = toy()
    mv.add_experts(m, "blocks.*.mlp", 4, router="topk", k=2)
    r = m.blocks[0].mlp.router
    assert isinstance(r, TopKRouter) and r.gate.in_features == 16 and r.k == 2
    y = m.train()(torch.randn(2, 5, 4))
    assert y.shape == (2, 5, 3)
    aux = mv.experts.collect_aux_losses(m)
    assert set(aux) == {"load_balance", "z_loss"}
    h = toy().to(torch.bfloat16)
    mv.add_experts(h, "blocks.*.mlp", 2, router="topk")
    assert h.blocks[0].mlp.router.gate.weight.dtype == torch.float32
    assert h.train()(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_surgery_on_cuda_with_bf16_autocast():
    m = toy().cuda()
    mv.add_experts(m, "blocks.*.mlp", 3, router="topk")
    assert m.blocks[0].mlp.router.gate.weight.is_cuda
    x = torch.randn(4, 4, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m.train()(x).float().sum().backward()
        y = m.eval()(x)
    mv.collapse_experts(m)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert (m(x) - y).abs().max().item() <= 1e-2
    assert m.blocks[0].mlp[0].weight.is_cuda


# -- open_clip ------------------------------------------------------------------------------------------

OC_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def clip_factory(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("oc_cfg")
    (d / "mkv-test-tiny.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(d)

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return open_clip.create_model("mkv-test-tiny", pretrained=None)

    return make


def _clip_outputs(model, images, text):
    return model.encode_image(images), model.encode_text(text)


@pytest.mark.parametrize(
    "target",
    [
        "visual.transformer.resblocks.*.mlp",  # visual tower
        "transformer.resblocks.*.mlp",  # text tower (CLIP keeps it at the top level)
    ],
)
def test_open_clip_surgery_and_collapse(clip_factory, target):
    model = clip_factory(0)
    names = mv.add_experts(model, target, 3, init="normal")
    assert names == [target.replace("*", "0"), target.replace("*", "1")]
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(0, 100, (2, 16))
    img, txt = _clip_outputs(model.train(), images, text)
    (img.sum() + txt.sum()).backward()
    c = model.get_submodule(names[0])
    assert c.last_routing is not None
    assert all(e.c_fc.weight.grad is not None for e in c.experts if e.c_fc.weight.grad is not None)
    assert any(e.c_fc.weight.grad is not None for e in c.experts)
    model.eval()
    with torch.no_grad():
        ref = _clip_outputs(model, images, text)
    mv.collapse_experts(model)
    fresh = clip_factory(1)
    assert shapes(model) == shapes(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        out = _clip_outputs(fresh.eval(), images, text)
    assert max(maxdiff(a, b) for a, b in zip(out, ref)) <= 1e-5


def test_open_clip_copy_init_keeps_the_model(clip_factory):
    model = clip_factory(0)
    ref = clip_factory(0).eval()
    mv.add_experts(model, ["visual.transformer.resblocks.*.mlp", "transformer.resblocks.*.mlp"], 2, init="copy")
    assert len(find_containers(model)) == 4
    images, text = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        a = _clip_outputs(model.eval(), images, text)
        b = _clip_outputs(ref, images, text)
        with mv.experts.use_expert(model, 1):
            c = _clip_outputs(model, images, text)
    assert max(maxdiff(u, v) for u, v in zip(a, b)) <= 1e-5
    assert max(maxdiff(u, v) for u, v in zip(c, b)) <= 1e-5


# -- timm ---------------------------------------------------------------------------------------------


def _vit(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=5)


@pytest.mark.parametrize("router", ["multinomial", "topk"])
def test_timm_vit_surgery_and_collapse(router):
    model = _vit(0)
    names = mv.add_experts(model, "blocks.*.mlp", 3, router=router)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    x = torch.randn(2, 3, 32, 32)
    logits = model.train()(x)
    assert logits.shape == (2, 5)
    if router == "topk":
        assert model.blocks[0].mlp.router.gate.in_features == 32
        assert model.blocks[0].mlp.last_routing.indices.shape == (2 * 5, 1)  # 4 patches + cls per image
    model.eval()
    with torch.no_grad():
        ref = model(x)
    mv.collapse_experts(model)
    plain = _vit(1)
    assert shapes(model) == shapes(plain)
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert maxdiff(plain.eval()(x), ref) <= 1e-5


# -- the delivery check -----------------------------------------------------------------------------------


def test_core_api_demo_script_passes():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "core_api_demo.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ALL CHECKS PASSED" in out.stdout
    assert "FAIL" not in out.stdout


def test_add_experts_warns_when_a_plain_checkpointing_backbone_gets_stochastic_routers():
    import warnings

    from mergekit_video.models.temporal import TemporalTransformer

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grad_checkpointing = True  # as open_clip's Transformer / timm models set it
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    with pytest.warns(UserWarning, match=r"gradient checkpointing on and now holds stochastic or stateful routers \(blocks.0.0"):
        mv.add_experts(Backbone(), "blocks.*.0", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.add_experts(Backbone(), "blocks.*.0", 2, router="fixed")  # deterministic routing recomputes alike
        ours = TemporalTransformer(width=64, layers=1, heads=1)
        ours.grad_checkpointing = True  # checkpoints with checkpoint_routed
        mv.add_experts(ours, "resblocks.*.mlp", 2)


def test_video_clip_warns_when_checkpointing_a_tower_with_stochastic_experts():
    import warnings

    from mergekit_video.models import build_video_clip

    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_grad_checkpointing(clip=True, head=True)  # experts only in the head: replayed, no warning
        model.set_grad_checkpointing(clip=False)
        mv.add_experts(model.visual, "transformer.resblocks.0.mlp", 2)
    with pytest.warns(UserWarning, match=r"visual.transformer has gradient checkpointing on .*\(resblocks.0.mlp"):
        model.set_grad_checkpointing(clip=True)


def test_errors_in_a_containers_forward_name_the_module_it_replaced():
    m = toy()
    base = {k: (torch.zeros(3, 3) if k == "blocks.1.mlp.0.weight" else v.clone()) for k, v in toy(1).state_dict().items()}
    mv.add_experts(m, "blocks.*.mlp", 2, init="copy", merge="ties", merge_kwargs={"base": base, "density": 0.5})
    with pytest.raises(ValueError, match=r"^expert container 'blocks.1.mlp': .*'0.weight'"):
        m.eval()(torch.randn(2, 4))


def test_surgery_is_atomic_and_refuses_a_second_pass_on_containers():
    m = toy()
    mv.add_experts(m, "blocks.*.mlp", 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"'blocks.0.mlp' \(matched by 'blocks.\*.mlp'\) already is an ExpertContainer"):
        mv.add_experts(m, "blocks.*.mlp", 2)
    # a router that cannot be built for the second target: nothing was replaced for the first
    with pytest.raises(SurgeryError, match="needs dim"):
        mv.add_experts(m, ["head", "blocks.*.norm"], 2, router="topk")
    assert isinstance(m.head, nn.Linear) and all(isinstance(b.norm, nn.LayerNorm) for b in m.blocks)
    assert m.state_dict().keys() == before.keys()
    # a collapse that fails for one container leaves every container in place
    partial_base = {k: v for k, v in toy().state_dict().items() if k.startswith("blocks.0.")}
    with pytest.raises(SurgeryError, match="base has no tensors under 'blocks.1.mlp'"):
        mv.collapse_experts(m, "ties", base=partial_base, density=0.5)
    assert len(find_containers(m)) == 2


def test_eval_merge_with_a_base_and_per_container_dare_masks():
    base = toy()
    m = copy.deepcopy(base)
    mv.add_experts(m, "blocks.0.mlp", 2, init="copy_noise", noise_std=0.1)
    c = m.blocks[0].mlp
    c.set_merge("task_arithmetic", base=base.blocks[0].mlp.state_dict(), lam=1.0)
    c.eval()
    expected = c.collapse("task_arithmetic", base=base.blocks[0].mlp, lam=1.0)
    x = torch.randn(3, 16)
    assert maxdiff(c(x), expected(x)) <= 1e-6
    with pytest.raises(ValueError, match="merge strategy 'temperature_softmax'"):
        c.set_merge("temperature_softmax")  # tau is required
    # DARE with a seed: each container draws its own drop masks
    d = copy.deepcopy(base)
    mv.add_experts(d, "blocks.*.mlp", 2, init="copy")
    for blk in d.blocks:  # same experts in both layers: only the masks can differ
        blk.mlp.load_state_dict(d.blocks[0].mlp.state_dict())
    dare = mv.collapse_experts(copy.deepcopy(d), "dare", base=base, drop_rate=0.5, seed=0)
    assert not torch.equal(dare.blocks[0].mlp[0].weight, dare.blocks[1].mlp[0].weight)


def test_normal_init_keeps_rms_norms_and_padding_rows():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(8)
            self.emb = nn.Embedding(5, 8, padding_idx=0)
            self.fc = nn.Linear(8, 8)

    b = reinit_normal_(Block(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.norm.weight, torch.ones(8)) and torch.equal(b.emb.weight[0], torch.zeros(8))
    assert b.fc.weight.std().item() == pytest.approx(0.02, rel=0.3) and torch.equal(b.fc.bias, torch.zeros(8))


def test_a_shared_module_becomes_one_container_under_all_its_names():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.head = self.shared  # tied

    for target in ("head", "shared"):
        m = Tied()
        names = mv.add_experts(m, target, 2)
        assert sorted(names) == ["head", "shared"]
        assert isinstance(m.head, ExpertContainer) and m.head is m.shared  # still tied
        assert len(find_containers(m)) == 1


def test_a_shared_container_collapses_to_one_dense_module_under_all_its_names():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a

    m, plain = Tied(), Tied()
    mv.add_experts(m, "a", 3)
    c = m.a
    expected_w = sum(e.weight for e in c.experts) / 3
    mv.collapse_experts(m)
    assert m.a is m.b and type(m.a) is nn.Linear and not find_containers(m)
    assert list(m.state_dict()) == list(plain.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert maxdiff(m.b.weight, expected_w) <= 1e-7
    plain.load_state_dict(m.state_dict())  # strict


def test_containers_do_not_nest():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 4))
            self.b = self.a

    for alias in ("a", "b"):  # inside a shared container, under either of its names
        m = Shared()
        mv.add_experts(m, "a", 2)
        with pytest.raises(SurgeryError, match=rf"^'{alias}.experts.0.0' \(matched by '{alias}.experts.0.0'\) lies inside the ExpertContainer '{alias}'"):
            mv.add_experts(m, f"{alias}.experts.0.0", 2)
        assert type(m.a.experts[0][0]) is nn.Linear
    # a target holding a container
    m = toy()
    mv.add_experts(m, "blocks.*.mlp", 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"^'blocks.0' \(matched by 'blocks.\[01\]'\) holds the ExpertContainer 'blocks.0.mlp'"):
        mv.add_experts(m, "blocks.[01]", 2)
    assert all(type(b) is ToyBlock for b in m.blocks) and m.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match=r"^expert 0 holds an ExpertContainer at 'mlp': containers cannot be nested"):
        ExpertContainer([copy.deepcopy(m.blocks[0]) for _ in range(2)])
    # nested by hand: collapse_experts refuses before changing anything
    m.blocks[1] = ExpertContainer([copy.deepcopy(m.blocks[1].mlp.experts[0]) for _ in range(2)])
    m.blocks[1].experts[0][1] = ExpertContainer([nn.LayerNorm(64), nn.LayerNorm(64)])
    keys = list(m.state_dict())
    with pytest.raises(SurgeryError, match=r"^the ExpertContainer 'blocks.1.experts.0.1' lies inside the ExpertContainer 'blocks.1'"):
        mv.collapse_experts(m)
    assert list(m.state_dict()) == keys and len(find_containers(m)) == 3


def _upcycled_toy(num_experts: int) -> tuple[nn.Module, nn.Module]:
    """(the toy model, an eval-mode copy whose MLPs are noisy copies of it as experts)."""
    base = toy()
    m = copy.deepcopy(base)
    mv.add_experts(m, "blocks.*.mlp", num_experts, init="copy_noise", noise_std=0.1)
    return base, m.eval()


def test_seeded_dare_is_the_same_in_use_merge_collapse_experts_and_add_experts():
    from mergekit_video.experts import use_merge

    base, m = _upcycled_toy(3)
    x = torch.randn(3, 4)
    with torch.no_grad(), use_merge(m, "dare", base=base, drop_rate=0.5, seed=0):
        y = m(x)
        assert [c.merge_kwargs["seed"] for _, c in find_containers(m)] == [0, 1]
    dense = mv.collapse_experts(copy.deepcopy(m), "dare", base=base, drop_rate=0.5, seed=0)
    assert maxdiff(y, dense(x)) == 0.0
    d = toy()
    mv.add_experts(d, "embed", 2)
    before = copy.deepcopy(d)
    mv.add_experts(d, "blocks.*.mlp", 2, init="copy_noise", noise_std=0.1, merge="dare", merge_kwargs={"seed": 5, "drop_rate": 0.5})
    assert [(n, c.merge_kwargs.get("seed")) for n, c in find_containers(d)] == [("embed", None), ("blocks.0.mlp", 6), ("blocks.1.mlp", 7)]
    # upcycled experts merge relative to the module each container replaced
    for i in range(2):
        assert torch.equal(d.blocks[i].mlp.merge_kwargs["base"]["0.weight"], before.blocks[i].mlp[0].weight)
    with torch.no_grad():
        y = d.eval()(x)
        assert maxdiff(y, mv.collapse_experts(copy.deepcopy(d))(x)) == 0.0  # each container's own merge
        assert maxdiff(y, mv.collapse_experts(copy.deepcopy(d), "mean")(x)) > 1e-3
    # a whole-model base is sliced per container; re-initialised experts have none
    e = copy.deepcopy(before)
    mv.add_experts(e, "blocks.*.mlp", 2, init="copy_noise", merge="ties", merge_kwargs={"base": before.state_dict()})
    assert torch.equal(e.blocks[1].mlp.merge_kwargs["base"]["0.weight"], before.blocks[1].mlp[0].weight)
    # the base is the container's: naming a task-arithmetic strategy (a density sweep) needs no base again
    from mergekit_video.experts import use_merge

    f = toy()
    mv.add_experts(f, "blocks.*.mlp", 2, init="copy_noise", noise_std=0.1, merge="ties")
    with torch.no_grad():
        y = f.eval()(x)
        assert maxdiff(y, mv.collapse_experts(copy.deepcopy(f), "ties")(x)) == 0.0
        with use_merge(f, "ties", density=0.5):
            y_half = f(x)
        assert maxdiff(y_half, mv.collapse_experts(copy.deepcopy(f), "ties", density=0.5)(x)) == 0.0 and maxdiff(y_half, y) > 0
        f.blocks[0].mlp.set_merge("mean")
        f.blocks[0].mlp.set_merge("dare", drop_rate=0.5, seed=1)  # kept across other merges
    with pytest.raises(SurgeryError, match=r"^merge 'ties' merges relative to the weights the experts were tuned from, but init='normal'"):
        mv.add_experts(copy.deepcopy(before), "blocks.*.mlp", 2, merge="ties")
    with pytest.raises(SurgeryError, match=r"^merge_kwargs base has no tensors under 'blocks.0.mlp'$"):
        mv.add_experts(copy.deepcopy(before), "blocks.*.mlp", 2, init="copy", merge="ties", merge_kwargs={"base": {"x": torch.zeros(1)}})


def test_unseeded_dare_gives_each_container_its_own_masks_from_the_default_seed():
    from mergekit_video.experts import use_merge

    base, m = _upcycled_toy(3)
    x = torch.randn(3, 4)
    with torch.no_grad(), use_merge(m, "dare", base=base, drop_rate=0.5):  # no seed: DARE's default 0, then 0 + i
        y = m(x)
        assert [c.merge_kwargs["seed"] for _, c in find_containers(m)] == [0, 1]
    with torch.no_grad():
        assert maxdiff(y, mv.collapse_experts(copy.deepcopy(m), "dare", base=base, drop_rate=0.5, seed=0)(x)) == 0.0
    dense = mv.collapse_experts(copy.deepcopy(m), "dare", base=base, drop_rate=0.5)
    with torch.no_grad():
        assert maxdiff(y, dense(x)) == 0.0
    # the two blocks' task vectors are dropped by masks of their own (same shapes, other seeds)
    kept = [dense.blocks[i].mlp[0].weight != base.blocks[i].mlp[0].weight for i in range(2)]
    assert not torch.equal(kept[0], kept[1])
    d = toy()
    mv.add_experts(d, "blocks.*.mlp", 2, init="copy_noise", noise_std=0.1, merge="dare", merge_kwargs={"drop_rate": 0.5})
    assert [c.merge_kwargs.get("seed") for _, c in find_containers(d)] == [0, 1]
    mv.add_experts(d, "head", 2, init="copy_noise", merge="mean")
    assert "seed" not in d.head.merge_kwargs  # deterministic merges get none


def test_use_merge_with_a_whole_model_base_equals_the_collapse():
    from mergekit_video.experts import use_merge

    base, m = _upcycled_toy(2)
    x = torch.randn(3, 4)
    with torch.no_grad(), use_merge(m, "ties", base=base, density=0.5):
        y = m(x)
    assert m.blocks[0].mlp.merge == "mean"  # restored
    dense = mv.collapse_experts(copy.deepcopy(m), "ties", base=base, density=0.5)
    assert maxdiff(y, dense(x)) <= 1e-6


def test_torch_export_names_the_collapse_and_the_collapsed_model_exports_equal():
    m = toy()
    mv.add_experts(m, "blocks.*.mlp", 2, seed=0)
    m.eval()
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        expected = m(x)
    with pytest.raises(RuntimeError, match=r"^torch.export cannot trace an ExpertContainer .* mergekit_video.collapse_experts\(model\)"):
        torch.export.export(m, (x,))
    mv.collapse_experts(m)
    exported = torch.export.export(m, (x,))
    assert maxdiff(exported.module()(x), expected) <= 1e-6


def test_token_routing_is_refused_for_a_target_holding_a_position_mixing_module():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.fc = nn.Linear(4, 4)

    m = nn.Sequential(Block())
    with pytest.raises(SurgeryError, match=r"^'0' holds a MultiheadAttention \('attn'\), which mixes positions: per-token routing"):
        mv.add_experts(m, "0", 2, router="fixed", expert=0, granularity="token")
    mv.add_experts(m, "0", 2, router="fixed", expert=0, granularity="sample")  # per sample keeps each sequence whole


def test_a_parameter_tied_outside_the_target_is_refused_naming_both_names():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    m = TiedLM()
    with pytest.raises(SurgeryError, match=r"^'head.weight' is the same parameter as 'emb.weight', outside the target 'head' \(tied weights\)"):
        mv.add_experts(m, "head", 2, init="copy")
    assert isinstance(m.head, nn.Linear) and m.head.weight is m.emb.weight  # nothing changed
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight  # two targets sharing a parameter: each would get its own copies
    with pytest.raises(SurgeryError, match=r"^'0.weight' is the same parameter as '1.weight'"):
        mv.add_experts(shared, ["0", "1"], 2)
    alias = nn.Sequential(nn.Linear(4, 4))
    alias.add_module("again", alias[0])  # a module tie (not a parameter tie) is one container under both names
    assert mv.add_experts(alias, "0", 2) == ["0", "again"]


def test_experts_of_a_frozen_target_warn_that_they_will_not_train():
    import warnings

    m = toy()
    m.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"^the parameters of 'blocks.0.mlp' \(and 1 more targets\) are frozen .* they will not train"):
        mv.add_experts(m, "blocks.*.mlp", 2)
    assert not any(p.requires_grad for p in m.blocks[0].mlp.parameters())
    unfrozen = toy()
    unfrozen.embed.requires_grad_(False)  # frozen elsewhere: the targets train
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.add_experts(unfrozen, "blocks.*.mlp", 2)


def test_children_their_parent_reads_instead_of_calling_are_refused_and_the_parent_works():
    """nn.MultiheadAttention hands out_proj's weights to F.multi_head_attention_forward, and an
    nn.TransformerEncoderLayer's eval fast path hands its children's to one kernel: a container there
    would be skipped (expert 0's weights, no routing, no merge). The whole layer is the target."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    before = copy.deepcopy(model)
    for target, said in (("layers.*.self_attn.out_proj", r"^'layers\.0\.self_attn\.out_proj' is read, not called, by its parent "
                          r"'layers\.0\.self_attn': MultiheadAttention passes its out_proj weights to F\.multi_head_attention_forward "
                          r"itself, so experts there would never route nor merge; target 'layers\.0\.self_attn' itself"),
                         ("layers.*.linear1", r"^'layers\.0\.linear1' is read, not called, by its parent 'layers\.0': "
                          r"TransformerEncoderLayer passes its children's weights to one fused kernel in eval"),
                         ("layers.1.self_attn", r"^'layers\.1\.self_attn' is read, not called, by its parent 'layers\.1'")):
        with pytest.raises(SurgeryError, match=said):
            mv.add_experts(model, target, 3, init="copy_noise", noise_std=0.1)
    assert shapes(model) == shapes(before)  # refused before anything changed
    mv.add_experts(model, "layers.*", 3, init="copy_noise", noise_std=0.1, generator=torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        fast = model(x)  # the encoder's own fast-path checks read expert 0's attributes, then call each container
    collapsed = copy.deepcopy(model)
    mv.collapse_experts(collapsed)
    with torch.no_grad():
        assert maxdiff(fast, collapsed(x)) < 1e-5
    assert maxdiff(fast, model(x)) < 1e-5  # grad on (no fast path) gives the same merged output


def test_module_objects_and_router_classes_get_a_short_error_naming_what_to_pass():
    m = toy()
    with pytest.raises(SurgeryError, match=r"^target must be module names or globs over them, not module objects: pass \['blocks\.0\.mlp', 'blocks\.1\.mlp'\]$"):
        mv.add_experts(m, [b.mlp for b in m.blocks], 2)
    with pytest.raises(SurgeryError, match=r"not module objects; Linear given is not a submodule of the model$"):
        mv.add_experts(m, nn.Linear(2, 2), 2)
    with pytest.raises(SurgeryError, match=r"^router must be a registered name or a Router instance, got the class TopKRouter: pass router='topk'$"):
        mv.add_experts(m, "blocks.*.mlp", 2, router=TopKRouter)
    assert not find_containers(m)


def test_a_base_after_surgery_is_named_as_such():
    """Task vectors are taken from the model before add_experts; the surgered model (or its state dict) is refused."""
    m = toy()
    before = copy.deepcopy(m)
    mv.add_experts(m, "blocks.*.mlp", 3, init="copy_noise", generator=torch.Generator().manual_seed(0))
    with pytest.raises(SurgeryError, match=r"^base has expert containers: it is a model after add_experts; pass the model from before"):
        mv.collapse_experts(copy.deepcopy(m), "ties", base=m)
    with pytest.raises(SurgeryError, match=r"^base holds experts under 'blocks\.0\.mlp' \('blocks\.0\.mlp\.experts\.0\.\.\.'\): it is the state dict"):
        mv.collapse_experts(copy.deepcopy(m), "ties", base=m.state_dict())
    with pytest.raises(ValueError, match=r"^base has expert containers"):
        with use_merge(m, "task_arithmetic", base=m):
            pass
    dense = copy.deepcopy(m)
    mv.collapse_experts(dense, "ties", base=before)
    assert shapes(dense) == shapes(before)


def test_the_model_itself_as_target_and_a_child_named_experts_in_a_base():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    for target in (m, [m[0], m]):
        with pytest.raises(SurgeryError, match=r"the model itself cannot be a target \(experts replace its submodules\)"):
            mv.add_experts(m, target, 2)

    class MoE(nn.Module):  # a user block whose child is called experts: its base keys start with 'experts.'
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(e(x) for e in self.experts)

    torch.manual_seed(0)
    model = nn.Sequential(MoE())
    before = copy.deepcopy(model.state_dict())
    mv.add_experts(model, "0", 2, init="copy_noise", generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(model)
    mv.collapse_experts(dense, "task_arithmetic", base=before)
    assert set(dense.state_dict()) == set(before)


def _seq_first_encoder() -> nn.TransformerEncoder:
    """A sequence-first encoder ([S, B, D]: batch_first=False, torch's default)."""
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1, enable_nested_tensor=False)


def test_per_sample_routing_of_a_sequence_first_target_is_refused_without_batch_dim():
    """Defect: sample routing split dim 0 of a batch_first=False module's [S, B, D] input, the sequence, among the experts,
    silently. Now add_experts, ExpertContainer and use_router refuse it, naming the module and batch_dim=1."""
    said = (r"'layers.0' holds a MultiheadAttention \('self_attn'\) with batch_first=False, so its input is sequence-first "
            r"\(\[S, B, \.\.\.\]\), and per-sample routing would split dim 0, the sequence, among the experts: pass batch_dim=1 "
            r"\(add_experts\(\.\.\., batch_dim=1\)\), or build the module with batch_first=True")
    for router, kw in (("random", {"granularity": "sample"}), ("topk", {"granularity": "sample"})):
        enc = _seq_first_encoder()
        with pytest.raises(SurgeryError, match="^" + said):
            mv.add_experts(enc, "layers.*", 4, router=router, seed=0, **kw)
        assert isinstance(enc.layers[0], nn.TransformerEncoderLayer)  # unchanged
    enc = _seq_first_encoder()
    mv.add_experts(enc, "layers.*", 4, router="random", granularity="batch", seed=0)  # per batch: no split, fine
    with pytest.raises(ValueError, match=r"^a per-sample router plan \(use_router\): container 'layers.0' holds a MultiheadAttention"):
        with mv.experts.use_router(enc, "random"):
            pass
    layer = enc.layers[0].experts[0]
    with pytest.raises(ValueError, match=r"^the expert holds a MultiheadAttention \('self_attn'\) with batch_first=False.*"
                                         r"\(ExpertContainer\(\.\.\., batch_dim=1\)\)"):
        ExpertContainer([copy.deepcopy(layer) for _ in range(2)], "random", router_kwargs={"granularity": "sample"})
    mv.add_experts(_seq_first_encoder(), "layers.*", 2, router="random", granularity="sample", batch_dim=0)  # given: trusted


def test_assigning_a_router_after_construction_gets_the_constructor_checks():
    """Defect: ``container.router = <per-sample router>`` on a sequence-first expert skipped the refusal that
    add_experts, ExpertContainer and use_router make (sample routing would split the sequence); a router for another
    expert count was taken too. Both are refused now, naming the container; a per-batch router is taken."""
    enc = _seq_first_encoder()
    mv.add_experts(enc, "layers.*", 2, router="multinomial", seed=0)
    c = enc.layers[0]
    with pytest.raises(ValueError, match=r"^expert container 'layers.0' holds a MultiheadAttention \('self_attn'\) with "
                                         r"batch_first=False.*pass batch_dim=1"):
        c.router = build_router("random", num_experts=2, granularity="sample")
    with pytest.raises(ValueError, match=r"^expert container 'layers.0': the router is built for 3 experts but the container has 2$"):
        c.router = build_router("random", num_experts=3)
    with pytest.raises(TypeError, match=r"router must be a Router \(build one with build_router\), got int"):
        c.router = 1
    assert type(c.router).__name__ == "MultinomialRouter"  # unchanged by the refusals
    c.router = build_router("fixed", num_experts=2, expert=1)
    enc.train()
    x = torch.randn(5, 3, 16)  # [S, B, D]
    with torch.no_grad():
        assert torch.equal(enc(x), nn.TransformerEncoder(c.experts[1], 1, enable_nested_tensor=False)(x))
    sample_ok = _seq_first_encoder()
    mv.add_experts(sample_ok, "layers.*", 2, router="multinomial", seed=0, batch_dim=1)
    sample_ok.layers[0].router = build_router("random", num_experts=2, granularity="sample")  # batch_dim given: taken


def test_batch_dim_routes_each_sample_of_a_sequence_first_input_whole():
    """Defect: per-sample routing assumed [B, ...]. With batch_dim=1, sample j of [S, B, D] runs whole through its expert
    (random, topk and use_router; segmented plans split dim 1), and state_dict / deepcopy / eval round trips keep it."""
    x = torch.randn(5, 3, 16)  # [S, B, D]
    for router in ("random", "topk"):
        enc = _seq_first_encoder()
        mv.add_experts(enc, "layers.*", 4, router=router, granularity="sample", seed=0, batch_dim=1)
        c = enc.layers[0]
        assert c.batch_dim == 1 and "batch_dim=1" in repr(c)
        enc.train()
        y = enc(x)
        idx, w = c.last_routing.indices.view(-1), c.last_routing.weights.view(-1)
        assert idx.shape == (3,)  # one decision per sample, not per position
        with torch.no_grad():
            for j in range(3):
                ref = c.experts[int(idx[j])](x[:, j:j + 1])[:, 0] * w[j]
                assert (y[:, j] - ref).abs().max().item() <= 1e-6
    enc = _seq_first_encoder()
    mv.add_experts(enc, "layers.*", 3, router="fixed", granularity="batch", batch_dim=1)
    c = enc.layers[0]
    with torch.no_grad(), mv.experts.use_router(enc, "random", seed=0):
        y = enc(x)
        idx = c.last_routing.indices.view(-1)
        assert all((y[:, j] - c.experts[int(idx[j])](x[:, j:j + 1])[:, 0]).abs().max().item() <= 1e-6 for j in range(3))
    with torch.no_grad(), mv.experts.routing_plan(enc, [(1, 0), (2, 2)]):  # sample 0 → expert 0, samples 1, 2 → expert 2
        y = enc(x)
        assert (y[:, :1] - c.experts[0](x[:, :1])).abs().max().item() <= 1e-6
        assert (y[:, 1:] - c.experts[2](x[:, 1:])).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match=r"^plan segments cover 5 samples but the batch has 3 \(dim 1 of the input\)"):
        with mv.experts.routing_plan(enc, [(2, 0), (3, 1)]):
            enc(x)
    copied = copy.deepcopy(enc)
    assert copied.layers[0].batch_dim == 1 and copied.layers[0].batch_dim_given
    fresh = _seq_first_encoder()
    mv.add_experts(fresh, "layers.*", 3, router="fixed", granularity="batch", batch_dim=1)
    fresh.load_state_dict(enc.state_dict())  # no key for batch_dim: state dicts are as before
    assert set(enc.state_dict()) == set(fresh.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), enc.eval()(x))


def test_the_clip_experts_record_keeps_a_given_batch_dim():
    """Defect guard: a container's batch_dim must survive the VideoCLIP config record (recorded only when given, so
    records of batch-first containers are as before)."""
    from mergekit_video.models.video_clip import apply_clip_experts, clip_experts_record

    enc = _seq_first_encoder()
    mv.add_experts(enc, "layers.*", 2, router="random", granularity="sample", seed=0, batch_dim=1)
    record = clip_experts_record(enc)
    assert record[0]["batch_dim"] == 1
    rebuilt = _seq_first_encoder()
    apply_clip_experts(rebuilt, record)
    assert rebuilt.layers[0].batch_dim == 1 and rebuilt.layers[0].router.granularity == "sample"
    plain = nn.Sequential(nn.Linear(4, 4))
    mv.add_experts(plain, "0", 2)
    assert "batch_dim" not in clip_experts_record(plain)[0]


def test_router_keywords_beside_a_router_instance_are_refused():
    """Defect: add_experts(router=<Router instance>, temperature=5.0, granularity=..., seed=...) silently dropped the
    keywords (the instance was copied as is). Now refused, naming them; the instance alone still works."""
    m = Toy()
    template = MultinomialRouter(num_experts=2, temperature=2.0, seed=0)
    with pytest.raises(SurgeryError, match=r"^router is a MultinomialRouter instance, which carries its own arguments "
                                           r"\(num_experts=2, granularity='batch'\): the keyword arguments 'temperature', "
                                           r"'granularity', 'seed' would be ignored"):
        mv.add_experts(m, "blocks.*.mlp", 2, router=template, temperature=5.0, granularity="token", seed=1)
    assert not find_containers(m)
    mv.add_experts(m, "blocks.*.mlp", 2, router=template)
    assert [c.router.temperature for _, c in find_containers(m)] == [2.0, 2.0]


def test_a_typo_of_an_add_experts_keyword_is_named_with_the_closest_name_of_either_add_experts_or_the_router():
    """Defect: add_experts(init_sdt=0.1) was blamed on the router ("router 'multinomial' got an unexpected argument")
    with no suggestion. Now the closest name among add_experts's own keywords and the router's is offered."""
    m = Toy()
    with pytest.raises(SurgeryError, match=r"^add_experts got an unexpected argument 'init_sdt' \(did you mean 'init_std'\?\): it is "
                                           r"neither an argument of add_experts \(target, num_experts, router, init, merge, noise_std, "
                                           r"init_std, generator, merge_kwargs, batch_dim\) nor of router 'multinomial' "
                                           r"\(temperature, granularity, seed\)"):
        mv.add_experts(m, "blocks.*.mlp", 2, init_sdt=0.1)
    with pytest.raises(SurgeryError, match=r"^add_experts got an unexpected argument 'kk' \(did you mean 'k'\?\)"):
        mv.add_experts(m, "blocks.*.mlp", 2, router="topk", kk=2)
    assert not find_containers(m)


def test_an_init_std_or_noise_std_that_the_init_does_not_use_is_warned_about():
    """Defect: noise_std with init='normal' (and init_std with a copy init) was ignored silently. Now a UserWarning
    says so; the stds an init uses still apply (copy_noise with noise_std=0: the experts equal the module)."""
    with pytest.warns(UserWarning, match=r"^add_experts: noise_std=0.1 has no effect with init='normal' \(it is the std of init='copy_noise'\)$"):
        mv.add_experts(Toy(), "blocks.*.mlp", 2, noise_std=0.1)
    with pytest.warns(UserWarning, match=r"^add_experts: init_std=0.1 has no effect with init='copy' \(it is the std of init='normal'\)$"):
        mv.add_experts(Toy(), "blocks.*.mlp", 2, init="copy", init_std=0.1)
    m = Toy()
    before = copy.deepcopy(m.blocks[0].mlp.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.add_experts(m, "blocks.*.mlp", 2, init="copy_noise", noise_std=0.0)
    assert all(torch.equal(v, m.blocks[0].mlp.experts[1].state_dict()[k]) for k, v in before.items())


def test_token_routing_of_a_1x1_convolution_is_refused_for_its_layout_not_for_mixing_positions():
    """Defect: a 1x1 Conv2d (timm convnext conv_mlp) was refused for per-token routing as one "which mixes positions", which
    it does not; the refusal stands (it reads [B, C, H, W], not [tokens, dim]) but says why. Sample routing still works."""
    mlp = nn.Sequential(nn.Conv2d(8, 16, 1), nn.GELU(), nn.Conv2d(16, 8, 1))
    m = nn.Sequential(mlp)
    with pytest.raises(SurgeryError, match=r"^'0' holds a Conv2d \('0'\), a 1x1 convolution: it mixes no positions, but it reads "
                                           r"channels-first input \(\[B, C, \.\.\.\]\), while per-token routing runs each expert on "
                                           r"\[tokens, dim\] rows"):
        mv.add_experts(m, "0", 2, router="topk")
    mv.add_experts(m, "0", 2, router="topk", granularity="sample")
    x = torch.randn(2, 8, 3, 3)
    assert m.train()(x).shape == (2, 8, 3, 3)
