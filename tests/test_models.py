"""MoTE model: head structure, objective, TFM, evaluation, save/load, dense export."""

from __future__ import annotations

import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from mergekit_video.experts import find_containers, routing_plan
from mergekit_video.models import MoTEObjective, TemporalHead, build_video_clip, export_dense, load, save_model
from mergekit_video.models.checkpoint import count_parameters
from mergekit_video.models.clip import ClassFeatureCache, encode_class_names, needs_quick_gelu
from mergekit_video.models.modulation import semantic_association
from mergekit_video.models.prompts import MOTE_TEMPLATES
from mergekit_video.models.temporal import LAYER_NORM_EPS, cosine_logits

TINY = "mergevid-tiny-vit"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_video_clip(clip_name=TINY, temporal_layers=2, num_experts=4)


@pytest.fixture(scope="module")
def classes(model):
    return model.class_features(["running", "jumping", "swimming", "climbing", "dancing", "eating"], templates="single")


def test_head_structure_matches_reference_spec():
    head = TemporalHead(width=128, layers=3, num_experts=4)
    assert head.frame_position_embeddings.weight.shape == (77, 128)
    block = head.transformer.resblocks[0]
    assert block.attn.heads == 2  # D // 64
    assert block.ln_1.eps == LAYER_NORM_EPS == 1e-12
    assert [n for n, _ in find_containers(head)] == [f"transformer.resblocks.{i}.mlp" for i in range(3)]
    expert = block.mlp.experts[0]
    assert expert.c_fc.weight.shape == (512, 128) and expert.c_proj.weight.shape == (128, 512)
    # N(0, 0.02) init, zero biases, independent experts
    w = torch.cat([c.experts[i].c_fc.weight.flatten() for _, c in find_containers(head) for i in range(4)])
    assert abs(w.std().item() - 0.02) < 1e-3
    assert block.mlp.experts[0].c_fc.bias.abs().sum() == 0
    assert not torch.equal(block.mlp.experts[0].c_fc.weight, block.mlp.experts[1].c_fc.weight)
    assert abs(head.frame_position_embeddings.weight.std().item() - 0.02) < 2e-3


def test_quick_gelu_decision():
    assert needs_quick_gelu("ViT-L-14", "openai")
    assert needs_quick_gelu("ViT-B-16-quickgelu", None)
    assert not needs_quick_gelu("ViT-B-16", None)


def test_prompt_ensemble_normalises_per_template_then_renormalises(model):
    names = ["archery", "bowling"]
    feats = encode_class_names(model.clip, names, templates=MOTE_TEMPLATES[:3], model_name=TINY)
    import open_clip

    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        per = [F.normalize(model.clip.encode_text(tok([t.format(n) for n in names])), dim=-1) for t in MOTE_TEMPLATES[:3]]
    expected = F.normalize(torch.stack(per).mean(0), dim=-1)
    assert torch.allclose(feats, expected, atol=1e-6)
    assert len(MOTE_TEMPLATES) == 28


