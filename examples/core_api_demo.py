"""Delivery check for the generic core: the public API on a toy model, open_clip and timm.

    python examples/core_api_demo.py

Uses only the documented public names (``mergekit_video.add_experts``,
``collapse_experts``, ``ExpertContainer``, ``ROUTERS`` / ``MERGES`` / ``REGULARIZERS``,
``merge_state_dicts``) on tiny random-weight models (nothing is downloaded). Every
check prints one line with the number it rests on; the script exits 1 if any fails.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from mergekit_video import MERGES, REGULARIZERS, ROUTERS, ExpertContainer, add_experts, collapse_experts, merge_state_dicts
from mergekit_video.experts import collect_aux_losses

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    """Print one result line and remember failures."""
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")
    if not ok:
        FAILED.append(name)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def same_layout(a: nn.Module, b: nn.Module) -> bool:
    """Same state-dict keys, in order, with the same shapes."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


# -- registries -----------------------------------------------------------------------------------


def registries() -> None:
    for reg, want in (
        (ROUTERS, {"multinomial", "random", "fixed", "topk"}),
        (MERGES, {"mean", "weighted", "temperature_softmax", "task_arithmetic", "ties", "dare", "slerp", "ensemble"}),
        (REGULARIZERS, {"weight_merging", "feature_mse", "load_balance"}),
    ):
        names = reg.names()
        check(f"registry {reg.kind}", want <= set(names), ", ".join(names))


# -- routers ----------------------------------------------------------------------------------------


def routers() -> None:
    n, draws = 4, 20_000
    r = ROUTERS.build("multinomial", num_experts=n, granularity="sample", seed=0)
    idx = r(torch.zeros(draws, 8)).indices.view(-1)
    freq = torch.bincount(idx, minlength=n).double() / draws
    target = torch.softmax(torch.arange(1, n + 1, dtype=torch.float64), 0)
    dev = (freq - target).abs().max().item()
    check("multinomial P(i) ∝ exp(i) (Eq. 5)", dev <= 0.01, f"freq={[round(f, 3) for f in freq.tolist()]} max|dev|={dev:.4f}")

    rnd = ROUTERS.build("random", num_experts=n, granularity="sample", seed=0)
    freq = torch.bincount(rnd(torch.zeros(draws, 8)).indices.view(-1), minlength=n).double() / draws
    check("random is uniform", (freq - 0.25).abs().max().item() <= 0.01, f"freq={[round(f, 3) for f in freq.tolist()]}")

    fixed = ROUTERS.build("fixed", num_experts=n, expert=2, granularity="token")
    check("fixed always expert 2", bool((fixed(torch.zeros(2, 3, 8)).indices == 2).all()), "6/6 tokens")

    # topk with gate = identity: tokens are their own logits (see tests/test_routers.py for the arithmetic)
    topk = ROUTERS.build("topk", num_experts=3, dim=3, k=1)
    with torch.no_grad():
        topk.gate.weight.copy_(torch.eye(3))
    out = topk(torch.tensor([[math.log(3), math.log(2), 0.0], [0.0, math.log(4), math.log(3)]]))
    lb, z = out.aux_losses["load_balance"].item(), out.aux_losses["z_loss"].item()
    z_ref = (math.log(6) ** 2 + math.log(8) ** 2) / 2
    check("topk aux losses", abs(lb - 105 / 96) < 1e-6 and abs(z - z_ref) < 1e-5, f"load_balance={lb:.6f} (105/96) z_loss={z:.6f}")


# -- merges -------------------------------------------------------------------------------------------


def merges() -> None:
    ts = [torch.randn(3, 3) for _ in range(4)]
    mean = MERGES.get("mean")(ts)
    d_inf = maxdiff(MERGES.get("temperature_softmax")(ts, tau=math.inf), mean)
    check("temperature_softmax τ=∞ is the mean", d_inf <= 1e-6, f"max|diff|={d_inf:.2e}")
    last = maxdiff(MERGES.get("temperature_softmax")(ts, tau=1e-4), ts[-1])
    first = maxdiff(MERGES.get("temperature_softmax")(ts, tau=-1e-4), ts[0])
    check("temperature_softmax τ→0± limits", last == 0 and first == 0, f"0⁺→last {last:.1e}, 0⁻→first {first:.1e}")

    base = torch.full((4,), 0.5)
    thetas = [base + torch.tensor(t) for t in ([3, -1, 0.5, -2], [-4, 2, 1, -0.2], [1, 0.1, -3, -1.5])]
    ties = MERGES.get("ties")(thetas, base=base, density=0.5)
    check("ties hand example", torch.allclose(ties, torch.tensor([-3.5, 2.5, -2.5, -1.25])), f"{ties.tolist()}")
    dbase = torch.ones(4)
    dare = MERGES.get("dare")([dbase + torch.tensor([2.0, 0, 1, -1]), dbase + torch.tensor([3.0, 4, -2, 1])], base=dbase, drop_rate=0.1, seed=0)
    want = torch.tensor([1 + 5 / 0.9, 1 + 4 / 0.9, 1 - 2 / 0.9, 1.0])
    check("dare hand example (seed 0)", torch.allclose(dare, want, atol=1e-5), f"{[round(v, 4) for v in dare.tolist()]}")
    ta = MERGES.get("task_arithmetic")([torch.tensor([2.0, 0, 1]), torch.tensor([1.0, 3, 1])], base=torch.ones(3), lam=0.5)
    check("task_arithmetic", torch.allclose(ta, torch.tensor([1.5, 1.5, 1.0])), f"{ta.tolist()}")
    s = MERGES.get("slerp")([torch.tensor([1.0, 0]), torch.tensor([0.0, 1])], t=0.5)
    check("slerp of orthogonal unit vectors stays on the circle", abs(s.norm().item() - 1) < 1e-6, f"{s.tolist()}")
    try:
        merge_state_dicts([{"w": ts[0]}, {"w": ts[1]}], "ensemble")
        check("ensemble is not a weight merge", False, "no error")
    except TypeError as exc:
        check("ensemble is not a weight merge", True, f"TypeError: {str(exc)[:60]}...")