def test_class_feature_cache_hits_on_second_call(model, tmp_path):
    cache = ClassFeatureCache(directory=tmp_path)
    a = model.class_features(["a", "b"], templates="single", cache=cache)
    b = model.class_features(["a", "b"], templates="single", cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(a, b)
    model.class_features(["a", "c"], templates="single", cache=cache)  # other class list: other key
    assert cache.misses == 2


def test_train_step_lowers_loss_on_fixed_batch(classes):
    torch.manual_seed(1)
    head = TemporalHead(width=64, layers=2, num_experts=4, router_kwargs={"seed": 0})
    objective = MoTEObjective(wmr={"seed": 0})
    feats = F.normalize(torch.randn(6, 8, 64), dim=-1)
    labels = torch.arange(6)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head.train()
    losses = []
    for _ in range(30):
        out = objective(head, feats, classes, labels, torch.tensor(100.0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert set(out.terms) == {"te", "wmr", "mse"}
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_fused_paths_equal_separate_forwards(classes, grad_checkpointing):
    # fused: one [2B] forward whose first attention runs once on [B] and is shared by both paths
    torch.manual_seed(2)
    feats = torch.randn(4, 8, 64)
    labels = torch.tensor([0, 1, 2, 3])
    outs = []
    for fuse in (True, False):
        torch.manual_seed(3)
        head = TemporalHead(width=64, layers=2, num_experts=4, router_kwargs={"seed": 5}).train()
        head.set_grad_checkpointing(grad_checkpointing)
        obj = MoTEObjective(wmr={"seed": 7}, fuse_paths=fuse)
        o = obj(head, feats, classes, labels, torch.tensor(50.0))
        o.loss.backward()
        blocks = head.transformer.resblocks
        grads = [blocks[0].mlp.experts[3].c_fc.weight.grad, blocks[0].attn.in_proj_weight.grad, blocks[0].ln_2.weight.grad,
                 blocks[1].attn.in_proj_weight.grad, head.frame_position_embeddings.weight.grad]
        outs.append((o, [g.clone() for g in grads]))
    (a, ga), (b, gb) = outs
    assert a.taus == b.taus
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.logits_wmr, b.logits_wmr, atol=1e-6)
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    for x, y in zip(ga, gb):
        assert x.abs().sum() > 0 and torch.allclose(x, y, atol=1e-6)


def test_unfused_paths_keep_the_routers_auxiliary_loss(classes):
    # the merged-weights forward of the unfused path forgot the expert path's routing: topk's aux loss was dropped
    feats, labels = torch.randn(4, 8, 64), torch.tensor([0, 1, 2, 3])
    outs = []
    for fuse in (True, False):
        torch.manual_seed(3)
        head = TemporalHead(width=64, layers=2, num_experts=4, router="topk", router_kwargs={"seed": 5}).train()
        outs.append(MoTEObjective(wmr={"seed": 7}, fuse_paths=fuse)(head, feats, classes, labels, torch.tensor(50.0)))
    fused, unfused = outs
    assert set(unfused.terms) == set(fused.terms) == {"te", "wmr", "mse", "aux"}
    assert unfused.terms["aux"] > 0 and torch.allclose(unfused.terms["aux"], fused.terms["aux"], atol=1e-6)
    assert torch.allclose(unfused.loss, fused.loss, atol=1e-5)
    # Switch's 1e-2 on the load-balancing loss, ST-MoE's 1e-3 on the z-loss (aux_weight scales both)
    assert (MoTEObjective().aux.coef, MoTEObjective().aux.z_coef) == (1e-2, 1e-3)
    assert (MoTEObjective(aux_weight=1.0).aux.coef, MoTEObjective(aux_weight=1.0).aux.z_coef) == (1.0, 0.1)


def test_copies_share_the_first_attention_and_route_each_segment():
    torch.manual_seed(0)
    head = TemporalHead(width=64, layers=2, num_experts=3).eval()
    e = torch.randn(5, 8, 64)
    with torch.no_grad(), routing_plan(head, [(5, 0), (5, 2)]):
        both = head.video_features(e, copies=2)  # [10, T, D]
    with torch.no_grad():
        with routing_plan(head, 0):
            first = head.video_features(e)
        with routing_plan(head, 2):
            second = head.video_features(e)
        rho = torch.rand(5)
        with routing_plan(head, [(5, 0), (5, 2)]):
            modulated = head.video_features(e, rho, copies=2)
        with routing_plan(head, 2):
            modulated_second = head.video_features(e, rho)
    assert both.shape == (10, 8, 64)
    assert torch.allclose(both[:5], first, atol=1e-6) and torch.allclose(both[5:], second, atol=1e-6)
    assert not torch.allclose(first, second)
    assert torch.allclose(modulated[5:], modulated_second, atol=1e-6)


def test_loss_terms_follow_eq10(classes):
    torch.manual_seed(4)
    head = TemporalHead(width=64, layers=1, num_experts=2, router="fixed", router_kwargs={"expert": 1}).train()
    obj = MoTEObjective(wmr={"sampling": "point"}, wmr_weight=0.5, mse_weight=0.1, fuse_paths=False)
    feats, labels, s = torch.randn(3, 4, 64), torch.tensor([0, 1, 2]), 20.0
    out = obj(head, feats, classes, labels, torch.tensor(s))
    with torch.no_grad():
        exp_path = cosine_logits(feats + head.temporal_features(feats), classes)  # train mode: fixed router → expert 1
        head.eval()
        wmr_feats = feats + head.temporal_features(feats)  # τ = ∞ → mean merge, as eval
    ce = F.cross_entropy(s * exp_path, labels)
    ce_wmr = F.cross_entropy(s * cosine_logits(wmr_feats, classes), labels)
    mse = F.mse_loss(wmr_feats, feats)
    assert math.isclose(out.loss.item(), (ce + 0.5 * ce_wmr + 0.1 * mse).item(), rel_tol=1e-5)
    assert out.taus == {"transformer.resblocks.0.mlp": math.inf}


def test_baseline_and_switches(classes):
    head = TemporalHead(width=64, layers=1, num_experts=0).train()
    with pytest.raises(ValueError, match="WMR needs experts"):
        MoTEObjective()(head, torch.randn(2, 4, 64), classes, torch.tensor([0, 1]), 10.0)
    out = MoTEObjective(wmr_weight=0, mse_weight=0)(head, torch.randn(2, 4, 64), classes, torch.tensor([0, 1]), 10.0)
    assert set(out.terms) == {"te"} and out.logits_wmr is None
    moe = TemporalHead(width=64, layers=1, num_experts=2).train()
    for kind in ("kl", "mse"):
        o = MoTEObjective(wmr_loss=kind)(moe, torch.randn(2, 4, 64), classes, torch.tensor([0, 1]), 10.0)
        assert o.terms["wmr"] >= 0
    o = MoTEObjective(expert_data="all")(moe, torch.randn(2, 4, 64), classes, torch.tensor([0, 1]), 10.0)
    assert torch.isfinite(o.loss)


def test_tfm_matches_hand_built_case():
    # D = 2, unit class vectors at known angles; T = 2 frames averaging to direction (1, 0).
    frames = torch.tensor([[[1.0, 0.2], [1.0, -0.2]]])  # mean (1, 0)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    c, s = math.cos(0.3), math.sin(0.3)
    source = torch.tensor([[c, s], [0.0, -1.0], [-1.0, 0.0]])
    # K = 2: nearest targets to (1,0): t0 (1), t1 (0) [tie with t1 vs t2? t2 = -1, so t1]
    # nearest sources: s0 (cos .3), s1 (0)
    # S = [[t0·s0, t0·s1], [t1·s0, t1·s1]] = [[cos.3, 0], [sin.3, -1]]; row max = [cos.3, sin.3]
    m = (c + s) / 2
    expected = math.exp(-(1 - m) / 0.05)
    rho = semantic_association(frames, target, source, k=2, gamma=0.05)
    assert rho.shape == (1,)
    assert math.isclose(rho.item(), expected, rel_tol=1e-5)
    # class features of any length (raw text-tower output) are normalised first: ρ stays in (0, 1]
    scaled = semantic_association(frames, target * torch.tensor([[3.0], [0.5], [7.0]]), source * 4.0, k=2, gamma=0.05)
    assert math.isclose(scaled.item(), expected, rel_tol=1e-5)
    # target = source (close-set, few-shot): M = 1 up to rounding, which never lifts ρ above 1
    feats = torch.nn.functional.normalize(torch.randn(7, 64, generator=torch.Generator().manual_seed(0)), dim=-1) * 3
    same = semantic_association(torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(1)), feats, feats.clone())
    assert (same <= 1.0).all() and torch.allclose(same, torch.ones(16), atol=1e-5)
    # ρ modulates the temporal term only: z = e + ρ·h(e)
    head = TemporalHead(width=2, layers=1, heads=1, num_experts=0, tfm_k=2).eval()
    head.set_source_class_features(source)
    with torch.no_grad():
        e, h = frames, head.temporal_features(frames)
        assert torch.allclose(head(frames, target, modulation=True), cosine_logits(e + expected * h, target), atol=1e-6)
        assert torch.allclose(head(frames, target, modulation=False), cosine_logits(e + h, target), atol=1e-6)


def test_evaluation_is_deterministic_and_leaves_global_rng(model, classes):
    model.eval()
    model.head.set_source_class_features(classes[:4])
    frames = torch.randn(2, 8, 3, 32, 32)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = model(frames, classes, modulation=True)
        b = model(frames, classes, modulation=True)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())
    assert all(c.merge_count == 1 for _, c in find_containers(model.head))


def test_merged_eval_equals_collapsed_export_and_param_counts(model, classes, tmp_path):
    model.eval()
    model.head.set_source_class_features(classes[:5])
    frames = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        ref = model(frames, classes, modulation=True)
    # temp folders of saves killed midway: an old one is swept by the next save, a recent one (a save
    # that may still run) is left alone
    old, recent, users = tmp_path / ".mote.mergevid-tmp-k1lled00", tmp_path / ".mote.mergevid-tmp-runn1ng_", tmp_path / ".mote.backup01"
    for d in (old, recent, users):
        d.mkdir()
        (d / "head.safetensors").write_text("partial")
        os.utime(d, (0, 0) if d != recent else None)
    save_model(model, tmp_path / "mote")
    assert not old.exists() and recent.exists() and users.exists()  # only our own old temp folders go
    with pytest.raises(FileExistsError):
        save_model(model, tmp_path / "mote")
    reloaded = load(tmp_path / "mote")
    # a file where the model folder goes is refused, --overwrite or not, and left as it was
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="afile is a file, not a model folder"):
        save_model(model, tmp_path / "afile", overwrite=True)
    assert (tmp_path / "afile").read_text() == "mine" and not list(tmp_path.glob(".afile*"))
    # an edited, broken config.json is named
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "mote", broken)
    (broken / "config.json").write_text("{bad json")
    with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON"):
        load(broken)
    export_dense(model, tmp_path / "dense")
    dense = load(tmp_path / "dense")
    with torch.no_grad():
        assert torch.allclose(reloaded(frames, classes, modulation=True), ref, atol=1e-6)
        assert torch.allclose(dense(frames, classes, modulation=True), ref, atol=1e-5)
    baseline = build_video_clip(clip_name=TINY, temporal_layers=2, num_experts=0)
    assert sorted(dense.head.state_dict()) == sorted(k for k in baseline.head.state_dict())
    assert count_parameters(dense.head) == count_parameters(baseline.head)
    assert dense.head.source_class_features.shape == (5, 64)
    # the CLIP part loads into plain open_clip
    import open_clip
    from safetensors.torch import load_file

    plain = open_clip.create_model(TINY)
    plain.load_state_dict(load_file(str(tmp_path / "dense" / "clip.safetensors")), strict=True)
    # open_clip_config.json: the folder alone rebuilds it (a tower with experts gets none: plain open_clip cannot load it)
    import copy
    import json

    from mergekit_video import add_experts

    folder_cfg = json.loads((tmp_path / "dense" / "open_clip_config.json").read_text())
    assert folder_cfg["model_cfg"]["quick_gelu"] == model.config["clip"]["quick_gelu"]
    assert (tmp_path / "mote" / "open_clip_config.json").exists()  # experts in the head only: the CLIP part is plain
    with_visual_experts = copy.deepcopy(model)
    add_experts(with_visual_experts.clip.visual, "transformer.resblocks.0.mlp", 2)
    save_model(with_visual_experts, tmp_path / "visual_experts")
    assert not (tmp_path / "visual_experts" / "open_clip_config.json").exists()