# -- toy model -------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for m in self.mlps:
            x = x + m(x)
        return self.head(x)


def toy_model() -> None:
    torch.manual_seed(0)
    model, plain = Toy(), Toy()
    names = add_experts(model, "mlps.*", num_experts=4, router="multinomial", init="normal", seed=0)
    check("add_experts on a toy model", names == ["mlps.0", "mlps.1"], f"{names}")
    c = model.mlps[0]
    x = torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # routed training steps
        opt.zero_grad()
        model.train()(x).pow(2).mean().backward()
        opt.step()

    model.eval()
    dense = copy.deepcopy(c.experts[0])
    sds = [e.state_dict() for e in c.experts]
    dense.load_state_dict({k: sum(sd[k] for sd in sds) / 4 for k in sds[0]})
    h = torch.randn(5, 16)
    with torch.no_grad():  # evaluation: the cached merge is a constant
        y = [model(x) for _ in range(3)]
        d = maxdiff(c(h), dense(h))
    check("eval = dense mean weights (Eq. 6)", d <= 1e-6, f"max|diff|={d:.2e}, merges computed={c.merge_count} for 4 eval forwards")
    check("merge cached", c.merge_count == 1, f"merge_count={c.merge_count}")

    w = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    c.merged_forward(h, w).sum().backward()
    check("merged_forward is differentiable", w.grad is not None and c.experts[3][0].weight.grad is not None, f"d/dw={[round(g, 3) for g in w.grad.tolist()]}")

    wmr = REGULARIZERS.build("weight_merging", seed=0)
    model.train()
    with wmr.merged_region(model) as taus:
        y_wmr = model(x)
    tau_txt = {k: v for k, v in taus.items()}
    check("WMR merged region (Eq. 7-8)", y_wmr.shape == y[0].shape and set(taus) == {"mlps.0", "mlps.1"}, f"τ per container={tau_txt}")

    ens = ExpertContainer([copy.deepcopy(e) for e in c.experts], "fixed", merge="mean").collapse("ensemble")
    d = maxdiff(ens(h), sum(e(h) for e in c.experts) / 4)
    check("collapse('ensemble') averages outputs", d <= 1e-6, f"max|diff|={d:.2e}")

    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    collapse_experts(model)
    check("collapse keeps keys and shapes", same_layout(model, plain), f"{len(model.state_dict())} tensors")
    plain.load_state_dict(model.state_dict(), strict=True)
    d = maxdiff(plain.eval()(x), y_eval)
    check("collapsed weights load into the plain backbone", d <= 1e-6, f"max|diff|={d:.2e}")


# -- open_clip ----------------------------------------------------------------------------------------------


def open_clip_model() -> None:
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
    }
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "mkv-demo-tiny.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("mkv-demo-tiny", pretrained=None)
    plain = open_clip.create_model("mkv-demo-tiny", pretrained=None)
    names = add_experts(model, ["visual.transformer.resblocks.*.mlp", "transformer.resblocks.*.mlp"], num_experts=3)
    check("open_clip: visual and text towers", len(names) == 4, f"{names}")
    images, text = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 16))
    model.train()
    (model.encode_image(images).sum() + model.encode_text(text).sum()).backward()
    model.eval()
    with torch.no_grad():
        ref = (model.encode_image(images), model.encode_text(text))
    collapse_experts(model)
    check("open_clip: collapse keeps keys and shapes", same_layout(model, plain), f"{len(model.state_dict())} tensors")
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        out = (plain.eval().encode_image(images), plain.encode_text(text))
    d = max(maxdiff(a, b) for a, b in zip(out, ref))
    check("open_clip: merged model = plain backbone + merged weights", d <= 1e-5, f"max|diff|={d:.2e}")


# -- timm ------------------------------------------------------------------------------------------------------


def timm_vit() -> None:
    import timm

    def vit() -> nn.Module:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=5)

    torch.manual_seed(0)
    model, plain = vit(), vit()
    names = add_experts(model, "blocks.*.mlp", num_experts=4, router="topk", k=2)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x)
    aux = {k: round(v.item(), 4) for k, v in collect_aux_losses(model).items()}
    check("timm ViT: topk experts on blocks.*.mlp", names == ["blocks.0.mlp", "blocks.1.mlp"], f"{names} aux={aux}")
    model.eval()
    with torch.no_grad():
        ref = model(x)
    collapse_experts(model)
    check("timm ViT: collapse keeps keys and shapes", same_layout(model, plain), f"{len(model.state_dict())} tensors")
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        d = maxdiff(plain.eval()(x), ref)
    check("timm ViT: merged model = plain backbone + merged weights", d <= 1e-5, f"max|diff|={d:.2e}")


def main() -> int:
    """Run every section; return the process exit code."""
    for section in (registries, routers, merges, toy_model, open_clip_model, timm_vit):
        print(f"== {section.__name__}")
        section()
    if FAILED:
        print(f"{len(FAILED)} CHECK(S) FAILED: {', '.join(FAILED)}")
        return 1
    print("ALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