def test_plain_open_clip_names_keep_the_activation():
    from mergekit_video.models.clip import plain_open_clip_name

    assert plain_open_clip_name({"name": "ViT-B-16", "quick_gelu": True}) == "ViT-B-16-quickgelu"  # OpenAI weights
    assert plain_open_clip_name({"name": "ViT-B-16", "quick_gelu": False}) == "ViT-B-16"
    assert plain_open_clip_name({"name": "ViT-L-14-quickgelu", "quick_gelu": True}) == "ViT-L-14-quickgelu"
    assert plain_open_clip_name({"name": "ViT-B-16-quickgelu", "quick_gelu": False}) is None
    assert plain_open_clip_name({"name": "converted-vit", "quick_gelu": True}) is None
    assert plain_open_clip_name({"name": TINY, "quick_gelu": True}) is None  # bundled with mergekit_video only


def test_temporal_module_parameter_counts_match_paper_table_2c():
    # ViT-L/14 head: 6 layers, D = 768. Paper: 42.6M merged vs 127.6M with 4 experts.
    plain = count_parameters(TemporalHead(width=768, layers=6, num_experts=0))
    moe = count_parameters(TemporalHead(width=768, layers=6, num_experts=4))
    assert round(plain / 1e6, 1) == 42.6
    assert round(moe / 1e6, 1) == 127.6


def test_failed_download_names_the_recipe_key_and_stays_quiet(tmp_path, monkeypatch, capfd, caplog):
    import logging

    import mergekit_video.models.clip as clip_mod

    monkeypatch.setattr(clip_mod, "hub_reachable", lambda *a, **k: False)  # as on an offline machine
    root = logging.getLogger()
    handlers = list(root.handlers)
    with caplog.at_level(logging.ERROR), pytest.raises(clip_mod.PretrainedWeightsError) as info:
        clip_mod.create_clip("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))  # empty cache: nothing to load
    msg = str(info.value)
    assert msg.startswith("could not download the ViT-B-32 weights for pretrained tag 'openai' (no network access).")
    assert "set model.pretrained=/path/to/weights.pt" in msg
    assert "mergevid run RECIPE model.pretrained=/path/to/weights.pt" in msg
    assert not [r for r in caplog.records if "open_clip" in r.pathname]  # open_clip's own error line is dropped
    assert "Failed to download" not in capfd.readouterr().err
    assert root.handlers == handlers  # logging setup untouched (no basicConfig side effect)
    with pytest.raises(FileNotFoundError, match=r"^pretrained weights file '/no/such/ViT-B-32.pt' does not exist \(set model.pretrained\)$"):
        clip_mod.create_clip("ViT-B-32", pretrained="/no/such/ViT-B-32.pt")


def test_tokenizer_failures_say_what_to_install_or_cache(monkeypatch):
    import open_clip

    from mergekit_video.models.clip import TokenizerUnavailableError, load_tokenizer

    assert load_tokenizer(TINY)(["a video of running"]).shape == (1, 77)  # bundled BPE: no download

    def missing_package(name):
        raise ImportError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(open_clip, "get_tokenizer", missing_package)
    with pytest.raises(TokenizerUnavailableError, match=r"^the ViT-B-16-SigLIP text tokenizer needs the 'transformers' package: pip install transformers$"):
        load_tokenizer("ViT-B-16-SigLIP")

    def offline(name):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(TokenizerUnavailableError, match=r"point HF_HOME at that cache"):
        load_tokenizer("ViT-B-16-SigLIP")


def test_load_names_an_unreadable_weights_file(model, tmp_path):
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / "head.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match=r"^.*/m/head\.safetensors is unreadable \(SafetensorError: "):
        load(tmp_path / "m")


def test_head_grad_checkpointing_replays_the_routing_and_leaves_the_routers_in_step(classes):
    # recomputation in backward must draw the same experts; later steps must route as without checkpointing
    torch.manual_seed(2)
    feats, labels = torch.randn(4, 8, 64), torch.tensor([0, 1, 2, 3])
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(3)
        head = TemporalHead(width=64, layers=3, num_experts=4, router_kwargs={"seed": 5}).train()
        head.set_grad_checkpointing(ckpt)
        obj = MoTEObjective(wmr={"seed": 7})
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
        losses, routes = [], []
        for _ in range(4):
            out = obj(head, feats, classes, labels, torch.tensor(50.0))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
            routes.append([int(c.last_routing.indices.reshape(-1)[0]) for _, c in find_containers(head)])
        runs.append((losses, routes, head.state_dict()))
    (la, ra, sa), (lb, rb, sb) = runs
    assert ra == rb and len({tuple(r) for r in ra}) > 1
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(la, lb))
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


# -- CLIP builds: QuickGELU from local files, custom-text towers, the text-feature cache key --------------
@pytest.fixture(scope="module")
def extra_clip_configs(tmp_path_factory):
    """Tiny open_clip configs: plain GELU (as ViT-B-16's config) and a custom-text (``text.*``) layout."""
    import json

    import open_clip

    base = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    d = tmp_path_factory.mktemp("clip_cfgs")
    (d / "mkv-test-gelu.json").write_text(json.dumps(base))
    (d / "mkv-test-customtext.json").write_text(json.dumps({**base, "custom_text": True}))
    open_clip.add_model_config(d)
    return "mkv-test-gelu", "mkv-test-customtext"


def _module_holding(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state dict is exactly ``tensors`` (dotted names become submodules)."""
    root = torch.nn.Module()
    for key, value in tensors.items():
        *path, leaf = key.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, value.clone())
    return root


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_openai_torchscript_file_gets_quick_gelu_and_a_plain_state_dict_needs_the_flag(extra_clip_configs, tmp_path):
    import open_clip

    from mergekit_video.models.clip import create_clip, is_torchscript_archive

    name = extra_clip_configs[0]
    torch.manual_seed(0)
    openai_like = open_clip.create_model(name, force_quick_gelu=True).eval()
    # OpenAI released TorchScript archives: the CLIP state dict plus three metadata entries
    released = {k: v for k, v in openai_like.state_dict().items() if k != "attn_mask"}
    released |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    torch.jit.script(_module_holding(released)).save(str(tmp_path / "ViT-openai.pt"))
    torch.save(openai_like.state_dict(), tmp_path / "resaved.pt")
    assert is_torchscript_archive(tmp_path / "ViT-openai.pt") and not is_torchscript_archive(tmp_path / "resaved.pt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = openai_like.encode_image(images)
        built = {}
        for label, path, force in [("jit", "ViT-openai.pt", None), ("plain", "resaved.pt", None), ("forced", "resaved.pt", True)]:
            model, cfg = create_clip(name, pretrained=str(tmp_path / path), force_quick_gelu=force)
            built[label] = (cfg["quick_gelu"], (model.encode_image(images) - expected).abs().max().item())
    assert built["jit"] == (True, 0.0)
    assert built["forced"] == (True, 0.0)
    assert built["plain"][0] is False and built["plain"][1] > 1e-4  # GELU on QuickGELU weights: other features
    # False turns QuickGELU off even where the config has it
    model, cfg = create_clip(TINY, force_quick_gelu=False)
    assert cfg["quick_gelu"] is False and cfg["model_cfg"]["quick_gelu"] is False
    assert not any(type(m).__name__ == "QuickGELU" for m in model.modules())


class _Payload:
    """Unpickling it writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_dressed_as_torchscript_is_never_unpickled(tmp_path):
    import zipfile

    from mergekit_video.models.clip import PretrainedWeightsError, create_clip, is_torchscript_archive

    marker = tmp_path / "payload-ran"
    for extra in ("code/__torch__.py", "sub/constants.pkl"):  # TorchScript-looking records, not at torch's place
        path = tmp_path / f"ViT-{extra.replace('/', '_')}.pt"
        torch.save({"x": _Payload(str(marker))}, path)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr(z.namelist()[0].split("/")[0] + "/" + extra, "")
        assert not is_torchscript_archive(path)
        with pytest.raises(PretrainedWeightsError, match="could not load CLIP weights"):
            create_clip(TINY, pretrained=str(path))
    assert not marker.exists()


def test_text_feature_cache_keys_on_activation_and_on_custom_text_weights(extra_clip_configs, tmp_path):
    from mergekit_video.models.clip import text_tower_state

    gelu, custom = extra_clip_configs
    cache = ClassFeatureCache(directory=tmp_path / "cache")
    names = ["a", "b"]
    feats = {}
    for label, kw in [("gelu", {}), ("quick", {"force_quick_gelu": True})]:
        torch.manual_seed(0)  # the same weights, built with either activation
        m = build_video_clip(clip_name=gelu, temporal_layers=1, num_experts=0, **kw)
        feats[label] = (m.class_features(names, templates="single", cache=cache), m.class_features(names, templates="single"))
    assert (cache.misses, cache.hits) == (2, 0)
    for cached, fresh in feats.values():
        assert torch.equal(cached, fresh)
    assert (feats["gelu"][1] - feats["quick"][1]).abs().max() > 1e-4

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_video_clip(clip_name=custom, temporal_layers=1, num_experts=0))
    assert all(k.startswith("text.") for k in text_tower_state(models[0].clip))
    a = models[0].class_features(names, templates="single", cache=cache)
    b = models[1].class_features(names, templates="single", cache=cache)
    assert (cache.misses, cache.hits) == (4, 0)  # other text weights: another entry
    assert torch.equal(b, models[1].class_features(names, templates="single")) and not torch.equal(a, b)


def test_custom_text_model_saves_and_loads(extra_clip_configs, tmp_path, classes):
    custom = extra_clip_configs[1]
    torch.manual_seed(0)
    m = build_video_clip(clip_name=custom, temporal_layers=1, num_experts=2).eval()
    save_model(m, tmp_path / "m")
    back = load(tmp_path / "m").eval()
    assert type(back.clip).__name__ == "CustomTextCLIP"
    frames = torch.randn(2, 3, 3, 32, 32)
    text = m.class_features(["a", "b", "c"], templates="single")
    with torch.no_grad():
        assert torch.equal(back(frames, text), m(frames, text))
    assert torch.equal(back.class_features(["a", "b", "c"], templates="single"), text)


@pytest.mark.parametrize("kw, said", [
    ({"tfm_gamma": 0.0}, "tfm_gamma (γ of temporal feature modulation) must be a positive finite number, got 0.0"),
    ({"tfm_gamma": -0.05}, "must be a positive finite number, got -0.05"),
    ({"tfm_k": 0}, "tfm_k (K of temporal feature modulation) must be an integer >= 1, got 0"),
])
def test_tfm_settings_are_checked_when_the_head_is_built(kw, said):
    # γ = 0 gave NaN logits, K = 0 an IndexError deep in the TFM
    with pytest.raises(ValueError, match=re.escape(said)):
        TemporalHead(width=64, layers=1, **kw)


def test_a_model_with_experts_in_its_visual_tower_saves_and_loads_without_its_recipe(tmp_path):
    """config.json records the CLIP part's containers (module, experts, router and its settings, merge):
    load, a trainer checkpoint and the dense export rebuild them; the export loads into plain open_clip."""
    import json

    import open_clip

    from mergekit_video import add_experts
    from mergekit_video.training.checkpoint import CheckpointManager

    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)
    add_experts(model.clip.visual, "transformer.resblocks.1.mlp", 3, router="topk", init="copy_noise", k=2)
    add_experts(model.clip.visual, "transformer.resblocks.0.attn", 2, router="multinomial", merge="temperature_softmax",
                merge_kwargs={"tau": torch.tensor(0.5)}, temperature=2.0)  # a tensor argument is stored as a number
    frames = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval().encode_frames(frames)
    saved = save_model(model, tmp_path / "m")
    record = json.loads((saved / "config.json").read_text())["clip_experts"]
    assert record == [
        {"module": "visual.transformer.resblocks.0.attn", "num_experts": 2, "router": "multinomial",
         "router_kwargs": {"temperature": 2.0, "granularity": "batch"}, "merge": "temperature_softmax", "merge_kwargs": {"tau": 0.5}},
        {"module": "visual.transformer.resblocks.1.mlp", "num_experts": 3, "router": "topk",
         "router_kwargs": {"dim": 64, "k": 2, "granularity": "token", "renormalize": True, "channels_first": False},
         "merge": "mean", "merge_kwargs": {}},
    ]
    ckpt = CheckpointManager(directory=tmp_path / "ckpt").save(step=1, epoch=0, model_state=model.state_dict(), extra={"model_config": model.config})
    for source in (saved, ckpt):
        back = load(source)
        assert [(n, c.num_experts, c.merge) for n, c in find_containers(back.clip)] == [
            ("visual.transformer.resblocks.0.attn", 2, "temperature_softmax"), ("visual.transformer.resblocks.1.mlp", 3, "mean")]
        with torch.no_grad():
            assert torch.equal(back.encode_frames(frames), expected)
    dense = export_dense(load(saved), tmp_path / "dense")
    assert "clip_experts" not in json.loads((dense / "config.json").read_text())
    plain = open_clip.create_model("local-dir:" + str(dense))
    with torch.no_grad():
        ours = load(dense).clip.visual(frames.flatten(0, 1))
        assert torch.allclose(plain.visual(frames.flatten(0, 1)), ours, atol=1e-6)
        assert torch.allclose(ours.view(2, 4, -1), expected, atol=1e-5)
    from mergekit_video.cli.main import main as cli_main

    with pytest.MonkeyPatch.context() as mp:
        lines: list[str] = []
        mp.setattr("rich.console.Console.print", lambda self, *a, **k: lines.append(" ".join(map(str, a))))
        assert cli_main(["export", str(saved), str(tmp_path / "dense_cli"), "--dense"]) == 0
    tower = sum(p.numel() for p in load(saved).visual.parameters()), sum(p.numel() for p in load(dense).visual.parameters())
    assert f", visual tower {tower[1] / 1e6:.2f}M (was {tower[0] / 1e6:.2f}M); plain open_clip" in " ".join(lines)  # its experts collapsed too


def test_weights_of_another_model_are_refused_in_a_few_lines_naming_counts_and_first_keys(tmp_path):
    """torch's load_state_dict error lists every key (kB for a ViT); the error gives counts and the first keys."""
    from mergekit_video.models.clip import PretrainedWeightsError, create_clip

    other = {"visual.proj": torch.zeros(3, 3), **{f"extra.{i}": torch.zeros(1) for i in range(40)}}
    path = tmp_path / "other.pt"
    torch.save(other, path)
    with pytest.raises(PretrainedWeightsError) as info:
        create_clip("mergevid-tiny-vit", pretrained=str(path))
    message = str(info.value)
    assert len(message) < 900, message
    assert re.search(r"its tensors do not fit: \d+ missing keys \([^)]*, \.\.\.\); 40 unexpected keys \(extra\.0, extra\.1, extra\.2, \.\.\.\)", message), message


def test_a_text_cache_write_a_kill_cut_short_leaves_no_temp_file_behind(model, tmp_path):
    """The cache folder is shared by runs (~/.cache/mergekit_video): the next write of the entry removes the
    temp file of a killed writer; a live writer's is kept."""
    import subprocess
    import sys

    from mergekit_video.utils.io import _host_tag, temp_owner

    cache = ClassFeatureCache(directory=tmp_path)
    model.class_features(["a", "b"], templates="single", cache=cache)
    folder = cache.directory
    entry = next(folder.glob("*.safetensors"))
    entry.unlink()  # as if the killed write had been its first
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    stale, live = (folder / f".{entry.name}.{dead}-{_host_tag()}.abcd1234.tmp", folder / f".{entry.name}.{temp_owner()}.abcd5678.tmp")
    stale.write_bytes(b"half")
    live.write_bytes(b"")
    model.class_features(["a", "b"], templates="single", cache=cache)
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry.name, live.name])
